"""Offload Model through ComfyUI's HTTP API: listed, runs KSampler and SamplerCustomAdvanced, refuses bad input."""
import pytest

from example_workflows import for_checkpoint, load_api_workflow
from server import PromptRejected


MB = 2 ** 20
GB = 2 ** 30
REPORT = "20"


def offload_workflow(checkpoint_name, seed=42, **offload_inputs):
    """The example workflow on the tiny model, with a Memory Report after the image: its sampling stage
    carries the resident weight bytes the run measured (a new seed: nothing served from the cache)."""
    workflow = for_checkpoint(load_api_workflow("offload_model"), checkpoint_name,
                              without_text_encoder=True, steps=2, size=64)
    workflow["2"]["inputs"].update(offload_inputs)
    workflow["6"]["inputs"]["seed"] = seed
    workflow[REPORT] = {"class_type": "HeadroomMemoryReport", "inputs": {"value": ["7", 0]}}
    return workflow


def sampling_stage(run) -> dict:
    (report,) = run.outputs(REPORT)["headroom_report"]
    (stage,) = [stage for stage in report["stages"] if stage["kind"] == "sampling"]
    return stage


def test_object_info_lists_offload_model_with_tooltips(server):
    info = server.get("/object_info/HeadroomOffloadModel")["HeadroomOffloadModel"]
    assert info["display_name"] == "Offload Model" and info["category"] == "Headroom"
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"model", "budget_gb", "keep_free_gb", "text_encoder_and_vae", "clip", "vae"}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert info["output_name"] == ["MODEL", "CLIP", "VAE", "plan"]


def test_offload_model_workflow_runs_under_a_budget_and_fills_it(server, tiny_checkpoint):
    budget = int(0.01 * GB)
    # first the whole model, loaded without a budget: the budgeted prompt after it must move weights out
    # (whichever prompt ran before on the shared server, this one starts from the same state)
    unbudgeted = server.run(offload_workflow(tiny_checkpoint.name, seed=102, budget_gb=0.0, keep_free_gb=0.0))
    assert unbudgeted.succeeded, unbudgeted.error()
    whole = sampling_stage(unbudgeted)["resident_bytes"]
    assert whole > 50 * MB  # the tiny UNet's 52 MB of weights, all resident
    run = server.run(offload_workflow(tiny_checkpoint.name, seed=101, budget_gb=0.01, keep_free_gb=0.0))
    assert run.succeeded, run.error()
    plan = run.outputs("2")["text"][0]
    assert "resident weights <= 0.01 GB" in plan and "SD15" in plan
    assert len(run.outputs("8")["images"]) == 1
    stage = sampling_stage(run)
    # measured by the run (the most weight bytes ComfyUI held at any step), not planned: within the budget
    # and filling a good part of it (the tiny UNet's largest module is 7 MB of its 52 MB)
    assert budget - 8 * MB <= stage["resident_bytes"] <= budget, stage
    assert stage["planned_ram_bytes"] > 0 and stage["outcome"] == "success"


def test_sampler_custom_advanced_runs_under_the_budget(server, tiny_checkpoint):
    budget = int(0.02 * GB)
    workflow = offload_workflow(tiny_checkpoint.name, seed=103, budget_gb=0.02, keep_free_gb=0.0)
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
    run = server.run(workflow)
    assert run.succeeded, run.error()
    stage = sampling_stage(run)
    assert stage["node_type"] == "SamplerCustomAdvanced" and 0 < stage["resident_bytes"] <= budget, stage


def test_budget_and_keep_free_together_fail_naming_the_inputs_and_the_next_prompt_runs(server, tiny_checkpoint):
    run = server.run(offload_workflow(tiny_checkpoint.name, budget_gb=1.0, keep_free_gb=1.0))
    assert not run.succeeded
    error = run.error()
    assert error["node_type"] == "HeadroomOffloadModel"
    assert "set either budget_gb" in error["exception_message"] and "keep_free_gb" in error["exception_message"]
    again = server.run(offload_workflow(tiny_checkpoint.name, seed=104))
    assert again.succeeded, again.error()


def test_negative_budget_is_refused_at_queue_time_naming_the_input(server, tiny_checkpoint):
    with pytest.raises(PromptRejected) as rejected:
        server.queue(offload_workflow(tiny_checkpoint.name, budget_gb=-1.0))
    errors = rejected.value.body["node_errors"]["2"]["errors"]
    assert any(error["extra_info"]["input_name"] == "budget_gb" for error in errors), errors
