"""Tiled Inpaint inside real ComfyUI (CPU, tiny SD1.5 + TAESD): tiles sampled where the mask is,
pixels outside it bit-identical, several regions, OOM survived, bad input refused, nothing left behind."""
import comfy.model_management as model_management
import comfy.patcher_extension
import pytest
import torch

import comfy_host
import generated_models
from comfyui_headroom.memory.tiles import feather_mask, grow_mask, plan_grid, select_tiles

POSITIVE = generated_models.text_conditioning(1)
NEGATIVE = generated_models.text_conditioning(2)
SIZE, TILE, OVERLAP, GROW, FEATHER = 1024, 256, 32, 8, 8


def tiled_inpaint(nodes, model, vae, image, mask, **overrides):
    """(IMAGE, plan) from the node, run the way ComfyUI's executor runs it."""
    inputs = dict(model=model, positive=POSITIVE, negative=NEGATIVE, vae=vae, image=image, mask=mask,
                  tile_size=TILE, overlap=OVERLAP, mask_grow=GROW, mask_feather=FEATHER, seed=3, steps=1, cfg=4.0,
                  sampler_name="euler", scheduler="normal", denoise=1.0)
    inputs.update(overrides)
    return comfy_host.run_v3_node(nodes.NODE_CLASS_MAPPINGS["HeadroomTiledInpaint"], **inputs).args


def counting_sampler_runs(model):
    """A clone that records the noise shape of every sampling run (through ComfyUI's OUTER_SAMPLE wrapper)."""
    counted = model.clone()
    runs = []

    def outer_sample(executor, *args, **kwargs):
        runs.append(tuple((args[0] if args else kwargs["noise"]).shape))
        return executor(*args, **kwargs)

    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "test_count", outer_sample)
    return counted, runs


def random_image(size=SIZE, batch=1, seed=0):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def square_mask(*squares, size=SIZE):
    mask = torch.zeros(1, size, size)
    for top, left, side in squares:
        mask[0, top:top + side, left:left + side] = 1.0
    return mask


def final_mask(mask):
    return feather_mask(grow_mask(mask, GROW), FEATHER)


def assert_changed_only_inside(result, image, mask):
    outside = (final_mask(mask) == 0)[..., None].expand_as(image)
    assert torch.equal(result[outside], image[outside]), "a pixel outside the mask changed"
    fully = (mask == 1)[..., None].expand_as(image)
    assert (result[fully] != image[fully]).float().mean() > 0.9, "the masked area was not repainted"


def assert_nothing_of_ours_remains(original, test_clone=None):
    """Neither the incoming model nor anything loaded carries Headroom hooks (but the test's own OOM hook)."""
    has_headroom_hooks = comfy_host.pack_module("memory.comfy.models").has_headroom_hooks
    assert not has_headroom_hooks(original)
    for entry in model_management.current_loaded_models:
        assert entry.model is None or entry.model is test_clone or not has_headroom_hooks(entry.model)


