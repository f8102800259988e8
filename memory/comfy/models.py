"""Model patchers: names, sizes, the facts a plan needs, the pack's wrappers on a clone, unloading one."""
from __future__ import annotations

from ..decisions import FreeMemoryReading, memory_for_model, release_method
from ..plan import DeviceFacts, ModelFacts
from . import dynamic
from .host import dynamic_vram_enabled, model_management

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


def device_facts(device) -> DeviceFacts:
    """The device's memory as a plan for no particular model sees it (Offload Model's input checks)."""
    management = model_management()
    return DeviceFacts(name=str(device), total_bytes=int(management.get_total_memory(device)),
                       free_bytes=int(management.get_free_memory(device)))


def free_memory_reading(patcher) -> FreeMemoryReading:
    """Free memory on the patcher's load device the way the host says to read it for this patcher, with
    this model's own resident weights, so a plan counts them once (memory.decisions.memory_for_model)."""
    import comfy.model_patcher as model_patcher
    device = patcher.load_device
    if not hasattr(patcher, "get_free_memory"):  # before v0.12: the device's free memory
        free, view = model_management().get_free_memory(device), "device"
    else:
        free = patcher.get_free_memory(device)
        dynamic_class = getattr(model_patcher, "ModelPatcherDynamic", None)
        own_override = dynamic_class is not None and isinstance(patcher, dynamic_class) and (
            "get_free_memory" in vars(dynamic_class))
        if own_override:  # v0.12's dynamic patcher: the device's total less the whole model
            view = "total-minus-model"
        elif hasattr(_memory_management(), "aimdo_enabled") and dynamic_vram_enabled():
            view = "device+vbars"  # v0.15+: free memory plus every VBAR page aimdo could evict
        else:
            view = "device"
    vbar_resident = dynamic.vbar_resident_bytes(patcher) if is_dynamic(patcher) else 0
    outside = dynamic.loaded_outside_vbar_bytes(patcher) if is_dynamic(patcher) else loaded_bytes(patcher)
    return FreeMemoryReading(free_bytes=int(free), view=view, model_bytes=int(patcher.model_size()),
                             vbar_resident_bytes=vbar_resident, loaded_outside_vbar_bytes=outside)


def _memory_management():
    try:
        import comfy.memory_management
        return comfy.memory_management
    except ImportError:
        return None


def plan_device_facts(patcher) -> DeviceFacts:
    """The load device as a plan for this patcher sees it: free memory is what the model could use now,
    its own resident weights included once."""
    device = patcher.load_device
    return DeviceFacts(name=str(device), total_bytes=int(model_management().get_total_memory(device)),
                       free_bytes=memory_for_model(free_memory_reading(patcher)))


def model_facts(patcher, noise_shape):
    """Weights and the activation memory ComfyUI itself expects for this input (model.memory_required)."""
    batch = noise_shape[0]
    rest = list(noise_shape[1:])
    return ModelFacts(weight_bytes=int(patcher.model_size()),
                      activation_bytes_batched=int(patcher.memory_required([2 * batch] + rest)),
                      activation_bytes_single=int(patcher.memory_required([batch] + rest)))


def has_uncond(guider) -> bool:
    """Whether the guider's model calls run an uncond beside the cond (CFG with a negative prompt; ComfyUI
    skips the uncond at cfg 1)."""
    import math
    conds = getattr(guider, "original_conds", {}) or {}
    return len(conds) > 1 and not math.isclose(float(getattr(guider, "cfg", 1.0)), 1.0)


def loaded_bytes(patcher) -> int:
    return int(patcher.loaded_size())


def release(patcher) -> list[str]:
    """Free this patcher's device memory (and only its): a dynamic one pages its weights out and keeps its
    pinned host copy; a legacy one is unloaded from ComfyUI's loaded models. Returns the names unloaded."""
    if release_method(is_dynamic(patcher)) == "page out, keep pins":
        patcher.partially_unload(patcher.load_device, 1e30)
        return [model_name(patcher)]
    management = model_management()
    others = [entry for entry in management.current_loaded_models if entry.model is not patcher]
    ours = len(management.current_loaded_models) - len(others)
    if not ours:
        return []
    unloaded = management.free_memory(1e30, patcher.load_device, keep_loaded=others)
    return [model_name(entry.model) for entry in unloaded if entry.model is not None]
