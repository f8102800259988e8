"""The only module that knows ComfyUI, and the differences between its versions.

Everything here goes through ComfyUI's public surface (model_management's bookkeeping and
freeing functions); nothing is replaced or monkey-patched. ComfyUI is imported lazily so the
rest of the core stays importable (and testable) without it.
"""
from __future__ import annotations

from .plan import DeviceFacts, ModelFacts


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


# --- Offload Model: facts, trimming and releasing through ComfyUI's public surface

WRAPPER_KEY = "headroom"  # every wrapper and callback of the pack is registered under this key


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
    model_management = _model_management()
    return DeviceFacts(name=str(device), total_bytes=int(model_management.get_total_memory(device)),
                       free_bytes=int(model_management.get_free_memory(device)))


def model_facts(patcher, noise_shape):
    """Weights and the activation memory ComfyUI itself expects for this input (model.memory_required)."""
    batch = noise_shape[0]
    rest = list(noise_shape[1:])
    return ModelFacts(weight_bytes=int(patcher.model_size()),
                      activation_bytes_batched=int(patcher.memory_required([2 * batch] + rest)),
                      activation_bytes_single=int(patcher.memory_required([batch] + rest)))


def loaded_bytes(patcher) -> int:
    return int(patcher.loaded_size())


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


def release(patcher) -> list[str]:
    """Unload this patcher (and only it) from ComfyUI's loaded models, so nothing of ours stays loaded."""
    model_management = _model_management()
    others = [entry for entry in model_management.current_loaded_models if entry.model is not patcher]
    ours = len(model_management.current_loaded_models) - len(others)
    if not ours:
        return []
    unloaded = model_management.free_memory(1e30, patcher.load_device, keep_loaded=others)
    return [model_name(entry.model) for entry in unloaded if entry.model is not None]


def is_out_of_memory(error: BaseException) -> bool:
    import torch
    return isinstance(error, (torch.OutOfMemoryError, _model_management().OOM_EXCEPTION)) and not isinstance(
        error, _model_management().InterruptProcessingException)


def free_after_oom() -> None:
    """What ComfyUI itself does after an out-of-memory error, minus unloading the model being sampled."""
    import gc
    gc.collect()
    _model_management().soft_empty_cache(True)


def node_api():
    """(ComfyExtension, io, ui) of ComfyUI's V3 node API: the pinned version where the host has it."""
    try:
        from comfy_api.v0_0_2 import ComfyExtension, io, ui
    except ImportError:
        from comfy_api.latest import ComfyExtension, io, ui
    return ComfyExtension, io, ui


def is_interrupt(error: BaseException) -> bool:
    return isinstance(error, _model_management().InterruptProcessingException)


# the CLIP and VAE methods nodes call to use them, and the stage each is; an outer call may use an inner one
_ENTRY_POINTS = {"CLIP": {"encode_from_tokens_scheduled": "text encode", "encode_from_tokens": "text encode",
                          "encode": "text encode"},
                 "VAE": {"decode": "VAE decode", "decode_tiled": "VAE decode", "encode": "VAE encode",
                         "encode_tiled": "VAE encode"}}


def watch_use(clip_or_vae, kind: str, offload: bool):
    """A copy of a CLIP or VAE whose every use is a stage of the Memory Report, and which unloads itself
    from its device as soon as a use has finished when `offload` is set.

    The methods are wrapped on the copy only (an instance we own), never on the class; the copy
    gets its own patcher clone so releasing it leaves the incoming object's loaded state alone.
    ComfyUI's loaded-model list falls back to a patcher's parent when the patcher dies, and a dead
    parent reads as a memory leak. So the clone's parent is the incoming patcher (never a throwaway
    clone), and the wrappers hold the copy weakly: no reference cycle, so the copy dies when ComfyUI's
    cache drops it, while the nodes before it still hold the parent.
    """
    import copy
    import logging
    import weakref
    log = logging.getLogger("headroom")
    if kind == "CLIP":
        user = clip_or_vae.clone()
    else:
        user = copy.copy(clip_or_vae)  # v0.3.64's VAE has no clone(); its state is the patcher
        for name in _after_use_entry_points(clip_or_vae, kind):
            delattr(user, name)  # an earlier watch_use's wrappers call the copy they were made for
        user.patcher = clip_or_vae.patcher.clone()
    this_copy = weakref.ref(user)
    depth = [0]
    for name, stage_kind in _ENTRY_POINTS[kind].items():
        if not hasattr(user, name):
            continue

        def use(*args, _method=getattr(type(user), name), _name=name, _stage=stage_kind, **kwargs):
            watched = this_copy()  # alive: it is the object this method was looked up on
            if depth[0]:
                return _method(watched, *args, **kwargs)  # an inner call of an outer use: one stage, one release
            depth[0] += 1
            patcher = watched.patcher
            try:
                with stage(_stage, model_name(patcher), patcher.load_device) as record:
                    try:
                        return _method(watched, *args, **kwargs)
                    finally:
                        record.resident_bytes = loaded_bytes(patcher)
                        if offload:
                            unloaded = release(patcher)
                            record.detail = f"moved off {patcher.load_device} after {_name}"
                            log.info("Headroom offload: %s moved off %s after %s (unloaded: %s)", kind,
                                     patcher.load_device, _name, ", ".join(unloaded) or "nothing was loaded")
            finally:
                depth[0] -= 1

        use.headroom_offload = offload
        setattr(user, name, use)
    return user


