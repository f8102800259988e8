"""Offload Model: run the diffusion model under a VRAM budget; text encoder and VAE off the GPU after use."""
import logging

from ..memory.comfy import host, models, use
from ..memory.budget import Budget, gb
from ..memory.patching import apply_budget

_, io, ui = host.node_api()
log = logging.getLogger("headroom")

KEEP_LOADED = "keep loaded"
OFFLOAD_AFTER_USE = "move off the GPU after use"


class OffloadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadroomOffloadModel",
            display_name="Offload Model",
            category="Headroom",
            description="Every sampler that receives this MODEL runs under the VRAM budget you set: ComfyUI "
                        "keeps at most that much of the weights on the GPU and streams the rest. Out of "
                        "memory during sampling is retried with a tighter plan instead of failing.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to run under the budget. It is cloned; "
                                                "the incoming model is left as it is."),
                io.Float.Input("budget_gb", default=0.0, min=0.0, max=1024.0, step=0.25,
                               tooltip="Most GB of the diffusion model's weights kept on the GPU while sampling; "
                                       "the rest is streamed from RAM (slower, but fits). 0 = no cap. Set this "
                                       "or keep_free_gb, not both."),
                io.Float.Input("keep_free_gb", default=1.0, min=0.0, max=1024.0, step=0.25,
                               tooltip="GB of GPU memory to leave free for other programs (browser, desktop, a "
                                       "second ComfyUI). The model keeps what is left after that and its "
                                       "activations. 0 = no reserve. Set this or budget_gb, not both."),
                io.Combo.Input("text_encoder_and_vae", options=[OFFLOAD_AFTER_USE, KEEP_LOADED],
                               default=OFFLOAD_AFTER_USE,
                               tooltip="'move off the GPU after use': the text encoder and the VAE leave the GPU "
                                       "as soon as they have run, so the diffusion model gets the room. 'keep "
                                       "loaded': ComfyUI's usual behaviour."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional text encoder to pass through with the policy above."),
                io.Vae.Input("vae", optional=True, tooltip="Optional VAE to pass through with the policy above."),
            ],
            outputs=[
                io.Model.Output("MODEL", display_name="MODEL", tooltip="The model, running under the budget."),
                io.Clip.Output("CLIP", display_name="CLIP", tooltip="The text encoder (None if none came in)."),
                io.Vae.Output("VAE", display_name="VAE", tooltip="The VAE (None if none came in)."),
                io.String.Output("plan", display_name="plan",
                                 tooltip="The budget and the model's size; each sampling run logs its own plan "
                                         "(resident weights, activations, cond/uncond) and what it measured."),
            ],
        )

    @classmethod
    def execute(cls, model, budget_gb=0.0, keep_free_gb=1.0, text_encoder_and_vae=OFFLOAD_AFTER_USE,
                clip=None, vae=None):
        if not models.is_diffusion_model(model):
            raise ValueError(f"model: Offload Model needs a diffusion model (from a checkpoint or diffusion "
                             f"model loader), got {type(getattr(model, 'model', model)).__name__}")
        if text_encoder_and_vae not in (OFFLOAD_AFTER_USE, KEEP_LOADED):
            raise ValueError(f"text_encoder_and_vae must be '{OFFLOAD_AFTER_USE}' or '{KEEP_LOADED}', "
                             f"got {text_encoder_and_vae!r}")
        budget = Budget.from_gb(budget_gb, keep_free_gb)
        device = models.device_facts(model.load_device)
        budget.check_fits(device.name, device.total_bytes)
        patched = apply_budget(model, budget)
        offload = text_encoder_and_vae == OFFLOAD_AFTER_USE
        clip = use.watch_use(clip, "CLIP", offload) if clip is not None else None
        vae = use.watch_use(vae, "VAE", offload) if vae is not None else None
        plan = (f"Offload Model: {budget.describe()} on {device.name} ({gb(device.total_bytes)}); "
                f"{models.model_name(model)} weights {gb(model.model_size())}; text encoder and VAE: "
                f"{text_encoder_and_vae}")
        log.info(plan)
        return io.NodeOutput(patched, clip, vae, plan, ui=ui.PreviewText(plan))
