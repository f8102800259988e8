"""Offload Model through ComfyUI's HTTP API: listed, runs KSampler and SamplerCustomAdvanced, refuses bad input."""
import pytest

from example_workflows import for_checkpoint, load_api_workflow
from server import PromptRejected


def offload_workflow(checkpoint_name, **offload_inputs):
    workflow = for_checkpoint(load_api_workflow("offload_model"), checkpoint_name,
                              without_text_encoder=True, steps=2, size=64)
    workflow["2"]["inputs"].update(offload_inputs)
    return workflow


def test_object_info_lists_offload_model_with_tooltips(server):
    info = server.get("/object_info/HeadroomOffloadModel")["HeadroomOffloadModel"]
    assert info["display_name"] == "Offload Model" and info["category"] == "Headroom"
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"model", "budget_gb", "keep_free_gb", "text_encoder_and_vae", "clip", "vae"}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert info["output_name"] == ["MODEL", "CLIP", "VAE", "plan"]


def test_offload_model_workflow_runs_under_a_budget(server, tiny_checkpoint):
    run = server.run(offload_workflow(tiny_checkpoint.name, budget_gb=0.01, keep_free_gb=0.0))
    assert run.succeeded, run.error()
    plan = run.outputs("2")["text"][0]
    assert "resident weights <= 0.01 GB" in plan and "SD15" in plan
    assert len(run.outputs("8")["images"]) == 1
    log = server.log_text()
    assert "Headroom sampling: model=SD15 device=cpu outcome=success resident planned<=0.01 GB" in log
    assert "Headroom offload: VAE moved off cpu after decode" in log


def test_sampler_custom_advanced_runs_under_the_budget(server, tiny_checkpoint):
    workflow = offload_workflow(tiny_checkpoint.name, budget_gb=0.02, keep_free_gb=0.0)
    del workflow["6"]
    workflow.update({
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "12": {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "normal", "steps": 2,
                                                          "denoise": 1.0}},
        "13": {"class_type": "CFGGuider", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                     "cfg": 4.0}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["13", 0],
                                                                  "sampler": ["11", 0], "sigmas": ["12", 0],
                                                                  "latent_image": ["5", 0]}},
    })
    workflow["7"]["inputs"]["samples"] = ["14", 0]
    before = server.log_text().count("Headroom sampling:")
    run = server.run(workflow)
    assert run.succeeded, run.error()
    assert server.log_text().count("Headroom sampling: model=SD15 device=cpu outcome=success") > before


def test_budget_and_keep_free_together_fail_naming_the_inputs_and_the_next_prompt_runs(server, tiny_checkpoint):
    run = server.run(offload_workflow(tiny_checkpoint.name, budget_gb=1.0, keep_free_gb=1.0))
    assert not run.succeeded
    error = run.error()
    assert error["node_type"] == "HeadroomOffloadModel"
    assert "set either budget_gb" in error["exception_message"] and "keep_free_gb" in error["exception_message"]
    again = server.run(offload_workflow(tiny_checkpoint.name))
    assert again.succeeded, again.error()


def test_negative_budget_is_refused_at_queue_time_naming_the_input(server, tiny_checkpoint):
    with pytest.raises(PromptRejected) as rejected:
        server.queue(offload_workflow(tiny_checkpoint.name, budget_gb=-1.0))
    errors = rejected.value.body["node_errors"]["2"]["errors"]
    assert any(error["extra_info"]["input_name"] == "budget_gb" for error in errors), errors
