"""Which calls serve each action, decided from tables of host features (the dynamic-VRAM paths cannot run on a
CPU; their decisions are plain functions, tested here)."""
import pytest
import torch

from comfyui_headroom.memory.decisions import (
    DYNAMIC_VRAM_OFF,
    FreeMemoryReading,
    HostFeatures,
    budget_method,
    is_out_of_memory,
    memory_for_model,
    placement_route,
    release_method,
    vbar_cap_bytes,
    vram_sources,
)

GB = 2 ** 30
# What each pinned host offers, read from its source (v0.33.0 with comfy-aimdo 0.4.13, dynamic VRAM on as on
# an NVIDIA GPU; v0.12.1 with dynamic VRAM opted into with aimdo 0.1.7, its minimum; v0.3.64 has none of it)
V0_33 = HostFeatures(version="v0.33.0", dynamic_vram_enabled=True, dynamic_vram_off_flag=DYNAMIC_VRAM_OFF,
                     vbar_set_watermark=True, aimdo_vram_usage=True, host_is_oom=True, register_load_device=True,
                     clone_disable_dynamic=True, deepclone_multigpu=True, nvml=True)
V0_12_AIMDO_0_1 = HostFeatures(version="v0.12.1", dynamic_vram_enabled=True, vbar_set_watermark=False,
                               aimdo_vram_usage=True, nvml=True)
V0_3 = HostFeatures(version="v0.3.64", nvml=True)


@pytest.mark.parametrize("features, dynamic, expected", [
    (V0_3, False, (True, False, False, False)),  # legacy: bound ComfyUI's load, nothing else needed
    (V0_33, False, (True, False, False, False)),  # --disable-dynamic-vram on a new host: the same
    (V0_33, True, (False, True, True, False)),  # dynamic with a watermark: page out and cap after each load
    (V0_12_AIMDO_0_1, True, (False, True, False, True)),  # no watermark: page out after loads and steps
])
def test_budget_method_table(features, dynamic, expected):
    method = budget_method(features, dynamic)
    assert (method.bound_load, method.page_out_after_load, method.cap_faults, method.trim_after_step) == expected
    assert bool(method.note) == (dynamic and not features.vbar_set_watermark)  # the log says when it cannot cap
    if method.note:
        assert "0.4 or newer" in method.note


@pytest.mark.parametrize("limit, outside, cap", [(4 * GB, 100, 4 * GB - 100), (50, 100, 0), (0, 0, 0)])
def test_the_vbar_cap_leaves_room_for_weights_loaded_outside_it(limit, outside, cap):
    assert vbar_cap_bytes(limit, outside) == cap


def test_release_keeps_pins_of_dynamic_patchers_and_unloads_legacy_ones():
    assert release_method(dynamic=True) == "page out, keep pins"
    assert release_method(dynamic=False) == "unload"


