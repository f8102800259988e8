"""What counts as out of memory on this host, and freeing memory after one."""
from __future__ import annotations

from .. import decisions
from .host import model_management
from .models import model_name


def is_out_of_memory(error: BaseException) -> bool:
    """What this host counts as out of memory: its own model_management.is_oom where it has one (v0.15+:
    torch.AcceleratorError with CUDA's out-of-memory code counts), else the OOM exception types and the
    same AcceleratorError rule. Never an interrupt."""
    import torch
    management = model_management()
    host_is_oom = getattr(management, "is_oom", None)
    host_says = None
    if host_is_oom is not None and not isinstance(error, management.InterruptProcessingException):
        host_says = bool(host_is_oom(error))
    return decisions.is_out_of_memory(error, oom_types=(torch.OutOfMemoryError, management.OOM_EXCEPTION),
                                      interrupt_type=management.InterruptProcessingException,
                                      accelerator_error_type=getattr(torch, "AcceleratorError", None),
                                      host_says=host_says)


def free_after_oom() -> None:
    """What ComfyUI itself does after an out-of-memory error, minus unloading the model being sampled."""
    import gc
    gc.collect()
    model_management().soft_empty_cache(True)


def free_models_except(model, vae) -> list[str]:
    """After an out-of-memory error: unload every model ComfyUI holds (this prompt's and those it keeps
    from earlier prompts) on the devices of `model` and `vae`, except `model` itself and its clones,
    which are sampling; then collect and empty the caches. Returns the names unloaded."""
    management = model_management()
    keep = [entry for entry in management.current_loaded_models
            if entry.model is not None and model.is_clone(entry.model)]
    unloaded = []
    for device in {model.load_device, vae.patcher.load_device}:
        unloaded += management.free_memory(1e30, device, keep_loaded=keep)
    free_after_oom()
    return [model_name(entry.model) for entry in unloaded if entry.model is not None]


def free_other_models(patcher) -> list[str]:
    """The sampling ladder's first rung: unload every model ComfyUI holds on the patcher's device (this
    prompt's and those it keeps from earlier prompts) except the patcher and its clones, which are sampling.
    ComfyUI runs one prompt at a time: nothing unloaded here is in use. Returns the names unloaded."""
    management = model_management()
    keep = [entry for entry in management.current_loaded_models
            if entry.model is not None and patcher.is_clone(entry.model)]
    unloaded = management.free_memory(1e30, patcher.load_device, keep_loaded=keep)
    return [model_name(entry.model) for entry in unloaded if entry.model is not None]
