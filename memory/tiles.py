"""Tile grid, mask-aware tile selection, blend weights and stitching for tiled inpaint.

Pure tensor code: torch and plain dataclasses, no ComfyUI. Conventions:
- images are ComfyUI IMAGE tensors `[B, H, W, C]`, float in 0..1;
- masks are ComfyUI MASK tensors `[B, H, W]` or `[H, W]`, float in 0..1.

Grid rule: tiles are `tile_size` px, start every `tile_size - overlap` px, and the last tile on
an axis is shifted back to end at the image edge, so every tile keeps the full tile size
whenever the image side is at least one tile; a side smaller than a tile gets one tile of the
whole side. Origins are multiples of 8 (the latent downscale) except for that shifted last tile.

Order of use in a node: grow_mask -> feather_mask -> plan_grid -> select_tiles (with the
final mask, so every pixel the composite can change lies in a selected tile) -> sample each
selected tile on crop(image, tile) -> blend_weights(selected) -> stitch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LATENT_DOWNSCALE = 8


@dataclass(frozen=True)
class Tile:
    """A rectangle of the image, in pixels: top-left corner (y, x) and its size."""

    y: int
    x: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices that cut this tile out of an `[H, W]` plane."""
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)

    def overlaps(self, other: Tile) -> bool:
        """True when the two tiles share at least one pixel."""
        return (self.y < other.y + other.height and other.y < self.y + self.height
                and self.x < other.x + other.width and other.x < self.x + self.width)


@dataclass(frozen=True)
class TilePlan:
    """What a tiled run planned, for the log line and the Memory Report."""

    grid_count: int
    sampled_count: int
    tile_size: int
    overlap: int

    @property
    def skipped_count(self) -> int:
        return self.grid_count - self.sampled_count

    def describe(self) -> str:
        return (f"tiles: {self.grid_count} in grid "
                f"({self.tile_size} px, overlap {self.overlap} px), "
                f"{self.sampled_count} sampled, {self.skipped_count} skipped")


def _check_multiple_of_8(name: str, value: int) -> None:
    if value % LATENT_DOWNSCALE:
        raise ValueError(f"{name} {value} px is not a multiple of {LATENT_DOWNSCALE}")


def _axis_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Tile origins along one axis; the last one is shifted back to end at the edge."""
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    starts = list(range(0, length - tile_size, stride))
    starts.append(length - tile_size)
    return starts


def plan_grid(height: int, width: int, tile_size: int, overlap: int) -> list[Tile]:
    """Overlapping tiles covering every pixel of a `height` x `width` image, row by row."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {width}x{height} px is empty")
    if tile_size < LATENT_DOWNSCALE:
        raise ValueError(f"tile size {tile_size} px must be at least {LATENT_DOWNSCALE} px")
    _check_multiple_of_8("tile size", tile_size)
    if overlap < 0:
        raise ValueError(f"overlap {overlap} px must not be negative")
    _check_multiple_of_8("overlap", overlap)
    if overlap >= tile_size:
        raise ValueError(f"overlap {overlap} px must be smaller than the tile size {tile_size} px")
    tile_height, tile_width = min(tile_size, height), min(tile_size, width)
    return [Tile(y, x, tile_height, tile_width)
            for y in _axis_starts(height, tile_size, overlap)
            for x in _axis_starts(width, tile_size, overlap)]


def _check_tiles_inside(tiles: list[Tile], height: int, width: int) -> None:
    for tile in tiles:
        if (tile.y < 0 or tile.x < 0 or tile.height < 1 or tile.width < 1
                or tile.y + tile.height > height or tile.x + tile.width > width):
            raise ValueError(f"{tile} does not lie inside the {width}x{height} px image")


def _as_nchw(mask: torch.Tensor) -> torch.Tensor:
    """A MASK as `[B, 1, H, W]`, the layout torch's pooling and convolution want."""
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be [B, H, W] or [H, W], got shape {tuple(mask.shape)}")
    return mask.reshape(-1, 1, *mask.shape[-2:])


