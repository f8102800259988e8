"""Tile grid, selection, blend weights and stitching (memory/tiles.py), on small CPU tensors."""
import pytest
import torch

from comfyui_headroom.memory.tiles import (
    Tile, TilePlan, blend_weight, blend_weights, check_tiling, crop, feather_mask, grow_mask,
    halve_tile, mask_in_tile, plan_grid, select_tiles, stitch, stitch_tile)

# (height, width, tile_size, overlap): smaller than a tile, exactly one tile, one pixel over
# a tile, sides that are not multiples of 8, several tiles, a long thin strip.
GRID_CASES = [
    (40, 24, 64, 16),
    (64, 64, 64, 16),
    (65, 64, 64, 16),
    (101, 203, 64, 16),
    (256, 384, 64, 8),
    (8, 500, 64, 0),
    (1000, 1001, 640, 64),
]


def coverage(tiles: list[Tile], height: int, width: int) -> torch.Tensor:
    count = torch.zeros(height, width, dtype=torch.int32)
    for tile in tiles:
        count[tile.slices] += 1
    return count


def random_image(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, 3, generator=generator)


# --- plan_grid ---------------------------------------------------------------------------

@pytest.mark.parametrize("height, width, tile_size, overlap", GRID_CASES)
def test_grid_covers_every_pixel_with_full_size_tiles(height, width, tile_size, overlap):
    tiles = plan_grid(height, width, tile_size, overlap)
    assert (coverage(tiles, height, width) >= 1).all()
    assert len(set(tiles)) == len(tiles)
    for tile in tiles:
        assert tile.y >= 0 and tile.x >= 0
        assert tile.y + tile.height <= height and tile.x + tile.width <= width
        assert tile.height == min(tile_size, height) and tile.width == min(tile_size, width)
        # Origins sit on the latent grid unless the tile was shifted back to the far edge.
        assert tile.y % 8 == 0 or tile.y + tile.height == height
        assert tile.x % 8 == 0 or tile.x + tile.width == width


@pytest.mark.parametrize("height, width, tile_size, overlap", GRID_CASES)
def test_neighbouring_tiles_overlap_by_at_least_the_overlap(height, width, tile_size, overlap):
    tiles = plan_grid(height, width, tile_size, overlap)
    rows = sorted({tile.y for tile in tiles})
    columns = sorted({tile.x for tile in tiles})
    tile_height, tile_width = tiles[0].height, tiles[0].width
    for before, after in zip(rows, rows[1:]):
        assert before + tile_height - after >= overlap
    for before, after in zip(columns, columns[1:]):
        assert before + tile_width - after >= overlap
    assert len(tiles) == len(rows) * len(columns)


def test_grid_positions_for_known_sizes():
    assert plan_grid(40, 24, 64, 16) == [Tile(0, 0, 40, 24)]
    assert plan_grid(64, 64, 64, 16) == [Tile(0, 0, 64, 64)]
    # stride 48: origins 0, 48, then the last one shifted back to end at 112.
    assert [tile.x for tile in plan_grid(64, 112, 64, 16)] == [0, 48]
    assert [tile.x for tile in plan_grid(64, 150, 64, 16)] == [0, 48, 86]
    tiles = plan_grid(1000, 640, 640, 64)
    assert tiles == [Tile(0, 0, 640, 640), Tile(360, 0, 640, 640)]


@pytest.mark.parametrize("tile_size, overlap, message", [
    (100, 16, "tile_size 100 px is not a multiple of 8"),
    (0, 0, "tile_size 0 px must be at least 8 px"),
    (64, 12, "overlap 12 px is not a multiple of 8"),
    (64, -8, "overlap -8 px must not be negative"),
    (640, 640, "overlap 640 px must be smaller than tile_size 640 px"),
    (64, 72, "overlap 72 px must be smaller than tile_size 64 px"),
])
def test_plan_grid_rejects_bad_settings_naming_the_input(tile_size, overlap, message):
    with pytest.raises(ValueError) as error:
        plan_grid(512, 512, tile_size, overlap)
    assert str(error.value) == message


def test_plan_grid_rejects_an_empty_image():
    with pytest.raises(ValueError, match="image size 512x0 px is empty"):
        plan_grid(0, 512, 64, 16)


# --- grow_mask / feather_mask ------------------------------------------------------------

