"""Apply a budget to a clone of a MODEL through ComfyUI's public wrappers and callbacks.

Hooks, all registered under one key on the clone (so they travel with the MODEL into any sampler):
  OUTER_SAMPLE      the run as a stage of the Memory Report (add_stage_recorder, outermost); then the
                    scope of one run: plan, record, out-of-memory ladder; a failed run is unloaded
  PREPARE_SAMPLING  ComfyUI's load of the clone, bounded to the plan (legacy patchers)
  ON_LOAD           after every load: record the resident weights; page out and cap above the plan (dynamic)
  CALC_COND_BATCH   run cond and uncond one after the other when the plan says so
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

import psutil
import torch

from .attention import ACTIVATION_BYTES_KEY
from .budget import Budget
from .comfy import budgets, host, journal, models, oom
from .decisions import BudgetMethod
from .ladder import RungAttempt
from .plan import Plan, oom_ladder, plan_sampling
from .report import BudgetLine, RecordLog, SamplingRecord

HEADROOM = models.WRAPPER_KEY  # transformer_options key of the pack's state
log = logging.getLogger("headroom")


class BudgetExhausted(torch.OutOfMemoryError):
    """Every rung of the ladder was tried. An OOM error, so ComfyUI still shows its own OOM advice."""


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
    """The mutable state of one sampling run (one OUTER_SAMPLE call, retries included)."""
    plan: Plan
    record: SamplingRecord
    method: BudgetMethod
    step_in_attempt: int = 0


def apply_budget(model, budget: Budget):
    """A clone of `model` whose sampling runs under `budget`; `model` itself is left untouched."""
    clone = add_stage_recorder(model.clone())  # first: the stage wraps the whole run, retries included
    options = clone.model_options.setdefault("transformer_options", {})
    headroom = dict(options.get(HEADROOM, {}))  # a copy: never share a dict with the incoming model
    limit = LoadLimit()
    headroom["offload"] = OffloadSettings(budget=budget, records=RecordLog(), limit=limit)
    options[HEADROOM] = headroom

    def after_load(patcher, *args, **kwargs):  # ComfyUI's ON_LOAD: (patcher, device, memory, force, full)
        _after_load(limit, patcher)

    models.add_wrappers(clone,
                        {"OUTER_SAMPLE": _outer_sample, "PREPARE_SAMPLING": _prepare_sampling,
                         "CALC_COND_BATCH": _calc_cond_batch, "PREDICT_NOISE": _predict_noise},
                        {"ON_LOAD": after_load})
    return clone


def _headroom(model_options: dict | None) -> dict:
    return (model_options or {}).get("transformer_options", {}).get(HEADROOM, {})


def _attention_target(headroom: dict, plan: Plan) -> int | None:
    attention = headroom.get("attention")
    if attention is None:
        return None
    return getattr(attention, "target_bytes", None) or plan.activation_bytes


def _apply_rung(headroom: dict, run: RunState, rung, limit: LoadLimit) -> None:
    run.plan = rung.plan
    limit.resident_bytes = rung.plan.resident_bytes
    headroom[ACTIVATION_BYTES_KEY] = rung.plan.activation_bytes
    attention = headroom.get("attention")
    if attention is not None and rung.attention_target_bytes is not None:
        headroom["attention"] = dataclasses.replace(attention, target_bytes=rung.attention_target_bytes)


def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    patcher = guider.model_patcher
    headroom = _headroom(guider.model_options)
    settings: OffloadSettings = headroom["offload"]
    noise = args[0] if args else kwargs["noise"]
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
    limit = settings.limit
    limit.resident_bytes, limit.method, limit.record = plan.resident_bytes, method, record
    log.info("Headroom plan: %s", plan.describe())
    if method.note and plan.resident_bytes is not None:
        log.warning("Headroom: %s", method.note)
    cuda = patcher.load_device.type == "cuda" and torch.cuda.is_available()  # peak: since the stage began
    started = time.perf_counter()
    rungs = None
    try:
        while True:
            run.step_in_attempt = 0
            failure = None
            try:
                output = executor(*args, **kwargs)
                break
            except Exception as error:
                if not oom.is_out_of_memory(error):
                    raise
                failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            # retried outside the except block, so the traceback's frames (and their tensors) are freed
            if rungs is None:
                rungs = oom_ladder(run.plan, models.loaded_bytes(patcher), _attention_target(headroom, run.plan))
            if not rungs:
                tried = "; ".join(record.rungs) or "no rung applies"
                raise BudgetExhausted(f"Headroom: out of memory while sampling {record.model} on {device.name} "
                                      f"({failure}). Tried: {tried}. Lower the budget, the resolution or the "
                                      "batch size, or add Sliced Attention.")
            rung = rungs.pop(0)
            record.rungs.append(rung.name)
            log.warning("Headroom: out of memory (%s); retrying: %s", failure, rung.name)
            oom.free_after_oom()
            _apply_rung(headroom, run, rung, limit)
        record.outcome = "success"
        record.steps = run.step_in_attempt
        return output
    except BaseException as error:
        record.outcome = "interrupted" if host.is_interrupt(error) else f"failed: {type(error).__name__}"
        raise
    finally:
        limit.resident_bytes, limit.method, limit.record = None, None, None
        record.seconds = time.perf_counter() - started
        if cuda:
            record.peak_vram_bytes = int(torch.cuda.max_memory_allocated(patcher.load_device))
        if record.outcome != "success":
            models.release(patcher)  # a failed or interrupted run leaves nothing of ours loaded
        settings.records.add(record)
        log.info(record.log_line())


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
    run: RunState | None = _headroom(model_options).get("run")
    if run is None or not run.plan.split_cond_uncond or len(conds) < 2:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    outputs = []
    for cond in conds:  # one at a time: the activation peak of a batch of one
        outputs += executor(model, [cond], x_in, timestep, model_options, *args, **kwargs)
    return outputs


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


# --- The Memory Report's sampling stage: on every model a Headroom node returns

def add_stage_recorder(clone):
    """Register on a clone (once): each sampling run is a stage of the Memory Report, whose VRAM readings are
    also taken after every step. Returns the clone."""
    if _record_sampling not in models.headroom_wrappers(clone, "OUTER_SAMPLE"):
        models.add_wrappers(clone, {"OUTER_SAMPLE": _record_sampling, "PREDICT_NOISE": _sample_vram_each_step}, {})
    return clone


def _sample_vram_each_step(executor, *args, **kwargs):
    output = executor(*args, **kwargs)
    journal.sample_vram()  # between two steps sits the step's peak: the readers outside torch sample it here
    return output


def _record_sampling(executor, *args, **kwargs):
    guider = executor.class_obj
    patcher = guider.model_patcher
    with journal.stage("sampling", models.model_name(patcher), patcher.load_device) as stage:
        try:
            return executor(*args, **kwargs)
        finally:
            run: RunState | None = _headroom(guider.model_options).get("run")
            if run is None:  # no Offload Model: what ComfyUI kept loaded
                stage.resident_bytes = models.loaded_bytes(patcher)
            else:
                _copy_plan(run, stage)


def _copy_plan(run: RunState, stage) -> None:
    plan, record = run.plan, run.record  # the plan the run finished with, after any rungs
    if plan.resident_bytes is not None:
        on_device = plan.resident_bytes + plan.activation_bytes
        if stage.device.startswith("cuda"):
            stage.planned_vram_bytes, stage.planned_ram_bytes = on_device, plan.weight_bytes - plan.resident_bytes
        else:  # the device is the CPU: weights and activations are all in RAM
            stage.planned_ram_bytes = plan.weight_bytes + plan.activation_bytes
    stage.resident_bytes = record.measured_resident_bytes
    stage.rungs = [RungAttempt(name, name, outcome="tried") for name in record.rungs]
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
