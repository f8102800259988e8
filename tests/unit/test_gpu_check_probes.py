"""The GPU check's instruments that need no GPU: the card plan's arithmetic, the driver struct the ballast passes to
cuMemCreate (a wrong layout would only show on a lent GPU), and the memory sampler's peaks over time windows."""
import ctypes
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench" / "gpu_check"))
from gpu_probes import GIB, MIB, AllocationProp, CardPlan, MemorySampler  # noqa: E402


def test_the_ballast_leaves_the_card_minus_what_the_process_holds():
    plan = CardPlan(card_bytes=4 * GIB, process_bytes=600 * MIB, free_bytes=130 * GIB, granularity=2 * MIB)
    assert plan.target_free_bytes == 4 * GIB - 600 * MIB
    assert plan.ballast_bytes == 130 * GIB - (4 * GIB - 600 * MIB)
    assert plan.problem() is None


def test_the_ballast_is_a_multiple_of_the_granularity_and_never_takes_from_the_card():
    plan = CardPlan(card_bytes=4 * GIB, process_bytes=600 * MIB + 12345, free_bytes=130 * GIB + 777, granularity=2 * MIB)
    assert plan.ballast_bytes % (2 * MIB) == 0
    left = plan.free_bytes - plan.ballast_bytes
    assert plan.target_free_bytes <= left < plan.target_free_bytes + 2 * MIB


def test_a_card_smaller_than_the_process_or_the_free_memory_is_refused_with_the_reason():
    assert "already holds" in CardPlan(GIB, 2 * GIB, 100 * GIB, 2 * MIB).problem()
    assert "only 1.00 GiB free" in CardPlan(8 * GIB, GIB // 2, GIB, 2 * MIB).problem()


def test_the_allocation_properties_have_cuda_hs_layout():
    # CUmemAllocationProp: type, requestedHandleTypes, location {type, id}, win32HandleMetaData, allocFlags {
    # compressionType, gpuDirectRDMACapable, usage, reserved[4]} = 32 bytes on 64-bit Linux
    assert ctypes.sizeof(AllocationProp) == 32
    assert AllocationProp.location.offset == 8
    assert AllocationProp.win32HandleMetaData.offset == 16
    assert AllocationProp.allocFlags.offset == 24


class Readings:
    """A memory reader stepping through given values (the sampler's own logic, not a device)."""

    def __init__(self, values):
        self.values = list(values)
        self.ballast_bytes = 0

    def read(self):
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def test_the_sampler_reports_the_peak_within_a_window_only():
    sampler = MemorySampler(Readings([5, 50, 7]), interval_s=60)  # the thread never fires within the test
    sampler.sample()
    middle = time.perf_counter()
    sampler.sample()  # 50
    after = time.perf_counter()
    time.sleep(0.01)
    sampler.sample()  # 7
    assert sampler.peak(middle, after) == 50
    assert sampler.peak(after + 0.001) == 7  # and the reading taken now
