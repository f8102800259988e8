"""Which calls serve each Headroom action, decided from what the running ComfyUI offers.

ComfyUI has two kinds of model patcher: the legacy one (weights moved by its low-VRAM machinery) and,
since v0.15 the default on NVIDIA, the dynamic one (weights in a comfy-aimdo VBAR, paged in on first use).
What a host offers differs by version; `memory.comfy.host` detects it into a `HostFeatures` and the
functions here decide, as plain data, what to call for a budget, a release, a placement, a free-memory
reading, an out-of-memory check and a VRAM measurement. The calls themselves are thin, in memory.comfy.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

DYNAMIC_VRAM_OFF = "--disable-dynamic-vram"  # the flag that turns dynamic VRAM off, from ComfyUI v0.15


@dataclasses.dataclass(frozen=True)
class HostFeatures:
    """What the running ComfyUI and its comfy-aimdo offer. Defaults: what the oldest pinned host has."""
    version: str = "unknown"
    dynamic_vram_enabled: bool = False  # this process pages weights with comfy-aimdo (ModelPatcherDynamic)
    dynamic_vram_off_flag: str = ""  # the command-line flag that turns it off; "" where it is opt-in
    vbar_set_watermark: bool = False  # aimdo's VBAR.set_watermark: a cap on resident pages (aimdo 0.4+)
    aimdo_vram_usage: bool = False  # comfy_aimdo.control.get_total_vram_usage (aimdo's own usage figure)
    host_is_oom: bool = False  # model_management.is_oom (torch.AcceleratorError out of memory counts)
    register_load_device: bool = False  # ModelPatcherDynamic.register_load_device (retargeting a dynamic patcher)
    clone_disable_dynamic: bool = False  # ModelPatcher.clone(disable_dynamic=True): a legacy twin of a dynamic one
    deepclone_multigpu: bool = False  # ModelPatcher.deepclone_multigpu(new_load_device): own weights on another GPU
    nvml: bool = False  # NVML answers: the process's device memory can be read


# --- Offload Model's budget

@dataclasses.dataclass(frozen=True)
class BudgetMethod:
    """How the budget on resident weights is enforced for one patcher."""
    bound_load: bool  # bound ComfyUI's own load of the clone to the budget (legacy: it moves weights)
    page_out_after_load: bool  # after every load, page out what is above the budget (dynamic)
    cap_faults: bool  # cap the VBAR watermark after every load, so pages never fault in above it
    trim_after_step: bool  # page out after every step: nothing stops pages faulting in during a step
    note: str  # what a user reads in the log when the host cannot hold the budget at every moment


def budget_method(features: HostFeatures, dynamic: bool) -> BudgetMethod:
    if not dynamic:
        return BudgetMethod(bound_load=True, page_out_after_load=False, cap_faults=False, trim_after_step=False,
                            note="")
    if features.vbar_set_watermark:
        return BudgetMethod(bound_load=False, page_out_after_load=True, cap_faults=True, trim_after_step=False,
                            note="")
    return BudgetMethod(bound_load=False, page_out_after_load=True, cap_faults=False, trim_after_step=True,
                        note="this comfy-aimdo has no VBAR watermark: weights can page in above the budget "
                             "during a step and are paged out after it; update comfy-aimdo (0.4 or newer) "
                             "for a hard cap")


@dataclasses.dataclass(frozen=True)
class LoadUnit:
    """Weights ComfyUI's legacy load moves onto the device as one unit: one module's own parameters."""
    name: str
    bytes: int  # the unit's weights
    streaming_bytes: int  # what streaming it takes on the device (more than `bytes` when cast to another dtype)


def resident_after_streamed_load(units: list[LoadUnit], given_bytes: int, streams: int) -> int:
    """The weight bytes ComfyUI's legacy load (v0.12+) leaves resident when a load is given `given_bytes`.

    Its rule: units largest-streaming-cost first; one loads when the loaded bytes, its own and a reserve for
    streaming the others still fit under `given_bytes`. The reserve is the largest seen of (a unit's streaming
    cost + the `streams` units after it), so a load given the budget keeps only the budget less that reserve:
    with a reserve as large as a module or more, a small budget loads nothing at all.
    """
    ordered = sorted(units, key=lambda unit: (unit.streaming_bytes, unit.bytes, unit.name), reverse=True)
    loaded = reserve = 0
    for index, unit in enumerate(ordered):
        following = sum(later.bytes for later in ordered[index + 1:index + 1 + streams])
        needed = max(reserve, unit.streaming_bytes + following)
        if loaded + unit.bytes + needed < given_bytes:
            loaded += unit.bytes
        else:
            reserve = needed
    return loaded


def memory_to_give_streamed_load(units: list[LoadUnit], limit_bytes: int, streams: int) -> int:
    """The most memory to give ComfyUI's legacy load (v0.12+) so that it keeps at most `limit_bytes` of weights
    resident: the budget plus as much of ComfyUI's streaming reserve as fits. The budget is a ceiling to
    fill; given only the budget, the load undercuts it by the reserve."""
    total = sum(unit.bytes for unit in units)
    low, high = limit_bytes, limit_bytes + total + 1  # the result grows with the memory given (by steps)
    while high - low > 1:
        middle = (low + high) // 2
        if resident_after_streamed_load(units, middle, streams) <= limit_bytes:
            low = middle
        else:
            high = middle
    return low


def vbar_cap_bytes(resident_limit_bytes: int, loaded_outside_vbar_bytes: int) -> int:
    """The VBAR watermark that keeps a dynamic model's resident weights within the limit: ComfyUI force-loads
    small weights and buffers outside the VBAR, and those count against the limit first."""
    return max(0, resident_limit_bytes - loaded_outside_vbar_bytes)


# --- releasing a model (Offload Model's "move off after use", the out-of-memory ladder)

ReleaseMethod = Literal["page out, keep pins", "unload"]


def release_method(dynamic: bool) -> ReleaseMethod:
    """Dynamic patchers free their VRAM with partially_unload and keep the pinned host copy (unloading one
    drops the pins, and every later run pins again); legacy ones are unloaded as ComfyUI unloads them."""
    return "page out, keep pins" if dynamic else "unload"


# --- free memory for a plan

@dataclasses.dataclass(frozen=True)
class FreeMemoryReading:
    """A free-memory figure the host gave, and this model's own weights on the device."""
    free_bytes: int  # the patcher's get_free_memory(device) where the host has it, else model_management's
    view: Literal["device", "device+vbars", "total-minus-model"]  # what that figure counts (see below)
    model_bytes: int  # all of this model's weights
    vbar_resident_bytes: int  # this model's weights resident in its VBAR (dynamic)
    loaded_outside_vbar_bytes: int  # this model's other resident weights (legacy weights, force-loaded ones)


