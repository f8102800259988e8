"""What the running ComfyUI offers, detected in one place, and its node API.

Every version difference the pack depends on is read here, by looking for the thing itself (a
function, a method, an attribute), never by comparing version numbers; `features()` returns it as
plain data for the decisions in memory.decisions.
"""
from __future__ import annotations

from ..decisions import DYNAMIC_VRAM_OFF, HostFeatures


def model_management():
    import comfy.model_management
    return comfy.model_management


def node_api():
    """(ComfyExtension, io, ui) of ComfyUI's V3 node API: the pinned version where the host has it."""
    try:
        from comfy_api.v0_0_2 import ComfyExtension, io, ui
    except ImportError:
        from comfy_api.latest import ComfyExtension, io, ui
    return ComfyExtension, io, ui


def is_interrupt(error: BaseException) -> bool:
    return isinstance(error, model_management().InterruptProcessingException)


def default_device() -> str:
    return str(model_management().get_torch_device())


def version() -> str:
    try:
        import comfyui_version
        return "v" + comfyui_version.__version__
    except ImportError:
        return "unknown"


def dynamic_vram_enabled() -> bool:
    """Whether this process pages weights with comfy-aimdo: v0.15+ says so in memory_management.aimdo_enabled,
    v0.12 by having set memory_management.aimdo_allocator."""
    try:
        import comfy.memory_management as memory_management
    except ImportError:
        return False  # before v0.12: no dynamic VRAM at all
    if hasattr(memory_management, "aimdo_enabled"):
        return bool(memory_management.aimdo_enabled)
    return getattr(memory_management, "aimdo_allocator", None) is not None


def aimdo_modules():
    """(comfy_aimdo.control, comfy_aimdo.model_vbar), or (None, None) where comfy-aimdo is not installed."""
    try:
        import comfy_aimdo.control
        import comfy_aimdo.model_vbar
    except ImportError:
        return None, None
    return comfy_aimdo.control, comfy_aimdo.model_vbar


def features() -> HostFeatures:
    import comfy.model_patcher as model_patcher
    from comfy.cli_args import args
    from .nvml import nvml_works
    control, model_vbar = aimdo_modules()
    vbar_class = getattr(model_vbar, "ModelVBAR", None)
    dynamic_class = getattr(model_patcher, "ModelPatcherDynamic", None)
    clone_parameters = model_patcher.ModelPatcher.clone.__code__.co_varnames
    return HostFeatures(
        version=version(),
        dynamic_vram_enabled=dynamic_vram_enabled(),
        dynamic_vram_off_flag=DYNAMIC_VRAM_OFF if hasattr(args, "disable_dynamic_vram") else "",
        vbar_set_watermark=vbar_class is not None and hasattr(vbar_class, "set_watermark"),
        aimdo_vram_usage=control is not None and hasattr(control, "get_total_vram_usage"),
        host_is_oom=hasattr(model_management(), "is_oom"),
        register_load_device=dynamic_class is not None and hasattr(dynamic_class, "register_load_device"),
        clone_disable_dynamic="disable_dynamic" in clone_parameters,
        deepclone_multigpu=hasattr(model_patcher.ModelPatcher, "deepclone_multigpu"),
        nvml=nvml_works(),
    )
