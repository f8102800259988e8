"""Budget and plan: tables of cases, and the out-of-memory ladder."""
import math

import pytest

from comfyui_headroom.memory.budget import GB, Budget
from comfyui_headroom.memory.plan import (
    DeviceFacts,
    ModelFacts,
    RunSettings,
    plan_sampling,
    sampling_ladder,
    sub_batch_sizes,
)

MB = 2 ** 20
SDXL = ModelFacts(weight_bytes=int(4.8 * GB), activation_bytes_batched=2 * GB, activation_bytes_single=1 * GB)
CARD_8GB = DeviceFacts("cuda:0", total_bytes=8 * GB, free_bytes=7 * GB)


@pytest.mark.parametrize("budget, device, resident, split", [
    # no budget: ComfyUI decides
    (Budget(), CARD_8GB, None, False),
    # a cap below the weights: resident = cap; 7 GB free - 2 GB resident leaves room for batched activations
    (Budget(weights_cap_bytes=2 * GB), CARD_8GB, 2 * GB, False),
    # a cap above the weights: resident = all weights
    (Budget(weights_cap_bytes=6 * GB), CARD_8GB, int(4.8 * GB), False),
    # a cap that leaves room for one activation only: split cond/uncond
    (Budget(weights_cap_bytes=int(5.5 * GB)), DeviceFacts("cuda:0", 8 * GB, int(6.6 * GB)), int(4.8 * GB), True),
    # keep 1 GB free with 7 GB free: 6 GB usable >= 4.8 + 2 -> no? 6 < 6.8: resident 4 GB, batched
    (Budget(keep_free_bytes=1 * GB), CARD_8GB, 4 * GB, False),
    # keep 0.2 GB free on an empty 8 GB card (7.5 free): 7.3 usable >= 6.8: everything resident
    (Budget(keep_free_bytes=int(0.2 * GB)), DeviceFacts("cuda:0", 8 * GB, int(7.5 * GB)), int(4.8 * GB), False),
    # keep 5.5 GB free: 1.5 GB usable < 2 GB batched activations: split, 0.5 GB resident
    (Budget(keep_free_bytes=int(5.5 * GB)), CARD_8GB, int(0.5 * GB), True),
    # keep 6.5 GB free: 0.5 GB usable < one activation: stream everything, split
    (Budget(keep_free_bytes=int(6.5 * GB)), CARD_8GB, 0, True),
    # the device's free bytes are what this model could use (3 GB free + its own 3 GB resident): 6 - 1 kept = 5 GB
    (Budget(keep_free_bytes=1 * GB), DeviceFacts("cuda:0", 8 * GB, 6 * GB), 3 * GB, False),
])
def test_plan_table(budget, device, resident, split):
    plan = plan_sampling(budget, SDXL, device)
    assert plan.resident_bytes == resident
    assert plan.split_cond_uncond is split
    assert plan.activation_bytes == (SDXL.activation_bytes_single if split else SDXL.activation_bytes_batched)
    assert plan.device == "cuda:0" and plan.weight_bytes == SDXL.weight_bytes


def test_plan_describes_itself_in_numbers():
    text = plan_sampling(Budget(weights_cap_bytes=2 * GB), SDXL, CARD_8GB).describe()
    assert "resident weights <= 2.00 GB of 4.80 GB (42%)" in text
    assert "cond/uncond batched" in text and "cuda:0" in text


@pytest.mark.parametrize("budget_gb, keep_free_gb, named", [
    (-1, 0, "budget_gb"), (0, -0.1, "keep_free_gb"), (math.nan, 0, "budget_gb"), (2, 1, "budget_gb"),
])
def test_bad_budgets_name_the_input(budget_gb, keep_free_gb, named):
    with pytest.raises(ValueError, match=named):
        Budget.from_gb(budget_gb, keep_free_gb)


def test_budgets_the_device_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="budget_gb 16 is larger than cuda:0"):
        Budget.from_gb(16, 0).check_fits("cuda:0", 8 * GB)
    with pytest.raises(ValueError, match="keep_free_gb 8 leaves nothing"):
        Budget.from_gb(0, 8).check_fits("cuda:0", 8 * GB)
    Budget.from_gb(8, 0).check_fits("cuda:0", 8 * GB)


def test_from_gb_zero_means_no_budget():
    assert not Budget.from_gb(0, 0).is_set
    assert Budget.from_gb(1.5, 0).weights_cap_bytes == int(1.5 * GB)


def test_the_ladder_goes_from_cheapest_to_dearest_each_rung_cumulative():
    start = RunSettings(attention_target_bytes=256 * MB, resident_bytes=2 * GB)
    steps = sampling_ladder(start, batch=4, has_uncond=True)
    assert [step.name for step in steps] == [
        "free the other models ComfyUI keeps loaded", "run cond and uncond separately",
        "split each model call into batches of 2", "split each model call into batches of 1",
        "halve attention chunks (target 128 MB)", "halve resident weights to 1.00 GB",
        "stream all weights and halve attention chunks again"]
    assert steps[0].frees_other_models and not any(step.frees_other_models for step in steps[1:])
    assert steps[0].settings == start
    assert [step.settings.split_cond_uncond for step in steps] == [False] + [True] * 6
    assert [step.settings.sub_batch for step in steps] == [None, None, 2, 1, 1, 1, 1]
    assert [step.settings.attention_target_bytes for step in steps] == [256 * MB] * 4 + [128 * MB] * 2 + [64 * MB]
    assert [step.settings.resident_bytes for step in steps] == [2 * GB] * 5 + [GB, 0]


def test_a_model_with_only_pick_gpu_gets_the_rungs_that_change_no_result_and_nothing_repeats():
    steps = sampling_ladder(RunSettings(split_cond_uncond=True), batch=1, has_uncond=True)
    assert [step.name for step in steps] == ["free the other models ComfyUI keeps loaded"]
    steps = sampling_ladder(RunSettings(), batch=3, has_uncond=False)
    assert [step.name for step in steps] == ["free the other models ComfyUI keeps loaded",
                                             "split each model call into batches of 1"]


def test_sub_batches_divide_the_batch_and_shrink_to_one():
    assert [sub_batch_sizes(batch) for batch in (1, 2, 4, 6, 8, 12)] == [
        [], [1], [2, 1], [3, 1], [4, 2, 1], [6, 3, 1]]


def test_each_setting_change_is_said_in_words():
    before = RunSettings(attention_target_bytes=64 * MB, resident_bytes=GB)
    after = RunSettings(split_cond_uncond=True, sub_batch=2, attention_target_bytes=32 * MB, resident_bytes=GB // 2)
    assert after.changes_from(before) == ("cond and uncond in separate model calls; model calls in batches of 2; "
                                          "attention target 64 MB -> 32 MB; resident weights 1.00 GB -> 0.50 GB")
    assert before.changes_from(before) == ""
