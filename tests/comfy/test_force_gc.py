"""Force GC inside real ComfyUI: unloads what ComfyUI keeps loaded, frees a model nothing else holds (its RAM
comes back and the record says so), says why when something does hold it, and refuses bad input."""
import gc
import re
import weakref

import psutil
import pytest

import comfy_host
from comfy_host import sample


def loaded_names():
    import comfy.model_management as model_management
    return [type(entry.model.model).__name__ for entry in model_management.current_loaded_models
            if entry.model is not None]


def test_force_gc_unloads_the_sampled_model_and_passes_the_value_through(comfy_nodes, loaded_checkpoint):
    model, _, _ = loaded_checkpoint
    latent = sample(comfy_nodes, model)
    assert loaded_names() == ["BaseModel"]

    force_gc = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomForceGC"]
    output = comfy_host.run_v3_node(force_gc, value=latent, threshold_percent=0.0,
                                    unload_models=True, trim_ram=True)
    value, record = output.args
    assert value is latent
    assert loaded_names() == []
    assert "unloaded=[SD15]" in record
    assert "collected=" in record and "threshold=0%" in record and "device=cpu" in record
    # the model object is still held by this test (as a cached loader output would hold it): the
    # record must say why its RAM was not freed instead of claiming a saving
    assert "still referenced" in record and "still_referenced=[SD15]" in record
    assert output.ui.as_dict() == {"text": (record,)}


def test_force_gc_below_threshold_does_not_collect(comfy_nodes, loaded_checkpoint):
    model, _, _ = loaded_checkpoint
    sample(comfy_nodes, model)
    force_gc = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomForceGC"]
    value, record = comfy_host.run_v3_node(force_gc, value=1, threshold_percent=100.0,
                                           unload_models=True, trim_ram=True).args
    assert value == 1
    assert "action=skipped (below threshold)" in record
    assert "collected=" not in record
    assert loaded_names() == ["BaseModel"]


def test_force_gc_next_sampling_is_unchanged(comfy_nodes, loaded_checkpoint):
    model, _, _ = loaded_checkpoint
    before = sample(comfy_nodes, model, seed=7)
    force_gc = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomForceGC"]
    comfy_host.run_v3_node(force_gc, value=None, threshold_percent=0.0, unload_models=True, trim_ram=True)
    after = sample(comfy_nodes, model, seed=7)
    assert loaded_names() == ["BaseModel"]
    assert after.equal(before)


@pytest.mark.parametrize("threshold", [-1.0, 100.5, 1000.0])
def test_force_gc_refuses_a_threshold_outside_0_to_100(comfy_nodes, threshold):
    force_gc = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomForceGC"]
    with pytest.raises(ValueError, match="threshold_percent .* is outside 0-100"):
        comfy_host.run_v3_node(force_gc, value=None, threshold_percent=threshold,
                               unload_models=True, trim_ram=True)


def sampled_and_dropped(nodes, checkpoint) -> tuple[weakref.ref, int]:
    """Load the checkpoint's diffusion model, sample with it (ComfyUI keeps it loaded), and drop every
    reference of ours, leaving it in a reference cycle, as a failed node's traceback or a closure leaves one:
    only a garbage collection frees it. A weakref to its weights' module and their size come back."""
    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    sample(nodes, model)
    cycle = {"model": model}
    cycle["self"] = cycle
    return weakref.ref(model.model), model.model_size()


def freed_ram_bytes(record: str) -> int:
    (megabytes,) = re.findall(r"freed=ram:(-?[0-9.]+)MB", record)
    return int(float(megabytes) * 2 ** 20)


def test_force_gc_frees_a_model_nothing_else_holds_and_says_so(comfy_nodes, tiny_checkpoint):
    weights_ref, weights_bytes = sampled_and_dropped(comfy_nodes, tiny_checkpoint)
    assert weights_ref() is not None and loaded_names() == ["BaseModel"]  # only ComfyUI's loaded list holds it
    rss_before = psutil.Process().memory_info().rss
    force_gc = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomForceGC"]
    _, record = comfy_host.run_v3_node(force_gc, value=None, threshold_percent=0.0, unload_models=True,
                                       trim_ram=True).args
    rss_after = psutil.Process().memory_info().rss
    assert weights_ref() is None, "the model outlived Force GC"
    assert loaded_names() == [] and "unloaded=[SD15]" in record
    assert "still_referenced" not in record and "note=" not in record, record
    assert rss_before - rss_after >= 0.75 * weights_bytes, (rss_before - rss_after, weights_bytes)
    assert freed_ram_bytes(record) >= 0.75 * weights_bytes, record  # the record says what was freed
