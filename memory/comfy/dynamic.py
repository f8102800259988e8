"""The thin calls into comfy-aimdo (dynamic VRAM): a model's VBAR, its resident bytes, the watermark cap,
and aimdo's own usage figure. What to call when is decided in memory.decisions."""
from __future__ import annotations

from .host import aimdo_modules


def vbar_of(patcher):
    """The VBAR a dynamic patcher's weights page through on its load device (None before its first load)."""
    return getattr(patcher.model, "dynamic_vbars", {}).get(patcher.load_device)


def vbar_resident_bytes(patcher) -> int:
    vbar = vbar_of(patcher)
    return int(vbar.loaded_size()) if vbar is not None else 0


def loaded_outside_vbar_bytes(patcher) -> int:
    """Weights ComfyUI force-loaded onto the device outside the VBAR (small ones, buffers, resized LoRA)."""
    return int(getattr(patcher.model, "model_loaded_weight_memory", 0))


def cap_vbar(patcher, cap_bytes: int) -> bool:
    """Lower the VBAR's watermark to `cap_bytes`: pages above it are freed and never fault in again until
    the next load (ModelPatcherDynamic.load prioritizes the VBAR, which resets the watermark). Not
    set_watermark_limit: that is a floor for eviction, not a cap."""
    vbar = vbar_of(patcher)
    if vbar is None or not hasattr(vbar, "set_watermark"):
        return False
    vbar.set_watermark(int(cap_bytes))
    return True


def aimdo_vram_usage() -> dict[str, int] | None:
    """{"cuda:N": bytes} aimdo counts as used on each device it manages (its hooked CUDA allocations, torch's
    included, and VBAR pages), or None where aimdo is not paging. aimdo 0.1 has one device and one figure."""
    control, _ = aimdo_modules()
    if control is None or getattr(control, "lib", None) is None or not hasattr(control, "get_total_vram_usage"):
        return None
    import torch
    get_devctx = getattr(control, "get_devctx", None)
    if get_devctx is None:
        return {f"cuda:{torch.cuda.current_device()}": int(control.get_total_vram_usage())}
    usage = {}
    for index in range(torch.cuda.device_count()):
        try:
            usage[f"cuda:{index}"] = int(control.lib.get_total_vram_usage(get_devctx(index)))
        except RuntimeError:  # aimdo does not manage this device
            continue
    return usage
