"""Pick GPU through ComfyUI's HTTP API: listed, places MODEL/CLIP/VAE and the workflow saves an image,
re-runs live policies every prompt, refuses bad input naming it, and the next prompt runs."""
import os

import pytest

from example_workflows import for_checkpoint, load_api_workflow
from server import PromptRejected

GB = 2 ** 30


def pick_gpu_workflow(checkpoint_name, **pick_inputs):
    """The example workflow, small. The generated checkpoint has no text encoder: CLIP comes out of the
    loader as None, passes Pick GPU as None, and the conditioning comes from the test-only node."""
    workflow = for_checkpoint(load_api_workflow("pick_gpu"), checkpoint_name,
                              without_text_encoder=True, steps=2, size=64)
    workflow["2"]["inputs"].update(pick_inputs)
    return workflow


def choice_of(run) -> str:
    return run.outputs("2")["text"][0]


def test_object_info_lists_pick_gpu_with_tooltips(server):
    info = server.get("/object_info/HeadroomPickGPU")["HeadroomPickGPU"]
    assert info["display_name"] == "Pick GPU" and info["category"] == "Headroom"
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"policy", "device", "min_free_gb", "model", "clip", "vae"}
    assert set(info["input"].get("optional", {})) == {"model", "clip", "vae"}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    policy_options = inputs["policy"][1]["options"] if "options" in inputs["policy"][1] else inputs["policy"][0]
    assert policy_options == ["most free memory", "round robin", "first with min_free_gb free", "by name"]
    assert info["output_name"] == ["MODEL", "CLIP", "VAE", "choice"]


def test_model_and_vae_picked_to_cpu_by_name_run_the_workflow_and_save_an_image(server, tiny_checkpoint):
    run = server.run(pick_gpu_workflow(tiny_checkpoint.name, policy="by name", device="cpu"))
    assert run.succeeded, run.error()
    choice = choice_of(run)
    assert choice.startswith("Pick GPU: cpu (CPU (system RAM), ")
    assert ": asked for 'cpu'; MODEL, VAE on cpu" in choice  # CLIP is None from this checkpoint
    images = run.outputs("8")["images"]
    assert len(images) == 1
    assert (server.output_dir / images[0]["subfolder"] / images[0]["filename"]).stat().st_size > 0
    assert choice in server.log_text()


def test_the_example_workflow_picks_the_cpu_of_a_server_without_gpus_and_says_why(server, tiny_checkpoint):
    run = server.run(pick_gpu_workflow(tiny_checkpoint.name))  # policy "most free memory"
    assert run.succeeded, run.error()
    choice = choice_of(run)
    assert ": no GPU found: running on the CPU; MODEL, VAE on cpu; notes: " in choice
    # the server runs with --cpu: either torch sees no GPU, or the GPUs it sees are not used
    notes = choice.split("; notes: ")[1]
    assert "no CUDA device visible" in notes or "not used: ComfyUI runs with --cpu" in notes
    assert len(run.outputs("8")["images"]) == 1


@pytest.mark.parametrize("policy, runs_again", [("most free memory", True), ("by name", False)])
def test_live_policies_run_every_prompt_and_by_name_is_cached(server, tiny_checkpoint, policy, runs_again):
    workflow = pick_gpu_workflow(tiny_checkpoint.name, policy=policy, device="cpu", min_free_gb=0.25)
    first = server.run(workflow)
    assert first.succeeded, first.error()
    lines = server.log_text().count("Pick GPU: cpu")
    again = server.run(workflow)
    assert again.succeeded, again.error()
    assert server.log_text().count("Pick GPU: cpu") == lines + (1 if runs_again else 0)


@pytest.mark.parametrize("inputs, message", [
    (dict(policy="by name", device="cuda:7"), "device: device 'cuda:7' does not exist; devices here: "),
    (dict(policy="by name", device="gpu0"), "device: device name 'gpu0' is not valid; use cpu, cuda, cuda:N, "
                                            "xpu, xpu:N or mps (AMD ROCm GPUs are cuda:N); devices here: "),
    (dict(policy="first with min_free_gb free", min_free_gb=1024.0),
     f"min_free_gb: no GPU found, and the CPU does not have 1024.0 GiB free (min_free_bytes={1024 * GB}); "
     "devices here: "),
], ids=["missing device", "malformed name", "no device has enough free"])
def test_bad_input_fails_naming_the_input_and_listing_the_devices_then_the_next_prompt_runs(
        server, tiny_checkpoint, inputs, message):
    run = server.run(pick_gpu_workflow(tiny_checkpoint.name, **inputs))
    assert not run.succeeded
    error = run.error()
    assert error["node_type"] == "HeadroomPickGPU" and error["node_id"] == "2"
    assert error["exception_message"].startswith(message + "cpu (CPU (system RAM), "), error["exception_message"]
    again = server.run(pick_gpu_workflow(tiny_checkpoint.name, policy="by name", device="cpu"))
    assert again.succeeded, again.error()


def test_negative_min_free_is_refused_at_queue_time(server, tiny_checkpoint):
    with pytest.raises(PromptRejected) as rejected:
        server.queue(pick_gpu_workflow(tiny_checkpoint.name, min_free_gb=-1.0))
    errors = rejected.value.body["node_errors"]["2"]["errors"]
    assert any(error["extra_info"]["input_name"] == "min_free_gb" for error in errors), errors


def test_an_unknown_policy_is_refused_naming_policy(server, tiny_checkpoint):
    workflow = pick_gpu_workflow(tiny_checkpoint.name, policy="sideways")
    if os.environ["HEADROOM_HOST"] != "v0.3.64":  # v0.12+ checks V3 combo values when the prompt is queued
        with pytest.raises(PromptRejected) as rejected:
            server.run(workflow)
        errors = rejected.value.body["node_errors"]["2"]["errors"]
        assert any(error["extra_info"]["input_name"] == "policy" for error in errors), errors
        return
    run = server.run(workflow)  # v0.3.64 queues V3 combo values unchecked: the node refuses it when it runs
    assert not run.succeeded
    assert run.error()["exception_message"].strip() == ("policy must be one of most free memory, round robin, "
                                                        "first with min_free_gb free, by name, got 'sideways'")
