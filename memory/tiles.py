"""Tile grid, mask-aware tile selection, blend weights and stitching for tiled inpaint.

Pure tensor code: torch and plain dataclasses, no ComfyUI. Conventions:
- images are ComfyUI IMAGE tensors `[B, H, W, C]`, float in 0..1;
- masks are ComfyUI MASK tensors `[B, H, W]` or `[H, W]`, float in 0..1.

Grid rule: tiles are `tile_size` px, start every `tile_size - overlap` px, and the last tile on
an axis is shifted back to end at the image edge, so every tile keeps the full tile size
whenever the image side is at least one tile; a side smaller than a tile gets one tile of the
whole side. Origins are multiples of 8 (the latent downscale) except for that shifted last tile.

Order of use in a node: plan_grid -> select_tiles(grid, mask, grow, feather) (every pixel the
grown and feathered mask can change lies in a selected tile) -> for each selected tile: sample
crop(image, tile), then stitch_tile it into the result with blend_weight(selected, index) and
mask_in_tile. Each step works on one tile (plus a margin), never on a whole-image buffer, so the
memory of a run is the image and its result plus one tile. grow_mask, feather_mask, blend_weights
and stitch are the whole-image forms of the same operations.
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

    images: int = 1  # grid_count and sampled_count count the tiles of every image of a batch

    @property
    def skipped_count(self) -> int:
        return self.grid_count - self.sampled_count

    def describe(self) -> str:
        over = f" over {self.images} images" if self.images > 1 else ""
        return (f"tiles: {self.grid_count} in grid{over} "
                f"({self.tile_size} px, overlap {self.overlap} px), "
                f"{self.sampled_count} sampled, {self.skipped_count} skipped")


def _check_multiple_of_8(name: str, value: int) -> None:
    if value % LATENT_DOWNSCALE:
        raise ValueError(f"{name} {value} px is not a multiple of {LATENT_DOWNSCALE}")


def _check_not_negative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} {value} px must not be negative")


def check_tiling(tile_size: int, overlap: int) -> None:
    """Raise ValueError, naming the setting, unless tiles of `tile_size` with `overlap` can be planned."""
    if tile_size < LATENT_DOWNSCALE:
        raise ValueError(f"tile_size {tile_size} px must be at least {LATENT_DOWNSCALE} px")
    _check_multiple_of_8("tile_size", tile_size)
    _check_not_negative("overlap", overlap)
    _check_multiple_of_8("overlap", overlap)
    if overlap >= tile_size:
        raise ValueError(f"overlap {overlap} px must be smaller than tile_size {tile_size} px")


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
    check_tiling(tile_size, overlap)
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
    _check_not_negative("mask_grow", grow_px)
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
    _check_not_negative("mask_feather", feather_px)
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


def check_mask_reach(grow_px: int, feather_px: int) -> None:
    """Raise ValueError, naming the setting, for a negative mask grow or feather."""
    _check_not_negative("mask_grow", grow_px)
    _check_not_negative("mask_feather", feather_px)


def _with_margin(mask: torch.Tensor, tile: Tile, margin: int) -> tuple[torch.Tensor, int, int]:
    """The mask's region of `tile` grown by `margin` px (clipped at the image), and its top-left corner."""
    height, width = mask.shape[-2:]
    top, left = max(0, tile.y - margin), max(0, tile.x - margin)
    bottom = min(height, tile.y + tile.height + margin)
    right = min(width, tile.x + tile.width + margin)
    return mask[..., top:bottom, left:right], top, left


def mask_in_tile(mask: torch.Tensor, tile: Tile, grow_px: int = 0, feather_px: int = 0) -> torch.Tensor:
    """`crop(feather_mask(grow_mask(mask, grow_px), feather_px), tile)`, from the tile and a margin.

    A tile pixel's grown-and-feathered value depends only on mask pixels within
    grow_px + feather_px of it, so computing on the tile plus that margin (clipped at the image
    border, where both filters treat the border as the whole-image forms do) gives the same
    values while memory follows the tile, not the image.
    """
    check_mask_reach(grow_px, feather_px)
    _check_tiles_inside([tile], *mask.shape[-2:])
    region, top, left = _with_margin(mask, tile, grow_px + feather_px)
    final = feather_mask(grow_mask(region, grow_px), feather_px)
    return final[..., tile.y - top:tile.y - top + tile.height, tile.x - left:tile.x - left + tile.width]


def select_tiles(tiles: list[Tile], mask: torch.Tensor, grow_px: int = 0,
                 feather_px: int = 0) -> list[Tile]:
    """The tiles (in their order) holding any nonzero pixel, in any image of the batch, of the
    mask grown by `grow_px` and feathered by `feather_px` (see mask_in_tile)."""
    check_mask_reach(grow_px, feather_px)
    _check_tiles_inside(tiles, *mask.shape[-2:])

    def touched(tile: Tile) -> bool:
        # Most tiles of a large image have no mask pixel within reach: one pass over their region.
        return (bool(_with_margin(mask, tile, grow_px + feather_px)[0].any())
                and bool(mask_in_tile(mask, tile, grow_px, feather_px).any()))

    return [tile for tile in tiles if touched(tile)]


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


