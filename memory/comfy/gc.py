"""Force GC's view of ComfyUI: its list of loaded models, unloading per device, its own cleanup."""
from __future__ import annotations

from .host import model_management
from .models import model_name


class ComfyModelHost:
    """`memory.gc.ModelHost` for ComfyUI."""

    def loaded_models(self) -> list[tuple[str, str, object]]:
        loaded = []
        for entry in model_management().current_loaded_models:
            patcher = entry.model  # a property resolving LoadedModel's weak reference
            if patcher is not None:
                loaded.append((str(entry.device), model_name(patcher), patcher.model))
        return loaded

    def unload_models(self, device: str) -> list[str]:
        """Unload every model on `device` (ComfyUI's unload_all_models only covers the default device)."""
        import torch
        unloaded = model_management().free_memory(1e30, torch.device(device))
        return [model_name(entry.model) for entry in unloaded if entry.model is not None]

    def cleanup(self) -> None:
        management = model_management()
        management.cleanup_models_gc()
        management.cleanup_models()
        management.soft_empty_cache()
