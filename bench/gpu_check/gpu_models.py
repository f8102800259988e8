"""Random-weight models shaped like the real ones, generated in seconds and loaded through ComfyUI's own loaders.

Shapes come from ComfyUI's own module classes (built on the meta device, so nothing is allocated), the
values from torch.randn on the check's device in the model's dtype, copied to RAM as a file's weights
would be; ComfyUI then detects the family from the keys and shapes (comfy.sd.load_diffusion_model_state_dict,
comfy.sd.VAE), exactly as for a downloaded file. Memory and time do not depend on the values.

  SD1.5   the full UNet (860 M parameters); in the dry run, the suite's tiny SD1.5 (13.6 M)
  SDXL    the full base UNet (2.57 G); in the dry run the tiny SD1.5 stands in (an SDXL that ComfyUI
          detects cannot be made small: its detection fixes the transformer depths)
  Flux    the Flux.1-dev DiT (hidden 3072, 24 heads, guidance embedding); depth as the check sets it; in
          the dry run hidden 128, one double and one single block
  VAE     the SD/SDXL AutoencoderKL (83.7 M); in the dry run a TAESD-shaped one (2.45 M), as the suite uses
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

import torch

_SUPPORT = str(pathlib.Path(__file__).resolve().parents[2] / "tests" / "support")
if _SUPPORT not in sys.path:
    sys.path.append(_SUPPORT)  # after ComfyUI's folder: its `server` module must win over tests/support's
from generated_models import FULL_SD15_UNET, TINY_SD15_UNET  # noqa: E402  (the suite's SD1.5 shapes)

SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, num_head_channels=64, context_dim=2048, adm_in_channels=2816, num_classes="sequential",
    use_spatial_transformer=True, use_linear_in_transformer=True, legacy=False,
)
FLUX_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
FLUX_TINY = dict(FLUX_DEV, hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)


@dataclasses.dataclass(frozen=True)
class Family:
    """How to condition and size a latent for one model family."""
    name: str
    latent_channels: int
    context: tuple[int, int]  # (tokens, width) of the text conditioning
    pooled: int | None  # width of pooled_output, when the family takes one
    guidance: float | None = None  # Flux's distilled guidance
    cfg: float = 7.0


SD15 = Family("SD1.5", 4, (77, 768), 768)
SDXL = Family("SDXL", 4, (77, 2048), 1280)
FLUX = Family("Flux", 16, (256, 4096), 768, guidance=3.5, cfg=1.0)


def _shapes(module: torch.nn.Module) -> list[tuple[str, torch.Size]]:
    return [(key, value.shape) for key, value in sorted(module.state_dict().items())]


def random_state_dict(shapes, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Seeded noise for every tensor, made on `device` and handed over in RAM, as a file's weights are."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    with torch.no_grad():  # plain tensors, as a file's: ComfyUI may make Parameters of them (dynamic VRAM)
        for key, shape in shapes:
            values = torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(0.02)
            if "norm" in key and key.endswith((".weight", ".scale")):
                values.add_(1.0)  # gains near 1 keep activations alive through the layers
            tensors[key] = values.to("cpu")
    return tensors


def unet_state_dict(config: dict, device, dtype, seed: int) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    return random_state_dict(_shapes(unet), device, dtype, seed)


def flux_state_dict(params: dict, device, dtype, seed: int) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.flux import model as flux_model
    fields = {field.name for field in dataclasses.fields(flux_model.FluxParams)}  # older hosts have fewer
    with torch.device("meta"):
        flux = flux_model.Flux(image_model="flux", operations=comfy.ops.disable_weight_init,
                               **{key: value for key, value in params.items() if key in fields})
    return random_state_dict(_shapes(flux), device, dtype, seed)


def vae_state_dict(device, dtype, seed: int) -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    return random_state_dict(_shapes(vae), device, dtype, seed)


def taesd_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """The dry run's VAE: TAESD-shaped (2.45 M parameters), as the suite's tiny checkpoint has it."""
    from comfy.taesd.taesd import TAESD
    with torch.device("meta"):
        taesd = TAESD(latent_channels=4)
    state = random_state_dict(_shapes(taesd), torch.device("cpu"), torch.float32, seed)
    state["vae_scale"] = torch.tensor(1.0)
    state["vae_shift"] = torch.tensor(0.0)
    return state


def load_diffusion_model(state_dict: dict, expected: str):
    """ComfyUI's loader for a diffusion model state dict; fails unless ComfyUI detected `expected`."""
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model_state_dict(state_dict)
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not detect the generated {expected} model")
    detected = type(patcher.model.model_config).__name__
    if expected.lower().replace(".", "") not in detected.lower().replace(".", "").replace("_", ""):
        raise RuntimeError(f"ComfyUI detected the generated {expected} model as {detected}")
    return patcher


def load_vae(state_dict: dict):
    import comfy.sd
    return comfy.sd.VAE(sd=state_dict)


def parameter_count(state_dict: dict) -> int:
    return sum(tensor.numel() for tensor in state_dict.values())


def conditioning(family: Family, seed: int, batch: int = 1) -> list:
    """CONDITIONING of the family's shape built without a text encoder."""
    generator = torch.Generator().manual_seed(seed)
    tokens, width = family.context
    extra = {}
    if family.pooled is not None:
        extra["pooled_output"] = torch.randn((batch, family.pooled), generator=generator)
    if family.guidance is not None:
        extra["guidance"] = family.guidance
    return [[torch.randn((batch, tokens, width), generator=generator), extra]]


def empty_latent(family: Family, size: int, batch: int = 1) -> torch.Tensor:
    return torch.zeros((batch, family.latent_channels, size // 8, size // 8))
