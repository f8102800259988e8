"""Sliced Attention through ComfyUI's HTTP API: listed, runs before KSampler, bad input refused naming it."""
import pytest

from example_workflows import for_checkpoint, load_api_workflow
from server import PromptRejected


def sliced_workflow(checkpoint_name, size=64, **sliced_inputs):
    workflow = for_checkpoint(load_api_workflow("sliced_attention"), checkpoint_name,
                              without_text_encoder=True, steps=2, size=size)
    workflow["2"]["inputs"].update(sliced_inputs)
    return workflow


def test_object_info_lists_sliced_attention_with_tooltips(server):
    info = server.get("/object_info/HeadroomSlicedAttention")["HeadroomSlicedAttention"]
    assert info["display_name"] == "Sliced Attention" and info["category"] == "Headroom"
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"model", "target_mb", "method", "fp32"}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert inputs["method"][0] == "COMBO"
    assert inputs["method"][1]["options"] == ["auto", "chunked", "comfy split", "sub-quadratic"]
    assert (inputs["target_mb"][1]["min"], inputs["target_mb"][1]["max"]) == (0, 2 ** 20)
    # what is covered and what is not, where the user reads it
    assert "Not covered: VAEs, text encoders" in inputs["model"][1]["tooltip"]
    assert "Flux" in inputs["model"][1]["tooltip"] and "HunyuanDiT, PixArt" in inputs["model"][1]["tooltip"]
    assert info["output"] == ["MODEL"]


@pytest.mark.parametrize("method, target_mb", [("chunked", 1), ("auto", 0)])
def test_sliced_attention_before_ksampler_runs(server, tiny_checkpoint, method, target_mb):
    run = server.run(sliced_workflow(tiny_checkpoint.name, method=method, target_mb=target_mb))
    assert run.succeeded, run.error()
    assert len(run.outputs("8")["images"]) == 1
    target = f"{target_mb}MB" if target_mb else "auto"
    assert f"Headroom Sliced Attention: method={method} target={target}" in server.log_text()


def test_a_target_below_one_query_row_fails_at_sampling_naming_target_mb_and_the_next_prompt_runs(
        server, tiny_checkpoint):
    # 512x512 with the tiny model: one self-attention query row needs ~30 MB (the output is 10 MB alone)
    run = server.run(sliced_workflow(tiny_checkpoint.name, size=512, method="chunked", target_mb=1))
    assert not run.succeeded
    error = run.error()
    assert error["node_type"] == "KSampler"  # the override runs inside sampling: it fired over HTTP
    assert error["exception_message"].startswith("target_mb 1 MB is below the smallest possible chunk")
    again = server.run(sliced_workflow(tiny_checkpoint.name, method="chunked", target_mb=1))
    assert again.succeeded, again.error()


@pytest.mark.parametrize("inputs, input_name, message", [
    (dict(method="flash"), "method", "method must be one of auto, chunked, comfy split, sub-quadratic"),
    (dict(target_mb=-64), "target_mb", "target_mb must be a whole number of MB from 0 (auto)"),
    (dict(target_mb=512, method="sub-quadratic"), "target_mb", "target_mb 512 cannot bound method 'sub-quadratic'"),
])
def test_bad_inputs_are_refused_at_queue_time_naming_the_input(server, tiny_checkpoint, inputs, input_name,
                                                                message):
    with pytest.raises(PromptRejected) as rejected:
        server.queue(sliced_workflow(tiny_checkpoint.name, **inputs))
    errors = rejected.value.body["node_errors"]["2"]["errors"]
    assert any(error["extra_info"]["input_name"] == input_name and message in error["details"]
               for error in errors), errors