def test_grow_turns_a_pixel_into_a_square_clipped_at_the_border():
    mask = torch.zeros(2, 20, 30)
    mask[0, 10, 15] = 0.5
    mask[1, 1, 28] = 1.0
    grown = grow_mask(mask, 3)
    assert grown.shape == mask.shape
    expected = torch.zeros(2, 20, 30)
    expected[0, 7:14, 12:19] = 0.5
    expected[1, 0:5, 25:30] = 1.0
    assert torch.equal(grown, expected)


def test_grow_accepts_a_single_mask_and_zero_is_a_copy():
    mask = torch.zeros(16, 16)
    mask[4:6, 4:6] = 1.0
    grown = grow_mask(mask, 2)
    assert grown.shape == (16, 16)
    assert grown.sum().item() == 36.0  # 2x2 block grown by 2 on each side: 6x6
    same = grow_mask(mask, 0)
    assert torch.equal(same, mask) and same is not mask


def test_feather_stays_zero_beyond_its_reach_and_full_deep_inside():
    mask = torch.zeros(1, 64, 64)
    mask[0, 24:40, 24:40] = 1.0
    feathered = feather_mask(mask, 4)
    assert feathered.shape == mask.shape
    reach = grow_mask(mask, 4)
    assert torch.equal(feathered[reach == 0], torch.zeros(int((reach == 0).sum())))
    assert (feathered[reach != 0] > 0).all()
    assert feathered.min() >= 0 and feathered.max() <= 1
    # Fully inside (the whole blur window is 1) the value stays exactly 1.
    assert feathered[0, 32, 32].item() == 1.0
    assert feathered[0, 28:36, 28:36].eq(1).all()
    assert feathered[0, 27, 32] < 1 and feathered[0, 36, 32] < 1
    # Soft edge: the boundary pixels are strictly between 0 and 1.
    edge = feathered[0, 32, 22:27]
    assert ((edge > 0) & (edge < 1)).all()
    assert torch.all(edge[1:] > edge[:-1])


def test_feather_keeps_a_mask_that_touches_the_border_full_at_the_border():
    mask = torch.zeros(32, 32)
    mask[:, :16] = 1.0
    feathered = feather_mask(mask, 6)
    assert torch.equal(feathered[:, 0], torch.ones(32))
    assert torch.equal(feather_mask(mask, 0), mask)


@pytest.mark.parametrize("operation, message", [
    (grow_mask, "mask_grow -1 px must not be negative"),
    (feather_mask, "mask_feather -1 px must not be negative"),
])
def test_mask_operations_reject_negative_sizes(operation, message):
    with pytest.raises(ValueError, match=message):
        operation(torch.zeros(8, 8), -1)


# --- select_tiles ------------------------------------------------------------------------

def tiles_touched_by_brute_force(tiles: list[Tile], mask: torch.Tensor) -> list[Tile]:
    """Each nonzero pixel, checked against each tile's bounds, without slicing."""
    points = mask.reshape(-1, *mask.shape[-2:]).ne(0).any(dim=0).nonzero().tolist()
    return [tile for tile in tiles
            if any(tile.y <= y < tile.y + tile.height and tile.x <= x < tile.x + tile.width
                   for y, x in points)]


def corner_pixel_mask() -> torch.Tensor:
    mask = torch.zeros(1, 101, 203)
    mask[0, 100, 202] = 0.01
    return mask


def top_left_block_mask() -> torch.Tensor:
    mask = torch.zeros(1, 101, 203)
    mask[0, :10, :10] = 1.0
    return mask


def two_blobs_mask() -> torch.Tensor:
    mask = torch.zeros(1, 101, 203)
    mask[0, 5:12, 5:12] = 1.0
    mask[0, 80:90, 150:190] = 0.3
    return mask


def second_image_only_mask() -> torch.Tensor:
    mask = torch.zeros(2, 101, 203)
    mask[1, 50, 100] = 1.0
    return mask


@pytest.mark.parametrize("make_mask, expected_count", [
    (corner_pixel_mask, 1),
    (top_left_block_mask, 1),
    (two_blobs_mask, 1 + 2),
    (second_image_only_mask, 4),
    (lambda: torch.zeros(1, 101, 203), 0),
    (lambda: torch.ones(101, 203), 8),
])
def test_select_tiles_returns_exactly_the_tiles_the_mask_touches(make_mask, expected_count):
    tiles = plan_grid(101, 203, 64, 16)  # rows 0, 37; columns 0, 48, 96, 139: 2x4 = 8 tiles
    assert len(tiles) == 8
    mask = make_mask()
    selected = select_tiles(tiles, mask)
    assert selected == tiles_touched_by_brute_force(tiles, mask)
    assert len(selected) == expected_count


