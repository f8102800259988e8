"""Offload Model's budget on the patcher: trimming resident weights, and undoing what lasts."""
from __future__ import annotations

from .models import is_dynamic, loaded_bytes


def trim_to(patcher, resident_bytes: int) -> int:
    """Drop resident weights down to `resident_bytes`; ComfyUI streams the rest. Returns bytes freed.

    Legacy patcher: partially_unload moves whole castable modules to the offload device and marks
    them for cast-on-use (ComfyUI's low-VRAM path). Dynamic patcher: cap the model's VBAR watermark
    so aimdo never pages more in, then page out the excess.
    """
    resident = loaded_bytes(patcher)
    if is_dynamic(patcher):
        vbar = patcher.model.dynamic_vbars.get(patcher.load_device)
        if vbar is None:
            return 0
        if hasattr(vbar, "set_watermark_limit"):
            vbar.set_watermark_limit(resident_bytes)
        return int(vbar.free_memory(max(0, resident - resident_bytes)))
    if resident <= resident_bytes:
        return 0
    return int(patcher.partially_unload(patcher.offload_device, resident - resident_bytes))


def reset_limits(patcher) -> None:
    """Undo trim_to's lasting part: the dynamic watermark (legacy trimming is undone by the next load)."""
    if is_dynamic(patcher):
        vbar = patcher.model.dynamic_vbars.get(patcher.load_device)
        if vbar is not None and hasattr(vbar, "set_watermark_limit"):
            # no per-VBAR "unlimited" exists: the VBAR's own size (model size x10 in ComfyUI) never binds
            vbar.set_watermark_limit(int(patcher.model_size()) * 10)