# --- Memory Report: the journal of the prompt that is running

_JOURNALS_KEPT = 4  # the running prompt's and a few before it, for a report read after its prompt ended
# The pack's one piece of process state: ComfyUI runs a prompt's nodes and hooks as separate calls, and
# the journal of the prompt they belong to (by the prompt id ComfyUI's executor sets) is what they share.
_journals: dict = {}


def executing_node() -> tuple[str | None, str | None]:
    """(prompt id, node id) of the node ComfyUI is running now; (None, None) outside a prompt."""
    from comfy_execution.utils import get_executing_context
    context = get_executing_context()
    return (context.prompt_id, context.node_id) if context is not None else (None, None)


def prompt_journal():
    """The Journal of the prompt that is running (outside a prompt: one shared journal)."""
    return _journal_of(executing_node()[0])


def stage(kind: str, name: str, device):
    """Measure a block as a stage of the running prompt's journal, tagged with the running node."""
    prompt_id, node_id = executing_node()
    return _journal_of(prompt_id).stage(kind, name, str(device), node_id)


def _journal_of(prompt_id: str | None):
    from .report import Journal
    journal = _journals.get(prompt_id)
    if journal is None:
        journal = _journals[prompt_id] = Journal(prompt_id, is_interrupt=is_interrupt)
        while len(_journals) > _JOURNALS_KEPT:
            del _journals[next(iter(_journals))]  # the oldest prompt's
    return journal


# --- Sliced Attention

def has_fused_attention(device) -> bool:
    """Whether ComfyUI runs attention on `device` through a memory-efficient kernel (PyTorch SDPA
    flash/memory-efficient, xFormers, SageAttention, FlashAttention) rather than math attention."""
    import torch
    device = torch.device(device)
    if device.type == "cpu":
        return False  # ComfyUI's CPU attention is sub-quadratic, whatever the main device runs
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (5, 0):
        return False  # SDPA's memory-efficient kernel needs sm50+ (flash sm80+): Kepler is math only
    model_management = _model_management()
    return bool(model_management.pytorch_attention_flash_attention() or model_management.xformers_enabled()
                or model_management.sage_attention_enabled() or model_management.flash_attention_enabled())


def comfy_attention_functions() -> dict:
    """ComfyUI's own attention functions for the Sliced Attention methods that delegate to them."""
    from comfy.ldm.modules.attention import get_attention_function
    return {"comfy split": get_attention_function("split"), "sub-quadratic": get_attention_function("sub_quad")}


# --- Pick GPU

def devices_comfy_uses() -> tuple[set[str] | None, str]:
    """The device names ComfyUI itself runs on when it limits them (None: every device torch sees), and why."""
    model_management = _model_management()
    if model_management.cpu_state == model_management.CPUState.CPU:
        return {"cpu"}, "ComfyUI runs with --cpu"
    # ComfyUI after v0.12 has its own multi-GPU nodes and lists the devices they may use
    all_torch_devices = getattr(model_management, "get_all_torch_devices", None)
    if all_torch_devices is None:
        return None, ""
    names = {str(device) for device in all_torch_devices(exclude_current=False)}
    return names | {"cpu"}, "not among the devices ComfyUI uses (model_management.get_all_torch_devices)"


def native_placement(patcher) -> str | None:
    """Why ComfyUI's own multi-GPU nodes (after v0.12) already chose this patcher's device; None when they did not."""
    if patcher.get_additional_models_with_key("multigpu"):
        return "ComfyUI's MultiGPU CFG Split runs it on several GPUs"
    if hasattr(patcher.model, "_select_base_load_device"):  # set by ComfyUI's Select Model/CLIP/VAE Device
        return "ComfyUI's Select Device node placed it"
    return None


def place_model(model, device: str):
    """A clone of a MODEL that loads on `device`; the incoming MODEL keeps its devices."""
    import torch
    target = torch.device(device)
    _refuse_dynamic_move(model, target)
    placed = model.clone()
    _set_devices(placed, target)
    return placed


