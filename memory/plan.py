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
class Rung:
    """One step of the out-of-memory ladder: what was tightened, and the resulting settings."""
    name: str
    plan: Plan
    attention_target_bytes: int | None  # None: Sliced Attention is not on the model


def oom_ladder(plan: Plan, loaded_bytes: int, attention_target_bytes: int | None) -> list[Rung]:
    """Ever tighter settings to retry with after an out-of-memory error, each rung cumulative.

    Rungs that would change nothing are left out (a plan already split is not split again).
    """
    rungs = []
    current, attention = plan, attention_target_bytes
    resident_now = plan.resident_bytes if plan.resident_bytes is not None else min(loaded_bytes, plan.weight_bytes)
    if resident_now > 0:
        current = dataclasses.replace(current, resident_bytes=resident_now // 2)
        rungs.append(Rung(f"halve resident weights to {gb(resident_now // 2)}", current, attention))
    if not current.split_cond_uncond:
        current = dataclasses.replace(current, split_cond_uncond=True)
        rungs.append(Rung("run cond and uncond separately", current, attention))
    if attention is not None:
        attention //= 2
        rungs.append(Rung(f"halve attention chunks (target {attention / 2**20:.0f} MB)", current, attention))
    if current.resident_bytes:
        current = dataclasses.replace(current, resident_bytes=0)
        attention = attention // 2 if attention is not None else None
        rungs.append(Rung("stream all weights" + (" and halve attention chunks again" if attention else ""),
                          current, attention))
    return rungs
