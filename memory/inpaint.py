"""Tiled inpaint of an IMAGE batch: sample only the tiles the mask touches, blend them back, and
survive out-of-memory by freeing and halving the tile.

No ComfyUI here: the VAE, the sampler, freeing and the progress bar come in as plain callables
(a TileBackend; memory.comfy builds the real one), so the tile loop, the out-of-memory ladder and
the plan string are unit-tested with a backend of test doubles.

Memory: besides the input IMAGE and MASK, a run holds the result (one copy of the image), the
initial noise of the whole image in latent space (1/48 of an RGB image for 4-channel latents at
8x downscale) and one tile at a time; masks, blend weights and stitching all work per tile.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .tiles import (
    LATENT_DOWNSCALE, Tile, TilePlan, blend_weight, blend_weights, check_mask_reach, check_tiling, crop,
    halve_tile, mask_in_tile, plan_grid, select_tiles, stitch, stitch_tile)

log = logging.getLogger("headroom")

MIN_TILE_SIZE = 128  # the ladder's floor: below it a tile holds too little context to inpaint well

# Conditioning keys that place something on the image. "area" and "mask" are cropped to each
# tile; the others would need their own model's cooperation to crop, so they are refused.
CROPPED_KEYS = ("area", "mask")
REFUSED_KEYS = {
    "control": "a ControlNet or T2I-Adapter hint",
    "gligen": "GLIGEN boxes",
    "concat_latent_image": "an inpaint model's image latent (InpaintModelConditioning)",
    "concat_mask": "an inpaint model's mask (InpaintModelConditioning)",
    "concat_image": "an image to concatenate with the latent",
}


class TilesExhausted(torch.OutOfMemoryError):
    """Out of memory on the smallest tile. An OOM error, so ComfyUI still shows its own OOM advice."""


@dataclasses.dataclass(frozen=True)
class InpaintSettings:
    tile_size: int  # px, multiple of 8
    overlap: int  # px between neighbouring tiles, multiple of 8, below tile_size
    grow_px: int  # the mask is dilated by this much...
    feather_px: int  # ...then its edge blurred over this much
    seed: int

    def check(self) -> None:
        """Raise ValueError naming the node input that is wrong."""
        check_tiling(self.tile_size, self.overlap)
        check_mask_reach(self.grow_px, self.feather_px)


@dataclasses.dataclass(frozen=True)
class TileBackend:
    """What a run needs from the host. Pixels are IMAGE tensors `[1, h, w, 3]` with h and w
    multiples of 8; latents are `[1, C, h / r, w / r]` for the VAE's downscale r."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    encode_tiled: Callable[[torch.Tensor], torch.Tensor]  # for when encode runs out of memory
    # (latent, noise, noise_mask [1, 1, h, w] in pixels, positive, negative, seed) -> latent
    sample: Callable[..., torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    decode_tiled: Callable[[torch.Tensor], torch.Tensor]  # for when decode runs out of memory
    free_memory: Callable[[], list[str]]  # unload the models not sampling; returns their names
    is_out_of_memory: Callable[[BaseException], bool]
    progress: Callable[[int, int], None]  # (planned tiles done, planned tiles)


@dataclasses.dataclass
class InpaintReport:
    plan: TilePlan
    width: int
    height: int
    retries: list[str]  # one per out-of-memory error survived
    smallest_tile: int  # the tile size the ladder ended at
    tiles_run: int = 0  # tiles actually sampled, the smaller ones of a retry included
    seconds: float = 0.0
    # (image index, tile) of every tile actually sampled, in order: what ran, not what was planned
    sampled_tiles: list[tuple[int, Tile]] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        if self.plan.sampled_count == 0:
            return f"mask is empty: nothing to inpaint, image returned unchanged; {self.plan.describe()}"
        text = self.plan.describe()
        if self.retries:
            text += (f"; out of memory {len(self.retries)}x, survived: {'; '.join(self.retries)}; "
                     f"{self.tiles_run} tiles sampled in all, down to {self.smallest_tile} px")
        return text

    def log_line(self) -> str:
        plan = self.plan
        return (f"Headroom tiled inpaint: image={self.width}x{self.height} batch={plan.images} "
                f"tile={plan.tile_size}px overlap={plan.overlap}px grid={plan.grid_count} "
                f"sampled={plan.sampled_count} skipped={plan.skipped_count} tiles_run={self.tiles_run} "
                f"smallest_tile={self.smallest_tile}px oom_retries=[{'; '.join(self.retries) or 'none'}] "
                f"time={self.seconds:.2f}s")


def check_inputs(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ValueError naming `image` or `mask` unless they are an RGB batch and its mask(s)."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image must be an RGB IMAGE [batch, height, width, 3], got shape {tuple(image.shape)}")
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be a MASK [batch, height, width], got shape {tuple(mask.shape)}")
    batch, height, width, _ = image.shape
    if tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} px but image is {width}x{height} px; "
                         "they must be the same size")
    mask_batch = mask.shape[0] if mask.ndim == 3 else 1
    if mask_batch not in (1, batch):
        raise ValueError(f"mask batch {mask_batch} does not match image batch {batch}: give one mask for "
                         "every image, or one mask per image")