@pytest.mark.parametrize("reading, usable", [
    # legacy: free device memory does not include the model's own 3 GB: add them
    (FreeMemoryReading(5 * GB, "device", 6 * GB, 0, 3 * GB), 8 * GB),
    # v0.15+ patcher figure: free + every evictable VBAR page, ours (2 GB) included; add only the 0.1 GB force-loaded
    (FreeMemoryReading(7 * GB, "device+vbars", 6 * GB, 2 * GB, GB // 10), 7 * GB + GB // 10),
    # a dynamic patcher on a host whose figure has no VBARs: its pages are added too
    (FreeMemoryReading(5 * GB, "device", 6 * GB, 2 * GB, GB // 10), 7 * GB + GB // 10),
    # v0.12's dynamic patcher: total less the whole model, whatever is resident
    (FreeMemoryReading(18 * GB, "total-minus-model", 6 * GB, 2 * GB, 0), 24 * GB),
])
def test_memory_for_a_model_counts_its_own_weights_exactly_once(reading, usable):
    assert memory_for_model(reading) == usable


@pytest.mark.parametrize("features, dynamic, current, target, how", [
    (V0_33, True, "cuda:0", "cuda:0", "clone"),
    (V0_3, False, "cuda:0", "cuda:1", "retarget"),
    (V0_3, False, "cuda:0", "cpu", "retarget"),
    (V0_33, True, "cuda:0", "cpu", "legacy twin"),  # as core's Select VAE/CLIP Device: clone(disable_dynamic=True)
    (V0_33, True, "cuda:0", "cuda:1", "deep clone"),  # as core's Select Model Device: deepclone_multigpu
    (V0_12_AIMDO_0_1, True, "cuda:0", "cpu", "refuse"),
    (V0_12_AIMDO_0_1, True, "cuda:0", "cuda:1", "refuse"),
])
def test_placement_route_table(features, dynamic, current, target, how):
    assert placement_route(features, dynamic, current, target).how == how


def test_a_refused_move_names_the_hosts_real_flag_and_never_the_dead_one():
    no_deep_clone = HostFeatures(version="v0.16.0", dynamic_vram_enabled=True, dynamic_vram_off_flag=DYNAMIC_VRAM_OFF,
                                 clone_disable_dynamic=True)
    message = placement_route(no_deep_clone, True, "cuda:0", "cuda:1").message
    assert "start ComfyUI with --disable-dynamic-vram" in message and "cuda:1" in message
    opt_in = placement_route(V0_12_AIMDO_0_1, True, "cuda:0", "cpu").message
    assert "start ComfyUI without dynamic VRAM" in opt_in
    for text in (message, opt_in):
        assert "--fast dynamic_vram" not in text and "--fast" not in text


class Interrupted(Exception):
    pass


def accelerator_error(message, code=None):
    error = torch.AcceleratorError(message) if hasattr(torch, "AcceleratorError") else RuntimeError(message)
    if code is not None:
        error.error_code = code
    return error


@pytest.mark.parametrize("error, host_says, expected", [
    (torch.OutOfMemoryError("CUDA out of memory"), None, True),
    (accelerator_error("CUDA error: out of memory"), None, True),  # as newer ComfyUI's is_oom counts it
    (accelerator_error("CUDA error: an illegal memory access", code=2), None, True),  # code 2: cudaErrorMemoryAllocation
    (accelerator_error("CUDA error: an illegal memory access was encountered", code=700), None, False),
    (RuntimeError("shapes cannot be multiplied"), None, False),
    (ValueError("out of memory (but a ValueError)"), None, False),
    (Interrupted(), True, False),  # an interrupt is never retried, whatever else says so
    (RuntimeError("odd"), True, True),  # the host's own verdict wins where it has one
    (torch.OutOfMemoryError("CUDA out of memory"), False, False),
])
def test_out_of_memory_table(error, host_says, expected):
    accelerator_type = getattr(torch, "AcceleratorError", RuntimeError)
    verdict = is_out_of_memory(error, oom_types=(torch.OutOfMemoryError,), interrupt_type=Interrupted,
                               accelerator_error_type=accelerator_type if accelerator_type is not RuntimeError else None,
                               host_says=host_says)
    assert verdict is expected


@pytest.mark.parametrize("features, device, sources", [
    (V0_33, "cuda:0", ("torch", "aimdo", "nvml")),
    (V0_33, "cpu", ()),
    (V0_12_AIMDO_0_1, "cuda:1", ("torch", "aimdo", "nvml")),
    (V0_3, "cuda:0", ("torch", "nvml")),
    (HostFeatures(), "cuda:0", ("torch",)),  # no NVML (no driver library): torch's peaks, a lower bound
    (HostFeatures(aimdo_vram_usage=True), "cuda:0", ("torch",)),  # aimdo installed but not paging: nothing to add
])
def test_vram_sources_table(features, device, sources):
    assert vram_sources(features, device) == sources