def test_a_corner_mask_samples_only_the_tiles_it_touches(comfy_nodes, loaded_checkpoint):
    model, _, vae = loaded_checkpoint
    image = random_image()
    before = image.clone()
    mask = square_mask((200, 200, 30))  # near the top-left corner, across the overlap of four tiles
    counted, runs = counting_sampler_runs(model)
    result, plan = tiled_inpaint(comfy_nodes, counted, vae, image, mask)
    grid = plan_grid(SIZE, SIZE, TILE, OVERLAP)
    touched = select_tiles(grid, final_mask(mask))
    assert len(grid) == 25 and len(touched) == 4
    assert runs == [(1, 4, TILE // 8, TILE // 8)] * 4
    assert plan == "tiles: 25 in grid (256 px, overlap 32 px), 4 sampled, 21 skipped"
    assert_changed_only_inside(result, image, mask)
    assert torch.equal(image, before)  # the input IMAGE is not written to
    assert_nothing_of_ours_remains(model)


def test_two_disjoint_masks_are_inpainted_in_one_run(comfy_nodes, loaded_checkpoint):
    model, _, vae = loaded_checkpoint
    image = random_image(seed=1)
    mask = square_mask((16, 16, 40), (960, 960, 40))  # opposite corners
    counted, runs = counting_sampler_runs(model)
    result, plan = tiled_inpaint(comfy_nodes, counted, vae, image, mask)
    assert len(runs) == 2 and plan.endswith("2 sampled, 23 skipped")
    assert_changed_only_inside(result, image, mask)


def test_an_empty_mask_returns_the_input_unchanged(comfy_nodes, loaded_checkpoint):
    model, _, vae = loaded_checkpoint
    image = random_image(size=512)
    counted, runs = counting_sampler_runs(model)
    result, plan = tiled_inpaint(comfy_nodes, counted, vae, image, torch.zeros(1, 512, 512))
    assert torch.equal(result, image) and runs == []
    assert plan.startswith("mask is empty: nothing to inpaint, image returned unchanged; tiles: 9 in grid")


def test_one_tile_is_comfyuis_own_masked_inpaint(comfy_nodes, loaded_checkpoint):
    """A tile covering the whole image gives what VAE Encode -> Set Latent Noise Mask -> KSampler ->
    VAE Decode gives, composited with the mask: same noise, same sampler, same VAE."""
    model, _, vae = loaded_checkpoint
    image = random_image(size=256, seed=2)
    mask = square_mask((64, 96, 80), size=256)
    result, plan = tiled_inpaint(comfy_nodes, model, vae, image, mask, steps=2)
    assert plan == "tiles: 1 in grid (256 px, overlap 32 px), 1 sampled, 0 skipped"
    strength = final_mask(mask)
    latent = comfy_nodes.VAEEncode().encode(vae, image)[0]
    latent = comfy_nodes.SetLatentNoiseMask().set_mask(latent, strength)[0]
    sampled = comfy_nodes.KSampler().sample(model, 3, 2, 4.0, "euler", "normal", POSITIVE, NEGATIVE, latent)[0]
    decoded = comfy_nodes.VAEDecode().decode(vae, sampled)[0]
    weight = strength[..., None]
    expected = torch.where(weight == 0, image, image + weight * (decoded - image))
    assert torch.equal(result, expected)


def test_injected_out_of_memory_halves_the_tile_and_succeeds(comfy_nodes, loaded_checkpoint):
    model, _, vae = loaded_checkpoint
    image = random_image(size=512, seed=3)
    mask = square_mask((20, 20, 24), size=512)
    counted, runs = counting_sampler_runs(model)
    injection = {"times": 1}
    counted.model_options["transformer_options"]["headroom"] = {"test_inject_tile_oom": injection}
    result, plan = tiled_inpaint(comfy_nodes, counted, vae, image, mask)
    assert injection == {"times": 0}
    assert runs == [(1, 4, 16, 16)]  # the 256 px tile failed; its region ran as one 128 px tile
    assert "out of memory 1x, survived: sampling the 256x256 px tile at x=0 y=0 (OutOfMemoryError: " in plan
    assert "retried with 128 px tiles; 1 tiles sampled in all, down to 128 px" in plan
    assert_changed_only_inside(result, image, mask)
    assert counted.model_options["transformer_options"]["headroom"] == {"test_inject_tile_oom": injection}
    assert_nothing_of_ours_remains(model, test_clone=counted)


def test_out_of_memory_on_the_smallest_tile_fails_listing_what_was_tried(comfy_nodes, loaded_checkpoint):
    model, _, vae = loaded_checkpoint
    failing = model.clone()
    failing.model_options["transformer_options"]["headroom"] = {"test_inject_tile_oom": {"times": 99}}
    tiles_exhausted = comfy_host.pack_module("memory.inpaint").TilesExhausted
    with pytest.raises(tiles_exhausted) as failure:
        tiled_inpaint(comfy_nodes, failing, vae, random_image(size=512), square_mask((20, 20, 24), size=512))
    message = str(failure.value)
    assert "out of memory on a 128 px tile, the smallest it tries" in message
    assert "retried with 128 px tiles" in message and "128 px is the smallest tile" in message
    assert isinstance(failure.value, model_management.OOM_EXCEPTION)  # ComfyUI still shows its OOM advice
    assert_nothing_of_ours_remains(model, test_clone=failing)


def test_area_and_mask_conditioning_is_cropped_per_tile(comfy_nodes, loaded_checkpoint):
    model, _, vae = loaded_checkpoint
    area = comfy_nodes.ConditioningSetArea().append(generated_models.text_conditioning(4), 256, 256, 128, 128, 1.0)[0]
    region = torch.zeros(1, 512, 512)
    region[0, 300:400, 300:400] = 1.0
    masked = comfy_nodes.ConditioningSetMask().append(generated_models.text_conditioning(5), region, "default", 1.0)[0]
    image = random_image(size=512, seed=4)
    mask = square_mask((100, 100, 100), size=512)  # one tile: the area crosses it, the mask misses it
    result, plan = tiled_inpaint(comfy_nodes, model, vae, image, mask, positive=POSITIVE + area + masked)
    assert plan.endswith("1 sampled, 8 skipped")
    assert_changed_only_inside(result, image, mask)


@pytest.mark.parametrize("change, message", [
    ({"mask": torch.ones(1, 64, 32)}, "mask is 32x64 px but image is 64x64 px"),
    ({"mask": torch.ones(3, 64, 64), "image": torch.rand(2, 64, 64, 3)}, "mask batch 3 does not match image batch 2"),
    ({"tile_size": 100}, "tile_size 100 px is not a multiple of 8"),
    ({"overlap": 256}, "overlap 256 px must be smaller than tile_size 256 px"),
    ({"mask_grow": -1}, "mask_grow -1 px must not be negative"),
    ({"negative": [[NEGATIVE[0][0], {"control": object()}]]}, "negative: conditioning entry 0 carries 'control'"),
])
def test_bad_input_is_refused_naming_the_input(comfy_nodes, loaded_checkpoint, change, message):
    model, _, vae = loaded_checkpoint
    counted, runs = counting_sampler_runs(model)
    inputs = {"image": torch.rand(1, 64, 64, 3), "mask": torch.ones(1, 64, 64), **change}
    with pytest.raises(ValueError, match=message):
        tiled_inpaint(comfy_nodes, counted, vae, **inputs)
    assert runs == []


def test_a_model_that_is_not_a_diffusion_model_is_refused(comfy_nodes, loaded_checkpoint):
    _, _, vae = loaded_checkpoint
    with pytest.raises(ValueError, match="model: Tiled Inpaint needs a diffusion model"):
        tiled_inpaint(comfy_nodes, vae.patcher, vae, torch.rand(1, 64, 64, 3), torch.ones(1, 64, 64))


def test_the_comfyui_side_of_the_ladder_calls_comfyuis_own_functions(comfy_nodes, loaded_checkpoint):
    """The fallbacks an OOM leads to, called directly: VAE tiled encode/decode and freeing the other models."""
    model, _, vae = loaded_checkpoint
    backend = comfy_host.pack_module("memory.comfy.inpaint").inpaint_backend(model, vae, 1, 4.0, "euler", "normal", 1.0)
    pixels = random_image(size=256, seed=5)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        latent = backend.encode_tiled(pixels)
        assert latent.shape == (1, 4, 32, 32)
        assert torch.allclose(latent, backend.encode(pixels), atol=0.05)  # TAESD tiles agree with the whole
        assert backend.decode_tiled(latent).shape == (1, 256, 256, 3)
    model_management.load_models_gpu([model])
    assert any(entry.model is vae.patcher for entry in model_management.current_loaded_models)
    assert backend.free_memory() == ["TAESD"]  # the VAE goes, the model that samples stays
    loaded = [entry.model for entry in model_management.current_loaded_models]
    assert model in loaded and vae.patcher not in loaded
    assert backend.is_out_of_memory(torch.OutOfMemoryError("x")) and not backend.is_out_of_memory(ValueError())
