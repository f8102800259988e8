"""The sampling out-of-memory ladder inside real ComfyUI (CPU), on every model a Headroom node returns.

Out-of-memory errors are raised from inside the model (a forward pre-hook on a UNet block, so the ladder
meets a half-run model) with each of the host's real out-of-memory classes. Expected results are the
plain model's latents, from runs without any injection; expected rungs are literal names.
"""
import gc
import weakref

import comfy.model_management as model_management
import comfy.sample
import pytest
import torch

import comfy_host
import generated_models

GB = 2 ** 30
MB = 2 ** 20
POSITIVE = generated_models.text_conditioning(1)
NEGATIVE = generated_models.text_conditioning(2)
FREE = "free the other models ComfyUI keeps loaded"
SPLIT = "run cond and uncond separately"


def node(nodes, name):
    return nodes.NODE_CLASS_MAPPINGS[name]


def through(nodes, kind, model):
    """`model` after one Headroom node: the MODEL output of Sliced Attention, Pick GPU or Offload Model."""
    if kind == "sliced attention":
        return comfy_host.run_v3_node(node(nodes, "HeadroomSlicedAttention"), model=model, target_mb=64,
                                      method="chunked", fp32=False).args[0]
    if kind == "pick gpu":
        return comfy_host.run_v3_node(node(nodes, "HeadroomPickGPU"), policy="by name", device="cpu",
                                      min_free_gb=0.0, model=model).args[0]
    return comfy_host.run_v3_node(node(nodes, "HeadroomOffloadModel"), model=model,
                                  budget_gb=model.model_size() / 2 / GB, keep_free_gb=0.0,
                                  text_encoder_and_vae="keep loaded").args[0]


