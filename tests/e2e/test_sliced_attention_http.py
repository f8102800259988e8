"""Sliced Attention through ComfyUI's HTTP API: listed, runs before KSampler with its override
called on every attention call, bad input refused naming it.

What a prompt did is read from the server log written since that prompt was queued. The tests
that count override calls run on their own server with `--verbose DEBUG` (the override's
per-call "Headroom attention:" lines) and `--cache-none` (every prompt runs every node, so a
prompt's lines never depend on which prompt ran before it).
"""
import re

import pytest

import comfy_host
from example_workflows import for_checkpoint, load_api_workflow
from server import ComfyServer, PromptRejected

STEPS = 2
# The tiny SD1.5 model has one transformer block: one self-attention and one cross-attention
# layer; KSampler (cfg 7) runs cond and uncond as one batch, so one call per layer per step.
ATTENTION_CALLS = STEPS * 2
CALL = re.compile(r"Headroom attention: runner=(?P<runner>\S+) kernel=\S+ batch=(?P<batch>\d+) heads=8 "
                  r"kv_heads=8 queries=(?P<queries>\d+) keys=(?P<keys>\d+) chunk=(?P<chunk>\d+) "
                  r"chunks=(?P<chunks>\d+) estimate=\S+ target=(?P<target>\S+) fp32=no$", re.MULTILINE)


@pytest.fixture(scope="module")
def debug_server(tiny_checkpoint):
    comfy = ComfyServer(comfy_host.comfyui_dir(), checkpoints=[tiny_checkpoint],
                        extra_args=["--verbose", "DEBUG", "--cache-none"]).start()
    yield comfy
    comfy.stop()
    log = comfy.log_text()
    comfy.cleanup()
    assert "Potential memory leak" not in log, "ComfyUI reported a leak:\n" + log[-4000:]


def sliced_workflow(checkpoint_name, size=64, **sliced_inputs):
    workflow = for_checkpoint(load_api_workflow("sliced_attention"), checkpoint_name,
                              without_text_encoder=True, steps=STEPS, size=size)
    workflow["2"]["inputs"].update(sliced_inputs)
    return workflow


def run_and_read_log(server, workflow):
    """Run a prompt; its result and the server log written since it was queued."""
    mark = server.log_mark()
    run = server.run(workflow)
    return run, server.log_since(mark)


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


@pytest.mark.parametrize("method, target_mb, target", [("chunked", 1, "1MB"), ("auto", 0, None)])
def test_sliced_attention_before_ksampler_runs_its_override_on_every_attention_call(
        debug_server, tiny_checkpoint, method, target_mb, target):
    run, log = run_and_read_log(debug_server, sliced_workflow(tiny_checkpoint.name, method=method,
                                                              target_mb=target_mb))
    assert run.succeeded, run.error()
    assert len(run.outputs("8")["images"]) == 1
    shown = f"{target_mb}MB" if target_mb else "auto"
    assert log.count(f"Headroom Sliced Attention: method={method} target={shown}") == 1
    calls = [match.groupdict() for match in CALL.finditer(log)]
    assert len(calls) == ATTENTION_CALLS, log[-3000:]
    # 64x64: an 8x8 latent, 64 tokens; self-attention over them, cross-attention over 77 text tokens.
    # The CPU has no memory-efficient kernel in ComfyUI: Headroom runs every call, here whole.
    assert {(c["runner"], c["batch"], c["queries"], c["keys"], c["chunk"], c["chunks"]) for c in calls} == {
        ("chunked", "2", "64", "64", "64", "1"), ("chunked", "2", "64", "77", "64", "1")}
    if target:
        assert {c["target"] for c in calls} == {target}


def test_a_target_below_one_query_row_fails_at_sampling_naming_target_mb_and_the_next_prompt_runs(
        debug_server, tiny_checkpoint):
    # 512x512 with the tiny model: one self-attention query row needs ~30 MB (the output is 10 MB alone)
    run, log = run_and_read_log(debug_server, sliced_workflow(tiny_checkpoint.name, size=512, method="chunked",
                                                              target_mb=1))
    assert not run.succeeded
    error = run.error()
    assert error["node_type"] == "KSampler"  # the override runs inside sampling: it fired over HTTP
    assert error["exception_message"].startswith("target_mb 1 MB is below the smallest possible chunk")
    assert CALL.search(log) is None  # refused before any chunk ran
    again, log = run_and_read_log(debug_server, sliced_workflow(tiny_checkpoint.name, method="chunked",
                                                                target_mb=1))
    assert again.succeeded, again.error()
    assert len(CALL.findall(log)) == ATTENTION_CALLS


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
