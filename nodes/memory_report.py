"""Memory Report: what each stage of this prompt planned and measured, as text, JSON and a chart."""
import logging

import numpy
import torch

from ..memory.comfy import host, journal
from ..memory.chart import render_chart
from ..memory.report import MemoryReport

_, io, ui = host.node_api()
log = logging.getLogger("headroom")


class MemoryReportNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadroomMemoryReport",
            display_name="Memory Report",
            category="Headroom",
            description="Shows this prompt so far, stage by stage (text encode, sampling, VAE, tiles, GC): planned "
                        "and measured peak VRAM and RAM, resident weights, time and out-of-memory retries, as text "
                        "and as a chart with the budget as a line. The same numbers come out as JSON, and in "
                        "/history for API users. Wire it last.",
            inputs=[
                io.AnyType.Input("value", optional=True,
                                 tooltip="The last output of your workflow (an image, a latent...). The report "
                                         "runs after the node that made it, so it sees every stage before; "
                                         "the value is returned unchanged."),
            ],
            outputs=[
                io.AnyType.Output("passthrough", display_name="value", tooltip="The input value, unchanged."),
                io.Image.Output("chart", display_name="chart",
                                tooltip="The chart: peak VRAM and RAM per stage, memory left at each stage's end, "
                                        "the planned VRAM, and the budget as a dashed line."),
                io.String.Output("report_json", display_name="report_json",
                                 tooltip="The report as JSON: every stage (kind, node, device, planned and peak "
                                         "bytes, resident weights, seconds, out-of-memory rungs, outcome)."),
            ],
            hidden=[io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # a fresh NaN: never served from ComfyUI's cache (see Force GC)

    @classmethod
    def execute(cls, value=None):
        prompt = cls.hidden.prompt or {}
        node_types = {node_id: node.get("class_type") for node_id, node in prompt.items()}
        report = MemoryReport.of(journal.prompt_journal(), node_types)
        chart = render_chart(report)
        chart_image = torch.from_numpy(numpy.asarray(chart).astype(numpy.float32) / 255.0)[None]
        text = report.describe()
        vram = "n/a" if report.peak_vram_bytes is None else report.peak_vram_bytes
        log.info("Headroom memory report: prompt=%s stages=%d peak_vram_bytes=%s peak_ram_bytes=%d",
                 report.prompt_id, len(report.stages), vram, report.peak_ram_bytes)
        shown = {**ui.PreviewImage(chart_image, cls=cls).as_dict(), "text": [text],
                 "headroom_report": [report.to_dict()]}
        return io.NodeOutput(value, chart_image, report.to_json(), ui=shown)
