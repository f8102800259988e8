"""Memory Report inside real ComfyUI (CPU): stages land in the journal of the prompt that ran them (ComfyUI's
executing context), failed and interrupted runs say so and leave nothing open, and the node returns the same
report as JSON, text and a chart."""
import json
import math

import comfy.model_management as model_management
import comfy.sample
import pytest
import torch
from comfy_execution.utils import CurrentNodeContext

import comfy_host
import generated_models

GB = 2 ** 30


def node(nodes, name):
    return nodes.NODE_CLASS_MAPPINGS[name]


def offload_and_slice(nodes, model, budget_bytes):
    budgeted = comfy_host.run_v3_node(node(nodes, "HeadroomOffloadModel"), model=model, budget_gb=budget_bytes / GB,
                                      keep_free_gb=0.0, text_encoder_and_vae="keep loaded").args[0]
    return comfy_host.run_v3_node(node(nodes, "HeadroomSlicedAttention"), model=budgeted, target_mb=0,
                                  method="auto", fp32=False).args[0]


def report(nodes, prompt_id):
    with CurrentNodeContext(prompt_id, "99"):
        value, chart, report_json = comfy_host.run_v3_node(node(nodes, "HeadroomMemoryReport"), value="kept").args
    assert value == "kept"
    return chart, json.loads(report_json)


def test_stages_go_to_the_journal_of_their_prompt_and_the_node_reports_them(comfy_nodes, loaded_checkpoint):
    model = offload_and_slice(comfy_nodes, loaded_checkpoint[0], loaded_checkpoint[0].model_size() // 2)
    with CurrentNodeContext("prompt-a", "3"):
        comfy_host.sample(comfy_nodes, model)
    with CurrentNodeContext("prompt-b", "4"):
        comfy_host.sample(comfy_nodes, model, seed=1)
        comfy_host.run_v3_node(node(comfy_nodes, "HeadroomForceGC"), threshold_percent=0.0, unload_models=True,
                               trim_ram=True)
    chart, first = report(comfy_nodes, "prompt-a")
    _, second = report(comfy_nodes, "prompt-b")
    assert [(s["kind"], s["node_id"]) for s in first["stages"]] == [("sampling", "3")]
    assert [(s["kind"], s["node_id"]) for s in second["stages"]] == [("sampling", "4"), ("GC", "4")]
    sampling = first["stages"][0]
    assert sampling["name"] == "SD15" and sampling["outcome"] == "success" and sampling["depth"] == 0
    assert 0 < sampling["resident_bytes"] <= loaded_checkpoint[0].model_size() // 2  # one stage, not two wrappers
    assert first["budgets"][0]["bytes"] == loaded_checkpoint[0].model_size() // 2
    assert chart.shape == (1, 540, 960, 3) and chart.dtype == torch.float32 and 0 <= chart.min() <= chart.max() <= 1


def test_a_failed_run_is_recorded_with_its_rungs_and_nothing_stays_open(comfy_nodes, loaded_checkpoint):
    model = offload_and_slice(comfy_nodes, loaded_checkpoint[0], loaded_checkpoint[0].model_size())
    model.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 1, "times": 99}
    with CurrentNodeContext("prompt-oom", "5"):
        with pytest.raises(torch.OutOfMemoryError):
            comfy_host.sample(comfy_nodes, model)
    _, failed = report(comfy_nodes, "prompt-oom")
    (stage,) = failed["stages"]
    assert stage["outcome"] == "failed: LadderExhausted"
    assert [rung["name"].split(" (")[0].split(" to ")[0] for rung in stage["rungs"]] == [
        "run cond and uncond separately", "halve attention chunks", "halve resident weights",
        "stream all weights and halve attention chunks again"]  # Sliced Attention and Offload Model are on it
    assert all(rung["outcome"] == "out of memory" and rung["seconds"] > 0 and rung["changed"] for rung in stage["rungs"])
    plain = loaded_checkpoint[0]
    with CurrentNodeContext("prompt-next", "5"):
        comfy_host.sample(comfy_nodes, plain)  # no Headroom node on it: nothing to record
    _, after = report(comfy_nodes, "prompt-next")
    assert after["stages"] == []


def sample_checking_interrupts(model):
    """ComfyUI's sampling with a step callback that checks for an interrupt, as the server's progress hook does."""
    latent = torch.zeros(1, 4, 8, 8)

    def each_step(step, x0, x, total_steps):
        model_management.throw_exception_if_processing_interrupted()

    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 2, 4.0, "euler", "normal",
                               generated_models.text_conditioning(1), generated_models.text_conditioning(2), latent,
                               callback=each_step)


def test_an_interrupted_run_is_recorded_as_interrupted(comfy_nodes, loaded_checkpoint):
    model = offload_and_slice(comfy_nodes, loaded_checkpoint[0], loaded_checkpoint[0].model_size())
    model_management.interrupt_current_processing(True)
    try:
        with CurrentNodeContext("prompt-stop", "6"), pytest.raises(model_management.InterruptProcessingException):
            sample_checking_interrupts(model)
    finally:
        model_management.interrupt_current_processing(False)
    _, stopped = report(comfy_nodes, "prompt-stop")
    assert [stage["outcome"] for stage in stopped["stages"]] == ["interrupted"]


def test_only_the_last_few_prompts_journals_are_kept(comfy_nodes):
    journals = comfy_host.pack_module("memory.comfy.journal")._journals
    for index in range(10):
        report(comfy_nodes, f"prompt-{index}")
    assert list(journals)[-4:] == [f"prompt-{index}" for index in range(6, 10)] and len(journals) == 4


def test_memory_report_never_comes_from_the_cache(comfy_nodes):
    fingerprint = node(comfy_nodes, "HeadroomMemoryReport").fingerprint_inputs(value=1)
    assert math.isnan(fingerprint) and fingerprint is not node(comfy_nodes, "HeadroomMemoryReport").fingerprint_inputs()
