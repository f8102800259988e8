"""What each stage of a prompt planned and measured, and the Memory Report built from it.

A `Journal` belongs to one prompt. Every Headroom hook opens a stage in it (text encode,
sampling, VAE, tiles, GC) with `journal.stage(...)`; stages nest (a tile's sampling runs inside
"tiles"). Peaks come from a `PeakProbe`: the process's RAM high-water mark (Linux VmHWM, reset
through /proc/self/clear_refs), torch's allocated peak per CUDA device, and the readings of device
memory outside torch's allocator it is given (`vram_readers`: the process's NVML usage; comfy-aimdo's
usage, which counts its VBAR pages too), sampled at each stage's start and end and whenever a hook
calls `Journal.sample()` (every sampling step). Those are process-wide counters, so a stage that opens
inside another folds what the outer one had seen before it resets them, and hands its own peak back to
the outer one when it closes. A stage's VRAM peak is the largest of its sources: torch's peak alone is a
lower bound (VBAR pages and other allocators are outside it); sampled readings can miss a peak between
two samples. The report names the sources each stage used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from typing import Callable

import psutil
import torch

from .budget import gb
from .ladder import RungAttempt

RAM = "ram"  # the probe's key for the process's RAM; torch's CUDA peaks are keyed by device ("cuda:0")
TORCH = "torch"
# a reader of device memory outside torch's allocator: {"cuda:0": bytes now}, or None when it cannot say
VramReader = Callable[[], "dict[str, int] | None"]


def _source_key(source: str, device: str) -> str:
    return f"{source}@{device}"


class PeakProbe:
    """The process's peak memory since the last reset: RAM, torch's peak on every CUDA device it sees, and
    the largest reading each VRAM reader gave per device."""

    def __init__(self, vram_readers: dict[str, VramReader] | None = None):
        self.ram_peak_is_exact = _reset_ram_peak()  # False off Linux: the peak is the RSS at reads
        self.vram_readers = dict(vram_readers or {})
        self._sampled: dict[str, int] = {}

    def sample(self) -> None:
        """Fold the readers' current readings into the peaks since the last reset."""
        for source, reader in self.vram_readers.items():
            for device, value in (reader() or {}).items():
                key = _source_key(source, device)
                self._sampled[key] = max(self._sampled.get(key, 0), int(value))

    def reset(self) -> None:
        if self.ram_peak_is_exact:
            _reset_ram_peak()
        for device in _cuda_devices():
            torch.cuda.reset_peak_memory_stats(device)
        self._sampled = {}
        self.sample()

    def read(self) -> dict[str, int]:
        self.sample()
        peaks = {RAM: _ram_peak_bytes() if self.ram_peak_is_exact else psutil.Process().memory_info().rss}
        for device in _cuda_devices():
            peaks[device] = int(torch.cuda.max_memory_allocated(device))
        peaks.update(self._sampled)
        return peaks


def _cuda_devices() -> list[str]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []  # nothing has run on a GPU yet: no peak to read, and no CUDA context to create for it
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def _reset_ram_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # "5" resets the peak RSS (VmHWM) of this process, nothing else
        return _ram_peak_bytes() > 0
    except OSError:
        return False


def _ram_peak_bytes() -> int:
    with open("/proc/self/status") as status:
        match = re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _device_name(device) -> str:
    """"cuda" alone means the current CUDA device: name it by index, as the probe keys its peaks."""
    name = str(device)
    if name == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return name


def _fold(peaks: dict[str, int], more: dict[str, int]) -> None:
    for key, value in more.items():
        peaks[key] = max(peaks.get(key, 0), value)


