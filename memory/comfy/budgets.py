"""Offload Model's budget on a patcher: ComfyUI's load bounded to it, what is above it paged out, the cap.

Legacy patchers: ComfyUI's load moves weights onto the device, as much as its free-memory arithmetic
allows; it has no per-call limit. So for the duration of ComfyUI's load of *our clone* (inside our
PREPARE_SAMPLING wrapper) the clone's own partially_load is bounded to the budget: an attribute of that
one patcher object, removed when the load returns (the class and every other patcher are untouched, every
argument is passed on). This is the pack's one touch of a patcher method, kept here.
Dynamic patchers: ComfyUI's load only stages weights; they fault in on first use. After every load (the
ON_LOAD callback, which ComfyUI fires at the end of each load) the pages above the budget are paged out
and the VBAR's watermark is capped, so none fault in above it until the next load resets it.
"""
from __future__ import annotations

import contextlib

from ..decisions import BudgetMethod, budget_method, vbar_cap_bytes
from . import dynamic
from .host import features, model_management
from .models import is_dynamic, loaded_bytes


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
    own = vars(patcher).get("partially_load")  # another extension's, set on this object: kept and restored
    unbounded = patcher.partially_load  # that one, or the class's bound to this patcher

    def partially_load(device_to, extra_memory=0, *args, **kwargs):
        room = max(0, limit_bytes - loaded_bytes(patcher))
        return unbounded(device_to, min(extra_memory, room), *args, **kwargs)

    patcher.partially_load = partially_load
    try:
        yield
    finally:
        if own is None:
            del patcher.partially_load
        else:
            patcher.partially_load = own


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
