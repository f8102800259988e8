"""Tiled Inpaint's backend: the VAE, ComfyUI's sampling entry point and its progress bar."""
from __future__ import annotations

from .host import model_management
from .models import WRAPPER_KEY
from .oom import free_models_except, is_out_of_memory

def sampler_names() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SCHEDULERS)


def _inject_test_oom(model) -> None:
    """Test hook: transformer_options["headroom"]["test_inject_tile_oom"] = {"times": n} makes the
    next n tiles fail as if out of memory."""
    import torch
    injection = model.model_options.get("transformer_options", {}).get(WRAPPER_KEY, {}).get("test_inject_tile_oom")
    if injection and injection["times"] > 0:
        injection["times"] -= 1
        raise torch.OutOfMemoryError("Headroom test hook: out of memory injected into a tile")


def tile_progress():
    """progress(done, total) on ComfyUI's progress bar: the node's bar in the UI and its websocket
    `progress` events (value/max), one step per tile."""
    import comfy.utils
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return progress


def inpaint_backend(model, vae, steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float):
    """memory.inpaint.TileBackend on ComfyUI: the VAE (whose encode/decode already retry in VAE tiles
    on OOM; the tiled calls are the next rung), and comfy.sample.sample, the entry point KSampler
    uses, so the wrappers other nodes put on `model` (budgets, attention, device) apply to each tile."""
    import comfy.sample
    import comfy.utils
    from ..inpaint import TileBackend
    management = model_management()

    def check_interrupt(step, denoised, x, total_steps):
        # without KSampler's preview callback: its step progress would mix with the tile count
        management.throw_exception_if_processing_interrupted()

    def sample(latent, noise, noise_mask, positive, negative, seed):
        _inject_test_oom(model)
        return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   denoise=denoise, noise_mask=noise_mask, callback=check_interrupt,
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)

    return TileBackend(
        encode=vae.encode,
        encode_tiled=lambda pixels: vae.encode_tiled(pixels, tile_x=256, tile_y=256, overlap=32),
        sample=sample,
        decode=vae.decode,
        decode_tiled=lambda latent: vae.decode_tiled(latent, tile_x=32, tile_y=32, overlap=8),  # latent units
        free_memory=lambda: free_models_except(model, vae),
        is_out_of_memory=is_out_of_memory,
        progress=tile_progress(),
    )
