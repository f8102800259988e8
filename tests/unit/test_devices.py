"""Device facts, matching and pick policies, driven by recorded device tables."""
import sys
from types import SimpleNamespace

import pytest

from comfyui_headroom.memory import devices as devices_module
from comfyui_headroom.memory.devices import (
    DeviceInfo, NvmlRecord, TorchRecord, list_devices, match_devices, parse_device_name,
    pick_first_with_free, pick_most_free, pick_round_robin, read_nvml, read_torch, restrict_devices)

GIB = 1024 ** 3
UUID_3060 = "3060aaaa-1111-2222-3333-444455556666"
UUID_4090 = "4090bbbb-1111-2222-3333-444455556666"

# Two GPUs on one box. NVML numbers in PCI bus order: the RTX 3060 (bus 01) first. CUDA's
# default FASTEST_FIRST order makes the RTX 4090 (bus 02) cuda:0.
NVML_TWO_GPUS = [
    {"index": 0, "name": "NVIDIA GeForce RTX 3060", "uuid": f"GPU-{UUID_3060}",
     "pci_bus_id": "00000000:01:00.0", "free_bytes": 11 * GIB, "total_bytes": 12 * GIB},
    {"index": 1, "name": "NVIDIA GeForce RTX 4090", "uuid": f"GPU-{UUID_4090}",
     "pci_bus_id": "00000000:02:00.0", "free_bytes": 20 * GIB, "total_bytes": 24 * GIB},
]
TORCH_TWO_GPUS = [
    {"device": "cuda:0", "name": "NVIDIA GeForce RTX 4090", "total_bytes": 24 * GIB,
     "free_bytes": 23 * GIB, "uuid": UUID_4090, "pci_bus_id": "00000000:02:00.0"},
    {"device": "cuda:1", "name": "NVIDIA GeForce RTX 3060", "total_bytes": 12 * GIB,
     "free_bytes": 11 * GIB + GIB // 2, "uuid": UUID_3060, "pci_bus_id": "00000000:01:00.0"},
]
# Four identical GPUs, as NVML lists them.
NVML_FOUR_GPUS = [
    {"index": index, "name": "NVIDIA A100-SXM4-40GB",
     "uuid": f"GPU-a100000{index}-0000-0000-0000-000000000000",
     "pci_bus_id": f"00000000:{0x07 + index:02X}:00.0", "free_bytes": (10 + index) * GIB,
     "total_bytes": 40 * GIB}
    for index in range(4)
]
# One H200, as torch 2.13 and NVML report it.
NVML_ONE_H200 = [
    {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-5a1e0000-1111-2222-3333-444455556666",
     "pci_bus_id": "00000000:1B:00.0", "free_bytes": 150_110_000_000,
     "total_bytes": 150_754_000_000},
]
TORCH_ONE_H200 = [
    {"device": "cuda:0", "name": "NVIDIA H200", "total_bytes": 150_754_000_000,
     "free_bytes": None, "uuid": "5a1e0000-1111-2222-3333-444455556666",
     "pci_bus_id": "00000000:1B:00.0"},
]
H200_SUMMARY = "cuda:0 (NVIDIA H200, 139.8 GiB free of 140.4 GiB)"


def nvml(rows):
    return [NvmlRecord(**row) for row in rows]


def torch_view(rows, **changes):
    return [TorchRecord(**{**row, **changes}) for row in rows]


def matched(torch_records, nvml_rows, **kwargs):
    """match_devices with 30 GiB of 64 GiB RAM free."""
    return match_devices(torch_records, nvml(nvml_rows), cpu_free_bytes=30 * GIB,
                         cpu_total_bytes=64 * GIB, **kwargs)


def one_h200():
    return matched(torch_view(TORCH_ONE_H200), NVML_ONE_H200)


# ---------------------------------------------------------------------------- matching

@pytest.mark.parametrize("drop", ["uuid", "pci_bus_id"])
def test_nvml_order_differs_from_torch_order_matched_by_the_other_id(drop):
    devices = matched(torch_view(TORCH_TWO_GPUS, **{drop: None}), NVML_TWO_GPUS)

    assert [(d.device, d.name, d.source) for d in devices] == [
        ("cuda:0", "NVIDIA GeForce RTX 4090", "nvml"),
        ("cuda:1", "NVIDIA GeForce RTX 3060", "nvml"),
        ("cpu", "CPU (system RAM)", "cpu"),
    ]
    rtx_4090, rtx_3060, cpu = devices
    assert (rtx_4090.free_bytes, rtx_4090.total_bytes) == (20 * GIB, 24 * GIB)
    assert (rtx_4090.pci_bus_id, rtx_4090.uuid) == ("00000000:02:00.0", f"GPU-{UUID_4090}")
    assert (rtx_3060.free_bytes, rtx_3060.total_bytes) == (11 * GIB, 12 * GIB)
    assert (rtx_3060.pci_bus_id, rtx_3060.uuid) == ("00000000:01:00.0", f"GPU-{UUID_3060}")
    assert (cpu.free_bytes, cpu.total_bytes) == (30 * GIB, 64 * GIB)
    assert rtx_4090.used_fraction == pytest.approx(4 / 24)


def test_mig_instance_is_not_matched_to_its_parent_gpu_by_bus_id():
    # A MIG slice has its own UUID but shares the parent's bus id; the parent's free memory
    # (all slices) would be wrong for it.
    mig = [TorchRecord(device="cuda:0", name="NVIDIA A100-SXM4-40GB MIG 1g.5gb",
                       total_bytes=5 * GIB, free_bytes=4 * GIB,
                       uuid="77770000-aaaa-bbbb-cccc-ddddeeeeffff", pci_bus_id="00000000:07:00.0")]
    gpu, _ = match_devices(mig, nvml(NVML_FOUR_GPUS), cpu_free_bytes=1, cpu_total_bytes=2)

    assert (gpu.source, gpu.free_bytes, gpu.total_bytes) == ("torch", 4 * GIB, 5 * GIB)


def test_gpu_filled_by_another_process_loses_to_the_other_gpu():
    # torch's view (an older reading) says the 4090 is nearly empty; NVML, read now, sees a
    # training job of another process holding 23 GB of it.
    nvml_rows = [dict(NVML_TWO_GPUS[0]), dict(NVML_TWO_GPUS[1], free_bytes=1 * GIB)]
    devices = matched(torch_view(TORCH_TWO_GPUS), nvml_rows)

    assert [d.free_bytes for d in devices[:2]] == [1 * GIB, 11 * GIB]
    choice = pick_most_free(devices)
    assert choice.device == "cuda:1"
    assert choice.info.name == "NVIDIA GeForce RTX 3060"
    assert choice.reason == "most free memory of 2 GPUs"
    assert choice.describe() == ("cuda:1 (NVIDIA GeForce RTX 3060, 11.0 GiB free of 12.0 GiB): "
                                 "most free memory of 2 GPUs")


def test_visible_subset_with_ids_keeps_only_the_gpus_torch_sees():
    # CUDA_VISIBLE_DEVICES=3,1: torch sees two of the four GPUs NVML lists.
    torch_rows = [
        {"device": "cuda:0", "name": "NVIDIA A100-SXM4-40GB", "total_bytes": 40 * GIB,
         "free_bytes": None, "uuid": "a1000003-0000-0000-0000-000000000000", "pci_bus_id": None},
        {"device": "cuda:1", "name": "NVIDIA A100-SXM4-40GB", "total_bytes": 40 * GIB,
         "free_bytes": None, "uuid": None, "pci_bus_id": "00000000:08:00.0"},
    ]
    devices = matched(torch_view(torch_rows), NVML_FOUR_GPUS, cuda_visible_devices="3,1")

    assert [(d.device, d.free_bytes, d.pci_bus_id) for d in devices] == [
        ("cuda:0", 13 * GIB, "00000000:0A:00.0"),
        ("cuda:1", 11 * GIB, "00000000:08:00.0"),
        ("cpu", 30 * GIB, None),
    ]


def id_less(*free_gib):
    """Torch records as a torch build without uuid/pci properties reports them."""
    return [TorchRecord(device=f"cuda:{index}", name="NVIDIA A100-SXM4-40GB",
                        total_bytes=40 * GIB, free_bytes=free * GIB)
            for index, free in enumerate(free_gib)]


def test_visible_subset_by_index_in_pci_order_without_ids():
    devices = matched(id_less(1, 1), NVML_FOUR_GPUS, cuda_visible_devices="2, 0",
                      cuda_device_order="PCI_BUS_ID")

    assert [(d.device, d.source, d.free_bytes, d.pci_bus_id) for d in devices[:2]] == [
        ("cuda:0", "nvml", 12 * GIB, "00000000:09:00.0"),
        ("cuda:1", "nvml", 10 * GIB, "00000000:07:00.0"),
    ]


def test_visible_subset_by_uuid_prefix_without_ids():
    devices = matched(id_less(1), NVML_TWO_GPUS, cuda_visible_devices="GPU-4090")

    assert (devices[0].source, devices[0].free_bytes, devices[0].uuid) == (
        "nvml", 20 * GIB, f"GPU-{UUID_4090}")


@pytest.mark.parametrize("visible, order", [
    ("1", None),  # FASTEST_FIRST: an index says nothing about NVML's (PCI) numbering
    ("GPU-", "PCI_BUS_ID"),  # a prefix that fits both GPUs
    ("-1,0", "PCI_BUS_ID"),  # CUDA stops at "-1": torch would see no GPU at all
])
def test_position_that_names_no_single_gpu_keeps_torch_facts(visible, order):
    devices = matched(id_less(7), NVML_TWO_GPUS, cuda_visible_devices=visible,
                      cuda_device_order=order)

    assert (devices[0].source, devices[0].free_bytes, devices[0].total_bytes) == (
        "torch", 7 * GIB, 40 * GIB)


def test_unmeasured_gpu_without_nvml_record_is_an_error():
    with pytest.raises(ValueError, match="cuda:0: free memory was not measured"):
        matched(torch_view(TORCH_ONE_H200), [])


# ---------------------------------------------------------------------------- reading facts

def fake_pynvml(calls):
    gpus = [(0x3B, "GPU-aaaa", 5 * GIB), (0x86, "GPU-bbbb", 7 * GIB)]
    return SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda index: gpus[index],
        nvmlDeviceGetName=lambda handle: "NVIDIA L40S",
        nvmlDeviceGetUUID=lambda handle: handle[1],
        nvmlDeviceGetPciInfo=lambda handle: SimpleNamespace(domain=0, bus=handle[0], device=0),
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(free=handle[2], total=48 * GIB),
    )


