"""Force GC: collect garbage, unload models from every device, give memory back; pass a value through."""
import logging

from ..memory.comfy.gc import ComfyModelHost
from ..memory.comfy.host import default_device, node_api
from ..memory.comfy.journal import stage
from ..memory.gc import GcRequest, force_gc

_, io, ui = node_api()
log = logging.getLogger("headroom")


class ForceGC(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadroomForceGC",
            display_name="Force GC",
            category="Headroom",
            description="Frees memory for real: collects garbage, unloads models from every device, empties "
                        "the allocator caches and gives RAM back. Place it between any two nodes; the value "
                        "passes through unchanged. Runs on every prompt.",
            inputs=[
                io.AnyType.Input("value", optional=True,
                                 tooltip="Any value (latent, image, model...). Returned unchanged, so Force GC "
                                         "can sit between any two nodes and runs right after the first one."),
                io.Float.Input("threshold_percent", default=0.0, min=0.0, max=100.0, step=1.0,
                               tooltip="Act only when the device's memory use is above this percentage "
                                       "(VRAM on a GPU, RAM on the CPU). 0 = always act."),
                io.Boolean.Input("unload_models", default=True,
                                 tooltip="Unload the models ComfyUI keeps loaded, on every device that holds "
                                         "any (ComfyUI's own unload only covers the default device)."),
                io.Boolean.Input("trim_ram", default=True,
                                 tooltip="Ask the C library to give freed RAM back to the system (Linux "
                                         "malloc_trim). Without it freed RAM stays reserved by the process."),
            ],
            outputs=[
                io.AnyType.Output("passthrough", display_name="value", tooltip="The input value, unchanged."),
                io.String.Output("record", display_name="record", tooltip="What was collected and freed, as one line."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        # a new NaN each call: ComfyUI compares cache keys by identity first, so the shared math.nan
        # would match itself; a fresh one never does, and the node re-runs on every prompt
        return float("nan")

    @classmethod
    def execute(cls, threshold_percent=0.0, unload_models=True, trim_ram=True, value=None):
        request = GcRequest(threshold_percent=threshold_percent, unload_models=unload_models,
                            trim_ram=trim_ram, device=default_device())
        with stage("GC", "Force GC", request.device) as gc_stage:
            record = force_gc(request, ComfyModelHost())
            gc_stage.detail = record.summary()
        line = record.log_line()
        log.info(line)
        return io.NodeOutput(value, line, ui=ui.PreviewText(line))
