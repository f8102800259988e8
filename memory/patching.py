"""Headroom's hooks on a clone of a MODEL, through ComfyUI's public wrappers and callbacks.

On every model a Headroom node returns (add_run_hooks), all registered under one key on the clone (so they
travel with the MODEL into any sampler):
  OUTER_SAMPLE      the run as a stage of the Memory Report, and its out-of-memory ladder (memory.ladder):
                    after an out-of-memory error the run is retried with the next rung of
                    memory.plan.sampling_ladder applied, every rung recorded in the stage
  CALC_COND_BATCH   cond and uncond one after the other, when the plan or a rung says so
  APPLY_MODEL       each model call in sub-batches, when a rung says so (results do not change)
  PREDICT_NOISE     the stage's VRAM readings after every step
Offload Model adds (apply_budget):
  PREPARE_SAMPLING  ComfyUI's load of the clone, bounded to the plan (legacy patchers)
  ON_LOAD           after every load: record the resident weights; page out and cap above the plan (dynamic)
  PREDICT_NOISE     per step: measure resident weights and RAM (and page out, where nothing caps faults);
                    the test hook that injects an OOM
Per-run state lives in the run's copy of transformer_options["headroom"] (ComfyUI copies nested dicts of
the model options for every run), so a run never changes the model it came from. The limit of the run in
progress is shared with the ON_LOAD callback through the clone's `LoadLimit`. Between runs ComfyUI's own
caching applies: a successful run leaves the clone loaded within its budget, as ComfyUI leaves any model,
so an identical next prompt loads nothing again; another workflow's load evicts it as ComfyUI evicts any.
Non-resident weights are streamed by ComfyUI's own low-VRAM machinery or paged by comfy-aimdo.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

import psutil
import torch

from .attention import ACTIVATION_BYTES_KEY, ATTENTION_PLAN_KEY, DELEGATED_METHODS, resolve_target_bytes
from .batching import slice_batch, sub_batches
from .budget import Budget
from .comfy import budgets, host, journal, models, oom
from .decisions import BudgetMethod
from .ladder import Rung, run_ladder
from .plan import LadderStep, Plan, RunSettings, plan_sampling, sampling_ladder
from .report import BudgetLine, RecordLog, SamplingRecord

HEADROOM = models.WRAPPER_KEY  # transformer_options key of the pack's state
log = logging.getLogger("headroom")


class LoadLimit:
    """The resident-weight limit of the run in progress on a budgeted clone, for its ON_LOAD callback (which
    ComfyUI calls with the patcher only). One per Offload Model output, shared by its clones and runs."""

    def __init__(self):
        self.resident_bytes: int | None = None  # None: no run in progress, or no limit
        self.method: BudgetMethod | None = None
        self.record: SamplingRecord | None = None

    def __deepcopy__(self, memo):
        return self  # ComfyUI deep-copies model options per clone and run; the limit is one


@dataclasses.dataclass(frozen=True)
class OffloadSettings:
    budget: Budget
    records: RecordLog
    limit: LoadLimit


@dataclasses.dataclass
class RunState:
    """The mutable state of one sampling run under Offload Model (one OUTER_SAMPLE call, retries included)."""
    plan: Plan
    record: SamplingRecord
    method: BudgetMethod
    step_in_attempt: int = 0


@dataclasses.dataclass
class SamplingRun:
    """The out-of-memory ladder's settings in one sampling run of any Headroom model."""
    settings: RunSettings


ADVICE = ("Lower the resolution or the batch size, or add Offload Model (a budget) or Sliced Attention "
          "to the model.")


def apply_budget(model, budget: Budget):
    """A clone of `model` whose sampling runs under `budget`; `model` itself is left untouched."""
    clone = add_run_hooks(model.clone())
    options = clone.model_options.setdefault("transformer_options", {})
    headroom = dict(options.get(HEADROOM, {}))  # a copy: never share a dict with the incoming model
    limit = LoadLimit()
    headroom["offload"] = OffloadSettings(budget=budget, records=RecordLog(), limit=limit)
    options[HEADROOM] = headroom

    def after_load(patcher, *args, **kwargs):  # ComfyUI's ON_LOAD: (patcher, device, memory, force, full)
        _after_load(limit, patcher)

    models.add_wrappers(clone, {"PREPARE_SAMPLING": _prepare_sampling, "PREDICT_NOISE": _predict_noise},
                        {"ON_LOAD": after_load})
    return clone


