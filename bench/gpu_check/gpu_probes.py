"""Measuring instruments of the GPU check: a small card played on a big one, the process's device memory
over time (NVML), and the log lines a check needs to see.

A small card on a big one. Each capped check takes device memory away from the process with one
physical allocation, `cuMemCreate` through the CUDA driver (a "ballast"), until the free memory the
device reports is the card's size minus what the process already holds. Why this and not torch's
allocator fraction plus ComfyUI's --reserve-vram:
  - every reader of free memory then sees the card: cuMemGetInfo (torch.cuda.mem_get_info), NVML,
    ComfyUI's get_free_memory, aimdo's pressure poll and the pack's own plans (Offload Model's
    keep_free, Sliced Attention's auto target), not only ComfyUI's loader through the reserve;
  - an allocation past the card fails in the driver, as on the card: a real out-of-memory error,
    whichever allocator asks (torch's, cudaMallocAsync, which ComfyUI enables on cu130 and which has no
    per-process fraction, aimdo's VBAR pages and cast buffers);
  - cuMemCreate is not one of the calls aimdo hooks (cuMemAlloc*/cuMemFree*), so the ballast is not
    counted as the process's own use by aimdo's budget, just as memory held by another program is not.
What differs from the card: the device's total still reads 139 GiB (ComfyUI uses it only for its
upper bound on weights and the Windows reserve; the pack for refusing a budget larger than the device).
NVML counts the ballast in the process's memory, so the process's own use is NVML's reading minus the
ballast, and the check verifies it against the card.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import subprocess
import threading
import time

import psutil

MIB = 2 ** 20
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class CardPlan:
    """How much to take away so that the process is left with `card_bytes` of device memory."""
    card_bytes: int
    process_bytes: int  # what the process holds now (CUDA context, allocator caches, VBAR pages)
    free_bytes: int  # what the device reports free now
    granularity: int  # the driver's allocation granularity (2 MiB on NVIDIA GPUs)

    @property
    def target_free_bytes(self) -> int:
        return self.card_bytes - self.process_bytes

    @property
    def ballast_bytes(self) -> int:
        raw = self.free_bytes - self.target_free_bytes
        return max(0, raw // self.granularity * self.granularity)

    def problem(self) -> str | None:
        if self.target_free_bytes <= 0:
            return (f"the process already holds {self.process_bytes / GIB:.2f} GiB, more than the "
                    f"{self.card_bytes / GIB:.2f} GiB card")
        if self.free_bytes < self.target_free_bytes:
            return (f"the device has only {self.free_bytes / GIB:.2f} GiB free, less than the "
                    f"{self.target_free_bytes / GIB:.2f} GiB the card leaves")
        return None


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class AllocationProp(ctypes.Structure):
    """CUmemAllocationProp (cuda.h): pinned device memory on one device."""
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class DriverBallast:
    """Physical device memory held through the CUDA driver's virtual memory API (never mapped)."""

    def __init__(self, device_index: int):
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self._check(self.cuda.cuInit(0), "cuInit")
        self.prop = AllocationProp()
        self.prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        self.prop.location.id = device_index
        granularity = ctypes.c_size_t()
        self._check(self.cuda.cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(self.prop),
                                                            CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                    "cuMemGetAllocationGranularity")
        self.granularity = granularity.value
        self.handle: int | None = None
        self.bytes = 0

    @staticmethod
    def _check(result: int, call: str) -> None:
        if result != 0:
            raise RuntimeError(f"{call} failed with CUresult {result}")

    def take(self, size: int) -> None:
        self.release()
        if size <= 0:
            return
        handle = ctypes.c_ulonglong()
        self.cuda.cuMemCreate.argtypes = [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_size_t,
                                          ctypes.POINTER(AllocationProp), ctypes.c_ulonglong]
        self._check(self.cuda.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(self.prop), 0), "cuMemCreate")
        self.handle, self.bytes = handle.value, size

    def release(self) -> None:
        if self.handle is not None:
            self.cuda.cuMemRelease.argtypes = [ctypes.c_ulonglong]
            self._check(self.cuda.cuMemRelease(self.handle), "cuMemRelease")
            self.handle, self.bytes = None, 0


class ProcessMemory:
    """The process's device memory as NVML reports it (every allocator, aimdo's VBAR pages and the CUDA
    context included), minus the ballast. Off a GPU (the dry run) it reads the process's RSS instead, so
    the same sampling code runs."""

    def __init__(self, device_index: int | None):
        self.device_index = device_index
        self.ballast_bytes = 0
        self.source = "rss (no GPU: dry run)"
        self._read = lambda: psutil.Process().memory_info().rss
        if device_index is None:
            return
        import pynvml
        pynvml.nvmlInit()
        self.pynvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.device_used_at_start = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        self.source = "nvml device used minus its value at start (no per-process reading)"
        self._read = self._device_used_since_start

    def bind_process(self) -> None:
        """Choose NVML's per-process reading once this process has a CUDA context (NVML lists only
        processes with one). A container can show other process ids than ours: with exactly one process
        on the device, that one is ours."""
        if self.device_index is None:
            return
        pid = os.getpid()
        processes = self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        mine = [process for process in processes if process.pid == pid]
        if mine and mine[0].usedGpuMemory is not None:
            self.source = "nvml process (nvmlDeviceGetComputeRunningProcesses, this pid)"
            self._read = lambda: self._process_used(lambda process: process.pid == pid)
        elif len(processes) == 1 and processes[0].usedGpuMemory is not None:
            other = processes[0].pid
            self.source = f"nvml process (the only process on the device, pid {other}; ours is {pid})"
            self._read = lambda: self._process_used(lambda process: process.pid == other)

    def _process_used(self, is_ours) -> int:
        for process in self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if is_ours(process):
                return int(process.usedGpuMemory or 0)
        return 0

    def _device_used_since_start(self) -> int:
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used) - self.device_used_at_start

    def read(self) -> int:
        """Bytes the process itself uses (the ballast is the card's absence, not the process's use)."""
        return self._read() - self.ballast_bytes

    def device_free_bytes(self) -> int | None:
        """NVML's free memory of the whole device (what nvidia-smi prints)."""
        if self.device_index is None:
            return None
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).free)


