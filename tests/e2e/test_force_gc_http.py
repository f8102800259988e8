"""Force GC through ComfyUI's HTTP API: listed, run between KSampler and VAEDecode, bad input refused."""
import json

import pytest

from server import PromptRejected
from example_workflows import for_checkpoint, load_api_workflow


def force_gc_workflow(checkpoint_name):
    """The example workflow, small, with a probe right after Force GC that reports what is loaded."""
    workflow = for_checkpoint(load_api_workflow("force_gc"), checkpoint_name,
                              without_text_encoder=True, steps=2, size=64)
    workflow["9"] = {"class_type": "HeadroomTestLoadedModels", "inputs": {"value": ["6", 0]}}
    workflow["7"]["inputs"]["samples"] = ["9", 0]
    return workflow


def test_object_info_lists_force_gc_with_tooltips(server):
    info = server.get("/object_info/HeadroomForceGC")["HeadroomForceGC"]
    assert info["display_name"] == "Force GC"
    assert info["category"] == "Headroom"
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    assert set(inputs) == {"value", "threshold_percent", "unload_models", "trim_ram"}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert info["output_name"] == ["value", "record"]


def test_force_gc_between_ksampler_and_vae_decode(server, tiny_checkpoint):
    run = server.run(force_gc_workflow(tiny_checkpoint.name))
    assert run.succeeded, run.error()

    record = run.outputs("6")["text"][0]
    assert "unloaded=[SD15]" in record, record
    assert "collected=" in record
    # right after Force GC, before VAEDecode loads the VAE, ComfyUI holds no model at all
    assert json.loads(run.outputs("9")["loaded_models"][0]) == []

    images = run.outputs("8")["images"]
    assert len(images) == 1
    saved = server.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert saved.stat().st_size > 0

    # the next prompt (without Force GC) runs normally
    plain = for_checkpoint(load_api_workflow("force_gc"), tiny_checkpoint.name,
                              without_text_encoder=True, steps=2, size=64)
    plain["7"]["inputs"]["samples"] = ["5", 0]
    del plain["6"]
    plain["8"]["inputs"]["filename_prefix"] = "headroom_plain"
    again = server.run(plain)
    assert again.succeeded, again.error()
    assert again.outputs("8")["images"][0]["filename"].startswith("headroom_plain")


def test_force_gc_runs_on_every_prompt(server, tiny_checkpoint):
    workflow = force_gc_workflow(tiny_checkpoint.name)
    first = server.run(workflow)
    records_before = server.log_text().count("Headroom GC:")
    second = server.run(workflow)
    assert first.succeeded and second.succeeded
    # the same prompt twice: KSampler is served from cache, Force GC runs again
    cached = [node for event in second.events if event["type"] == "execution_cached"
              for node in event["data"]["nodes"]]
    assert "5" in cached and "6" not in cached
    assert any(event["type"] == "executed" and event["data"]["node"] == "6" for event in second.events)
    assert server.log_text().count("Headroom GC:") == records_before + 1


@pytest.mark.parametrize("threshold", [150.0, -5.0])
def test_threshold_outside_0_to_100_is_refused_naming_the_input(server, tiny_checkpoint, threshold):
    workflow = force_gc_workflow(tiny_checkpoint.name)
    workflow["6"]["inputs"]["threshold_percent"] = threshold
    with pytest.raises(PromptRejected) as rejected:
        server.queue(workflow)
    errors = rejected.value.body["node_errors"]["6"]["errors"]
    assert any(error["extra_info"]["input_name"] == "threshold_percent" for error in errors), errors