def _max_filter(planes: torch.Tensor, radius: int) -> torch.Tensor:
    """Maximum over the (2 * radius + 1)-pixel square around each pixel of `[B, 1, H, W]`."""
    size = 2 * radius + 1
    # Separable: rows then columns costs O(size) per pixel instead of O(size**2).
    planes = F.max_pool2d(planes, (1, size), stride=1, padding=(0, radius))
    return F.max_pool2d(planes, (size, 1), stride=1, padding=(radius, 0))


def grow_mask(mask: torch.Tensor, grow_px: int) -> torch.Tensor:
    """Dilate the mask by `grow_px` pixels with a square max filter; same shape as the input."""
    if grow_px < 0:
        raise ValueError(f"mask grow {grow_px} px must not be negative")
    return _max_filter(_as_nchw(mask), grow_px).reshape(mask.shape)


def _gaussian_kernel(radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # sigma = radius / 3 so the cut-off at the radius is below 1.2 % of the peak.
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets * 3 / radius) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def feather_mask(mask: torch.Tensor, feather_px: int) -> torch.Tensor:
    """Soften the mask edge with a Gaussian blur that reaches exactly `feather_px` pixels.

    Pixels farther than `feather_px` from any nonzero pixel stay exactly 0. The blur is
    centred on the edge, so grow the mask first by at least `feather_px` when the whole
    original area must stay fully repainted.
    """
    if feather_px < 0:
        raise ValueError(f"mask feather {feather_px} px must not be negative")
    planes = _as_nchw(mask)
    if feather_px == 0:
        return mask.clone()
    kernel = _gaussian_kernel(feather_px, planes.dtype, planes.device)
    # Replicate padding: a mask touching the image border stays full strength there.
    blurred = F.pad(planes, (feather_px, feather_px, feather_px, feather_px), mode="replicate")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1)).clamp(0.0, 1.0)
    # A flat neighbourhood keeps its value exactly: rounding must not turn a full 1 into
    # 0.99999994, which would let the original bleed into the area that is fully repainted.
    flat = _max_filter(planes, feather_px) == -_max_filter(-planes, feather_px)
    return torch.where(flat, planes, blurred).reshape(mask.shape)


def select_tiles(tiles: list[Tile], mask: torch.Tensor) -> list[Tile]:
    """The tiles (in their order) holding any nonzero mask pixel of any image of the batch."""
    touched = _as_nchw(mask).ne(0).any(dim=0)[0]
    _check_tiles_inside(tiles, *touched.shape)
    return [tile for tile in tiles if bool(touched[tile.slices].any())]


def _edge_ramp(length: int, ramp: int, rise_at_start: bool, fall_at_end: bool) -> torch.Tensor:
    """Weights along one axis of a tile: 1, with linear ramps on the sides that blend.

    Ramp values are (i + 1) / (ramp + 1), never 0, so a pixel that only this tile covers still
    has a weight to normalise; two ramps meeting over exactly `ramp` pixels sum to 1.
    """
    weights = torch.ones(length, dtype=torch.float32)
    ramp = min(ramp, length)
    rise = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
    if ramp and rise_at_start:
        weights[:ramp] *= rise
    if ramp and fall_at_end:
        weights[length - ramp:] *= rise.flip(0)
    return weights


def blend_weights(tiles: list[Tile], height: int, width: int, overlap: int) -> list[torch.Tensor]:
    """One `[tile.height, tile.width]` float32 weight map per tile, for stitching these tiles.

    A side of a tile ramps over `overlap` pixels when another of `tiles` overlaps the tile and
    reaches past that side; other sides (image borders, or no neighbour among `tiles`) are flat.
    The maps are divided by their accumulated sum, so over the union of `tiles` they add up to
    1 at every pixel; pass only the tiles that will be stitched.
    """
    if overlap < 0:
        raise ValueError(f"overlap {overlap} px must not be negative")
    _check_tiles_inside(tiles, height, width)
    raw = []
    for index, tile in enumerate(tiles):
        neighbours = [other for other_index, other in enumerate(tiles)
                      if other_index != index and other.overlaps(tile)]
        rows = _edge_ramp(tile.height, overlap,
                          rise_at_start=any(other.y < tile.y for other in neighbours),
                          fall_at_end=any(other.y + other.height > tile.y + tile.height
                                          for other in neighbours))
        columns = _edge_ramp(tile.width, overlap,
                             rise_at_start=any(other.x < tile.x for other in neighbours),
                             fall_at_end=any(other.x + other.width > tile.x + tile.width
                                             for other in neighbours))
        raw.append(rows[:, None] * columns[None, :])
    total = torch.zeros(height, width, dtype=torch.float32)
    for tile, weight in zip(tiles, raw):
        total[tile.slices] += weight
    return [weight / total[tile.slices] for tile, weight in zip(tiles, raw)]


