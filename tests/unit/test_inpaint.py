"""The tiled inpaint run (memory/inpaint.py) with a backend of test doubles: no ComfyUI, no model.

The doubles: encode averages 8x8 pixel blocks into 4 latent channels, sample returns a constant
latent (so a sampled pixel is recognisable), decode repeats each latent pixel 8x8. Out-of-memory
is simulated by raising torch.OutOfMemoryError for inputs above a size.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_headroom.memory.inpaint import (
    MIN_TILE_SIZE, InpaintSettings, LatentNoise, TileBackend, TilesExhausted, check_conditioning,
    conditioning_for_tile, inpaint_tiled)
from comfyui_headroom.memory.tiles import Tile

PAINT = 0.75  # what the double sampler paints


class DoubleBackend:
    """Records every call; `oom_above` / `encode_oom_above`: sides (px) whose calls run out of memory."""

    def __init__(self, oom_above: int | None = None, encode_oom_above: int | None = None,
                 tiled_encode_oom: bool = False):
        self.oom_above, self.encode_oom_above, self.tiled_encode_oom = oom_above, encode_oom_above, tiled_encode_oom
        self.sampled: list[tuple] = []  # (latent shape, seed)
        self.noise: list[torch.Tensor] = []
        self.calls: list[str] = []
        self.progress_calls: list[tuple[int, int]] = []
        self.frees = 0

    @staticmethod
    def _latent(pixels):
        averaged = F.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([averaged, averaged.mean(dim=1, keepdim=True)], dim=1)

    def encode(self, pixels):
        self.calls.append(f"encode {pixels.shape[2]}x{pixels.shape[1]}")
        assert pixels.shape[1] % 8 == 0 and pixels.shape[2] % 8 == 0
        if self.encode_oom_above is not None and max(pixels.shape[1:3]) > self.encode_oom_above:
            raise torch.OutOfMemoryError("double: encode does not fit")
        return self._latent(pixels)

    def encode_tiled(self, pixels):
        self.calls.append(f"encode_tiled {pixels.shape[2]}x{pixels.shape[1]}")
        if self.tiled_encode_oom:
            raise torch.OutOfMemoryError("double: tiled encode does not fit either")
        return self._latent(pixels)

    def sample(self, latent, noise, noise_mask, positive, negative, seed):
        side = max(latent.shape[-2:]) * 8
        self.calls.append(f"sample {side}")
        assert noise.shape == latent.shape and noise_mask.shape[-2:] == (latent.shape[-2] * 8, latent.shape[-1] * 8)
        if self.oom_above is not None and side > self.oom_above:
            raise torch.OutOfMemoryError(f"double: a {side} px tile does not fit")
        self.sampled.append((tuple(latent.shape), seed))
        self.noise.append(noise)
        return torch.full_like(latent, PAINT)

    def decode(self, latent):
        self.calls.append("decode")
        return latent[:, :3].repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).movedim(1, -1)

    def decode_tiled(self, latent):
        return self.decode(latent)

    def free_memory(self):
        self.frees += 1
        return ["OtherModel"]

    def backend(self) -> TileBackend:
        return TileBackend(encode=self.encode, encode_tiled=self.encode_tiled, sample=self.sample,
                           decode=self.decode, decode_tiled=self.decode_tiled, free_memory=self.free_memory,
                           is_out_of_memory=lambda error: isinstance(error, torch.OutOfMemoryError),
                           progress=lambda done, total: self.progress_calls.append((done, total)))


TEXT = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]


def image_of(batch, height, width, seed=0):
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def run(image, mask, double, tile_size=128, overlap=16, grow_px=4, feather_px=4, seed=1, positive=TEXT,
        negative=TEXT):
    return inpaint_tiled(image, mask, positive, negative,
                         InpaintSettings(tile_size, overlap, grow_px, feather_px, seed), double.backend())


# A pixel farther than this from the mask is never touched: mask_grow 4 + mask_feather 4 (the run's
# defaults below), and 4 px to spare. Written by hand, not computed with the pack's own grow/feather.
REACH = 12


def boxes_mask(batch, height, width, *boxes):
    """A MASK set to 1 in each (image, top, left, bottom, right) box."""
    mask = torch.zeros(batch, height, width)
    for index, top, left, bottom, right in boxes:
        mask[index, top:bottom, left:right] = 1.0
    return mask


def assert_only_the_mask_changed(result, image, *boxes):
    """Pixels more than REACH px outside every masked box are the input's exact values; the boxes
    themselves (grown as far as they are feathered) are fully repainted."""
    may_change = torch.zeros(image.shape[:3], dtype=torch.bool)
    for index, top, left, bottom, right in boxes:
        may_change[index, max(0, top - REACH):bottom + REACH, max(0, left - REACH):right + REACH] = True
    kept = ~may_change
    assert kept.any() and torch.equal(result[kept], image[kept]), "a pixel far outside the mask changed"
    for index, top, left, bottom, right in boxes:
        painted = result[index, top:bottom, left:right]
        assert torch.allclose(painted, torch.full_like(painted, PAINT), atol=1e-6)


def origins(report):
    """(image, x, y) of every tile the run sampled, in order."""
    return [(index, tile.x, tile.y) for index, tile in report.sampled_tiles]


def test_only_the_tiles_the_final_mask_touches_are_sampled_and_blended_back():
    image = image_of(1, 300, 420)
    boxes = [(0, 100, 100, 130, 130),  # inside the overlap of four tiles
             (0, 280, 400, 300, 420)]  # the bottom-right corner tile
    double = DoubleBackend()
    result, report = run(image, boxes_mask(1, 300, 420, *boxes), double)
    # 128 px tiles, stride 112, the last shifted back to the edge: y 0, 112, 172; x 0, 112, 224, 292
    assert origins(report) == [(0, 0, 0), (0, 112, 0), (0, 0, 112), (0, 112, 112), (0, 292, 172)]
    assert len(double.sampled) == 5
    assert report.describe() == "tiles: 12 in grid (128 px, overlap 16 px), 5 sampled, 7 skipped"
    assert double.progress_calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert_only_the_mask_changed(result, image, *boxes)
    assert double.frees == 0 and report.retries == []
    assert "sampled=5 skipped=" in report.log_line() and "oom_retries=[none]" in report.log_line()


def test_the_input_image_is_not_changed():
    image = image_of(1, 128, 128)
    before = image.clone()
    mask = torch.ones(1, 128, 128)
    result, _ = run(image, mask, DoubleBackend())
    assert torch.equal(image, before) and result is not image


def test_an_empty_mask_returns_the_image_itself_and_says_so():
    image = image_of(1, 256, 256)
    double = DoubleBackend()
    result, report = run(image, torch.zeros(1, 256, 256), double)
    assert result is image and double.calls == [] and double.progress_calls == []
    assert report.describe() == ("mask is empty: nothing to inpaint, image returned unchanged; "
                                 "tiles: 9 in grid (128 px, overlap 16 px), 0 sampled, 9 skipped")


def test_a_batch_samples_each_image_where_its_own_mask_is_set():
    image = image_of(2, 256, 256)
    box = (1, 10, 10, 20, 20)
    double = DoubleBackend()
    result, report = run(image, boxes_mask(2, 256, 256, box), double)
    assert torch.equal(result[0], image[0]) and len(double.sampled) == 1
    assert origins(report) == [(1, 0, 0)]
    assert_only_the_mask_changed(result, image, box)
    assert report.describe() == "tiles: 18 in grid over 2 images (128 px, overlap 16 px), 1 sampled, 17 skipped"
    double = DoubleBackend()  # one mask for every image
    result, report = run(image, boxes_mask(1, 256, 256, (0, 10, 10, 20, 20)), double)
    assert len(double.sampled) == 2 and origins(report) == [(0, 0, 0), (1, 0, 0)]
    assert_only_the_mask_changed(result, image, (0, 10, 10, 20, 20), (1, 10, 10, 20, 20))


def test_sides_that_are_not_multiples_of_8_are_padded_for_the_vae():
    image = image_of(1, 100, 150)
    box = (0, 40, 50, 60, 90)
    double = DoubleBackend()
    result, report = run(image, boxes_mask(1, 100, 150, box), double, tile_size=256)
    assert double.calls[0] == "encode 152x104"
    assert result.shape == image.shape and "1 in grid" in report.describe()
    assert_only_the_mask_changed(result, image, box)


def test_noise_is_one_whole_image_field_that_overlapping_tiles_share():
    field = LatentNoise(seed=5, batch=2, height=300, width=420)
    latent = torch.zeros(1, 4, 16, 16)
    left = field.for_tile(1, Tile(0, 0, 128, 128), latent)
    right = field.for_tile(1, Tile(0, 112, 128, 128), latent)
    assert torch.equal(left[..., :, 14:], right[..., :, :2])  # pixels 112..127 = latent columns 14, 15
    whole = torch.randn((2, 4, 38, 53), generator=torch.Generator().manual_seed(5))  # ComfyUI's numbers
    assert torch.equal(field.noise, whole)
    assert torch.equal(left, whole[1:2, :, :16, :16])
    corner = field.for_tile(0, Tile(300 - 104, 420 - 128, 104, 128), torch.zeros(1, 4, 13, 16))
    assert torch.equal(corner, whole[0:1, :, 24:37, 36:52])


def test_a_vae_that_does_not_downscale_by_8_is_refused():
    double = DoubleBackend()
    double.encode = lambda pixels: torch.zeros(1, 4, pixels.shape[1] // 16, pixels.shape[2] // 16)
    with pytest.raises(ValueError, match="vae: encoding a 128x128 px tile gave a 8x8 latent"):
        run(image_of(1, 128, 128), torch.ones(1, 128, 128), double)


def test_tiles_get_their_own_sampler_seed():
    image = image_of(1, 256, 256)
    double = DoubleBackend()
    run(image, torch.ones(1, 256, 256), double, seed=7)
    seeds = [seed for _, seed in double.sampled]
    assert seeds[0] == 7 and len(set(seeds)) == len(seeds) == 9


def test_out_of_memory_frees_halves_the_tile_and_keeps_the_smaller_size():
    image = image_of(1, 512, 512)
    boxes = [(0, 20, 20, 40, 40), (0, 470, 470, 500, 500)]
    double = DoubleBackend(oom_above=128)
    result, report = run(image, boxes_mask(1, 512, 512, *boxes), double, tile_size=512, overlap=64)
    # 512 fails, 256 fails, 128 fits; the second region goes straight to 128 px tiles
    assert [call for call in double.calls if call.startswith("sample")] == [
        "sample 512", "sample 256", "sample 128", "sample 128"]
    assert double.frees == 2 and len(report.retries) == 2
    assert "sampling the 512x512 px tile at x=0 y=0 (OutOfMemoryError: double: a 512 px tile does not fit): " \
           "freed [OtherModel], retried with 256 px tiles" in report.retries[0]
    assert "retried with 128 px tiles" in report.retries[1]
    assert report.tiles_run == 2 and report.smallest_tile == 128
    assert report.describe().startswith("tiles: 1 in grid (512 px, overlap 64 px), 1 sampled, 0 skipped; "
                                        "out of memory 2x, survived: ")
    assert report.describe().endswith("2 tiles sampled in all, down to 128 px")
    assert double.progress_calls == [(1, 1)]
    # 256 px parts at 0, 192, 256; the failed one at 0 in 128 px parts at 0, 64, 128 (overlap 64):
    # each mask square lies in the corner part alone
    assert origins(report) == [(0, 0, 0), (0, 384, 384)]
    assert_only_the_mask_changed(result, image, *boxes)


def test_vae_encode_out_of_memory_retries_in_vae_tiles_before_halving_the_tile():
    image = image_of(1, 256, 256)
    box = (0, 100, 100, 120, 120)
    mask = boxes_mask(1, 256, 256, box)
    double = DoubleBackend(encode_oom_above=128)
    result, report = run(image, mask, double, tile_size=256)
    assert double.calls[:3] == ["encode 256x256", "encode_tiled 256x256", "sample 256"]
    assert len(report.retries) == 1 and "VAE encode of the 256x256 px tile" in report.retries[0]
    assert report.retries[0].endswith("retried in VAE tiles")
    assert origins(report) == [(0, 0, 0)]
    assert_only_the_mask_changed(result, image, box)
    double = DoubleBackend(encode_oom_above=128, tiled_encode_oom=True)  # tiled also fails: halve the tile
    result, report = run(image, mask, double, tile_size=256)
    assert "retried with 128 px tiles" in report.retries[1] and report.smallest_tile == 128
    # 128 px parts of the 256 px tile, overlap 16 px: at 0, 112, 128; the square reaches 92-127
    assert origins(report) == [(0, 0, 0), (0, 112, 0), (0, 0, 112), (0, 112, 112)]
    assert_only_the_mask_changed(result, image, box)


def test_when_the_smallest_tile_fails_the_error_lists_what_was_tried():
    image = image_of(1, 512, 512)
    mask = torch.zeros(1, 512, 512)
    mask[0, 20:40, 20:40] = 1.0
    double = DoubleBackend(oom_above=64)
    with pytest.raises(TilesExhausted) as failure:
        run(image, mask, double, tile_size=512, overlap=64)
    message = str(failure.value)
    assert f"out of memory on a {MIN_TILE_SIZE} px tile, the smallest it tries" in message
    for tried in ("retried with 256 px tiles", "retried with 128 px tiles", "128 px is the smallest tile"):
        assert tried in message
    assert isinstance(failure.value, torch.OutOfMemoryError) and double.frees == 3


def test_other_errors_are_not_retried():
    double = DoubleBackend()

    def broken(*args):
        raise RuntimeError("sampler broke")

    double.sample = broken
    with pytest.raises(RuntimeError, match="sampler broke"):
        run(image_of(1, 128, 128), torch.ones(1, 128, 128), double)
    assert double.frees == 0


@pytest.mark.parametrize("image_shape, mask_shape, settings, message", [
    ((1, 64, 64, 3), (1, 32, 64), {}, "mask is 64x32 px but image is 64x64 px"),
    ((2, 64, 64, 3), (3, 64, 64), {}, "mask batch 3 does not match image batch 2"),
    ((1, 64, 64, 4), (1, 64, 64), {}, r"image must be an RGB IMAGE \[batch, height, width, 3\]"),
    ((1, 64, 64, 3), (1, 1, 64, 64), {}, r"mask must be a MASK \[batch, height, width\]"),
    ((1, 64, 64, 3), (1, 64, 64), {"tile_size": 100}, "tile_size 100 px is not a multiple of 8"),
    ((1, 64, 64, 3), (1, 64, 64), {"overlap": 128}, "overlap 128 px must be smaller than tile_size 128 px"),
    ((1, 64, 64, 3), (1, 64, 64), {"grow_px": -1}, "mask_grow -1 px must not be negative"),
    ((1, 64, 64, 3), (1, 64, 64), {"feather_px": -3}, "mask_feather -3 px must not be negative"),
])
def test_bad_input_is_refused_naming_the_input(image_shape, mask_shape, settings, message):
    double = DoubleBackend()
    with pytest.raises(ValueError, match=message):
        run(torch.zeros(image_shape), torch.ones(mask_shape), double, **settings)
    assert double.calls == []


# --- conditioning --------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["control", "gligen", "concat_latent_image", "concat_mask"])
@pytest.mark.parametrize("name", ["positive", "negative"])
def test_spatial_conditioning_that_cannot_be_cropped_is_refused_naming_the_input(key, name):
    spatial = TEXT + [[torch.zeros(1, 77, 768), {key: object()}]]
    conditioning = {"positive": TEXT, "negative": TEXT, name: spatial}
    double = DoubleBackend()
    with pytest.raises(ValueError, match=rf"^{name}: conditioning entry 1 carries '{key}'"):
        run(image_of(1, 64, 64), torch.ones(1, 64, 64), double, **conditioning)
    assert double.calls == []


def test_areas_and_masks_of_other_shapes_are_refused():
    with pytest.raises(ValueError, match="positive: conditioning entry 0 has a 6-value area"):
        check_conditioning([[None, {"area": (1, 8, 8, 0, 0, 0)}]], "positive")
    with pytest.raises(ValueError, match=r"negative: conditioning entry 0 has a mask of shape \(1, 1, 8, 8\)"):
        check_conditioning([[None, {"mask": torch.zeros(1, 1, 8, 8)}]], "negative")


def test_plain_conditioning_passes_through_untouched():
    options = {"pooled_output": torch.zeros(1, 768), "strength": 0.5}
    conditioning = [[torch.zeros(1, 77, 768), options]]
    (entry,) = conditioning_for_tile(conditioning, Tile(256, 256, 256, 256), 1024, 1024)
    assert entry[1] is options


def test_areas_are_cropped_to_the_tile_and_dropped_where_they_miss_it():
    # ConditioningSetArea stores (height // 8, width // 8, y // 8, x // 8)
    area = (256 // 8, 512 // 8, 128 // 8, 384 // 8)  # pixels y 128..383, x 384..895
    conditioning = [[None, {"area": area, "strength": 0.8}], [None, {}]]
    inside = conditioning_for_tile(conditioning, Tile(0, 256, 512, 512), 1024, 1024)
    # tile x 256..767, y 0..511: the area's pixels y 128..383, x 384..767 -> tile-local latent
    assert inside[0][1]["area"] == (256 // 8, 384 // 8, 128 // 8, 128 // 8)
    assert inside[0][1]["strength"] == 0.8 and conditioning[0][1]["area"] == area
    missed = conditioning_for_tile(conditioning, Tile(512, 0, 512, 256), 1024, 1024)
    assert len(missed) == 1 and "area" not in missed[0][1]
    percentage = [[None, {"area": ("percentage", 0.5, 0.5, 0.25, 0.25)}]]  # pixels 256..767 both ways
    (entry,) = conditioning_for_tile(percentage, Tile(512, 512, 512, 512), 1024, 1024)
    assert entry[1]["area"] == (256 // 8, 256 // 8, 0, 0)


def test_an_area_crossing_an_unaligned_tile_edge_covers_every_latent_pixel_it_touches():
    (entry,) = conditioning_for_tile([[None, {"area": (8, 8, 0, 0)}]], Tile(0, 36, 64, 64), 100, 100)
    # pixels x 36..63 of the area, 0..27 in the tile: latent columns 0..3
    assert entry[1]["area"] == (8, math.ceil(28 / 8), 0, 0)


def test_conditioning_masks_are_cropped_at_their_own_resolution():
    mask = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 64, 64)
    tile = Tile(32, 64, 64, 32)
    (same,) = conditioning_for_tile([[None, {"mask": mask, "set_area_to_bounds": True}]], tile, 128, 128)
    assert torch.equal(same[1]["mask"], mask[:, 16:48, 32:48])  # the mask is half the image's resolution
    assert same[1]["set_area_to_bounds"] is True
    (exact,) = conditioning_for_tile([[None, {"mask": mask[0]}]], Tile(8, 16, 24, 32), 64, 64)
    assert torch.equal(exact[1]["mask"], mask[0, 8:32, 16:48])


def test_cropped_conditioning_reaches_the_sampler():
    seen = []
    double = DoubleBackend()
    sample = double.sample

    def recording(latent, noise, noise_mask, positive, negative, seed):
        seen.append((positive, negative))
        return sample(latent, noise, noise_mask, positive, negative, seed)

    double.sample = recording
    area = [[torch.zeros(1, 77, 768), {"area": (8, 8, 0, 0)}]]  # the top-left 64 px
    run(image_of(1, 256, 256), torch.ones(1, 256, 256), double, positive=TEXT + area)
    assert len(seen) == 9
    assert seen[0][0][1][1]["area"] == (8, 8, 0, 0) and all(len(positive) == 1 for positive, _ in seen[1:])
    assert all(negative[0][1] is TEXT[0][1] for _, negative in seen)


def test_no_autograd_graph_is_kept_even_outside_comfyuis_inference_mode():
    double = DoubleBackend()
    gain = torch.ones(1, requires_grad=True)  # a VAE weight, as ComfyUI loads them
    decode = double.decode
    double.decode = lambda latent: decode(latent) * gain
    result, _ = run(image_of(1, 256, 256), torch.ones(1, 256, 256), double)
    assert not result.requires_grad  # else every tile's activations would stay alive until the end
