"""Model patchers: names, sizes, the facts a plan needs, the pack's wrappers on a clone, unloading one."""
from __future__ import annotations

from ..plan import DeviceFacts, ModelFacts
from .host import model_management

WRAPPER_KEY = "headroom"  # every wrapper and callback of the pack is registered under this key


def model_name(patcher) -> str:
    """A name a user recognises: the model family for diffusion models, else the module class."""
    module = patcher.model
    config = getattr(module, "model_config", None)
    return type(config).__name__ if config is not None else type(module).__name__


def add_wrappers(patcher, wrappers: dict, callbacks: dict) -> None:
    """Register on a clone, by WrappersMP/CallbacksMP member name (e.g. "OUTER_SAMPLE")."""
    import comfy.patcher_extension as extension
    for name, function in wrappers.items():
        patcher.add_wrapper_with_key(getattr(extension.WrappersMP, name), WRAPPER_KEY, function)
    for name, function in callbacks.items():
        patcher.add_callback_with_key(getattr(extension.CallbacksMP, name), WRAPPER_KEY, function)


def headroom_wrappers(patcher, name: str) -> list:
    """The pack's wrappers of one kind (WrappersMP member name) on a patcher."""
    import comfy.patcher_extension as extension
    return list(patcher.wrappers.get(getattr(extension.WrappersMP, name), {}).get(WRAPPER_KEY, []))


def has_headroom_hooks(patcher) -> bool:
    """Whether any wrapper, callback or transformer option of the pack is on this patcher."""
    options = patcher.model_options.get("transformer_options", {})
    if WRAPPER_KEY in options or "optimized_attention_override" in options:
        return True
    registries = list(patcher.wrappers.values()) + list(patcher.callbacks.values())
    return any(WRAPPER_KEY in by_key for by_key in registries)


def is_diffusion_model(patcher) -> bool:
    import comfy.model_base
    return isinstance(getattr(patcher, "model", None), comfy.model_base.BaseModel)


def is_dynamic(patcher) -> bool:
    """ComfyUI v0.12+ ModelPatcherDynamic (comfy-aimdo pages weights itself); absent before."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def device_facts(device):
    management = model_management()
    return DeviceFacts(name=str(device), total_bytes=int(management.get_total_memory(device)),
                       free_bytes=int(management.get_free_memory(device)))


def model_facts(patcher, noise_shape):
    """Weights and the activation memory ComfyUI itself expects for this input (model.memory_required)."""
    batch = noise_shape[0]
    rest = list(noise_shape[1:])
    return ModelFacts(weight_bytes=int(patcher.model_size()),
                      activation_bytes_batched=int(patcher.memory_required([2 * batch] + rest)),
                      activation_bytes_single=int(patcher.memory_required([batch] + rest)))


def loaded_bytes(patcher) -> int:
    return int(patcher.loaded_size())


def release(patcher) -> list[str]:
    """Unload this patcher (and only it) from ComfyUI's loaded models, so nothing of ours stays loaded."""
    management = model_management()
    others = [entry for entry in management.current_loaded_models if entry.model is not patcher]
    ours = len(management.current_loaded_models) - len(others)
    if not ours:
        return []
    unloaded = management.free_memory(1e30, patcher.load_device, keep_loaded=others)
    return [model_name(entry.model) for entry in unloaded if entry.model is not None]