def test_select_tiles_keeps_grid_order_and_picks_overlap_neighbours():
    tiles = plan_grid(64, 112, 64, 16)  # columns 0 and 48, overlapping on 48..63
    mask = torch.zeros(64, 112)
    mask[30, 50] = 1.0  # inside both tiles
    assert select_tiles(tiles, mask) == tiles
    mask = torch.zeros(64, 112)
    mask[30, 70] = 1.0  # only in the second
    assert select_tiles(tiles, mask) == [tiles[1]]


def test_select_tiles_rejects_tiles_outside_the_mask():
    with pytest.raises(ValueError, match="does not lie inside the 32x32 px image"):
        select_tiles([Tile(0, 0, 64, 64)], torch.ones(32, 32))


# --- blend_weights -----------------------------------------------------------------------

def weight_sum(tiles: list[Tile], weights: list[torch.Tensor], height: int, width: int):
    total = torch.zeros(height, width, dtype=torch.float64)
    for tile, weight in zip(tiles, weights):
        assert weight.shape == (tile.height, tile.width)
        assert (weight > 0).all()
        total[tile.slices] += weight.double()
    return total


def check_partition_of_unity(tiles: list[Tile], height: int, width: int, overlap: int) -> None:
    weights = blend_weights(tiles, height, width, overlap)
    total = weight_sum(tiles, weights, height, width)
    covered = coverage(tiles, height, width) > 0
    assert torch.allclose(total[covered], torch.ones_like(total[covered]), atol=1e-6, rtol=0)
    assert torch.equal(total[~covered], torch.zeros_like(total[~covered]))


@pytest.mark.parametrize("height, width, tile_size, overlap", GRID_CASES)
def test_blend_weights_of_the_full_grid_sum_to_one(height, width, tile_size, overlap):
    check_partition_of_unity(plan_grid(height, width, tile_size, overlap), height, width, overlap)


@pytest.mark.parametrize("seed", range(6))
def test_blend_weights_of_random_subsets_sum_to_one_over_their_union(seed):
    tiles = plan_grid(200, 264, 64, 16)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(len(tiles), generator=generator) < 0.4
    subset = [tile for tile, kept in zip(tiles, keep.tolist()) if kept] or tiles[:1]
    check_partition_of_unity(subset, 200, 264, 16)


def test_blend_weights_of_diagonal_neighbours_sum_to_one():
    tiles = plan_grid(112, 112, 64, 16)  # 2x2, origins 0 and 48
    check_partition_of_unity([tiles[0], tiles[3]], 112, 112, 16)
    check_partition_of_unity([tiles[1], tiles[2]], 112, 112, 16)


def test_blend_weights_ramp_linearly_across_the_overlap_and_are_flat_elsewhere():
    tiles = plan_grid(64, 112, 64, 16)  # columns 0..63 and 48..111: overlap 48..63
    left, right = blend_weights(tiles, 64, 112, 16)
    ramp_down = torch.tensor([(16 - j) / 17 for j in range(16)])
    assert torch.allclose(left[:, 48:], ramp_down.expand(64, 16), atol=1e-6)
    assert torch.allclose(right[:, :16], 1 - ramp_down.expand(64, 16), atol=1e-6)
    # Image borders and the non-overlapping parts keep full weight.
    assert torch.equal(left[:, :48], torch.ones(64, 48))
    assert torch.equal(right[:, 16:], torch.ones(64, 48))


def test_a_lone_tile_has_weight_one_everywhere():
    tiles = plan_grid(200, 264, 64, 16)
    (weight,) = blend_weights([tiles[7]], 200, 264, 16)
    assert torch.equal(weight, torch.ones(64, 64))


# --- stitch ------------------------------------------------------------------------------

def soft_mask(batch: int, height: int, width: int) -> torch.Tensor:
    """Two disjoint regions with 0, fractional and 1 values, grown and feathered."""
    mask = torch.zeros(batch, height, width)
    mask[:, 10:30, 12:40] = 1.0
    mask[-1, 70:95, 150:200] = 0.6
    return feather_mask(grow_mask(mask, 2), 4)