def _headroom(model_options: dict | None) -> dict:
    return (model_options or {}).get("transformer_options", {}).get(HEADROOM, {})


def _begin_offload(headroom: dict, patcher, noise) -> RunState:
    """Plan the run under the Offload Model budget; the limit applies from the first load."""
    settings: OffloadSettings = headroom["offload"]
    device = models.plan_device_facts(patcher)
    plan = plan_sampling(settings.budget, models.model_facts(patcher, noise.shape), device)
    limit_line = settings.budget.limit_bytes(device.total_bytes)
    if limit_line is not None:
        journal.prompt_journal().set_budget(BudgetLine(device.name, *limit_line))
    method = budgets.method_for(patcher)
    record = SamplingRecord(model=models.model_name(patcher), device=device.name, plan=plan.describe(),
                            planned_resident_bytes=plan.resident_bytes, usable_bytes=device.free_bytes,
                            patcher="dynamic" if models.is_dynamic(patcher) else "legacy")
    run = RunState(plan=plan, record=record, method=method)
    headroom["run"] = run
    headroom[ACTIVATION_BYTES_KEY] = plan.activation_bytes  # Sliced Attention's auto target
    settings.limit.resident_bytes, settings.limit.method, settings.limit.record = plan.resident_bytes, method, record
    log.info("Headroom plan: %s", plan.describe())
    if method.note and plan.resident_bytes is not None:
        log.warning("Headroom: %s", method.note)
    return run


def _end_offload(headroom: dict, run: RunState, patcher, error: BaseException | None, seconds: float) -> None:
    settings: OffloadSettings = headroom["offload"]
    record = run.record
    settings.limit.resident_bytes, settings.limit.method, settings.limit.record = None, None, None
    if error is None:
        record.outcome, record.steps = "success", run.step_in_attempt
    else:
        record.outcome = "interrupted" if host.is_interrupt(error) else f"failed: {type(error).__name__}"
    record.seconds = seconds
    if patcher.load_device.type == "cuda" and torch.cuda.is_available():  # peak: since the stage began
        record.peak_vram_bytes = int(torch.cuda.max_memory_allocated(patcher.load_device))
    settings.records.add(record)
    log.info(record.log_line())


def _ladder(guider, headroom: dict, sampling: SamplingRun, run: RunState | None, noise) -> Iterator[Rung]:
    """The rungs of this run, built at the first out-of-memory error (from what is loaded then)."""
    patcher = guider.model_patcher
    start = sampling.settings
    if run is not None and start.resident_bytes is None:  # no budget set: halve what ComfyUI loaded
        start = dataclasses.replace(start, resident_bytes=min(models.loaded_bytes(patcher), run.plan.weight_bytes))
    attention = headroom.get(ATTENTION_PLAN_KEY)
    if attention is not None and attention.method not in DELEGATED_METHODS:  # Sliced Attention on the model
        target, _ = resolve_target_bytes(attention, patcher.load_device, headroom)
        start = dataclasses.replace(start, attention_target_bytes=int(target))
    sampling.settings = start  # what the run ran with, made explicit: the rungs say what they change from it
    for step in sampling_ladder(start, noise.shape[0], models.has_uncond(guider)):
        yield Rung(step.name, lambda step=step: _take_step(step, patcher, headroom, sampling, run))


def _take_step(step: LadderStep, patcher, headroom: dict, sampling: SamplingRun, run: RunState | None) -> str:
    """Apply one rung before the retry; returns what it changed, in words ("" = nothing: skipped)."""
    if step.frees_other_models:
        unloaded = oom.free_other_models(patcher)
        oom.free_after_oom()
        return f"unloaded {', '.join(unloaded)}" if unloaded else ""
    before, after = sampling.settings, step.settings
    changed = after.changes_from(before)
    sampling.settings = after
    if after.attention_target_bytes != before.attention_target_bytes:
        headroom[ATTENTION_PLAN_KEY] = dataclasses.replace(headroom[ATTENTION_PLAN_KEY],
                                                           target_bytes=after.attention_target_bytes)
    if run is not None and after.resident_bytes != before.resident_bytes:
        run.plan = dataclasses.replace(run.plan, resident_bytes=after.resident_bytes)
        headroom["offload"].limit.resident_bytes = after.resident_bytes
    oom.free_after_oom()
    return changed