def crop(image_or_mask: torch.Tensor, tile: Tile) -> torch.Tensor:
    """The tile's region of an IMAGE `[B, H, W, C]` or a MASK `[B, H, W]` / `[H, W]` (a view)."""
    rows, columns = tile.slices
    if image_or_mask.ndim == 4:
        return image_or_mask[:, rows, columns, :]
    if image_or_mask.ndim == 3:
        return image_or_mask[:, rows, columns]
    if image_or_mask.ndim == 2:
        return image_or_mask[rows, columns]
    raise ValueError(f"expected an IMAGE [B, H, W, C] or a MASK [B, H, W] / [H, W], "
                     f"got shape {tuple(image_or_mask.shape)}")


def stitch(original: torch.Tensor, tile_images: list[torch.Tensor], tiles: list[Tile],
           weights: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Blend the sampled tiles back into `original` and composite with `mask`.

    Where the mask is 0 the result is `original`, bit for bit; where it is 1 it is the
    weighted blend of the tiles; in between it is `original * (1 - m) + blend * m`. Pixels
    that no tile covers keep the original. Pass the grown/feathered mask the tiles were
    selected with.
    """
    if not len(tile_images) == len(tiles) == len(weights):
        raise ValueError(f"got {len(tile_images)} tile images, {len(tiles)} tiles "
                         f"and {len(weights)} weight maps; they must match one to one")
    batch, height, width, _ = original.shape
    _check_tiles_inside(tiles, height, width)
    strength = _as_nchw(mask).permute(0, 2, 3, 1)  # [B or 1, H, W, 1]
    if tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} px "
                         f"but the image is {width}x{height} px")
    if strength.shape[0] not in (1, batch):
        raise ValueError(f"mask batch {strength.shape[0]} does not match image batch {batch}")
    # Accumulate weighted changes rather than weighted values: a tile equal to the original
    # then adds exactly 0, so the original survives bit for bit even where the mask is 1.
    change = torch.zeros_like(original, dtype=torch.promote_types(original.dtype, torch.float32))
    for tile_image, tile, weight in zip(tile_images, tiles, weights):
        region = crop(original, tile)
        if tile_image.shape != region.shape:
            raise ValueError(f"tile image at {tile} has shape {tuple(tile_image.shape)}, "
                             f"expected {tuple(region.shape)}")
        weight = weight.to(device=change.device, dtype=change.dtype)[None, :, :, None]
        crop(change, tile).add_(weight * (tile_image.to(change) - region))
    strength = strength.to(change)
    blended = (original + strength * change).to(original.dtype)
    return torch.where(strength == 0, original, blended)


def halve_tile(tile_size: int, floor: int) -> int | None:
    """The next tile size down the out-of-memory ladder, or None when `floor` is reached.

    Half the size, rounded down to a multiple of 8 and raised to `floor` if below it.
    """
    _check_multiple_of_8("tile size", tile_size)
    if floor < LATENT_DOWNSCALE:
        raise ValueError(f"smallest tile size {floor} px must be at least {LATENT_DOWNSCALE} px")
    _check_multiple_of_8("smallest tile size", floor)
    if tile_size <= floor:
        return None
    half = tile_size // 2 // LATENT_DOWNSCALE * LATENT_DOWNSCALE
    return max(half, floor)