@pytest.mark.parametrize("batch", [1, 2])
def test_stitching_unchanged_tiles_reproduces_the_input_exactly(batch):
    image = random_image(batch, 101, 203, seed=1)
    mask = soft_mask(batch, 101, 203)
    assert ((mask > 0) & (mask < 1)).any() and (mask == 1).any() and (mask == 0).any()
    for tiles in (plan_grid(101, 203, 64, 16), select_tiles(plan_grid(101, 203, 64, 16), mask)):
        weights = blend_weights(tiles, 101, 203, 16)
        tile_images = [crop(image, tile).clone() for tile in tiles]
        assert torch.equal(stitch(image, tile_images, tiles, weights, mask), image)
    # Also with the mask fully on: every pixel takes the blended (unchanged) tiles.
    tiles = plan_grid(101, 203, 64, 16)
    weights = blend_weights(tiles, 101, 203, 16)
    tile_images = [crop(image, tile).clone() for tile in tiles]
    assert torch.equal(stitch(image, tile_images, tiles, weights, torch.ones(101, 203)), image)


def test_stitching_modified_tiles_leaves_unmasked_pixels_bit_identical():
    image = random_image(2, 101, 203, seed=2)
    mask = soft_mask(2, 101, 203)
    tiles = select_tiles(plan_grid(101, 203, 64, 16), mask)
    weights = blend_weights(tiles, 101, 203, 16)
    generator = torch.Generator().manual_seed(3)
    tile_images = [torch.rand(crop(image, tile).shape, generator=generator) for tile in tiles]
    # A NaN from the sampler where the mask is 0 must not leak into the result.
    outside_in_first_tile = (crop(mask, tiles[0]) == 0).nonzero()[0].tolist()
    tile_images[0][tuple(outside_in_first_tile)] = float("nan")
    result = stitch(image, tile_images, tiles, weights, mask)
    outside = (mask == 0)[..., None].expand_as(image)
    assert torch.equal(result[outside], image[outside])
    assert not torch.equal(result[~outside], image[~outside])


def test_stitched_values_follow_the_weights_and_the_mask():
    height, width = 64, 112
    image = torch.full((1, height, width, 3), 0.1)
    tiles = plan_grid(height, width, 64, 16)  # two tiles, overlap on columns 48..63
    weights = blend_weights(tiles, height, width, 16)
    tile_images = [torch.full((1, 64, 64, 3), 0.9), torch.full((1, 64, 64, 3), 0.5)]
    mask = torch.zeros(height, width)
    mask[:, :40] = 1.0
    mask[:, 40:56] = 0.25
    mask[:, 56:100] = 1.0
    result = stitch(image, tile_images, tiles, weights, mask)
    # Only the first tile covers columns < 48: its value, or a quarter of the way there.
    assert torch.allclose(result[0, :, :40], torch.full((height, 40, 3), 0.9))
    assert torch.allclose(result[0, :, 40:48], torch.full((height, 8, 3), 0.1 + 0.25 * 0.8))
    # In the overlap the tiles cross-fade linearly: column 48 + j gives (16 - j) / 17 to tile 1.
    for j in range(8, 16):
        share = (16 - j) / 17
        expected = 0.9 * share + 0.5 * (1 - share)
        assert torch.allclose(result[0, :, 48 + j], torch.full((height, 3), expected))
    assert torch.allclose(result[0, :, 64:100], torch.full((height, 36, 3), 0.5))
    assert torch.equal(result[0, :, 100:], image[0, :, 100:])


def test_constant_tiles_stitch_to_that_constant_on_the_union():
    image = random_image(1, 101, 203, seed=4)
    tiles = plan_grid(101, 203, 64, 16)
    subset = [tiles[0], tiles[2], tiles[5], tiles[6]]
    weights = blend_weights(subset, 101, 203, 16)
    tile_images = [torch.full((1, tile.height, tile.width, 3), 0.25) for tile in subset]
    result = stitch(image, tile_images, subset, weights, torch.ones(1, 101, 203))
    covered = (coverage(subset, 101, 203) > 0)[None, ..., None].expand_as(image)
    assert torch.allclose(result[covered], torch.full_like(result[covered], 0.25), atol=1e-6)
    assert torch.equal(result[~covered], image[~covered])