def place_clip(clip, device: str):
    """A copy of a CLIP whose text encoder loads on `device` (v0.12 sets its execution device from it)."""
    import torch
    target = torch.device(device)
    _refuse_dynamic_move(clip.patcher, target)
    placed = watch_use(clip, "CLIP", _offloads_after_use(clip, "CLIP"))  # one clone, of the incoming patcher
    _set_devices(placed.patcher, target)
    return placed


def place_vae(vae, device: str):
    """A copy of a VAE that loads on `device`: its patcher (a clone) and vae.device, which encode/decode move
    inputs to."""
    import torch
    target = torch.device(device)
    _refuse_dynamic_move(vae.patcher, target)
    placed = watch_use(vae, "VAE", _offloads_after_use(vae, "VAE"))
    _set_devices(placed.patcher, target)
    placed.device = target
    return placed


def _set_devices(patcher, target) -> None:
    import torch
    patcher.load_device = target
    patcher.offload_device = torch.device("cpu")  # off a GPU the weights wait in RAM; on the CPU they stay


def _refuse_dynamic_move(patcher, target) -> None:
    if is_dynamic(patcher) and patcher.load_device != target:
        raise ValueError(f"ComfyUI's dynamic VRAM (--fast dynamic_vram) pages this model's weights on "
                         f"{patcher.load_device} only and cannot move it to {target}; start ComfyUI without "
                         "--fast dynamic_vram to choose devices per model, or one ComfyUI per GPU (--cuda-device N)")


def _after_use_entry_points(clip_or_vae, kind: str) -> list[str]:
    """The methods watch_use wrapped on this object."""
    return [name for name in _ENTRY_POINTS[kind] if hasattr(vars(clip_or_vae).get(name), "headroom_offload")]


def _offloads_after_use(clip_or_vae, kind: str) -> bool:
    """Whether Offload Model set this CLIP or VAE to move off its device after each use."""
    return any(vars(clip_or_vae)[name].headroom_offload for name in _after_use_entry_points(clip_or_vae, kind))


# --- Tiled Inpaint

def sampler_names() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SCHEDULERS)


def free_models_except(model, vae) -> list[str]:
    """After an out-of-memory error: unload every model ComfyUI holds (this prompt's and those it keeps
    from earlier prompts) on the devices of `model` and `vae`, except `model` itself and its clones,
    which are sampling; then collect and empty the caches. Returns the names unloaded."""
    model_management = _model_management()
    keep = [entry for entry in model_management.current_loaded_models
            if entry.model is not None and model.is_clone(entry.model)]
    unloaded = []
    for device in {model.load_device, vae.patcher.load_device}:
        unloaded += model_management.free_memory(1e30, device, keep_loaded=keep)
    free_after_oom()
    return [model_name(entry.model) for entry in unloaded if entry.model is not None]


def _inject_test_oom(model) -> None:
    """Test hook: transformer_options["headroom"]["test_inject_tile_oom"] = {"times": n} makes the
    next n tiles fail as if out of memory."""
    import torch
    injection = model.model_options.get("transformer_options", {}).get(WRAPPER_KEY, {}).get("test_inject_tile_oom")
    if injection and injection["times"] > 0:
        injection["times"] -= 1
        raise torch.OutOfMemoryError("Headroom test hook: out of memory injected into a tile")


def tile_progress():
    """progress(done, total) on ComfyUI's progress bar: the node's bar in the UI and its websocket
    `progress` events (value/max), one step per tile."""
    import comfy.utils
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return progress


def inpaint_backend(model, vae, steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float):
    """memory.inpaint.TileBackend on ComfyUI: the VAE (whose encode/decode already retry in VAE tiles
    on OOM; the tiled calls are the next rung), and comfy.sample.sample, the entry point KSampler
    uses, so the wrappers other nodes put on `model` (budgets, attention, device) apply to each tile."""
    import comfy.sample
    import comfy.utils
    from .inpaint import TileBackend
    model_management = _model_management()

    def check_interrupt(step, denoised, x, total_steps):
        # without KSampler's preview callback: its step progress would mix with the tile count
        model_management.throw_exception_if_processing_interrupted()

    def sample(latent, noise, noise_mask, positive, negative, seed):
        _inject_test_oom(model)
        return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   denoise=denoise, noise_mask=noise_mask, callback=check_interrupt,
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)

    return TileBackend(
        encode=vae.encode,
        encode_tiled=lambda pixels: vae.encode_tiled(pixels, tile_x=256, tile_y=256, overlap=32),
        sample=sample,
        decode=vae.decode,
        decode_tiled=lambda latent: vae.decode_tiled(latent, tile_x=32, tile_y=32, overlap=8),  # latent units
        free_memory=lambda: free_models_except(model, vae),
        is_out_of_memory=is_out_of_memory,
        progress=tile_progress(),
    )
