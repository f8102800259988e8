"""The only module that knows ComfyUI, and the differences between its versions.

Everything here goes through ComfyUI's public surface (model_management's bookkeeping and
freeing functions); nothing is replaced or monkey-patched. ComfyUI is imported lazily so the
rest of the core stays importable (and testable) without it.
"""
from __future__ import annotations


def _model_management():
    import comfy.model_management
    return comfy.model_management


def model_name(patcher) -> str:
    """A name a user recognises: the model family for diffusion models, else the module class."""
    module = patcher.model
    config = getattr(module, "model_config", None)
    return type(config).__name__ if config is not None else type(module).__name__


class ComfyModelHost:
    """`memory.gc.ModelHost` for ComfyUI: its list of loaded models, unloading, cleanup."""

    def loaded_models(self) -> list[tuple[str, str, object]]:
        loaded = []
        for entry in _model_management().current_loaded_models:
            patcher = entry.model  # a property resolving LoadedModel's weak reference
            if patcher is not None:
                loaded.append((str(entry.device), model_name(patcher), patcher.model))
        return loaded

    def unload_models(self, device: str) -> list[str]:
        """Unload every model on `device` (ComfyUI's unload_all_models only covers the default device)."""
        import torch
        model_management = _model_management()
        target = torch.device(device)
        unloaded = model_management.free_memory(1e30, target)
        return [model_name(entry.model) for entry in unloaded if entry.model is not None]

    def cleanup(self) -> None:
        model_management = _model_management()
        model_management.cleanup_models_gc()
        model_management.cleanup_models()
        model_management.soft_empty_cache()


def default_device() -> str:
    return str(_model_management().get_torch_device())


def node_api():
    """(ComfyExtension, io, ui) of ComfyUI's V3 node API: the pinned version where the host has it."""
    try:
        from comfy_api.v0_0_2 import ComfyExtension, io, ui
    except ImportError:
        from comfy_api.latest import ComfyExtension, io, ui
    return ComfyExtension, io, ui