def test_stitch_rejects_mismatched_inputs():
    image = random_image(1, 64, 112, seed=5)
    tiles = plan_grid(64, 112, 64, 16)
    weights = blend_weights(tiles, 64, 112, 16)
    tile_images = [crop(image, tile) for tile in tiles]
    with pytest.raises(ValueError, match="got 1 tile images, 2 tiles and 2 weight maps"):
        stitch(image, tile_images[:1], tiles, weights, torch.ones(64, 112))
    with pytest.raises(ValueError, match="mask is 64x64 px but the image is 112x64 px"):
        stitch(image, tile_images, tiles, weights, torch.ones(64, 64))
    with pytest.raises(ValueError, match="mask batch 3 does not match image batch 1"):
        stitch(image, tile_images, tiles, weights, torch.ones(3, 64, 112))
    with pytest.raises(ValueError, match=r"expected \(1, 64, 64, 3\)"):
        stitch(image, [tile_images[0][:, :32], tile_images[1]], tiles, weights,
               torch.ones(64, 112))


def test_crop_cuts_images_and_both_mask_layouts():
    tile = Tile(8, 16, 24, 32)
    assert crop(torch.zeros(2, 64, 64, 3), tile).shape == (2, 24, 32, 3)
    assert crop(torch.zeros(2, 64, 64), tile).shape == (2, 24, 32)
    plane = torch.arange(64 * 64).reshape(64, 64)
    assert crop(plane, tile)[0, 0].item() == 8 * 64 + 16
    with pytest.raises(ValueError, match="got shape"):
        crop(torch.zeros(64), tile)


# --- TilePlan and halve_tile -------------------------------------------------------------

def test_tile_plan_describes_itself_in_one_line():
    plan = TilePlan(grid_count=9, sampled_count=2, tile_size=640, overlap=64)
    assert plan.skipped_count == 7
    assert plan.describe() == "tiles: 9 in grid (640 px, overlap 64 px), 2 sampled, 7 skipped"


def test_halve_tile_walks_down_to_the_floor_then_stops():
    ladder, size = [], 1024
    while size is not None:
        ladder.append(size)
        size = halve_tile(size, 128)
    assert ladder == [1024, 512, 256, 128]
    assert halve_tile(640, 256) == 320
    assert halve_tile(320, 256) == 256  # half would be below the floor: the floor itself
    assert halve_tile(256, 256) is None
    assert halve_tile(600, 64) == 296  # half rounded down to a multiple of 8


@pytest.mark.parametrize("tile_size, floor, message", [
    (100, 64, "tile_size 100 px is not a multiple of 8"),
    (512, 60, "smallest tile size 60 px is not a multiple of 8"),
    (512, 0, "smallest tile size 0 px must be at least 8 px"),
])
def test_halve_tile_rejects_bad_sizes(tile_size, floor, message):
    with pytest.raises(ValueError) as error:
        halve_tile(tile_size, floor)
    assert str(error.value) == message


# --- per-tile forms: mask_in_tile, select_tiles with grow/feather, blend_weight, stitch_tile

