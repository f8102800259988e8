"""Records of what each stage planned and measured; kept per model for the Memory Report."""
from __future__ import annotations

import dataclasses
import json

from .budget import gb


@dataclasses.dataclass
class SamplingRecord:
    """One sampling run under Offload Model: what was planned, what was measured."""
    model: str
    device: str
    plan: str  # Plan.describe() of the plan the run started with
    planned_resident_bytes: int | None
    measured_resident_bytes: int = 0  # the most weight bytes ComfyUI held on the device at any step
    peak_vram_bytes: int | None = None  # torch's peak on a CUDA device; None elsewhere
    peak_ram_bytes: int = 0  # the largest process RSS sampled at a step
    rungs: list[str] = dataclasses.field(default_factory=list)  # out-of-memory ladder rungs used
    steps: int = 0  # model evaluations (sampler steps) of the attempt that succeeded
    seconds: float = 0.0
    outcome: str = "running"  # success | failed: ... | interrupted

    def log_line(self) -> str:
        planned = "none" if self.planned_resident_bytes is None else gb(self.planned_resident_bytes)
        vram = "n/a" if self.peak_vram_bytes is None else gb(self.peak_vram_bytes)
        rungs = "; ".join(self.rungs) if self.rungs else "none"
        return (f"Headroom sampling: model={self.model} device={self.device} outcome={self.outcome} "
                f"resident planned<={planned} measured_max={gb(self.measured_resident_bytes)} "
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
