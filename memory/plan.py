"""Budget + model facts + device facts -> a Plan for one sampling run, and the out-of-memory ladder.

Pure functions over plain data: the caller measures the device and the model (memory.comfy does
it for ComfyUI) and applies the Plan (memory.patching).
"""
from __future__ import annotations

import dataclasses

from .budget import Budget, gb


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    weight_bytes: int  # all weights of the diffusion model
    activation_bytes_batched: int  # what ComfyUI expects for one step with cond and uncond together
    activation_bytes_single: int  # ... with cond and uncond run one after the other


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    name: str
    total_bytes: int
    free_bytes: int  # what the model being planned could use now (free memory + its own resident weights)


@dataclasses.dataclass(frozen=True)
class Plan:
    resident_bytes: int | None  # cap on the model's weights kept on the device; None = ComfyUI decides
    activation_bytes: int  # the activation memory ComfyUI expects with this plan's batching
    split_cond_uncond: bool
    weight_bytes: int
    device: str
    reason: str

    def describe(self) -> str:
        if self.resident_bytes is None:
            weights = f"weights {gb(self.weight_bytes)}: ComfyUI decides what stays resident"
        else:
            share = 100.0 * self.resident_bytes / self.weight_bytes if self.weight_bytes else 100.0
            weights = (f"resident weights <= {gb(self.resident_bytes)} of {gb(self.weight_bytes)} ({share:.0f}%), "
                       "the rest streamed by ComfyUI")
        batching = "cond/uncond run separately" if self.split_cond_uncond else "cond/uncond batched"
        return (f"{self.device}: {weights}; activations ~{gb(self.activation_bytes)} ({batching}); "
                f"{self.reason}")


def plan_sampling(budget: Budget, model: ModelFacts, device: DeviceFacts) -> Plan:
    """The plan for one run. `device.free_bytes` is what this model could use now, its own resident weights
    counted (they are free for it, since the plan may keep or drop them): memory.decisions.memory_for_model."""
    usable_now = device.free_bytes
    if budget.weights_cap_bytes is not None:
        resident = min(budget.weights_cap_bytes, model.weight_bytes)
        split = (usable_now - resident < model.activation_bytes_batched
                 and usable_now - resident >= model.activation_bytes_single)
        reason = f"budget: {budget.describe()}"
    elif budget.keep_free_bytes is not None:
        usable = usable_now - budget.keep_free_bytes
        if usable >= model.weight_bytes + model.activation_bytes_batched:
            resident, split = model.weight_bytes, False
        elif usable >= model.activation_bytes_batched:
            resident, split = usable - model.activation_bytes_batched, False
        else:
            resident, split = max(0, usable - model.activation_bytes_single), True
        reason = f"budget: {budget.describe()} of {gb(usable_now)} available"
    else:
        return Plan(None, model.activation_bytes_batched, False, model.weight_bytes, device.name,
                    "no budget set")
    activation = model.activation_bytes_single if split else model.activation_bytes_batched
    return Plan(resident, activation, split, model.weight_bytes, device.name, reason)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the out-of-memory ladder can tighten in one sampling run."""
    split_cond_uncond: bool = False  # cond and uncond in separate model calls
    sub_batch: int | None = None  # None: each model call runs its whole batch; else at most this many samples
    attention_target_bytes: int | None = None  # Sliced Attention's target; None: no target to halve
    resident_bytes: int | None = None  # Offload Model's resident-weight cap; None: Offload Model is not on it

    def changes_from(self, before: RunSettings) -> str:
        """What changed since `before`, in words ("" when nothing did)."""
        changes = []
        if self.split_cond_uncond != before.split_cond_uncond:
            changes.append("cond and uncond in separate model calls")
        if self.sub_batch != before.sub_batch:
            changes.append(f"model calls in batches of {self.sub_batch}"
                           + (f" (were {before.sub_batch})" if before.sub_batch else ""))
        if self.attention_target_bytes != before.attention_target_bytes:
            changes.append(f"attention target {_mb(before.attention_target_bytes)} -> "
                           f"{_mb(self.attention_target_bytes)}")
        if self.resident_bytes != before.resident_bytes:
            changes.append(f"resident weights {gb(before.resident_bytes or 0)} -> {gb(self.resident_bytes or 0)}")
        return "; ".join(changes)


@dataclasses.dataclass(frozen=True)
class LadderStep:
    """One rung of the sampling ladder: its name and the settings of the retry (cumulative). A step that
    frees the other models ComfyUI keeps loaded changes no setting."""
    name: str
    settings: RunSettings
    frees_other_models: bool = False


FREE_OTHER_MODELS = "free the other models ComfyUI keeps loaded"


def sampling_ladder(start: RunSettings, batch: int, has_uncond: bool) -> list[LadderStep]:
    """The rungs to retry a sampling run with after an out-of-memory error, cheapest first, each cumulative:
    free the other models; cond and uncond separately; model calls in ever smaller sub-batches (results do
    not change); halve the attention target; halve the resident weights; stream them all. Rungs that
    would change nothing are left out. `batch`: the latent batch (samples per cond)."""
    steps = [LadderStep(FREE_OTHER_MODELS, start, frees_other_models=True)]
    current = start

    def step(name: str, **changes) -> None:
        nonlocal current
        current = dataclasses.replace(current, **changes)
        steps.append(LadderStep(name, current))

    if has_uncond and not current.split_cond_uncond:
        step("run cond and uncond separately", split_cond_uncond=True)
    for size in sub_batch_sizes(batch):  # after the split, a model call holds one cond's batch
        if current.sub_batch is None or size < current.sub_batch:
            step(f"split each model call into batches of {size}", sub_batch=size)
    if current.attention_target_bytes:
        step(f"halve attention chunks (target {_mb(current.attention_target_bytes // 2)})",
             attention_target_bytes=current.attention_target_bytes // 2)
    if current.resident_bytes:
        step(f"halve resident weights to {gb(current.resident_bytes // 2)}", resident_bytes=current.resident_bytes // 2)
        attention = current.attention_target_bytes // 2 if current.attention_target_bytes else None
        step("stream all weights" + (" and halve attention chunks again" if attention else ""),
             resident_bytes=0, attention_target_bytes=attention)
    return steps


def sub_batch_sizes(batch: int) -> list[int]:
    """Ever smaller sub-batches of a model call of `batch` samples, each dividing it: halved while even,
    then 1 (8 -> 4, 2, 1; 6 -> 3, 1; 1 -> none)."""
    sizes, size = [], batch
    while size > 1:
        size = size // 2 if size % 2 == 0 else 1
        sizes.append(size)
    return sizes


def _mb(n_bytes: int | None) -> str:
    return "auto" if n_bytes is None else f"{n_bytes / 2**20:.0f} MB"