def scattered_mask(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    """A few rectangles of random strength, some touching the image border."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, height, width)
    for index in range(4):
        y = int(torch.randint(-5, height, (1,), generator=generator))
        x = int(torch.randint(-5, width, (1,), generator=generator))
        mask[index % batch, max(0, y):y + 9, max(0, x):x + 13] = float(torch.rand(1, generator=generator)) + 0.01
    return mask


@pytest.mark.parametrize("seed, grow_px, feather_px", [(0, 0, 0), (1, 3, 0), (2, 0, 5), (3, 6, 4), (4, 2, 11)])
def test_mask_in_tile_equals_the_whole_image_mask_cropped(seed, grow_px, feather_px):
    mask = scattered_mask(seed, 2, 101, 203)
    whole = feather_mask(grow_mask(mask, grow_px), feather_px)
    for tile in plan_grid(101, 203, 48, 16):
        assert torch.equal(mask_in_tile(mask, tile, grow_px, feather_px), crop(whole, tile)), tile
    single = mask[1]  # a [H, W] mask keeps its layout
    assert mask_in_tile(single, Tile(0, 0, 48, 48), grow_px, feather_px).shape == (48, 48)


def test_mask_in_tile_rejects_negative_sizes_and_tiles_outside():
    with pytest.raises(ValueError, match="mask_grow -2 px must not be negative"):
        mask_in_tile(torch.zeros(8, 8), Tile(0, 0, 8, 8), -2, 0)
    with pytest.raises(ValueError, match="mask_feather -1 px must not be negative"):
        mask_in_tile(torch.zeros(8, 8), Tile(0, 0, 8, 8), 0, -1)
    with pytest.raises(ValueError, match="does not lie inside the 8x8 px image"):
        mask_in_tile(torch.zeros(8, 8), Tile(0, 0, 16, 16))


@pytest.mark.parametrize("seed, grow_px, feather_px", [(5, 0, 0), (6, 8, 8), (7, 20, 3)])
def test_select_tiles_with_grow_and_feather_picks_the_tiles_of_the_final_mask(seed, grow_px, feather_px):
    mask = scattered_mask(seed, 1, 101, 203)
    tiles = plan_grid(101, 203, 32, 8)
    whole = feather_mask(grow_mask(mask, grow_px), feather_px)
    selected = select_tiles(tiles, mask, grow_px, feather_px)
    assert selected == select_tiles(tiles, whole) == tiles_touched_by_brute_force(tiles, whole)
    assert 0 < len(selected) < len(tiles)


def test_growing_the_mask_reaches_exactly_the_next_tile():
    tiles = plan_grid(64, 112, 64, 16)  # columns 0..63 and 48..111
    mask = torch.zeros(64, 112)
    mask[30, 40] = 1.0  # 8 px left of the second tile
    assert select_tiles(tiles, mask, grow_px=7) == [tiles[0]]
    assert select_tiles(tiles, mask, grow_px=8) == tiles
    assert select_tiles(tiles, mask, grow_px=4, feather_px=4) == tiles


@pytest.mark.parametrize("seed", range(3))
def test_blend_weight_is_blend_weights_entry_bit_for_bit(seed):
    tiles = plan_grid(200, 264, 64, 16)
    keep = torch.rand(len(tiles), generator=torch.Generator().manual_seed(seed)) < 0.5
    subset = [tile for tile, kept in zip(tiles, keep.tolist()) if kept]
    for index, weight in enumerate(blend_weights(subset, 200, 264, 16)):
        assert torch.equal(blend_weight(subset, index, 16), weight)


def test_stitching_tile_by_tile_gives_the_stitch_result():
    image = random_image(2, 101, 203, seed=6)
    mask = soft_mask(2, 101, 203)
    tiles = select_tiles(plan_grid(101, 203, 64, 16), mask)
    generator = torch.Generator().manual_seed(7)
    tile_images = [torch.rand(crop(image, tile).shape, generator=generator) for tile in tiles]
    expected = stitch(image, tile_images, tiles, blend_weights(tiles, 101, 203, 16), mask)
    result = image.clone()
    for index, (tile, tile_image) in enumerate(zip(tiles, tile_images)):
        stitch_tile(result, image, tile_image, tile, blend_weight(tiles, index, 16), crop(mask, tile))
    assert torch.equal(result, expected)
    outside = (mask == 0)[..., None].expand_as(image)
    assert torch.equal(result[outside], image[outside]) and not torch.equal(result, image)


def test_stitch_tile_changes_only_its_tile_and_keeps_masked_off_pixels():
    image = random_image(1, 64, 112, seed=8)
    result = image.clone()
    tile = Tile(0, 48, 64, 64)
    tile_mask = torch.zeros(64, 64)
    tile_mask[:, 32:] = 0.5
    tile_image = torch.full((1, 64, 64, 3), float("nan"))
    tile_image[:, :, 32:] = 1.0
    stitch_tile(result, image, tile_image, tile, torch.ones(64, 64), tile_mask)
    assert torch.equal(result[:, :, :80], image[:, :, :80])  # outside the tile, and where the mask is 0
    assert torch.allclose(result[:, :, 80:], (image[:, :, 80:] + 1.0) / 2)
    with pytest.raises(ValueError, match=r"expected \(1, 64, 64, 3\)"):
        stitch_tile(result, image, tile_image[:, :32], tile, torch.ones(64, 64), tile_mask)


def test_tile_plan_names_the_batch():
    plan = TilePlan(grid_count=18, sampled_count=3, tile_size=512, overlap=64, images=2)
    assert plan.describe() == "tiles: 18 in grid over 2 images (512 px, overlap 64 px), 3 sampled, 15 skipped"


def test_check_tiling_names_the_setting():
    check_tiling(640, 64)
    with pytest.raises(ValueError, match="overlap 64 px must be smaller than tile_size 64 px"):
        check_tiling(64, 64)
