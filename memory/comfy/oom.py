"""What counts as out of memory on this host, and freeing memory after one."""
from __future__ import annotations

from .host import model_management
from .models import model_name


def is_out_of_memory(error: BaseException) -> bool:
    import torch
    management = model_management()
    return isinstance(error, (torch.OutOfMemoryError, management.OOM_EXCEPTION)) and not isinstance(
        error, management.InterruptProcessingException)


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