def _ramped_weight(tiles: list[Tile], index: int, overlap: int) -> torch.Tensor:
    """tiles[index]'s weights before normalising: flat, ramped on the sides a neighbour reaches past."""
    tile = tiles[index]
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
    return rows[:, None] * columns[None, :]


def blend_weight(tiles: list[Tile], index: int, overlap: int) -> torch.Tensor:
    """The `[height, width]` float32 weight map of `tiles[index]`, for stitching these tiles.

    A side of a tile ramps over `overlap` pixels when another of `tiles` overlaps the tile and
    reaches past that side; other sides (image borders, or no neighbour among `tiles`) are flat.
    The map is divided by the sum of all maps over the tile, so over the union of `tiles` the
    maps add up to 1 at every pixel; pass only the tiles that will be stitched. Only the tile's
    region is summed: memory follows the tile.
    """
    _check_not_negative("overlap", overlap)
    tile = tiles[index]
    total = torch.zeros(tile.height, tile.width, dtype=torch.float32)
    for other_index, other in enumerate(tiles):  # in list order: the sums match blend_weights' bit for bit
        if other_index != index and not other.overlaps(tile):
            continue
        top, left = max(tile.y, other.y), max(tile.x, other.x)
        bottom = min(tile.y + tile.height, other.y + other.height)
        right = min(tile.x + tile.width, other.x + other.width)
        total[top - tile.y:bottom - tile.y, left - tile.x:right - tile.x] += _ramped_weight(
            tiles, other_index, overlap)[top - other.y:bottom - other.y, left - other.x:right - other.x]
    return _ramped_weight(tiles, index, overlap) / total


def blend_weights(tiles: list[Tile], height: int, width: int, overlap: int) -> list[torch.Tensor]:
    """blend_weight for every tile of `tiles`, which must lie inside the `height` x `width` image."""
    _check_tiles_inside(tiles, height, width)
    return [blend_weight(tiles, index, overlap) for index in range(len(tiles))]


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


def stitch_tile(result: torch.Tensor, original: torch.Tensor, tile_image: torch.Tensor, tile: Tile,
                weight: torch.Tensor, tile_mask: torch.Tensor) -> None:
    """Blend one sampled tile into `result` (a copy of `original`) in place.

    Adds `tile_mask * weight * (tile_image - original)` over the tile: once every tile of a
    blend is in, `result` is `original * (1 - m) + blend * m`. The change is added rather than
    the values, so a tile equal to the original adds exactly 0; where `tile_mask` is 0 `result`
    is left untouched (a NaN from the sampler there does not leak in). `tile_mask` is the tile's
    crop of the mask, `[B or 1, h, w]` or `[h, w]`.
    """
    region = crop(original, tile)
    if tile_image.shape != region.shape:
        raise ValueError(f"tile image at {tile} has shape {tuple(tile_image.shape)}, "
                         f"expected {tuple(region.shape)}")
    precision = torch.promote_types(original.dtype, torch.float32)
    strength = _as_nchw(tile_mask).permute(0, 2, 3, 1).to(device=result.device, dtype=precision)
    weight = weight.to(device=result.device, dtype=precision)[None, :, :, None]
    change = strength * weight * (tile_image.to(region.device, precision) - region)
    target = crop(result, tile)
    target.copy_(torch.where(strength == 0, target, (target.to(precision) + change).to(result.dtype)))


def stitch(original: torch.Tensor, tile_images: list[torch.Tensor], tiles: list[Tile],
           weights: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Blend the sampled tiles back into `original` and composite with `mask` (see stitch_tile).

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
    if tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} px "
                         f"but the image is {width}x{height} px")
    mask_batch = _as_nchw(mask).shape[0]
    if mask_batch not in (1, batch):
        raise ValueError(f"mask batch {mask_batch} does not match image batch {batch}")
    result = original.clone()
    for tile_image, tile, weight in zip(tile_images, tiles, weights):
        stitch_tile(result, original, tile_image, tile, weight, crop(mask, tile))
    return result


def halve_tile(tile_size: int, floor: int) -> int | None:
    """The next tile size down the out-of-memory ladder, or None when `floor` is reached.

    Half the size, rounded down to a multiple of 8 and raised to `floor` if below it.
    """
    _check_multiple_of_8("tile_size", tile_size)
    if floor < LATENT_DOWNSCALE:
        raise ValueError(f"smallest tile size {floor} px must be at least {LATENT_DOWNSCALE} px")
    _check_multiple_of_8("smallest tile size", floor)
    if tile_size <= floor:
        return None
    half = tile_size // 2 // LATENT_DOWNSCALE * LATENT_DOWNSCALE
    return max(half, floor)
