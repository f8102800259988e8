"""Generated models: nothing is downloaded, nothing is committed.

- `tiny_sd15_checkpoint()`: the smallest UNet ComfyUI detects as SD1.5 (70 tensors, 13.6 M params:
  one level, one res block, one transformer, no middle block) plus a TAESD-shaped VAE (2.45 M
  params), in one safetensors checkpoint that CheckpointLoaderSimple loads.
- `full_sd15_unet()`: a full-size SD1.5-shaped UNet (860 M params) with random weights, for
  benchmarks: memory and time do not depend on the values.
Weights are seeded random numbers, so every generation gives the same bytes. Files are written
into the cache (${XDG_CACHE_HOME:-~/.cache}/comfyui-headroom/models/). ComfyUI must be importable
(tests/support/comfy_host.py puts it on the path); its own module classes give the shapes.
"""
from __future__ import annotations

import os
import pathlib

import torch

from hosts import cache_root  # tests/support is on sys.path wherever this runs

TINY_SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[0, 0], transformer_depth_middle=-2,
    num_heads=8, context_dim=768, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
)
FULL_SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
    num_heads=8, context_dim=768, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
)
GENERATOR_VERSION = 1  # bump when the recipe changes, so cached files are regenerated
TINY_CHECKPOINT_NAME = f"headroom-tiny-sd15-v{GENERATOR_VERSION}.safetensors"
TINY_TE_CHECKPOINT_NAME = f"headroom-tiny-sd15-te-v{GENERATOR_VERSION}.safetensors"


def models_dir() -> pathlib.Path:
    path = cache_root() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _seeded_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fill every tensor with seeded noise (ComfyUI's disable_weight_init leaves memory uninitialised)."""
    generator = torch.Generator().manual_seed(seed)
    filled = {}
    for key in sorted(module.state_dict()):
        shape = module.state_dict()[key].shape
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02
        if "norm" in key and key.endswith(".weight"):
            values += 1.0  # normalisation gains near 1 keep activations alive through the layers
        filled[key] = values.contiguous()
    return filled


def _unet_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    return _seeded_state_dict(unet, seed)


def _taesd_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from comfy.taesd.taesd import TAESD
    with torch.device("meta"):
        taesd = TAESD(latent_channels=4)
    state = _seeded_state_dict(taesd, seed)
    state["vae_scale"] = torch.tensor(1.0)
    state["vae_shift"] = torch.tensor(0.0)
    return state


def _write_atomically(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    save_file(tensors, str(partial))
    partial.replace(path)


def tiny_sd15_checkpoint() -> pathlib.Path:
    path = models_dir() / TINY_CHECKPOINT_NAME
    if not path.exists():
        tensors = {f"model.diffusion_model.{k}": v for k, v in _unet_state_dict(TINY_SD15_UNET, seed=1).items()}
        tensors.update({f"first_stage_model.{k}": v for k, v in _taesd_state_dict(seed=2).items()})
        _write_atomically(path, tensors)
    return path


def _clip_l_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """SD1.5's text encoder at full size (CLIP-L: 12 layers, 123 M params), as ComfyUI builds it, in fp16."""
    import json
    import comfy.clip_model
    import comfy.ops
    config = json.loads((pathlib.Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
    with torch.device("meta"):
        text_model = comfy.clip_model.CLIPTextModel(config, torch.float16, None, comfy.ops.disable_weight_init)
    return {key: value.half() for key, value in _seeded_state_dict(text_model, seed).items()}


def tiny_sd15_te_checkpoint() -> pathlib.Path:
    """The tiny checkpoint plus a full-size SD1.5 text encoder (+246 MB), for workflows that encode text:
    a checkpoint's SD1.5 text encoder has a fixed shape, so a smaller one would load half-initialised."""
    path = models_dir() / TINY_TE_CHECKPOINT_NAME
    if not path.exists():
        tensors = {f"model.diffusion_model.{k}": v for k, v in _unet_state_dict(TINY_SD15_UNET, seed=1).items()}
        tensors.update({f"first_stage_model.{k}": v for k, v in _taesd_state_dict(seed=2).items()})
        tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in _clip_l_state_dict(seed=5).items()})
        _write_atomically(path, tensors)
    return path


GENERATED_CHECKPOINTS = {TINY_CHECKPOINT_NAME: tiny_sd15_checkpoint, TINY_TE_CHECKPOINT_NAME: tiny_sd15_te_checkpoint}


def lacks_text_encoder(checkpoint_name: str) -> bool:
    """Whether a generated checkpoint has no text encoder (workflows on it need conditioning built without CLIP)."""
    return checkpoint_name == TINY_CHECKPOINT_NAME


def full_sd15_unet() -> pathlib.Path:
    path = models_dir() / f"headroom-full-sd15-unet-v{GENERATOR_VERSION}.safetensors"
    if not path.exists():
        _write_atomically(path, _unet_state_dict(FULL_SD15_UNET, seed=3))
    return path


def text_conditioning(seed: int, batch: int = 1) -> list:
    """SD1.5-shaped CONDITIONING without CLIP: [[cond [B, 77, 768], {"pooled_output": [B, 768]}]]."""
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn((batch, 77, 768), generator=generator)
    pooled = torch.randn((batch, 768), generator=generator)
    return [[cond, {"pooled_output": pooled}]]


def small_clip():
    """A real SD1.5 text encoder (CLIP-L shaped, 2 layers, 43.5 M params) built through ComfyUI's API.

    Only the layer count and MLP width are reduced: the 49408x768 token embedding and width 768
    are what SD1.5's tokenizer and cross-attention need. Weights are seeded noise, set in place.
    """
    import comfy.sd
    detection_key = {"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(64, 768)}
    clip = comfy.sd.load_text_encoder_state_dicts(
        [detection_key], model_options={"clip_l_model_config": {"num_hidden_layers": 2, "intermediate_size": 64}})
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, tensor in sorted(clip.cond_stage_model.state_dict().items()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return clip