def check_conditioning(conditioning: list, name: str) -> None:
    """Raise ValueError naming `name` (positive/negative) for spatial conditioning that cannot be cropped."""
    for index, (_, options) in enumerate(conditioning):
        for key, what in REFUSED_KEYS.items():
            if options.get(key) is not None:
                raise ValueError(
                    f"{name}: conditioning entry {index} carries '{key}' ({what}) for the whole image, which "
                    f"Tiled Inpaint cannot crop to each tile. Connect conditioning without it; Tiled Inpaint "
                    f"crops only {' and '.join(repr(k) for k in CROPPED_KEYS)} (e.g. Conditioning Set Area/Mask)")
        area = options.get("area")
        if area is not None and len(area) != (5 if area[0] == "percentage" else 4):
            raise ValueError(f"{name}: conditioning entry {index} has a {len(area)}-value area; Tiled Inpaint "
                             "crops image areas (height, width, y, x) only")
        mask = options.get("mask")
        if mask is not None and mask.ndim not in (2, 3):
            raise ValueError(f"{name}: conditioning entry {index} has a mask of shape {tuple(mask.shape)}; "
                             "Tiled Inpaint crops image masks [batch, height, width] only")


def _area_in_tile(area: tuple, tile: Tile, height: int, width: int) -> tuple | None:
    """A conditioning area (latent units, or "percentage" of the image) as seen from `tile`; None
    when it misses the tile."""
    if area[0] == "percentage":
        top, left = area[3] * height, area[4] * width
        bottom, right = top + area[1] * height, left + area[2] * width
    else:
        top, left = area[2] * LATENT_DOWNSCALE, area[3] * LATENT_DOWNSCALE
        bottom, right = top + area[0] * LATENT_DOWNSCALE, left + area[1] * LATENT_DOWNSCALE
    top, left = max(top, tile.y) - tile.y, max(left, tile.x) - tile.x
    bottom = min(bottom, tile.y + tile.height) - tile.y
    right = min(right, tile.x + tile.width) - tile.x
    if bottom <= top or right <= left:
        return None
    y, x = math.floor(top / LATENT_DOWNSCALE), math.floor(left / LATENT_DOWNSCALE)
    return (math.ceil(bottom / LATENT_DOWNSCALE) - y, math.ceil(right / LATENT_DOWNSCALE) - x, y, x)


