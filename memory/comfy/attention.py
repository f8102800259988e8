"""ComfyUI's attention kernels, for Sliced Attention."""
from __future__ import annotations

from .host import model_management


def has_fused_attention(device) -> bool:
    """Whether ComfyUI runs attention on `device` through a memory-efficient kernel (PyTorch SDPA
    flash/memory-efficient, xFormers, SageAttention, FlashAttention) rather than math attention."""
    import torch
    device = torch.device(device)
    if device.type == "cpu":
        return False  # ComfyUI's CPU attention is sub-quadratic, whatever the main device runs
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (5, 0):
        return False  # SDPA's memory-efficient kernel needs sm50+ (flash sm80+): Kepler is math only
    management = model_management()
    return bool(management.pytorch_attention_flash_attention() or management.xformers_enabled()
                or management.sage_attention_enabled() or management.flash_attention_enabled())


def comfy_attention_functions() -> dict:
    """ComfyUI's own attention functions for the Sliced Attention methods that delegate to them."""
    from comfy.ldm.modules.attention import get_attention_function
    return {"comfy split": get_attention_function("split"), "sub-quadratic": get_attention_function("sub_quad")}
