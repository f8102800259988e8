"""What the running ComfyUI offers, detected in one place, and its node API."""
from __future__ import annotations


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