def _conditioning_mask_in_tile(mask: torch.Tensor, tile: Tile, height: int, width: int) -> torch.Tensor:
    """The tile's part of a conditioning mask, which may have another resolution than the image."""
    mask_height, mask_width = mask.shape[-2:]
    top = min(mask_height - 1, math.floor(tile.y * mask_height / height))
    left = min(mask_width - 1, math.floor(tile.x * mask_width / width))
    bottom = max(top + 1, math.ceil((tile.y + tile.height) * mask_height / height))
    right = max(left + 1, math.ceil((tile.x + tile.width) * mask_width / width))
    return mask[..., top:bottom, left:right]


def conditioning_for_tile(conditioning: list, tile: Tile, height: int, width: int) -> list:
    """The conditioning as `tile` of a `height` x `width` image sees it: areas and masks cropped,
    entries whose area misses the tile left out, everything else as it came."""
    cropped = []
    for embedding, options in conditioning:
        if not any(options.get(key) is not None for key in CROPPED_KEYS):
            cropped.append([embedding, options])
            continue
        options = dict(options)
        if options.get("area") is not None:
            options["area"] = _area_in_tile(options["area"], tile, height, width)
            if options["area"] is None:
                continue
        if options.get("mask") is not None:
            options["mask"] = _conditioning_mask_in_tile(options["mask"], tile, height, width)
        cropped.append([embedding, options])
    return cropped


class LatentNoise:
    """The initial noise of the whole image in latent space, drawn once from the seed (the same
    numbers ComfyUI's KSampler draws for a latent of that size); each tile takes its crop, so
    overlapping tiles start from the same noise where they overlap. Drawn at the first tile,
    when the latent's channel count is known."""

    def __init__(self, seed: int, batch: int, height: int, width: int):
        self.seed, self.batch, self.height, self.width = seed, batch, height, width
        self.noise: torch.Tensor | None = None

    def for_tile(self, index: int, tile: Tile, latent: torch.Tensor) -> torch.Tensor:
        if self.noise is None:
            generator = torch.Generator().manual_seed(self.seed)
            shape = (self.batch, latent.shape[1], math.ceil(self.height / LATENT_DOWNSCALE),
                     math.ceil(self.width / LATENT_DOWNSCALE))
            self.noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        # floor(y / 8) + latent height <= ceil(image height / 8): tiles are 8-multiples or start at 0
        top, left = tile.y // LATENT_DOWNSCALE, tile.x // LATENT_DOWNSCALE
        height, width = latent.shape[-2:]
        return self.noise[index:index + 1, :, top:top + height, left:left + width].to(latent.dtype)