def memory_for_model(reading: FreeMemoryReading) -> int:
    """What this model could use on the device now, counting its own resident weights exactly once.

    "device": free device memory; the model's resident weights are not in it, so they are added.
    "device+vbars" (v0.15+ patchers): free device memory plus every VBAR page aimdo could evict, this
    model's own pages included; only its weights outside the VBAR are added.
    "total-minus-model" (v0.12's dynamic patcher): the device's total less the whole model, so the model
    is added back.
    """
    if reading.view == "total-minus-model":
        return reading.free_bytes + reading.model_bytes
    own = reading.loaded_outside_vbar_bytes
    if reading.view == "device":
        own += reading.vbar_resident_bytes
    return reading.free_bytes + own


# --- Pick GPU: moving a patcher to another device

@dataclasses.dataclass(frozen=True)
class PlacementRoute:
    how: Literal["clone", "retarget", "legacy twin", "deep clone", "refuse"]
    message: str = ""  # why it is refused, naming what to change


def placement_route(features: HostFeatures, dynamic: bool, current: str, target: str) -> PlacementRoute:
    """How to give a clone of a patcher on `current` the load device `target`, the way ComfyUI's own Select
    Model/CLIP/VAE Device nodes do on hosts that have them.

    clone: the target is where it already loads. retarget: a legacy patcher's clone takes the new load device.
    legacy twin: a dynamic patcher bound for the CPU becomes a legacy clone (clone(disable_dynamic=True)).
    deep clone: a dynamic patcher bound for another GPU gets its own weights there (deepclone_multigpu, then
    register_load_device). refuse: the host cannot move it; the message names its flag.
    """
    if current == target:
        return PlacementRoute("clone")
    if not dynamic:
        return PlacementRoute("retarget")
    if target == "cpu" and features.clone_disable_dynamic:
        return PlacementRoute("legacy twin")
    if target != "cpu" and features.deepclone_multigpu and features.register_load_device:
        return PlacementRoute("deep clone")
    turn_off = (f"start ComfyUI with {features.dynamic_vram_off_flag}" if features.dynamic_vram_off_flag
                else "start ComfyUI without dynamic VRAM")
    return PlacementRoute("refuse", f"ComfyUI {features.version} pages this model's weights dynamically on "
                                    f"{current} (dynamic VRAM) and cannot move it to {target}; {turn_off} to "
                                    "choose devices per model, or run one ComfyUI per GPU (--cuda-device N)")


# --- out of memory

def is_out_of_memory(error: BaseException, *, oom_types: tuple[type, ...], interrupt_type: type,
                     accelerator_error_type: type | None, host_says: bool | None) -> bool:
    """Whether an error means the device ran out of memory.

    `host_says`: the host's own model_management.is_oom verdict where it has one (None elsewhere).
    Otherwise: an OOM exception type, or a torch.AcceleratorError with CUDA's out-of-memory code (2) or
    message, as newer ComfyUI counts it. An interrupt is never an out-of-memory error.
    """
    if isinstance(error, interrupt_type):
        return False
    if host_says is not None:
        return host_says
    if isinstance(error, oom_types):
        return True
    return (accelerator_error_type is not None and isinstance(error, accelerator_error_type)
            and (getattr(error, "error_code", None) == 2 or "out of memory" in str(error).lower()))


# --- measuring VRAM

def vram_sources(features: HostFeatures, device: str) -> tuple[str, ...]:
    """Which readings a stage on `device` takes its VRAM figures from. torch's allocator peak is a lower
    bound: comfy-aimdo maps VBAR pages outside it. aimdo's usage figure adds those pages; NVML reads the
    whole process's device memory (every allocator, the CUDA context included)."""
    if not device.startswith("cuda"):
        return ()
    sources = ["torch"]
    if features.dynamic_vram_enabled and features.aimdo_vram_usage:
        sources.append("aimdo")
    if features.nvml:
        sources.append("nvml")
    return tuple(sources)
