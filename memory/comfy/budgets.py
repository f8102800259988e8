"""Offload Model's budget on a patcher: ComfyUI's load bounded to it, what is above it paged out, the cap.

Legacy patchers: ComfyUI's load moves weights onto the device, as much as its free-memory arithmetic
allows; it has no per-call limit. From v0.12 it also keeps back a reserve for streaming the other weights
(about one large module, more with several streams) out of the memory it is given, so a load given the
budget undercuts it by that reserve; the memory given is the budget plus what of the reserve fits. So for the duration of ComfyUI's load of *our clone* (inside our
PREPARE_SAMPLING wrapper) the clone's own partially_load is bounded to the budget: an attribute of that
one patcher object, removed when the load returns (the class and every other patcher are untouched, every
argument is passed on). This is the pack's one touch of a patcher method, kept here.
Dynamic patchers: ComfyUI's load only stages weights; they fault in on first use. After every load (the
ON_LOAD callback, which ComfyUI fires at the end of each load) the pages above the budget are paged out
and the VBAR's watermark is capped, so none fault in above it until the next load resets it.
"""
from __future__ import annotations

import contextlib
import logging

from ..decisions import BudgetMethod, LoadUnit, budget_method, memory_to_give_streamed_load, vbar_cap_bytes
from . import dynamic
from .host import features, model_management
from .models import is_dynamic, loaded_bytes

log = logging.getLogger("headroom")


def method_for(patcher) -> BudgetMethod:
    return budget_method(features(), is_dynamic(patcher))


def unload_model(patcher) -> None:
    """Unload the model under `patcher` from its load device, whichever clone of it ComfyUI holds loaded
    (clones share the weights, so one loaded by another prompt counts against this budget too)."""
    management = model_management()
    others = [entry for entry in management.current_loaded_models
              if entry.model is None or not patcher.is_clone(entry.model)]
    management.free_memory(1e30, patcher.load_device, keep_loaded=others)


@contextlib.contextmanager
def bounded_load(patcher, limit_bytes: int):
    """ComfyUI loads a legacy `patcher` inside this block with at most `limit_bytes` of weights resident.

    Weights above the limit are unloaded first (a load only adds weights, and which modules stay is then
    ComfyUI's own largest-first choice, the same on every load: a second run moves nothing).
    """
    if limit_bytes >= patcher.model_size():  # the whole model fits: ComfyUI's load is already within it
        yield
        return
    if loaded_bytes(patcher) > limit_bytes:
        unload_model(patcher)
        excess = loaded_bytes(patcher) - limit_bytes
        if excess > 0:  # weights resident without a loaded-model entry (loaded by hand): page them out
            patcher.partially_unload(patcher.offload_device, excess)
    given = memory_to_give(patcher, limit_bytes)
    own = vars(patcher).get("partially_load")  # another extension's, set on this object: kept and restored
    unbounded = patcher.partially_load  # that one, or the class's bound to this patcher

    def partially_load(device_to, extra_memory=0, *args, **kwargs):
        room = max(0, given - loaded_bytes(patcher))
        moved = unbounded(device_to, min(extra_memory, room), *args, **kwargs)
        excess = loaded_bytes(patcher) - limit_bytes
        if excess > 0:  # this ComfyUI loaded otherwise than its rule foretold: back within the budget
            log.warning("Headroom: ComfyUI loaded %d bytes above the budget; moving them off", excess)
            patcher.partially_unload(patcher.offload_device, excess)
        return moved

    patcher.partially_load = partially_load
    try:
        yield
    finally:
        if own is None:
            del patcher.partially_load
        else:
            patcher.partially_load = own


def load_units(patcher) -> list[LoadUnit]:
    """The units ComfyUI's legacy load moves, as its _load_list picks them: modules whose parameters are all
    their own; a unit cast to the model's compute dtype when streamed takes that copy's bytes as well."""
    size = model_management().module_size
    cast_dtype = getattr(patcher.model, "manual_cast_dtype", None)
    units = []
    for name, module in patcher.model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if any(key not in own for key, _ in module.named_parameters(recurse=True)):
            continue
        if not own and not hasattr(module, "comfy_cast_weights"):
            continue
        unit_bytes = size(module)
        streaming = unit_bytes
        if hasattr(module, "comfy_cast_weights") and cast_dtype is not None:
            streaming += sum(tensor.numel() * cast_dtype.itemsize for tensor in own.values()
                             if tensor.dtype != cast_dtype)
        units.append(LoadUnit(name, unit_bytes, streaming))
    return units


def memory_to_give(patcher, limit_bytes: int) -> int:
    """The memory to give ComfyUI's load of a legacy patcher so it fills `limit_bytes` without exceeding it."""
    if not hasattr(patcher.model, "model_offload_buffer_memory"):  # before v0.12: no streaming reserve
        return limit_bytes
    streams = int(getattr(model_management(), "NUM_STREAMS", 0) or 0)
    return memory_to_give_streamed_load(load_units(patcher), limit_bytes, streams)


def after_load(patcher, limit_bytes: int, cap_faults: bool) -> None:
    """A dynamic patcher has just loaded: page out what is above the limit and cap the VBAR there."""
    # VBAR pages only: weights force-loaded outside the VBAR are what the model runs with between loads
    excess = min(loaded_bytes(patcher) - limit_bytes, dynamic.vbar_resident_bytes(patcher))
    if excess > 0:
        patcher.partially_unload(patcher.load_device, excess)
    if cap_faults:
        dynamic.cap_vbar(patcher, vbar_cap_bytes(limit_bytes, dynamic.loaded_outside_vbar_bytes(patcher)))


def trim(patcher, limit_bytes: int) -> int:
    """Page or move out what is resident above the limit; returns the bytes freed."""
    if is_dynamic(patcher):
        excess = min(loaded_bytes(patcher) - limit_bytes, dynamic.vbar_resident_bytes(patcher))
        device = patcher.load_device
    else:
        excess, device = loaded_bytes(patcher) - limit_bytes, patcher.offload_device
    if excess <= 0:
        return 0
    return int(patcher.partially_unload(device, excess) or 0)
