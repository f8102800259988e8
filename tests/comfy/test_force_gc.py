"""Force GC inside real ComfyUI: unloads what ComfyUI keeps loaded, says so, and refuses bad input."""
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
    assert "still referenced" in record
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
