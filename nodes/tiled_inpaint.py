"""Tiled Inpaint: inpaint a large image tile by tile, so memory follows the tile, not the image."""
import logging

from ..memory.comfy import host, inpaint, journal, models
from ..memory.inpaint import MIN_TILE_SIZE, REFUSED_KEYS, InpaintSettings, inpaint_tiled
from ..memory.ladder import RungAttempt

_, io, ui = host.node_api()
log = logging.getLogger("headroom")

MAX_SIDE = 16384  # ComfyUI's own largest image side (nodes.MAX_RESOLUTION)
REFUSED = ", ".join(sorted(REFUSED_KEYS))


class TiledInpaint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadroomTiledInpaint",
            display_name="Tiled Inpaint",
            category="Headroom",
            description="Inpaints a large image where the mask is set, one overlapping tile at a time: only "
                        "the tiles the mask touches are sampled, and they are blended back with feathered "
                        "weights. Pixels outside the mask keep their exact values. Out of memory on a tile: "
                        "frees the other models and retries with half the tile size, down to "
                        f"{MIN_TILE_SIZE} px.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model. Each tile is sampled through ComfyUI's "
                                                "usual sampling path, so Offload Model, Sliced Attention and "
                                                "Pick GPU on this model apply. It is not changed."),
                io.Conditioning.Input("positive", tooltip="What to paint. Text conditioning is used for every "
                                                          "tile; areas and masks (Conditioning Set Area/Mask) are "
                                                          f"cropped to each tile; {REFUSED} are refused."),
                io.Conditioning.Input("negative", tooltip="What to avoid; same rules as positive."),
                io.Vae.Input("vae", tooltip="The VAE that encodes and decodes each tile (an 8x downscale VAE)."),
                io.Image.Input("image", tooltip="The image to inpaint, any size; a batch is inpainted image "
                                                "by image."),
                io.Mask.Input("mask", tooltip="Where to inpaint (1 = repaint, 0 = keep exactly), the same size "
                                              "as the image: one mask for the whole batch or one per image."),
                io.Int.Input("tile_size", default=640, min=64, max=MAX_SIDE, step=8,
                             tooltip="Side of a tile in pixels, a multiple of 8. Memory follows this, not the "
                                     "image: use what your model generates well (512 for SD1.5, 640-1024 for "
                                     "SDXL/FLUX)."),
                io.Int.Input("overlap", default=64, min=0, max=MAX_SIDE, step=8,
                             tooltip="Pixels neighbouring tiles share, a multiple of 8 and below tile_size; "
                                     "tiles are cross-faded over it so no seam shows."),
                io.Int.Input("mask_grow", default=16, min=0, max=MAX_SIDE, step=1,
                             tooltip="Grow the mask by this many pixels first, so the repaint reaches a little "
                                     "past the masked object."),
                io.Int.Input("mask_feather", default=16, min=0, max=MAX_SIDE, step=1,
                             tooltip="Blur the (grown) mask's edge over this many pixels, so the repaint fades "
                                     "into the kept image. Keep it at most mask_grow to repaint all of the "
                                     "original mask fully."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed; the same seed and settings give the same image."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps per tile."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as in KSampler."),
                io.Combo.Input("sampler_name", options=inpaint.sampler_names(),
                               tooltip="The sampling algorithm, as in KSampler."),
                io.Combo.Input("scheduler", options=inpaint.scheduler_names(),
                               tooltip="The noise schedule, as in KSampler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the masked area is repainted: 1.0 paints it anew, lower "
                                       "values keep more of what is there."),
            ],
            outputs=[
                io.Image.Output("IMAGE", display_name="IMAGE",
                                tooltip="The inpainted image; outside the mask, the input's exact pixels."),
                io.String.Output("plan", display_name="plan",
                                 tooltip="The tile plan: tiles in the grid, sampled and skipped, and any "
                                         "out-of-memory retries."),
            ],
        )

    @classmethod
    def validate_inputs(cls, tile_size=None, overlap=None, mask_grow=None, mask_feather=None):
        if None in (tile_size, overlap, mask_grow, mask_feather):
            return True  # a linked input: execute checks it
        try:
            InpaintSettings(tile_size, overlap, mask_grow, mask_feather, seed=0).check()
        except ValueError as problem:
            return str(problem)
        return True

    @classmethod
    def execute(cls, model, positive, negative, vae, image, mask, tile_size, overlap, mask_grow, mask_feather,
                seed, steps, cfg, sampler_name, scheduler, denoise):
        if not models.is_diffusion_model(model):
            raise ValueError(f"model: Tiled Inpaint needs a diffusion model (from a checkpoint or diffusion "
                             f"model loader), got {type(getattr(model, 'model', model)).__name__}")
        settings = InpaintSettings(tile_size, overlap, mask_grow, mask_feather, seed)
        backend = inpaint.inpaint_backend(model, vae, steps, cfg, sampler_name, scheduler, denoise)
        with journal.stage("tiles", "Tiled Inpaint", model.load_device) as tiles_stage:
            result, report = inpaint_tiled(image, mask, positive, negative, settings, backend)
            tiles_stage.rungs = [RungAttempt("halve the tile", retry, outcome="survived") for retry in report.retries]
            tiles_stage.detail = report.describe()
        log.info(report.log_line())
        plan = report.describe()
        return io.NodeOutput(result, plan, ui=ui.PreviewText(plan))
