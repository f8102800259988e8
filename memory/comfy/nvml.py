"""The process's device memory as NVML sees it: every allocator (torch's, comfy-aimdo's VBAR pages) and the
CUDA context. nvidia-ml-py is the pack's one runtime dependency; a machine without an NVIDIA driver has
no NVML, and every reading here then says so by returning None."""
from __future__ import annotations

import os


def nvml_works() -> bool:
    try:
        import pynvml
        pynvml.nvmlInit()
        return True
    except Exception:  # no library, no driver, no GPU: NVML raises its own error classes for each
        return False


def process_device_bytes(pci_bus_ids: dict[str, str]) -> dict[str, int] | None:
    """{"cuda:0": bytes this process holds there} for the CUDA devices given by their PCI bus ids (as
    memory.devices reads them), or None where NVML cannot say."""
    try:
        import pynvml
        pynvml.nvmlInit()
        used, seen = {}, False
        for device, bus_id in pci_bus_ids.items():
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            ours = [process for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if process.pid == os.getpid()]
            seen = seen or bool(ours)
            used[device] = sum(process.usedGpuMemory or 0 for process in ours)
        # a process NVML lists nowhere is one it cannot see (another PID namespace): no reading, not zero
        return used if seen else None
    except Exception:
        return None


def cuda_pci_bus_ids() -> dict[str, str]:
    """{"cuda:N": NVML's PCI bus id} for the CUDA devices torch sees (device properties: no CUDA context)."""
    import torch
    from ..devices import format_pci_bus_id
    ids = {}
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        if getattr(properties, "pci_bus_id", None) is not None:
            ids[f"cuda:{index}"] = format_pci_bus_id(properties.pci_domain_id, properties.pci_bus_id,
                                                     properties.pci_device_id)
    return ids


def process_vram_usage() -> dict[str, int] | None:
    """This process's memory on each CUDA device it has touched, as NVML reads it."""
    import torch
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None  # no CUDA context yet: nothing on any device, and no context to create for a reading
    return process_device_bytes(cuda_pci_bus_ids())
