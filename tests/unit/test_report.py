"""The journal of a prompt (nested stages and their peaks), the Memory Report and its chart."""
import json

import numpy
import pytest

from comfyui_headroom.memory.budget import GB
from comfyui_headroom.memory.chart import COLOURS, HEIGHT, WIDTH, render_chart
from comfyui_headroom.memory.ladder import RungAttempt
from comfyui_headroom.memory.report import BudgetLine, Journal, MemoryReport, PeakProbe

ALLOCATION = 256 * 2 ** 20


def allocate_and_touch(n_bytes: int) -> numpy.ndarray:
    return numpy.ones(n_bytes, dtype=numpy.uint8)  # ones: every page is written, so it counts in RSS


def test_a_nested_stage_peak_reaches_its_outer_stage_and_not_its_sibling():
    journal = Journal("prompt-1")
    with journal.stage("tiles", "Tiled Inpaint", "cpu"):
        with journal.stage("sampling", "SD15", "cpu", node_id="7") as inner:
            block = allocate_and_touch(ALLOCATION)
            del block
        with journal.stage("VAE decode", "TAESD", "cpu") as sibling:
            pass
    outer = journal.stages[0]
    assert [stage.kind for stage in journal.stages] == ["tiles", "sampling", "VAE decode"]
    assert [stage.depth for stage in journal.stages] == [0, 1, 1]
    assert journal.probe.ram_peak_is_exact  # Linux: VmHWM resets through /proc/self/clear_refs
    assert inner.peak_ram_bytes - inner.ram_after_bytes >= ALLOCATION * 0.9  # freed again before it ended
    assert inner.peak_ram_bytes - inner.ram_before_bytes >= ALLOCATION * 0.9  # what the stage added
    assert f"peak_ram={inner.peak_ram_bytes / GB:.2f} GB(+0.2" in inner.line()  # +0.25 GB, give or take pages
    assert outer.peak_ram_bytes >= inner.peak_ram_bytes  # the inner reset did not lose the outer's peak
    assert sibling.peak_ram_bytes < inner.peak_ram_bytes - ALLOCATION * 0.9  # its own reset forgot the block
    assert inner.node_id == "7" and all(stage.outcome == "success" for stage in journal.stages)
    assert outer.peak_vram_bytes is None  # no CUDA device


class Interrupted(Exception):
    """Stands for the host's interrupt error (ComfyUI's InterruptProcessingException)."""


ERRORS = [(MemoryError("full"), "failed: MemoryError"), (Interrupted(), "interrupted"),
          (KeyboardInterrupt(), "interrupted")]


@pytest.mark.parametrize("error, outcome", ERRORS)
def test_a_stage_that_raises_records_why_closes_and_lets_the_error_through(error, outcome):
    journal = Journal(is_interrupt=lambda raised: isinstance(raised, Interrupted))
    with pytest.raises(type(error)):
        with journal.stage("sampling", "SD15", "cpu"):
            raise error
    assert journal.stages[0].outcome == outcome and journal.stages[0].seconds >= 0
    with journal.stage("GC", "Force GC", "cpu") as after:
        pass
    assert after.depth == 0  # the failed stage did not stay open


def test_the_report_copies_the_stages_and_says_what_it_holds_in_json_and_words():
    journal = Journal("p")
    with journal.stage("sampling", "SD15", "cpu") as stage:
        stage.planned_ram_bytes = 3 * GB
        stage.rungs = [RungAttempt("halve resident weights", "resident 1.00 -> 0.50 GB", 1.5, "success")]
    journal.set_budget(BudgetLine("cpu", 2 * GB, "budget_gb: resident weights <= 2.00 GB"))
    report = MemoryReport.of(journal)
    stage.kind = "changed later"
    data = json.loads(report.to_json())
    assert [s["kind"] for s in data["stages"]] == ["sampling"]
    assert data["budgets"] == [{"device": "cpu", "bytes": 2 * GB, "label": "budget_gb: resident weights <= 2.00 GB"}]
    assert data["peak_ram_bytes"] == report.stages[0].peak_ram_bytes > 0 and data["peak_vram_bytes"] is None
    text = report.describe().splitlines()
    assert text[0].startswith("Memory Report: 1 stages, peak VRAM n/a")
    assert text[1] == "budget on cpu: budget_gb: resident weights <= 2.00 GB (2.00 GB)"
    assert text[2].startswith("sampling: SD15 on cpu success") and "planned[ram<=3.00 GB]" in text[2]
    assert "oom_rungs=[halve resident weights (resident 1.00 -> 0.50 GB): success in 1.50s]" in text[2]
    assert data["stages"][0]["rungs"] == [{"name": "halve resident weights", "changed": "resident 1.00 -> 0.50 GB",
                                           "seconds": 1.5, "outcome": "success"}]
    assert MemoryReport.of(Journal()).describe().startswith("Memory Report: no Headroom stage has run")


def pixels_of(image, colour) -> numpy.ndarray:
    return numpy.argwhere((numpy.asarray(image) == colour).all(axis=-1))