def _prepare_sampling(executor, *args, **kwargs):
    patcher = args[0] if args else kwargs["model"]
    model_options = kwargs.get("model_options", args[3] if len(args) > 3 else None)
    run: RunState | None = _headroom(model_options).get("run")
    if run is None or run.plan.resident_bytes is None:
        return executor(*args, **kwargs)
    limit = run.plan.resident_bytes
    if run.method.bound_load:
        with budgets.bounded_load(patcher, limit):
            return executor(*args, **kwargs)
    return executor(*args, **kwargs)  # dynamic: the ON_LOAD callback pages out and caps after the load


def _after_load(limit: LoadLimit, patcher) -> None:
    """ComfyUI has just loaded a budgeted clone (any load, also one outside a run)."""
    if limit.resident_bytes is not None and limit.method.page_out_after_load:
        budgets.after_load(patcher, limit.resident_bytes, limit.method.cap_faults)
    if limit.record is not None:
        limit.record.resident_after_loads.append(models.loaded_bytes(patcher))


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    sampling: SamplingRun | None = _headroom(model_options).get("sampling")
    if sampling is None or not sampling.settings.split_cond_uncond or len(conds) < 2:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    outputs = []
    for cond in conds:  # one at a time: the activation peak of a batch of one
        outputs += executor(model, [cond], x_in, timestep, model_options, *args, **kwargs)
    return outputs


def _apply_model_in_sub_batches(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                                transformer_options=None, **kwargs):
    """Each model call in sub-batches of the rung's size, when one applies: the same samples, fewer at once."""
    transformer_options = transformer_options if transformer_options is not None else {}
    sampling: SamplingRun | None = transformer_options.get(HEADROOM, {}).get("sampling")
    size = sampling.settings.sub_batch if sampling is not None else None
    batch = x.shape[0]
    if size is None or batch <= size:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    chunk_keys = [key for key in ("cond_or_uncond", "uuids") if isinstance(transformer_options.get(key), list)]
    chunks = len(transformer_options["cond_or_uncond"]) if "cond_or_uncond" in chunk_keys else 1
    outputs = []
    for part in sub_batches(batch, chunks, size):
        options = dict(transformer_options)  # per sub-call: its cond's chunk, its sigmas
        for key in chunk_keys:
            if len(options[key]) == chunks:
                options[key] = [options[key][part.chunk]]
        if "sigmas" in options:
            options["sigmas"] = slice_batch(options["sigmas"], batch, part)
        outputs.append(executor(slice_batch(x, batch, part), slice_batch(t, batch, part),
                                slice_batch(c_concat, batch, part), slice_batch(c_crossattn, batch, part),
                                slice_batch(control, batch, part), options,
                                **{key: slice_batch(value, batch, part) for key, value in kwargs.items()}))
    return torch.cat(outputs)


def _predict_noise(executor, *args, **kwargs):
    guider = executor.class_obj
    headroom = _headroom(guider.model_options)
    run: RunState | None = headroom.get("run")
    if run is None:
        return executor(*args, **kwargs)
    run.step_in_attempt += 1
    injection = headroom.get("test_inject_oom")  # test hook: {"step": n, "times": k}, per run
    if injection and injection["times"] > 0 and run.step_in_attempt == injection["step"]:
        injection["times"] -= 1
        raise torch.OutOfMemoryError(f"Headroom test hook: out of memory injected at step {injection['step']}")
    output = executor(*args, **kwargs)
    patcher = guider.model_patcher
    if run.method.trim_after_step and run.plan.resident_bytes is not None:
        budgets.trim(patcher, run.plan.resident_bytes)  # pages faulted in above the budget during this step
    record = run.record
    record.measured_resident_bytes = max(record.measured_resident_bytes, models.loaded_bytes(patcher))
    record.peak_ram_bytes = max(record.peak_ram_bytes, psutil.Process().memory_info().rss)
    return output


