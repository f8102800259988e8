"""Sliced Attention: a MODEL clone whose attention runs in query chunks under a memory target."""
import logging

from ..memory.attention import (
    ATTENTION_METHODS,
    DELEGATED_METHODS,
    MB,
    AttentionCall,
    AttentionPlan,
    install_attention_override,
    make_attention_override,
)
from ..memory.comfy.attention import comfy_attention_functions, has_fused_attention
from ..memory.comfy.host import node_api
from ..memory.patching import add_run_hooks

_, io, _ = node_api()
log = logging.getLogger("headroom")

MAX_TARGET_MB = 2 ** 20  # 1 TiB: far above any device, below anything that overflows

COVERAGE = ("Covered: SD1.x/SD2.x/SDXL UNet attention and the DiT families that pass "
            "transformer_options to attention (Flux, Chroma, SD3/SD3.5 joint blocks, WAN 2.x, "
            "HunyuanVideo, Qwen-Image, LTXV, Lumina2, HiDream, Cosmos, AuraFlow, Stable Audio). "
            "Not covered: VAEs, text encoders, ControlNets, HunyuanDiT, PixArt and SD3.5's extra "
            "self-attention blocks, whose attention ComfyUI calls without them.")


def input_problem(target_mb, method) -> str | None:
    """What is wrong with the node's inputs, naming the input; None when they are usable."""
    if isinstance(target_mb, bool) or not isinstance(target_mb, int) or not 0 <= target_mb <= MAX_TARGET_MB:
        return f"target_mb must be a whole number of MB from 0 (auto) to {MAX_TARGET_MB}, got {target_mb!r}"
    if method not in ATTENTION_METHODS:
        return f"method must be one of {', '.join(ATTENTION_METHODS)}, got {method!r}"
    if method in DELEGATED_METHODS and target_mb:
        return (f"target_mb {target_mb} cannot bound method {method!r}: ComfyUI's {method} attention "
                f"sizes its slices from free memory itself. Set target_mb to 0, or use method auto "
                f"or chunked to keep {target_mb} MB")
    return None


def attention_call_logger():
    """on_call for one node's override: the per-call line at DEBUG; once per set of names, a
    warning when calls carry keyword arguments the chunks do not implement (such calls run
    the model's own attention, not bounded by the target)."""
    warned = set()

    def log_attention_call(call: AttentionCall) -> None:
        if call.unhandled and call.unhandled not in warned:
            warned.add(call.unhandled)
            log.warning("Headroom Sliced Attention: attention called with %s, which Headroom's chunks do not "
                        "implement; those calls run the model's own attention, not bounded by the target",
                        ", ".join(call.unhandled))
        if log.isEnabledFor(logging.DEBUG):  # one line per attention call: only when asked for
            log.debug(call.log_line())

    return log_attention_call


class SlicedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadroomSlicedAttention",
            display_name="Sliced Attention",
            category="Headroom",
            description="Bounds the memory of the model's attention: each attention call runs in query "
                        "chunks as large as fit the target, through the best kernel available. Returns a "
                        "clone; the input model is not changed. " + COVERAGE,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model whose attention is bounded. " + COVERAGE),
                io.Int.Input("target_mb", default=0, min=0, max=MAX_TARGET_MB, step=64,
                             tooltip="Most memory one attention call may use, in MB: its output, key/value "
                                     "copies and, with a math kernel, one chunk's scores and softmax; queries "
                                     "run in the largest chunks that fit. "
                                     "0 = auto: the activation memory an Offload Model budget planned, else "
                                     "half the free memory of the device at each call. For methods auto and "
                                     "chunked; must be 0 with comfy split and sub-quadratic. A target below "
                                     "one query row of a layer fails at that layer, naming target_mb."),
                io.Combo.Input("method", options=list(ATTENTION_METHODS), default="auto",
                               tooltip="auto: calls that fit the target stay on the model's own kernel when "
                                       "the device has a memory-efficient one (SDPA flash/memory-efficient, "
                                       "xFormers); otherwise (CPU, Kepler and other math-only devices, or "
                                       "above the target) Headroom runs query chunks. chunked: always query "
                                       "chunks, each through the best kernel available. comfy split / "
                                       "sub-quadratic: ComfyUI's own split or sub-quadratic attention for "
                                       "this model only (they size themselves from free memory)."),
                io.Boolean.Input("fp32", default=False,
                                 tooltip="Compute attention scores and softmax in fp32: avoids black or NaN "
                                         "images from fp16 overflow; scores take twice the memory, so chunks "
                                         "are smaller."),
            ],
            outputs=[
                io.Model.Output(tooltip="A clone of the model whose attention runs under the target; "
                                        "the input model is unchanged."),
            ],
        )

    @classmethod
    def validate_inputs(cls, target_mb, method):
        return input_problem(target_mb, method) or True

    @classmethod
    def execute(cls, model, target_mb, method, fp32):
        problem = input_problem(target_mb, method)
        if problem:
            raise ValueError(problem)
        fused = has_fused_attention(model.load_device)
        plan = AttentionPlan(target_bytes=target_mb * MB or None, method=method, upcast_fp32=fp32,
                             fused_kernel=fused, target_name="target_mb")
        override = make_attention_override(plan, on_call=attention_call_logger(),
                                           delegates=comfy_attention_functions())
        patched = add_run_hooks(model.clone())  # its sampling runs show in the Memory Report
        options = patched.model_options.setdefault("transformer_options", {})
        replaced = install_attention_override(options, plan, override)
        target = f"{target_mb}MB" if target_mb else "auto(activation budget, else 50% of free memory per call)"
        log.info("Headroom Sliced Attention: method=%s target=%s fp32=%s device=%s fused_kernel=%s "
                 "replaced_override=%s", method, target, "yes" if fp32 else "no", model.load_device,
                 "yes" if fused else "no", "yes" if replaced else "no")
        return io.NodeOutput(patched)
