"""Force a garbage collection that frees something, and say what it freed.

Plain data in (`GcRequest`), plain data out (`GcRecord`). What a host application loads and
unloads is reached through the small `ModelHost` protocol; `memory.comfy` implements it for
ComfyUI, so this module never imports ComfyUI.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import json
import sys
import time
import weakref
from typing import Protocol

import psutil
import torch

GB = 1024 ** 3
MB = 1024 ** 2


class ModelHost(Protocol):
    """What the collector needs from the application that holds the models."""

    def loaded_models(self) -> list[tuple[str, str, object]]:
        """(device, name, module) of every model the host keeps loaded."""

    def unload_models(self, device: str) -> list[str]:
        """Unload every model on `device`; return the names of those unloaded."""

    def cleanup(self) -> None:
        """The host's own cleanup of models whose owners are gone."""


@dataclasses.dataclass(frozen=True)
class GcRequest:
    threshold_percent: float = 0.0  # act only above this memory use of the device; 0 = always
    unload_models: bool = True
    trim_ram: bool = True
    device: str = "cpu"  # the device whose use is compared with the threshold

    def __post_init__(self):
        if not 0 <= self.threshold_percent <= 100:
            raise ValueError(f"threshold_percent {self.threshold_percent:g} is outside 0-100: "
                             "give the device memory use (percent) above which Force GC acts, 0 to always act")


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    ram_bytes: int  # resident set size of this process
    vram_bytes: dict[str, int]  # torch-allocated bytes per CUDA device


@dataclasses.dataclass
class GcRecord:
    device: str
    utilization_percent: float
    threshold_percent: float
    acted: bool
    objects_collected: int = 0
    before: MemorySnapshot | None = None
    after: MemorySnapshot | None = None
    models_unloaded: list[str] = dataclasses.field(default_factory=list)
    models_still_referenced: list[str] = dataclasses.field(default_factory=list)
    ram_trimmed: bool = False
    seconds: float = 0.0
    note: str = ""  # why memory stayed, when some did

    @property
    def ram_freed_bytes(self) -> int:
        return self.before.ram_bytes - self.after.ram_bytes if self.acted else 0

    @property
    def vram_freed_bytes(self) -> int:
        if not self.acted:
            return 0
        return sum(self.before.vram_bytes.values()) - sum(self.after.vram_bytes.values())

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["ram_freed_bytes"] = self.ram_freed_bytes
        record["vram_freed_bytes"] = self.vram_freed_bytes
        return record

    def summary(self) -> str:
        """A few words for the Memory Report."""
        if not self.acted:
            return f"skipped: {self.utilization_percent:.0f}% used, below {self.threshold_percent:g}%"
        return (f"freed RAM {self.ram_freed_bytes / GB:.2f} GB, VRAM {self.vram_freed_bytes / GB:.2f} GB; "
                f"unloaded [{', '.join(self.models_unloaded)}]")

    def log_line(self) -> str:
        """One line, SD.Next style: utilization and threshold, what was collected and freed."""
        head = (f"Headroom GC: device={self.device} utilization={self.utilization_percent:.1f}% "
                f"threshold={self.threshold_percent:g}%")
        if not self.acted:
            return f"{head} action=skipped (below threshold) time={self.seconds:.3f}s"
        vram_before = sum(self.before.vram_bytes.values()) / GB
        vram_after = sum(self.after.vram_bytes.values()) / GB
        line = (f"{head} collected={self.objects_collected} "
                f"ram={self.before.ram_bytes / GB:.2f}->{self.after.ram_bytes / GB:.2f}GB "
                f"vram={vram_before:.2f}->{vram_after:.2f}GB "
                f"freed=ram:{self.ram_freed_bytes / MB:.1f}MB,vram:{self.vram_freed_bytes / MB:.1f}MB "
                f"unloaded=[{', '.join(self.models_unloaded)}] "
                f"ram_trimmed={'yes' if self.ram_trimmed else 'no'} time={self.seconds:.3f}s")
        if self.models_still_referenced:
            line += f" still_referenced=[{', '.join(self.models_still_referenced)}]"
        if self.note:
            line += f" note={self.note}"
        return line

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def cuda_devices() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def snapshot() -> MemorySnapshot:
    vram = {name: torch.cuda.memory_allocated(name) for name in cuda_devices()}
    return MemorySnapshot(ram_bytes=psutil.Process().memory_info().rss, vram_bytes=vram)


def utilization_percent(device: str) -> float:
    """Memory use of `device` in percent, as the whole machine sees it (other programs included)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return 100.0 * (total - free) / total
    return float(psutil.virtual_memory().percent)


def empty_allocator_caches() -> None:
    """Return cached allocator blocks to the driver on every device, not only the current one."""
    for name in cuda_devices():
        with torch.cuda.device(torch.device(name)):
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
    for backend in ("xpu", "mps"):
        module = getattr(torch, backend, None)
        if module is not None and module.is_available():
            module.empty_cache()


def trim_ram() -> bool:
    """Give freed heap pages back to the OS (glibc keeps them otherwise); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        return bool(ctypes.CDLL(libc_name).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _still_alive(modules: list[tuple[str, weakref.ref]]) -> list[str]:
    return [name for name, ref in modules if ref() is not None]


def force_gc(request: GcRequest, host: ModelHost) -> GcRecord:
    started = time.perf_counter()
    utilization = utilization_percent(request.device)
    record = GcRecord(device=request.device, utilization_percent=utilization,
                      threshold_percent=request.threshold_percent,
                      acted=request.threshold_percent == 0 or utilization > request.threshold_percent)
    if not record.acted:
        record.seconds = time.perf_counter() - started
        return record

    record.before = snapshot()
    unloaded_modules: list[tuple[str, weakref.ref]] = []
    if request.unload_models:
        loaded = host.loaded_models()
        for device in dict.fromkeys(device for device, _, _ in loaded):
            record.models_unloaded += host.unload_models(device)
        unloaded_modules = [(name, weakref.ref(module)) for _, name, module in loaded
                            if name in record.models_unloaded]
        del loaded
    record.objects_collected = gc.collect()
    host.cleanup()
    empty_allocator_caches()
    if request.trim_ram:
        record.ram_trimmed = trim_ram()
    record.after = snapshot()
    record.models_still_referenced = _still_alive(unloaded_modules)
    record.note = _why_memory_stayed(record, request)
    record.seconds = time.perf_counter() - started
    return record


def _why_memory_stayed(record: GcRecord, request: GcRequest) -> str:
    if record.models_still_referenced:
        return (f"{len(record.models_still_referenced)} unloaded model(s) stay in RAM because they are still "
                "referenced (cached node outputs keep loaded checkpoints for reuse; ComfyUI drops them when "
                "the workflow changes or on POST /free with free_memory)")
    if record.ram_freed_bytes > 0 or record.vram_freed_bytes > 0:
        return ""
    if not request.unload_models and not record.before.vram_bytes:
        return "model unloading is off and there is no GPU memory to release"
    return "no unreferenced memory was found to release"