@dataclasses.dataclass
class Stage:
    """One stage of a prompt: what it planned (None where nothing was planned) and what it measured."""
    kind: str  # text encode | sampling | VAE decode | VAE encode | tiles | GC
    name: str  # what ran: the model, or the node
    device: str
    node_id: str | None = None  # the ComfyUI node that ran it
    node_type: str | None = None  # that node's class (KSampler, VAEDecode...), when the prompt is known
    depth: int = 0  # how many stages it ran inside (a tile's sampling runs inside "tiles")
    planned_vram_bytes: int | None = None  # on a CUDA device: weights kept resident + activations
    planned_ram_bytes: int | None = None  # weights planned to wait in RAM (+ activations on the CPU)
    resident_bytes: int | None = None  # the most model weight bytes seen on the device
    peak_vram_bytes: int | None = None  # the largest of vram_peaks on the stage's CUDA device; None elsewhere
    vram_peaks: dict[str, int] = dataclasses.field(default_factory=dict)  # by source: torch, aimdo, nvml
    vram_sources: list[str] = dataclasses.field(default_factory=list)  # the sources that gave a reading
    peak_ram_bytes: int = 0  # the process's peak RSS during the stage
    vram_before_bytes: int | None = None  # torch-allocated on the stage's CUDA device when it started
    vram_after_bytes: int | None = None  # ... when it ended
    ram_before_bytes: int = 0  # the process's RSS when the stage started: peak - before = what the stage added
    ram_after_bytes: int = 0  # the process's RSS when it ended (what a GC gave back shows here)
    seconds: float = 0.0
    rungs: list[RungAttempt] = dataclasses.field(default_factory=list)  # out-of-memory ladder rungs tried
    outcome: str = "running"  # success | failed: <error> | interrupted
    detail: str = ""  # the plan, the tile count, what GC freed

    def line(self) -> str:
        planned = " ".join(f"{label}<={gb(value)}" for label, value in
                           (("vram", self.planned_vram_bytes), ("ram", self.planned_ram_bytes)) if value is not None)
        measured = [f"peak_ram={gb(self.peak_ram_bytes)}(+{gb(self.peak_ram_bytes - self.ram_before_bytes)})",
                    f"ram_after={gb(self.ram_after_bytes)}"]
        if self.peak_vram_bytes is not None:
            added = gb(self.peak_vram_bytes - self.vram_before_bytes)
            sources = ",".join(f"{source}:{gb(value).replace(' ', '')}" for source, value in self.vram_peaks.items())
            measured[:0] = [f"peak_vram={gb(self.peak_vram_bytes)}(+{added})[{sources}]",
                            f"vram_after={gb(self.vram_after_bytes)}"]
        if self.resident_bytes is not None:
            measured.append(f"resident={gb(self.resident_bytes)}")
        node = f" node={self.node_id}" if self.node_id is not None else ""
        node += f"({self.node_type})" if self.node_type else ""
        rungs = f" oom_rungs=[{'; '.join(rung.describe() for rung in self.rungs)}]" if self.rungs else ""
        return (f"{'  ' * self.depth}{self.kind}: {self.name} on {self.device}{node} {self.outcome} "
                f"{self.seconds:.2f}s planned[{planned or 'none'}] {' '.join(measured)}{rungs}"
                + (f" ({self.detail})" if self.detail else ""))


@dataclasses.dataclass(frozen=True)
class BudgetLine:
    """A limit the user set, in device memory: what the chart draws as a line."""
    device: str
    bytes: int
    label: str


class Journal:
    """The stages of one prompt, in the order they started."""

    def __init__(self, prompt_id: str | None = None, probe: PeakProbe | None = None,
                 is_interrupt=lambda error: False):
        self.prompt_id = prompt_id
        self.probe = probe or PeakProbe()
        self.is_interrupt = is_interrupt  # the host's interrupt error (a user's Cancel), told from a failure
        self.stages: list[Stage] = []
        self.budgets: dict[str, BudgetLine] = {}  # by device: the latest limit set there
        self._open_peaks: list[dict[str, int]] = []  # the peaks each open stage has seen, outermost first

    @contextlib.contextmanager
    def stage(self, kind: str, name: str, device: str, node_id: str | None = None):
        """Measure the block as one stage; yields the Stage for the caller to add its plan to."""
        record = Stage(kind=kind, name=name, device=_device_name(device), node_id=node_id, depth=len(self._open_peaks),
                       ram_before_bytes=psutil.Process().memory_info().rss)
        if record.device in _cuda_devices():
            record.vram_before_bytes = int(torch.cuda.memory_allocated(record.device))
        seen_so_far = self.probe.read()
        for outer in self._open_peaks:
            _fold(outer, seen_so_far)
        self.probe.reset()
        peaks: dict[str, int] = {}
        self._open_peaks.append(peaks)
        self.stages.append(record)
        started = time.perf_counter()
        try:
            yield record
            record.outcome = "success"
        except BaseException as error:
            interrupted = isinstance(error, KeyboardInterrupt) or self.is_interrupt(error)
            record.outcome = "interrupted" if interrupted else f"failed: {type(error).__name__}"
            raise
        finally:
            record.seconds = time.perf_counter() - started
            _fold(peaks, self.probe.read())
            self._open_peaks.pop()
            for outer in self._open_peaks:
                _fold(outer, peaks)
            record.peak_ram_bytes = peaks[RAM]
            if record.device.startswith("cuda"):
                record.vram_peaks = _vram_peaks(peaks, record.device)
                record.vram_sources = list(record.vram_peaks)
                record.peak_vram_bytes = max(record.vram_peaks.values()) if record.vram_peaks else None
            if record.peak_vram_bytes is not None and record.vram_before_bytes is None:
                record.vram_before_bytes = 0  # the stage was the first to use CUDA in this process
            record.ram_after_bytes = psutil.Process().memory_info().rss
            if record.peak_vram_bytes is not None:
                record.vram_after_bytes = int(torch.cuda.memory_allocated(record.device))

    def set_budget(self, line: BudgetLine) -> None:
        self.budgets[line.device] = line

    def sample(self) -> None:
        """Take the VRAM readers' readings now (a hook calls it during a stage: every sampling step)."""
        if self._open_peaks:
            self.probe.sample()