class MemorySampler:
    """A thread that reads ProcessMemory every few milliseconds; peaks over any stretch of time."""

    def __init__(self, memory: ProcessMemory, interval_s: float = 0.005):
        self.memory = memory
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="headroom-gpu-check-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> int:
        value = self.memory.read()
        with self._lock:
            self.samples.append((time.perf_counter(), value))
            if len(self.samples) > 400_000:  # about half an hour at 5 ms: keep the newest half
                del self.samples[:200_000]
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a failed NVML read must not end the check; the next one may work
                pass

    def peak(self, since: float, until: float | None = None) -> int:
        """The largest reading in [since, until] (until: now), including one taken now."""
        now_value = self.sample() if until is None else None
        with self._lock:
            values = [value for at, value in self.samples if at >= since and (until is None or at <= until)]
        if now_value is not None:
            values.append(now_value)
        return max(values) if values else self.memory.read()


@dataclasses.dataclass
class CardRecord:
    """What a capped run was given and what it used: the figures every capped check reports."""
    card_bytes: int
    mechanism: str
    ballast_bytes: int = 0
    free_target_bytes: int = 0
    free_seen_bytes: int | None = None  # torch.cuda.mem_get_info right after taking the ballast
    peak_process_bytes: int = 0  # NVML (minus the ballast) over the capped stretch
    nvml_counts_ballast: bool | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Cards:
    """Plays cards on this device; on a CPU (the dry run) it records the plan and applies nothing."""

    def __init__(self, memory: ProcessMemory, sampler: MemorySampler, device_index: int | None):
        self.memory = memory
        self.sampler = sampler
        self.ballast = DriverBallast(device_index) if device_index is not None else None
        self.device_index = device_index

    @contextlib.contextmanager
    def card(self, card_bytes: int, free_everything):
        """Within the block the process has `card_bytes` of device memory. `free_everything()` unloads
        ComfyUI's models and empties the caches first, so the card starts as a fresh process would."""
        free_everything()
        record = CardRecord(card_bytes=card_bytes, mechanism="none")
        if self.ballast is None:
            record.mechanism = "none (dry run on the CPU: the plan is computed, nothing is taken)"
            plan = CardPlan(card_bytes, self.memory.read(), psutil.virtual_memory().available, MIB)
            record.free_target_bytes = plan.target_free_bytes
            started = time.perf_counter()
            yield record
            record.peak_process_bytes = self.sampler.peak(started)
            return
        import torch
        free_bytes, _ = torch.cuda.mem_get_info(self.device_index)
        plan = CardPlan(card_bytes, self.memory.read(), int(free_bytes), self.ballast.granularity)
        problem = plan.problem()
        if problem:
            raise RuntimeError(f"cannot play a {card_bytes / GIB:.1f} GiB card: {problem}")
        before = self.memory.read()
        self.ballast.take(plan.ballast_bytes)
        # NVML counts memory the process created through the driver as the process's; subtract the ballast
        # only when the reading shows it (so a driver that does not count it cannot make the figure negative)
        counted = self.memory.read() - before >= plan.ballast_bytes // 2
        self.memory.ballast_bytes = plan.ballast_bytes if counted else 0
        record.nvml_counts_ballast = counted
        record.mechanism = ("ballast: cuMemCreate of the device's free memory minus the card's (outside "
                            "torch's and aimdo's allocators; every free-memory reader sees the card)")
        record.ballast_bytes = plan.ballast_bytes
        record.free_target_bytes = plan.target_free_bytes
        record.free_seen_bytes = int(torch.cuda.mem_get_info(self.device_index)[0])
        started = time.perf_counter()
        try:
            yield record
        finally:
            record.peak_process_bytes = self.sampler.peak(started)
            self.ballast.release()
            self.memory.ballast_bytes = 0


def nvidia_smi_free_bytes(device_index: int) -> int | None:
    """nvidia-smi's free memory of the device, in bytes (it prints MiB)."""
    try:
        output = subprocess.run(["nvidia-smi", f"--id={device_index}", "--query-gpu=memory.free",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        return int(float(output.stdout.strip().splitlines()[0]) * MIB)
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class LogCapture(logging.Handler):
    """The log lines (ComfyUI's and the pack's) emitted within a block."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:
            pass

    def __enter__(self) -> LogCapture:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)

    def find(self, *fragments: str) -> list[str]:
        return [line for line in self.lines if any(fragment.lower() in line.lower() for fragment in fragments)]
