"""Budget and plan: tables of cases, and the out-of-memory ladder."""
import math

import pytest

from comfyui_headroom.memory.budget import GB, Budget
from comfyui_headroom.memory.plan import DeviceFacts, ModelFacts, oom_ladder, plan_sampling

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


def test_ladder_tightens_step_by_step_and_skips_what_changes_nothing():
    plan = plan_sampling(Budget(weights_cap_bytes=2 * GB), SDXL, CARD_8GB)
    rungs = oom_ladder(plan, loaded_bytes=2 * GB, attention_target_bytes=256 * MB)
    assert [rung.name.split(" (")[0].split(" to ")[0] for rung in rungs] == [
        "halve resident weights", "run cond and uncond separately", "halve attention chunks",
        "stream all weights and halve attention chunks again"]
    assert [rung.plan.resident_bytes for rung in rungs] == [GB, GB, GB, 0]
    assert [rung.plan.split_cond_uncond for rung in rungs] == [False, True, True, True]
    assert [rung.attention_target_bytes for rung in rungs] == [256 * MB, 256 * MB, 128 * MB, 64 * MB]


def test_ladder_without_budget_starts_from_what_is_loaded_and_without_attention_has_no_attention_rung():
    plan = plan_sampling(Budget(), SDXL, CARD_8GB)
    plan = plan.__class__(**{**plan.__dict__, "split_cond_uncond": True})
    rungs = oom_ladder(plan, loaded_bytes=3 * GB, attention_target_bytes=None)
    assert [rung.plan.resident_bytes for rung in rungs] == [int(1.5 * GB), 0]
    assert all("attention" not in rung.name for rung in rungs)
    assert oom_ladder(rungs[-1].plan, 0, None) == []  # nothing left to tighten