def test_read_nvml_formats_bus_ids_and_shuts_nvml_down(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls))

    assert read_nvml() == [
        NvmlRecord(0, "NVIDIA L40S", "GPU-aaaa", "00000000:3B:00.0", 5 * GIB, 48 * GIB),
        NvmlRecord(1, "NVIDIA L40S", "GPU-bbbb", "00000000:86:00.0", 7 * GIB, 48 * GIB),
    ]
    assert calls == ["init", "shutdown"]


def fake_torch(measured):
    properties = [
        SimpleNamespace(name="NVIDIA L40S", total_memory=48 * GIB, uuid="aaaa",
                        pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0),
        SimpleNamespace(name="NVIDIA L40S", total_memory=48 * GIB, uuid="cccc",
                        pci_domain_id=0, pci_bus_id=0xC1, pci_device_id=0),
    ]

    def mem_get_info(index):
        measured.append(index)
        return 9 * GIB, 48 * GIB

    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: len(properties),
                           get_device_properties=lambda index: properties[index],
                           mem_get_info=mem_get_info)
    no_mps = SimpleNamespace(mps=SimpleNamespace(is_available=lambda: False))
    return SimpleNamespace(cuda=cuda, backends=no_mps)  # no torch.xpu, as in older builds


def test_read_torch_measures_only_gpus_nvml_does_not_cover(monkeypatch):
    # mem_get_info would create a CUDA context (hundreds of MB) on the GPU it measures.
    measured = []
    monkeypatch.setitem(sys.modules, "torch", fake_torch(measured))
    covered_by_nvml = [NvmlRecord(0, "NVIDIA L40S", "GPU-AAAA", "00000000:3B:00.0", 5 * GIB,
                                  48 * GIB)]

    records = read_torch(covered_by_nvml)

    assert measured == [1]
    assert records == [
        TorchRecord("cuda:0", "NVIDIA L40S", 48 * GIB, None, "aaaa", "00000000:3B:00.0"),
        TorchRecord("cuda:1", "NVIDIA L40S", 48 * GIB, 9 * GIB, "cccc", "00000000:C1:00.0"),
    ]