def _pad_to_latent_grid(pixels: torch.Tensor, tile_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a tile whose sides are not multiples of 8 (an image side smaller than a tile): the
    pixels with their edge, the mask with 0 (nothing is repainted there)."""
    height, width = pixels.shape[1:3]
    bottom, right = -height % LATENT_DOWNSCALE, -width % LATENT_DOWNSCALE
    if not bottom and not right:
        return pixels, tile_mask
    padded = F.pad(pixels.movedim(-1, 1), (0, right, 0, bottom), mode="replicate").movedim(1, -1)
    return padded, F.pad(tile_mask, (0, right, 0, bottom))


def _summary(error: BaseException) -> str:
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class TiledInpaint:
    """One run over an IMAGE batch; `run()` returns the result and the report."""

    def __init__(self, image: torch.Tensor, mask: torch.Tensor, positive: list, negative: list,
                 settings: InpaintSettings, backend: TileBackend):
        settings.check()
        check_inputs(image, mask)
        check_conditioning(positive, "positive")
        check_conditioning(negative, "negative")
        self.image, self.positive, self.negative = image, positive, negative
        self.settings, self.backend = settings, backend
        batch, self.height, self.width, _ = image.shape
        self.masks = mask.reshape(-1, self.height, self.width)  # one per image, or one for all
        self.noise = LatentNoise(settings.seed, batch, self.height, self.width)
        self.tile_size = settings.tile_size  # lowered by the ladder, kept for the rest of the run
        self.floor = min(MIN_TILE_SIZE, settings.tile_size)
        self.retries: list[str] = []
        self.tiles_run = 0
        self.sampled_tiles: list[tuple[int, Tile]] = []
        self.doing = ""  # the step under way, for out-of-memory messages

    def mask_of(self, index: int) -> torch.Tensor:
        return self.masks[index if self.masks.shape[0] > 1 else 0]

    def run(self) -> tuple[torch.Tensor, InpaintReport]:
        started = time.perf_counter()
        settings = self.settings
        grid = plan_grid(self.height, self.width, settings.tile_size, settings.overlap)
        batch = self.image.shape[0]
        selected = [select_tiles(grid, self.mask_of(index), settings.grow_px, settings.feather_px)
                    for index in range(batch)]
        planned = sum(len(tiles) for tiles in selected)
        report = InpaintReport(TilePlan(grid_count=len(grid) * batch, sampled_count=planned,
                                        tile_size=settings.tile_size, overlap=settings.overlap, images=batch),
                               width=self.width, height=self.height, retries=self.retries,
                               smallest_tile=settings.tile_size, sampled_tiles=self.sampled_tiles)
        if planned == 0:
            report.seconds = time.perf_counter() - started
            return self.image, report
        result = self.image.clone()
        done = 0
        for index, tiles in enumerate(selected):
            for position, tile in enumerate(tiles):
                tile_image = self.sample_region(index, tile)
                tile_mask = mask_in_tile(self.mask_of(index), tile, settings.grow_px, settings.feather_px)
                stitch_tile(result[index:index + 1], self.image[index:index + 1], tile_image, tile,
                            blend_weight(tiles, position, settings.overlap), tile_mask)
                done += 1
                self.backend.progress(done, planned)
        report.tiles_run, report.smallest_tile = self.tiles_run, self.tile_size
        report.seconds = time.perf_counter() - started
        return result, report

    def sample_region(self, index: int, tile: Tile) -> torch.Tensor:
        """The tile sampled whole, or (after out-of-memory) assembled from smaller tiles."""
        if max(tile.height, tile.width) <= self.tile_size:
            failure = None
            try:
                return self.sample_tile(index, tile)
            except Exception as error:
                if not self.backend.is_out_of_memory(error):
                    raise
                failure = _summary(error)
            # handled outside the except block, so the traceback's frames (and their tensors) are freed
            tried = min(self.tile_size, math.ceil(max(tile.height, tile.width) / LATENT_DOWNSCALE) * LATENT_DOWNSCALE)
            smaller = halve_tile(tried, self.floor)
            self.free(f"{self.doing} ({failure})",
                      f"retried with {smaller} px tiles" if smaller else f"{tried} px is the smallest tile")
            if smaller is None:
                raise TilesExhausted(
                    f"Headroom Tiled Inpaint: out of memory on a {tried} px tile, the smallest it tries. "
                    f"Tried: {'; '.join(self.retries)}. Lower tile_size, free memory used by other programs, "
                    "or put Offload Model / Sliced Attention on the model.")
            self.tile_size = smaller
        return self.sample_in_smaller_tiles(index, tile)

    def sample_in_smaller_tiles(self, index: int, tile: Tile) -> torch.Tensor:
        """The tile's region inpainted with the current (smaller) tile size, blended into one tile image."""
        overlap = min(self.settings.overlap, self.tile_size // 2 // LATENT_DOWNSCALE * LATENT_DOWNSCALE)
        parts = [Tile(tile.y + part.y, tile.x + part.x, part.height, part.width)
                 for part in plan_grid(tile.height, tile.width, self.tile_size, overlap)]
        parts = select_tiles(parts, self.mask_of(index), self.settings.grow_px, self.settings.feather_px)
        images = [self.sample_region(index, part) for part in parts]
        local = [Tile(part.y - tile.y, part.x - tile.x, part.height, part.width) for part in parts]
        # Mask 1: the region's composite with the real mask happens once, when the tile is stitched.
        return stitch(crop(self.image[index:index + 1], tile), images, local,
                      blend_weights(local, tile.height, tile.width, overlap), torch.ones(tile.height, tile.width))

    def sample_tile(self, index: int, tile: Tile) -> torch.Tensor:
        """Encode, sample with the tile's mask as the latent noise mask, decode; `[1, h, w, 3]`."""
        settings = self.settings
        tile_mask = mask_in_tile(self.mask_of(index), tile, settings.grow_px, settings.feather_px)
        pixels, noise_mask = _pad_to_latent_grid(crop(self.image[index:index + 1], tile), tile_mask)
        where = f"the {tile.width}x{tile.height} px tile at x={tile.x} y={tile.y}"
        self.doing = f"VAE encode of {where}"
        latent = self.with_tiled_fallback(self.backend.encode, self.backend.encode_tiled, pixels)
        if tuple(latent.shape[-2:]) != (pixels.shape[1] // LATENT_DOWNSCALE, pixels.shape[2] // LATENT_DOWNSCALE):
            raise ValueError(f"vae: encoding a {pixels.shape[2]}x{pixels.shape[1]} px tile gave a "
                             f"{latent.shape[-1]}x{latent.shape[-2]} latent; Tiled Inpaint needs a VAE that "
                             f"downscales images by {LATENT_DOWNSCALE}")
        noise = self.noise.for_tile(index, tile, latent)
        self.doing = f"sampling {where}"
        # Per-step noise (ancestral/SDE samplers) is seeded per tile, so tiles do not repeat a pattern.
        seed = (settings.seed + tile.y * self.width + tile.x) % 2 ** 64
        samples = self.backend.sample(latent, noise, noise_mask[None, None], conditioning_for_tile(
            self.positive, tile, self.height, self.width), conditioning_for_tile(
            self.negative, tile, self.height, self.width), seed)
        self.doing = f"VAE decode of {where}"
        decoded = self.with_tiled_fallback(self.backend.decode, self.backend.decode_tiled, samples)
        self.tiles_run += 1
        self.sampled_tiles.append((index, tile))
        log.debug("Headroom tiled inpaint: sampled image=%d x=%d y=%d size=%dx%d", index, tile.x, tile.y,
                  tile.width, tile.height)
        return decoded[:, :tile.height, :tile.width, :].to(self.image.dtype)

    def with_tiled_fallback(self, call, tiled_call, value: torch.Tensor) -> torch.Tensor:
        """`call(value)`; out of memory: free, then `tiled_call(value)` (whose OOM goes up the ladder)."""
        failure = None
        try:
            return call(value)
        except Exception as error:
            if not self.backend.is_out_of_memory(error):
                raise
            failure = _summary(error)
        self.free(f"{self.doing} ({failure})", "retried in VAE tiles")
        return tiled_call(value)

    def free(self, what: str, next_step: str) -> None:
        """Free the models not sampling, and record the out-of-memory error and what comes next."""
        freed = self.backend.free_memory()
        self.retries.append(f"{what}: freed [{', '.join(freed) or 'nothing'}], {next_step}")
        log.warning("Headroom Tiled Inpaint: out of memory in %s", self.retries[-1])


def inpaint_tiled(image: torch.Tensor, mask: torch.Tensor, positive: list, negative: list,
                  settings: InpaintSettings, backend: TileBackend) -> tuple[torch.Tensor, InpaintReport]:
    """Inpaint `image` where `mask` (grown, feathered) is nonzero, tile by tile; see TiledInpaint."""
    # ComfyUI's executor runs nodes in inference mode; so does this outside it (tests, scripts): else
    # an autograd graph keeps every tile's VAE activations alive until the run ends, and ComfyUI's
    # tiled VAE, which adds in place to its own inference-mode tensors, fails.
    with torch.inference_mode():
        return TiledInpaint(image, mask, positive, negative, settings, backend).run()