def test_the_chart_draws_a_bar_per_stage_and_the_budget_as_a_line_at_its_height():
    journal = Journal("abcdef0123")
    for kind in ("text encode", "sampling", "VAE decode"):
        with journal.stage(kind, "m", "cpu"):
            pass
    journal.stages[1].peak_ram_bytes = 4 * GB  # the tallest: the axis runs to ~4.4 GB -> ticks of 1 GB up to 5
    journal.set_budget(BudgetLine("cpu", 2 * GB, "budget"))
    image = render_chart(MemoryReport.of(journal))
    assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
    ram = pixels_of(image, COLOURS["ram"])
    bar_columns = numpy.unique(ram[ram[:, 0] > 80][:, 1])  # below the legend
    runs = numpy.split(bar_columns, numpy.where(numpy.diff(bar_columns) > 1)[0] + 1)
    assert len(runs) == 3  # one RAM bar per stage
    budget_rows = numpy.unique(pixels_of(image, COLOURS["budget"])[:, 0])
    plot_bottom, plot_top = HEIGHT - 70, 64
    expected = plot_bottom - (plot_bottom - plot_top) * 2 / 5
    assert any(abs(row - expected) <= 2 for row in budget_rows)
    sampling_top = ram[(ram[:, 1] >= runs[1][0]) & (ram[:, 1] <= runs[1][-1])][:, 0].min()
    assert abs(sampling_top - (plot_bottom - (plot_bottom - plot_top) * 4 / 5)) <= 2


def test_an_empty_report_still_renders_a_chart_that_says_so():
    image = render_chart(MemoryReport.of(Journal()))
    assert image.size == (WIDTH, HEIGHT) and len(pixels_of(image, COLOURS["ram"])) > 0  # the legend only


def test_a_budget_far_above_every_bar_is_named_not_drawn_so_the_bars_keep_their_scale():
    journal = Journal()
    with journal.stage("sampling", "m", "cpu"):
        pass
    journal.stages[0].peak_ram_bytes = GB
    journal.set_budget(BudgetLine("cpu", 22 * GB, "keep_free_gb"))
    image = render_chart(MemoryReport.of(journal))
    budget = pixels_of(image, COLOURS["budget"])
    assert len(budget) and budget[:, 0].max() < 100  # only the legend and the label near the top, no line
    ram = pixels_of(image, COLOURS["ram"])
    plot_bottom, plot_top = HEIGHT - 70, 64
    bar_top = ram[ram[:, 0] > 80][:, 0].min()
    assert bar_top < plot_bottom - (plot_bottom - plot_top) * 0.5  # 1 GB on an axis to ~1.1 GB, not to 22 GB


class DeviceMemory:
    """Readings of device memory outside torch's allocator, as NVML or comfy-aimdo give them: set by the test."""

    def __init__(self):
        self.now: dict[str, int] = {}

    def __call__(self):
        return dict(self.now) or None


def test_a_stage_peak_is_the_largest_source_and_names_them_all():
    nvml, aimdo = DeviceMemory(), DeviceMemory()
    journal = Journal("p", probe=PeakProbe({"aimdo": aimdo, "nvml": nvml}))
    with journal.stage("sampling", "SDXL", "cuda:0") as sampling:
        aimdo.now = {"cuda:0": 3 * GB}  # the VBAR pages a step faulted in, invisible to torch
        nvml.now = {"cuda:0": 3 * GB + 500 * 2 ** 20, "cuda:1": 1 * GB}
        journal.sample()  # a step ends: the hook samples
        aimdo.now, nvml.now = {"cuda:0": GB}, {"cuda:0": GB}  # paged out again before the stage ends
    assert sampling.vram_peaks == {"aimdo": 3 * GB, "nvml": 3 * GB + 500 * 2 ** 20}  # no CUDA here: no torch peak
    assert sampling.vram_sources == ["aimdo", "nvml"]
    assert sampling.peak_vram_bytes == 3 * GB + 500 * 2 ** 20  # the largest, not the sum
    assert "[aimdo:3.00GB,nvml:3.49GB]" in sampling.line()
    report = MemoryReport.of(journal)
    assert "peak VRAM 3.49 GB (sources: aimdo, nvml; torch alone is a lower bound)" in report.describe()
    assert report.to_dict()["stages"][0]["vram_sources"] == ["aimdo", "nvml"]


def test_a_nested_stages_vram_peak_reaches_its_outer_stage_and_a_spike_before_a_stage_stays_out():
    nvml = DeviceMemory()
    journal = Journal("p", probe=PeakProbe({"nvml": nvml}))
    nvml.now = {"cuda:0": 9 * GB}
    journal.probe.sample()  # before any stage: belongs to none
    nvml.now = {"cuda:0": GB}
    with journal.stage("tiles", "Tiled Inpaint", "cuda:0") as tiles:
        with journal.stage("sampling", "SD15", "cuda:0") as inner:
            nvml.now = {"cuda:0": 4 * GB}
            journal.sample()
            nvml.now = {"cuda:0": 2 * GB}
        with journal.stage("VAE decode", "VAE", "cuda:0") as sibling:
            pass
    assert (inner.peak_vram_bytes, tiles.peak_vram_bytes, sibling.peak_vram_bytes) == (4 * GB, 4 * GB, 2 * GB)


def test_without_readers_a_cpu_stage_has_no_vram_figures():
    journal = Journal("p", probe=PeakProbe({"nvml": lambda: None}))
    with journal.stage("sampling", "SD15", "cpu") as stage:
        journal.sample()
    assert (stage.peak_vram_bytes, stage.vram_peaks, stage.vram_sources) == (None, {}, [])