def fake_sources(monkeypatch, nvml_rows=None, nvml_error=None, torch_rows=()):
    """list_devices() over recorded tables: NVML rows or error, torch rows, 30 of 64 GiB RAM."""
    def fake_read_nvml():
        if nvml_error is not None:
            raise nvml_error
        return nvml(nvml_rows)

    def fake_read_torch(nvml_records):
        assert nvml_records == ([] if nvml_rows is None else nvml(nvml_rows))
        return torch_view(list(torch_rows))

    if nvml_error is not None or nvml_rows is not None:
        monkeypatch.setattr(devices_module, "read_nvml", fake_read_nvml)
    monkeypatch.setattr(devices_module, "read_torch", fake_read_torch)
    monkeypatch.setattr(devices_module, "read_ram", lambda: (30 * GIB, 64 * GIB))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


def test_nvml_missing_falls_back_to_torch_facts_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the real read_nvml: import fails
    fake_sources(monkeypatch, torch_rows=TORCH_TWO_GPUS)

    devices, notes = list_devices()

    assert [(d.device, d.source, d.free_bytes) for d in devices] == [
        ("cuda:0", "torch", 23 * GIB),
        ("cuda:1", "torch", 11 * GIB + GIB // 2),
        ("cpu", "cpu", 30 * GIB),
    ]
    assert len(notes) == 1
    assert notes[0].startswith("NVML not available: ")
    assert "pynvml" in notes[0]


def test_nvml_raising_falls_back_to_torch_facts_with_a_note(monkeypatch):
    import pynvml

    error = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    fake_sources(monkeypatch, nvml_error=error, torch_rows=TORCH_TWO_GPUS)

    devices, notes = list_devices()

    assert [d.source for d in devices] == ["torch", "torch", "cpu"]
    assert notes == ["NVML not available: Driver Not Loaded"]


def test_nvml_sees_gpus_that_torch_cannot_use(monkeypatch):
    fake_sources(monkeypatch, nvml_rows=NVML_TWO_GPUS, torch_rows=[])

    devices, notes = list_devices()

    assert [d.device for d in devices] == ["cpu"]
    assert notes == [
        "NVML sees 2 NVIDIA GPU(s) but torch has no CUDA device (a torch build without CUDA, "
        "or CUDA_VISIBLE_DEVICES hides them)",
        "no CUDA device visible: running on CPU",
    ]


def test_gpu_that_nvml_does_not_know_is_noted(monkeypatch):
    other = dict(TORCH_TWO_GPUS[1], uuid="99990000-0000-0000-0000-000000000000")
    fake_sources(monkeypatch, nvml_rows=NVML_TWO_GPUS, torch_rows=[TORCH_TWO_GPUS[0], other])

    devices, notes = list_devices()

    assert [d.source for d in devices] == ["nvml", "torch", "cpu"]
    assert notes == ["cuda:1: no NVML record matches; free memory as torch measures it"]


def test_no_gpu_at_all_runs_on_cpu_and_says_why(monkeypatch):
    fake_sources(monkeypatch, nvml_rows=[], torch_rows=[])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    devices, notes = list_devices()

    assert devices == [DeviceInfo("cpu", "CPU (system RAM)", 30 * GIB, 64 * GIB, "cpu")]
    assert notes == ["no CUDA device visible (CUDA_VISIBLE_DEVICES=''): running on CPU"]
    for choice in (pick_most_free(devices), pick_round_robin(devices, 5),
                   pick_first_with_free(devices, 8 * GIB)):
        assert choice.device == "cpu"
        assert choice.reason == "no GPU found: running on the CPU"


def test_list_devices_on_this_cpu_only_machine(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    devices, notes = list_devices()

    assert [d.device for d in devices] == ["cpu"]
    assert notes[0].startswith("NVML not available: ")
    assert notes[-1] == "no CUDA device visible: running on CPU"


def test_restrict_devices_keeps_the_named_ones_and_the_cpu_and_says_why_others_went():
    devices = matched(torch_view(TORCH_TWO_GPUS), NVML_TWO_GPUS)

    kept, notes = restrict_devices(devices, {"cuda:1"}, "not in the host's list")

    assert [d.device for d in kept] == ["cuda:1", "cpu"]
    assert notes == ["cuda:0 not used: not in the host's list"]
    assert pick_most_free(kept).device == "cuda:1"  # the 4090 has more free, but the host does not use it
    with pytest.raises(ValueError, match="^device 'cuda:0' does not exist; devices here: cuda:1 "):
        parse_device_name("cuda:0", kept)


def test_restrict_devices_to_the_cpu_only_leaves_the_cpu_for_every_policy():
    devices = matched(torch_view(TORCH_TWO_GPUS), NVML_TWO_GPUS)

    kept, notes = restrict_devices(devices, {"cpu"}, "ComfyUI runs with --cpu")

    assert [d.device for d in kept] == ["cpu"]
    assert notes == ["cuda:0 not used: ComfyUI runs with --cpu", "cuda:1 not used: ComfyUI runs with --cpu"]
    assert [pick_round_robin(kept, n).device for n in range(3)] == ["cpu"] * 3


# ---------------------------------------------------------------------------- picking

@pytest.mark.parametrize("text, device", [
    ("cuda:0", "cuda:0"), ("cuda", "cuda:0"), (" CUDA:0 ", "cuda:0"), ("cpu", "cpu")])
def test_parse_device_name_finds_the_device(text, device):
    choice = parse_device_name(text, one_h200())

    assert choice.device == device
    assert choice.reason == f"asked for {text.strip()!r}"


def test_parse_device_name_knows_xpu_and_mps():
    devices = [DeviceInfo("xpu:0", "Intel Arc A770", 15 * GIB, 16 * GIB, "torch"),
               DeviceInfo("mps", "Apple GPU (MPS)", 20 * GIB, 24 * GIB, "torch")]

    assert parse_device_name("xpu", devices).info.name == "Intel Arc A770"
    assert parse_device_name("mps", devices).info.name == "Apple GPU (MPS)"


@pytest.mark.parametrize("text, problem", [
    ("cuda:7", "device 'cuda:7' does not exist"),
    ("xpu:0", "device 'xpu:0' does not exist"),
    ("gpu0", "device name 'gpu0' is not valid; use cpu, cuda, cuda:N"),
    ("cuda:-1", "device name 'cuda:-1' is not valid; use cpu, cuda, cuda:N"),
    ("cpu:1", "device name 'cpu:1' is not valid"),
    ("", "device name '' is not valid"),
])
def test_bad_device_name_names_the_input_and_lists_the_devices(text, problem):
    with pytest.raises(ValueError) as raised:
        parse_device_name(text, one_h200())

    message = str(raised.value)
    assert message.startswith(problem)
    assert message.endswith(
        f"; devices here: {H200_SUMMARY}, cpu (CPU (system RAM), 30.0 GiB free of 64.0 GiB)")


def test_most_free_with_one_gpu():
    choice = pick_most_free(one_h200())

    assert choice.describe() == f"{H200_SUMMARY}: the only GPU"


def test_most_free_prefers_a_gpu_to_a_cpu_with_more_free_memory():
    devices = matched(torch_view(TORCH_ONE_H200), [dict(NVML_ONE_H200[0], free_bytes=1 * GIB)])

    assert pick_most_free(devices).device == "cuda:0"


def test_round_robin_cycles_over_gpus_only():
    devices = matched(torch_view(TORCH_TWO_GPUS), NVML_TWO_GPUS)

    picks = [pick_round_robin(devices, counter) for counter in range(5)]

    assert [p.device for p in picks] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert picks[3].reason == "round robin: call 3 takes GPU 2 of 2"


@pytest.mark.parametrize("min_gib, device", [(4, "cuda:0"), (8, "cuda:1")])
def test_first_with_free_takes_the_first_that_fits(min_gib, device):
    nvml_rows = [dict(NVML_TWO_GPUS[0]), dict(NVML_TWO_GPUS[1], free_bytes=5 * GIB)]

    choice = pick_first_with_free(matched(torch_view(TORCH_TWO_GPUS), nvml_rows), min_gib * GIB)

    assert choice.device == device
    assert choice.reason == f"first GPU with at least {min_gib}.0 GiB free"


def test_first_with_free_that_no_gpu_satisfies_names_the_requirement():
    with pytest.raises(ValueError) as raised:
        pick_first_with_free(matched(torch_view(TORCH_TWO_GPUS), NVML_TWO_GPUS), 21 * GIB)

    assert str(raised.value) == (
        f"no GPU has 21.0 GiB free (min_free_bytes={21 * GIB}); devices here: "
        "cuda:0 (NVIDIA GeForce RTX 4090, 20.0 GiB free of 24.0 GiB), "
        "cuda:1 (NVIDIA GeForce RTX 3060, 11.0 GiB free of 12.0 GiB), "
        "cpu (CPU (system RAM), 30.0 GiB free of 64.0 GiB)")


def test_first_with_free_on_a_cpu_too_small():
    with pytest.raises(ValueError) as raised:
        pick_first_with_free(matched([], []), 40 * GIB)

    assert str(raised.value) == (
        f"no GPU found, and the CPU does not have 40.0 GiB free (min_free_bytes={40 * GIB}); "
        "devices here: cpu (CPU (system RAM), 30.0 GiB free of 64.0 GiB)")