# --- On every model a Headroom node returns: the run as a Memory Report stage, and its out-of-memory ladder

def add_run_hooks(clone):
    """Register on a clone (once): each sampling run is a stage of the Memory Report (its VRAM readings also
    taken after every step) and recovers from out-of-memory errors through the ladder. Returns the clone."""
    if _run_sampling not in models.headroom_wrappers(clone, "OUTER_SAMPLE"):
        models.add_wrappers(clone, {"OUTER_SAMPLE": _run_sampling, "PREDICT_NOISE": _sample_vram_each_step,
                                    "CALC_COND_BATCH": _calc_cond_batch,
                                    "APPLY_MODEL": _apply_model_in_sub_batches}, {})
    return clone


def _sample_vram_each_step(executor, *args, **kwargs):
    output = executor(*args, **kwargs)
    journal.sample_vram()  # between two steps sits the step's peak: the readers outside torch sample it here
    return output


def _run_sampling(executor, *args, **kwargs):
    guider = executor.class_obj
    patcher = guider.model_patcher
    options = guider.model_options.setdefault("transformer_options", {})  # the run's own copy (ComfyUI's)
    headroom = options[HEADROOM] = dict(options.get(HEADROOM, {}))  # and ours: Pick GPU's clone has none
    noise = args[0] if args else kwargs["noise"]
    with journal.stage("sampling", models.model_name(patcher), patcher.load_device) as stage:
        started = time.perf_counter()
        run = _begin_offload(headroom, patcher, noise) if "offload" in headroom else None
        sampling = SamplingRun(RunSettings(split_cond_uncond=run.plan.split_cond_uncond,
                                           resident_bytes=run.plan.resident_bytes) if run else RunSettings())
        headroom["sampling"] = sampling
        if run is not None:
            run.record.rungs = stage.rungs  # one list: the record and the stage show the same rungs

        def attempt():
            if run is not None:
                run.step_in_attempt = 0
            return executor(*args, **kwargs)

        error = None
        try:
            return run_ladder(attempt, _ladder(guider, headroom, sampling, run, noise),
                              what=f"sampling {stage.name} on {patcher.load_device}",
                              is_out_of_memory=oom.is_out_of_memory, attempts=stage.rungs, advice=ADVICE,
                              is_interrupt=host.is_interrupt)
        except BaseException as failure:
            error = failure
            raise
        finally:
            if run is None:  # no Offload Model: what ComfyUI kept loaded
                stage.resident_bytes = models.loaded_bytes(patcher)
            else:
                _end_offload(headroom, run, patcher, error, time.perf_counter() - started)
                _copy_plan(run, stage)
            if error is not None:
                models.release(patcher)  # a failed or interrupted run leaves nothing of ours loaded


def _copy_plan(run: RunState, stage) -> None:
    plan, record = run.plan, run.record  # the plan the run finished with, after any rungs
    if plan.resident_bytes is not None:
        on_device = plan.resident_bytes + plan.activation_bytes
        if stage.device.startswith("cuda"):
            stage.planned_vram_bytes, stage.planned_ram_bytes = on_device, plan.weight_bytes - plan.resident_bytes
        else:  # the device is the CPU: weights and activations are all in RAM
            stage.planned_ram_bytes = plan.weight_bytes + plan.activation_bytes
    stage.resident_bytes = record.measured_resident_bytes
    stage.detail = f"{record.steps} steps; plan: {record.plan}"


# --- Pick GPU: the model's device is torch's current CUDA device while it samples

def add_device_guard(clone):
    """Register on a clone: sampling runs with the clone's load device as the current CUDA device, so code
    that allocates on "the current device" meets the model's tensors there. Returns the clone."""
    models.add_wrappers(clone, {"OUTER_SAMPLE": _device_guard}, {})
    return clone


def _device_guard(executor, *args, **kwargs):
    device = executor.class_obj.model_patcher.load_device  # read at run time: the device the run loads on
    if device.type != "cuda":
        return executor(*args, **kwargs)
    with torch.cuda.device(device):
        return executor(*args, **kwargs)