def sample(model, batch=1, seed=5, steps=3, cfg=4.0):
    latent = torch.zeros(batch, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", POSITIVE, NEGATIVE, latent, seed=seed)


# CPU kernels round differently with the batch size (MKL's GEMM for a handful of rows, oneDNN's convolution
# for a batch of one): splitting a model call cannot stay bit-identical on the CPU. Measured on the tiny
# model: at most ~1e-6 of the largest latent value; the bound leaves room for three steps of drift while a
# misplaced, dropped or reordered sample is off by the size of the latents themselves.
SPLIT_TOLERANCE = 1e-5


def assert_same_up_to_kernel_rounding(samples, expected):
    worst = (samples - expected).abs().max().item() / expected.abs().max().item()
    print(f"split vs unsplit: max |difference| = {worst:.2e} of the largest latent value")
    assert worst <= SPLIT_TOLERANCE, worst


def host_oom_errors():
    """The out-of-memory errors this host's ComfyUI counts: torch's OOM class, and from v0.15 (which has
    model_management.is_oom) torch.AcceleratorError with CUDA's out-of-memory message."""
    errors = {"OutOfMemoryError": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")}
    if hasattr(model_management, "is_oom") and hasattr(torch, "AcceleratorError"):
        errors["AcceleratorError"] = lambda: torch.AcceleratorError("CUDA error: out of memory")
    return errors


class OomInside:
    """Raise an error from a forward pre-hook on the UNet's first output block, from its `at_call`-th call
    on, `times` times (each model call runs the block once). Removes itself on exit."""

    def __init__(self, model, make_error, at_call=2, times=1):
        self.block = model.model.diffusion_model.output_blocks[0][0]
        self.make_error, self.at_call, self.times = make_error, at_call, times
        self.calls, self.raised, self.batches = 0, 0, []

    def __enter__(self):
        def hook(module, inputs):
            self.calls += 1
            self.batches.append(inputs[0].shape[0])
            if self.calls >= self.at_call and self.raised < self.times:
                self.raised += 1
                raise self.make_error()
        self.handle = self.block.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run_in_prompt(prompt_id, function):
    """`function()` as node 3 of prompt `prompt_id` runs it (the Memory Report journals by prompt)."""
    from comfy_execution.utils import CurrentNodeContext
    with CurrentNodeContext(prompt_id, "3"):
        return function()


def stage_of(prompt_id):
    """The sampling stage of a prompt's Memory Report journal."""
    journal = run_in_prompt(prompt_id, comfy_host.pack_module("memory.comfy.journal").prompt_journal)
    (stage,) = [stage for stage in journal.stages if stage.kind == "sampling"]
    return stage


def other_model_loaded(comfy_nodes, tiny_checkpoint):
    """A second model ComfyUI keeps loaded, as an earlier prompt leaves it: what the first rung frees."""
    import comfy.sd
    other = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False, output_clip=False)[0]
    model_management.load_models_gpu([other])
    return other


def is_loaded(patcher) -> bool:
    return any(entry.model is patcher for entry in model_management.current_loaded_models)


def assert_nothing_of_ours_left(plain, headroom_model):
    """Nothing of the pack on the incoming model, and no Headroom clone among ComfyUI's loaded models."""
    has_hooks = comfy_host.pack_module("memory.comfy.models").has_headroom_hooks
    assert not has_hooks(plain)
    for entry in model_management.current_loaded_models:
        assert entry.model is None or entry.model is headroom_model or not has_hooks(entry.model), (
            entry.model, entry.model.model_options, entry.model.wrappers)


@pytest.mark.parametrize("kind", ["sliced attention", "pick gpu", "offload model"])
@pytest.mark.parametrize("error", list(host_oom_errors()))
def test_every_headroom_model_survives_an_oom_inside_it_by_freeing_the_other_models(
        comfy_nodes, loaded_checkpoint, tiny_checkpoint, kind, error):
    plain = loaded_checkpoint[0]
    model = through(comfy_nodes, kind, plain)
    expected = sample(model)  # the same Headroom model, no injection
    model_management.unload_all_models()
    other = other_model_loaded(comfy_nodes, tiny_checkpoint)
    with OomInside(plain, host_oom_errors()[error], at_call=2) as injection:  # step 2, half-run
        samples = run_in_prompt(f"free-{kind}-{error}", lambda: sample(model))
    assert injection.raised == 1
    assert samples.equal(expected)  # nothing but the other model changed: bit-identical
    assert not is_loaded(other)
    stage = stage_of(f"free-{kind}-{error}")
    assert stage.outcome == "success"
    (rung,) = stage.rungs
    assert (rung.name, rung.changed, rung.outcome) == (FREE, "unloaded SD15", "success") and rung.seconds > 0
    assert_nothing_of_ours_left(plain, model)


@pytest.mark.parametrize("kind", ["sliced attention", "pick gpu", "offload model"])
def test_without_other_models_the_next_rung_splits_cond_and_uncond(comfy_nodes, loaded_checkpoint, kind):
    plain = loaded_checkpoint[0]
    model = through(comfy_nodes, kind, plain)
    expected = sample(model)
    with OomInside(plain, torch.OutOfMemoryError, at_call=2) as injection:
        samples = run_in_prompt(f"split-{kind}", lambda: sample(model))
    stage = stage_of(f"split-{kind}")
    assert [(rung.name, rung.outcome) for rung in stage.rungs] == [(SPLIT, "success")]
    assert injection.batches[:2] == [2, 2] and set(injection.batches[2:]) == {1}  # cond and uncond apart
    assert_same_up_to_kernel_rounding(samples, expected)


def test_the_batch_split_rung_on_a_batch_of_4_gives_identical_latents(comfy_nodes, loaded_checkpoint):
    plain = loaded_checkpoint[0]
    expected = sample(plain, batch=4)
    model = through(comfy_nodes, "pick gpu", plain)
    with OomInside(plain, torch.OutOfMemoryError, at_call=2, times=2) as injection:  # split fails too
        samples = run_in_prompt("batch-4", lambda: sample(model, batch=4))
    stage = stage_of("batch-4")
    assert [(rung.name, rung.outcome) for rung in stage.rungs] == [
        (SPLIT, "out of memory"), ("split each model call into batches of 2", "success")]
    assert stage.rungs[1].changed == "model calls in batches of 2"
    assert injection.batches[:2] == [8, 8] and set(injection.batches[3:]) == {2}
    assert_same_up_to_kernel_rounding(samples, expected)


def test_rungs_are_taken_in_order_of_cost_until_one_survives(comfy_nodes, loaded_checkpoint, caplog):
    import logging
    plain = loaded_checkpoint[0]
    model = through(comfy_nodes, "offload model", through(comfy_nodes, "sliced attention", plain))
    expected = sample(model, batch=2)
    caplog.set_level(logging.DEBUG, logger="headroom")
    with OomInside(plain, torch.OutOfMemoryError, at_call=1, times=5):
        samples = run_in_prompt("order", lambda: sample(model, batch=2))
    targets = [record.getMessage().split(" target=")[1].split()[0] for record in caplog.records
               if record.getMessage().startswith("Headroom attention:")]  # Sliced Attention's DEBUG line per call
    # attempts fail in the output blocks, after the input blocks' attention: each attempt's target shows
    assert targets[0] == "64MB" and "32MB" in targets and targets[-1] == "16MB"  # 64 MB halved, then again
    stage = stage_of("order")
    assert [rung.name.split(" to ")[0] for rung in stage.rungs] == [
        SPLIT, "split each model call into batches of 1", "halve attention chunks (target 32 MB)",
        "halve resident weights", "stream all weights and halve attention chunks again"]
    assert [rung.outcome for rung in stage.rungs] == ["out of memory"] * 4 + ["success"]
    assert stage.rungs[2].changed == "attention target 64 MB -> 32 MB"
    record = model.model_options["transformer_options"]["headroom"]["offload"].records.records[-1]
    assert record.rungs == stage.rungs and record.outcome == "success"
    assert model.loaded_size() == 0  # the last rung streams every weight
    assert_same_up_to_kernel_rounding(samples, expected)


def test_an_oom_at_every_rung_exhausts_the_ladder_listing_each_and_the_next_prompt_runs(
        comfy_nodes, loaded_checkpoint):
    plain = loaded_checkpoint[0]
    expected = sample(plain)
    model = through(comfy_nodes, "offload model", through(comfy_nodes, "sliced attention", plain))
    exhausted = comfy_host.pack_module("memory.ladder").LadderExhausted
    with OomInside(plain, torch.OutOfMemoryError, at_call=1, times=99) as injection:
        with pytest.raises(exhausted) as failure:
            run_in_prompt("exhausted", lambda: sample(model))
    names = [SPLIT, "halve attention chunks (target 32 MB)", "halve resident weights",
             "stream all weights and halve attention chunks again"]
    message = str(failure.value)
    for name in names:
        assert name in message
    assert injection.raised == 5  # the first attempt and one retry per rung: the ladder never loops
    assert isinstance(failure.value, model_management.OOM_EXCEPTION)  # ComfyUI still shows its own OOM advice
    stage = stage_of("exhausted")
    assert [rung.name.split(" to ")[0] for rung in stage.rungs] == names
    assert all(rung.outcome == "out of memory" for rung in stage.rungs)
    assert stage.outcome.startswith("failed")
    assert not is_loaded(model)  # a failed run leaves nothing of ours loaded
    assert_nothing_of_ours_left(plain, None)
    clone = weakref.ref(model)
    del model, failure
    gc.collect()
    assert clone() is None, "something still holds the Headroom clone"
    assert sample(plain).equal(expected)  # the next prompt runs as if nothing happened


def test_a_non_memory_error_is_never_retried(comfy_nodes, loaded_checkpoint):
    plain = loaded_checkpoint[0]
    model = through(comfy_nodes, "sliced attention", plain)
    with OomInside(plain, lambda: ValueError("a bug, not memory"), at_call=2, times=99) as injection:
        with pytest.raises(ValueError, match="a bug, not memory"):
            run_in_prompt("bug", lambda: sample(model))
    assert injection.raised == 1
    assert stage_of("bug").rungs == []


def test_an_interrupt_during_a_retry_stops_at_once(comfy_nodes, loaded_checkpoint):
    plain = loaded_checkpoint[0]
    expected = sample(plain)
    model = through(comfy_nodes, "pick gpu", plain)
    errors = iter([torch.OutOfMemoryError("CUDA out of memory"), model_management.InterruptProcessingException()])
    with OomInside(plain, lambda: next(errors), at_call=2, times=2) as injection:
        with pytest.raises(model_management.InterruptProcessingException):
            run_in_prompt("interrupted", lambda: sample(model))
    assert injection.raised == 2
    stage = stage_of("interrupted")
    assert [(rung.name, rung.outcome) for rung in stage.rungs] == [(SPLIT, "interrupted")]
    assert stage.outcome == "interrupted"
    assert_nothing_of_ours_left(plain, None)
    assert sample(plain).equal(expected)