def _vram_peaks(peaks: dict[str, int], device: str) -> dict[str, int]:
    """{source: peak} on one device: torch's allocator peak first, then each reader's."""
    found = {TORCH: peaks[device]} if device in peaks else {}
    prefix = "@" + device
    found.update((key[:-len(prefix)], value) for key, value in peaks.items() if key.endswith(prefix))
    return found


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """The Memory Report: a prompt's stages so far and the budgets set in it."""
    prompt_id: str | None
    stages: tuple[Stage, ...]
    budgets: tuple[BudgetLine, ...]
    ram_peak_is_exact: bool

    @classmethod
    def of(cls, journal: Journal, node_types: dict[str, str] | None = None) -> MemoryReport:
        """A snapshot of the journal; `node_types` (node id -> class) names the node of each stage."""
        node_types = node_types or {}
        stages = tuple(dataclasses.replace(stage, rungs=[dataclasses.replace(rung) for rung in stage.rungs],
                                           node_type=node_types.get(stage.node_id, stage.node_type))
                       for stage in journal.stages)
        return cls(journal.prompt_id, stages, tuple(journal.budgets.values()), journal.probe.ram_peak_is_exact)

    @property
    def peak_vram_bytes(self) -> int | None:
        peaks = [stage.peak_vram_bytes for stage in self.stages if stage.peak_vram_bytes is not None]
        return max(peaks) if peaks else None

    @property
    def peak_ram_bytes(self) -> int:
        return max((stage.peak_ram_bytes for stage in self.stages), default=0)

    def to_dict(self) -> dict:
        return {"prompt_id": self.prompt_id,
                "stages": [dataclasses.asdict(stage) for stage in self.stages],
                "budgets": [dataclasses.asdict(line) for line in self.budgets],
                "peak_vram_bytes": self.peak_vram_bytes, "peak_ram_bytes": self.peak_ram_bytes,
                "ram_peak_is_exact": self.ram_peak_is_exact}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        if not self.stages:
            return ("Memory Report: no Headroom stage has run in this prompt (yet). Stages are recorded for models, "
                    "text encoders and VAEs that pass through Offload Model, Sliced Attention or Pick GPU, and "
                    "for Force GC and Tiled Inpaint; wire the report after them. Nodes ComfyUI served from its "
                    "cache did not run, so they have no stage.")
        if self.peak_vram_bytes is None:
            vram = "n/a (no CUDA device used)"
        else:
            used = sorted({source for stage in self.stages for source in stage.vram_sources})
            vram = f"{gb(self.peak_vram_bytes)} (sources: {', '.join(used)}; torch alone is a lower bound)"
        lines = [f"Memory Report: {len(self.stages)} stages, peak VRAM {vram}, peak RAM {gb(self.peak_ram_bytes)}"
                 + ("" if self.ram_peak_is_exact else " (RAM peaks are RSS at stage ends: no VmHWM here)")]
        lines += [f"budget on {line.device}: {line.label} ({gb(line.bytes)})" for line in self.budgets]
        lines += [stage.line() for stage in self.stages]
        return "\n".join(lines)


@dataclasses.dataclass
class SamplingRecord:
    """One sampling run under Offload Model: what was planned, what was measured."""
    model: str
    device: str
    plan: str  # Plan.describe() of the plan the run started with
    planned_resident_bytes: int | None
    patcher: str = "legacy"  # legacy | dynamic (comfy-aimdo pages the weights)
    usable_bytes: int = 0  # what the model could use on the device when the plan was made (its own weights counted)
    measured_resident_bytes: int = 0  # the most weight bytes ComfyUI held on the device at any step
    resident_after_loads: list[int] = dataclasses.field(default_factory=list)  # after each load of the run
    peak_vram_bytes: int | None = None  # torch's peak on a CUDA device; None elsewhere
    peak_ram_bytes: int = 0  # the largest process RSS sampled at a step
    rungs: list[RungAttempt] = dataclasses.field(default_factory=list)  # out-of-memory ladder rungs tried
    steps: int = 0  # model evaluations (sampler steps) of the attempt that succeeded
    seconds: float = 0.0
    outcome: str = "running"  # success | failed: ... | interrupted

    def log_line(self) -> str:
        planned = "none" if self.planned_resident_bytes is None else gb(self.planned_resident_bytes)
        vram = "n/a" if self.peak_vram_bytes is None else gb(self.peak_vram_bytes)
        rungs = "; ".join(rung.describe() for rung in self.rungs) if self.rungs else "none"
        loads = ",".join(gb(value).replace(" ", "") for value in self.resident_after_loads) or "none"
        return (f"Headroom sampling: model={self.model} device={self.device} patcher={self.patcher} "
                f"outcome={self.outcome} resident planned<={planned} after_loads=[{loads}] "
                f"measured_max={gb(self.measured_resident_bytes)} "
                f"peak_vram={vram} peak_ram={gb(self.peak_ram_bytes)} steps={self.steps} "
                f"oom_rungs=[{rungs}] time={self.seconds:.2f}s")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


class RecordLog:
    """An append-only list of records shared by a model clone and its sampling runs.

    Not a plain list: ComfyUI copies lists in model options for every run, and a run's records
    must reach the model the Memory Report reads.
    """

    def __init__(self):
        self.records: list = []

    def add(self, record) -> None:
        self.records.append(record)

    def __deepcopy__(self, memo):
        return self  # model clones share the log: it records what happened, not a setting
