"""Offload Model inside real ComfyUI (CPU): the budget holds at every load and step and is filled, results
are unchanged, a second run loads nothing, OOM is survived (from our wrapper and from inside the model), and
a failed or interrupted run leaves nothing behind on the shared modules."""
import gc
import weakref

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import pytest
import torch

import comfy_host
import generated_models

MB = 2 ** 20
GB = 2 ** 30
POSITIVE = generated_models.text_conditioning(1)
NEGATIVE = generated_models.text_conditioning(2)


def offload(nodes, model, budget_bytes=0, keep_free_bytes=0, policy="keep loaded", clip=None, vae=None):
    node = nodes.NODE_CLASS_MAPPINGS["HeadroomOffloadModel"]
    inputs = dict(model=model, budget_gb=budget_bytes / GB, keep_free_gb=keep_free_bytes / GB,
                  text_encoder_and_vae=policy)
    if clip is not None:
        inputs["clip"] = clip
    if vae is not None:
        inputs["vae"] = vae
    return comfy_host.run_v3_node(node, **inputs).args


def sample_watching_residency(model, seed=5, steps=3, size=64):
    """Latents from ComfyUI's sampling entry point, and the weight bytes held on the device at each step."""
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    resident = []

    def each_step(step, x0, x, total_steps):
        resident.append(model.loaded_size())
        model_management.throw_exception_if_processing_interrupted()  # as ComfyUI's progress hook does

    samples = comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", POSITIVE, NEGATIVE, latent,
                                  callback=each_step, seed=seed)
    return samples, resident


def watch_loads(model) -> list[tuple[float, int]]:
    """(the memory each of ComfyUI's loads of `model` was given, the weight bytes resident after it), one
    pair per load call, through ComfyUI's public ON_LOAD callback (it fires at the end of every load)."""
    loads = []
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, "test",
                                lambda patcher, device, memory, *_: loads.append((memory, patcher.loaded_size())))
    return loads


def records(model):
    return model.model_options["transformer_options"]["headroom"]["offload"].records.records


def largest_module_bytes(model) -> int:
    """The largest set of weights ComfyUI moves as a unit: one module's own parameters (read from torch)."""
    return max(sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
               for module in model.model.modules())


def fill_bounds(model, budget: int) -> tuple[int, int]:
    """(the fewest, the most) weight bytes a budget may leave resident: within one module of it, never above."""
    ceiling = min(budget, model.model_size())
    return max(0, ceiling - largest_module_bytes(model)), ceiling


def low_vram_state(model) -> dict:
    """What ComfyUI's low-VRAM machinery leaves on the shared modules while a clone streams (read from each
    host's model_patcher load/unpatch_model): cast-on-use flags and their saved previous values, weight and
    bias functions, the model's low-VRAM flag, patch counter and streaming reserve."""
    modules = list(model.model.modules())
    return {"cast_on_use": sum(bool(getattr(m, "comfy_cast_weights", False)) for m in modules),
            "previous_cast_flags": sum(hasattr(m, "prev_comfy_cast_weights") for m in modules),
            "weight_functions": sum(len(getattr(m, "weight_function", []) or []) + len(getattr(m, "bias_function", []) or [])
                                    for m in modules),
            "model_lowvram": bool(getattr(model.model, "model_lowvram", False)),
            "lowvram_patch_counter": int(getattr(model.model, "lowvram_patch_counter", 0)),
            "stream_reserve_bytes": int(getattr(model.model, "model_offload_buffer_memory", 0))}


LOW_VRAM_OFF = {"cast_on_use": 0, "previous_cast_flags": 0, "weight_functions": 0, "model_lowvram": False,
                "lowvram_patch_counter": 0, "stream_reserve_bytes": 0}  # a float32 model on the CPU, loaded whole


class CountWeightMoves:
    """Counts the weights ComfyUI moves onto a device (ModelPatcher.patch_weight_to_device with a device) while
    active: instrumentation for a test, the method itself runs unchanged."""

    def __init__(self, monkeypatch):
        self.moved = []
        original = comfy.model_patcher.ModelPatcher.patch_weight_to_device

        def counting(patcher, key, device_to=None, *args, **kwargs):
            if device_to is not None:
                self.moved.append(key)
            return original(patcher, key, device_to, *args, **kwargs)

        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "patch_weight_to_device", counting)


def assert_no_headroom_clone_loaded():
    has_headroom_hooks = comfy_host.pack_module("memory.comfy.models").has_headroom_hooks
    for entry in model_management.current_loaded_models:
        assert entry.model is None or not has_headroom_hooks(entry.model), "a Headroom clone is still loaded"


@pytest.fixture
def tiny_model(loaded_checkpoint):
    return loaded_checkpoint[0]


@pytest.fixture
def baseline(tiny_model):
    """The plain model's latents and its shared modules' state after a plain run, before any budget."""
    samples, residency = sample_watching_residency(tiny_model)
    assert low_vram_state(tiny_model) == LOW_VRAM_OFF  # the plain model loads whole: nothing streams
    return samples, residency, LOW_VRAM_OFF


@pytest.mark.parametrize("share", [1.0, 0.5, 0.25, 0.10, None], ids=["100%", "50%", "25%", "10%", "1MB"])
def test_the_budget_holds_at_every_load_and_step_is_filled_and_latents_are_bit_identical(
        comfy_nodes, tiny_model, baseline, share):
    samples_unbudgeted, full_residency, _ = baseline
    weights = tiny_model.model_size()
    assert full_residency == [weights] * 3  # without a budget ComfyUI loads it all on CPU
    model_management.unload_all_models()  # the budgeted run loads from nothing (see the next test otherwise)
    budget = int(weights * share) if share else 1 * MB
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=budget)[0]
    loads = watch_loads(budgeted)
    samples, residency = sample_watching_residency(budgeted)
    assert loads, "ComfyUI never loaded the budgeted clone"
    # a ceiling to fill, not to undercut: after every load and at every step the resident weights are within
    # one module (the most ComfyUI moves as a unit) of the budget, and never above it
    floor, ceiling = fill_bounds(tiny_model, budget)
    for _, resident in loads:
        assert floor <= resident <= ceiling, (resident, floor, ceiling)
    assert len(residency) == 3
    for resident in residency:
        assert floor <= resident <= ceiling, (residency, floor, ceiling)
    assert samples.equal(samples_unbudgeted)
    (record,) = records(budgeted)
    assert record.outcome == "success" and record.steps == 3 * 1  # euler: one model call per step
    assert record.planned_resident_bytes == min(budget, weights)
    assert record.measured_resident_bytes == max(residency)
    assert record.resident_after_loads == [resident for _, resident in loads]
    assert "partially_load" not in vars(budgeted)  # the load's bound lasted as long as ComfyUI's load only


def test_a_model_another_workflow_left_fully_loaded_is_brought_within_the_budget(comfy_nodes, tiny_model, baseline):
    assert tiny_model.loaded_size() == tiny_model.model_size()  # the plain run left it all resident
    budget = tiny_model.model_size() // 4
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=budget)[0]
    loads = watch_loads(budgeted)
    samples, residency = sample_watching_residency(budgeted)
    floor, ceiling = fill_bounds(tiny_model, budget)
    assert loads and all(floor <= resident <= ceiling for _, resident in loads), loads
    assert all(floor <= resident <= ceiling for resident in residency) and samples.equal(baseline[0])


def test_half_and_quarter_budgets_keep_different_weights_resident(comfy_nodes, tiny_model):
    weights = tiny_model.model_size()
    held = {}
    for share in (0.5, 0.25):
        budgeted = offload(comfy_nodes, tiny_model, budget_bytes=int(weights * share))[0]
        held[share] = max(sample_watching_residency(budgeted)[1])
        model_management.unload_all_models()
        floor, ceiling = fill_bounds(tiny_model, int(weights * share))
        assert floor <= held[share] <= ceiling, (share, held[share])
    assert held[0.25] < held[0.5] <= weights // 2, held


def test_an_identical_second_run_loads_no_weight_again(comfy_nodes, tiny_model, monkeypatch):
    budget = tiny_model.model_size() // 2
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=budget)[0]
    moves = CountWeightMoves(monkeypatch)
    first, residency_first = sample_watching_residency(budgeted)
    moved_first = len(moves.moved)
    second, residency_second = sample_watching_residency(budgeted)
    assert moved_first > 0  # the first run loaded the budget's worth
    assert moves.moved[moved_first:] == []  # ComfyUI's caching: the second run found them resident
    assert residency_second == residency_first and max(residency_second) <= budget
    assert second.equal(first)
    # our clone stays loaded within its budget between runs, as ComfyUI leaves any model
    assert [entry.model for entry in model_management.current_loaded_models] == [budgeted]


def test_another_workflow_gets_the_plain_model_back_fully_loaded(comfy_nodes, tiny_model, baseline):
    samples_unbudgeted, full_residency, clean_state = baseline
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size() // 4)[0]
    sample_watching_residency(budgeted)
    assert low_vram_state(tiny_model) != clean_state  # our run streams: the shared modules carry low-VRAM state
    samples, residency = sample_watching_residency(tiny_model)  # another workflow, the same checkpoint, no budget
    assert samples.equal(samples_unbudgeted) and residency == full_residency
    assert low_vram_state(tiny_model) == clean_state
    assert_no_headroom_clone_loaded()  # ComfyUI evicted our clone for the plain model, as it evicts any clone


def assert_nothing_of_ours_remains(tiny_model, clone_ref, baseline):
    """After a failed or interrupted run, before anything else runs: no clone of ours is loaded, the shared
    modules carry no low-VRAM state, our clone (`clone_ref`: the test holds nothing else of it) dies at the
    next collection, and the plain model then samples exactly as before, fully resident."""
    samples_unbudgeted, full_residency, clean_state = baseline
    assert low_vram_state(tiny_model) == clean_state
    assert_no_headroom_clone_loaded()
    assert not comfy_host.pack_module("memory.comfy.models").has_headroom_hooks(tiny_model)
    assert tiny_model.loaded_size() in (0, tiny_model.model_size())  # unloaded, or whole as the plain run left it
    gc.collect()
    assert clone_ref() is None, "something still holds our clone"
    samples, residency = sample_watching_residency(tiny_model)
    assert samples.equal(samples_unbudgeted) and residency == full_residency
    assert low_vram_state(tiny_model) == clean_state


def test_an_oom_at_step_2_is_survived_through_the_ladder(comfy_nodes, tiny_model, baseline):
    samples_unbudgeted = baseline[0]
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size() // 2)[0]
    budgeted.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 2, "times": 2}
    samples, residency = sample_watching_residency(budgeted)
    (record,) = records(budgeted)
    assert record.outcome == "success"
    assert [(rung.name.split(" to ")[0], rung.outcome) for rung in record.rungs] == [
        ("run cond and uncond separately", "out of memory"), ("halve resident weights", "success")]
    assert max(residency[-3:]) <= tiny_model.model_size() // 4  # the retry ran under the halved budget
    # cond and uncond in separate calls: CPU kernels round a batch of one differently (tests/comfy/test_oom_ladder.py)
    assert (samples - samples_unbudgeted).abs().max() <= 1e-5 * samples_unbudgeted.abs().max()


def oom_from_inside_the_model(model, error_factory, at_call: int, times: int = 1) -> dict:
    """Raise `error_factory()` from a forward hook on the UNet's first output res block on its `at_call`-th call
    (a step runs it once: cond and uncond batched), `times` times: the error comes with a half-run model."""
    block = model.model.diffusion_model.output_blocks[0][0]  # a ResBlock: the UNet calls it as a module
    state = {"calls": 0, "raised": 0}

    def hook(module, inputs):
        state["calls"] += 1
        if state["calls"] >= at_call and state["raised"] < times:
            state["raised"] += 1
            state["low_vram_state_at_raise"] = low_vram_state(model)
            raise error_factory()

    state["handle"] = block.register_forward_pre_hook(hook)
    return state


def host_oom_errors():
    """The out-of-memory errors this host's ComfyUI counts: torch's OOM class, and from v0.15 (which has
    model_management.is_oom) torch.AcceleratorError with CUDA's out-of-memory message."""
    errors = [("OutOfMemoryError", lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))]
    if hasattr(model_management, "is_oom") and hasattr(torch, "AcceleratorError"):
        errors.append(("AcceleratorError", lambda: torch.AcceleratorError("CUDA error: out of memory")))
    return errors


@pytest.mark.parametrize("kind", [name for name, _ in host_oom_errors()])
def test_an_oom_raised_inside_the_model_at_step_2_is_survived(comfy_nodes, tiny_model, baseline, kind):
    samples_unbudgeted = baseline[0]
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size() // 2)[0]
    injection = oom_from_inside_the_model(tiny_model, dict(host_oom_errors())[kind], at_call=2)
    try:
        samples, _ = sample_watching_residency(budgeted)
    finally:
        injection["handle"].remove()
    assert injection["raised"] == 1
    assert (samples - samples_unbudgeted).abs().max() <= 1e-5 * samples_unbudgeted.abs().max()  # split: rounding
    (record,) = records(budgeted)
    assert record.outcome == "success" and [rung.name for rung in record.rungs] == ["run cond and uncond separately"]


def test_a_non_memory_error_inside_the_model_is_not_retried(comfy_nodes, tiny_model, baseline):
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size() // 2)[0]
    injection = oom_from_inside_the_model(tiny_model, lambda: ValueError("a bug, not memory"), at_call=2, times=99)
    try:
        with pytest.raises(ValueError, match="a bug, not memory"):
            sample_watching_residency(budgeted)
    finally:
        injection["handle"].remove()
    assert injection["raised"] == 1  # raised once: no rung was tried
    assert injection["low_vram_state_at_raise"] != baseline[2]  # it failed mid-run, streaming
    (record,) = records(budgeted)
    assert record.outcome == "failed: ValueError" and record.rungs == []
    clone_ref = weakref.ref(budgeted)
    del budgeted
    assert_nothing_of_ours_remains(tiny_model, clone_ref, baseline)


def test_when_every_rung_fails_the_error_lists_them_and_nothing_remains(comfy_nodes, tiny_model, baseline):
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size())[0]
    budgeted.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 1, "times": 99}
    ladder_exhausted = comfy_host.pack_module("memory.ladder").LadderExhausted
    with pytest.raises(ladder_exhausted) as failure:
        sample_watching_residency(budgeted)
    message = str(failure.value)
    for rung in ("halve resident weights", "run cond and uncond separately", "stream all weights"):
        assert rung in message
    assert isinstance(failure.value, model_management.OOM_EXCEPTION)  # ComfyUI still shows its own OOM advice
    assert records(budgeted)[0].outcome == "failed: LadderExhausted"
    clone_ref = weakref.ref(budgeted)
    del budgeted, failure  # the traceback holds the run's frames
    assert_nothing_of_ours_remains(tiny_model, clone_ref, baseline)


def test_an_interrupted_run_leaves_nothing_behind(comfy_nodes, tiny_model, baseline):
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size() // 4)[0]
    model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            sample_watching_residency(budgeted)
    finally:
        model_management.interrupt_current_processing(False)
    assert records(budgeted)[0].outcome == "interrupted"
    clone_ref = weakref.ref(budgeted)
    del budgeted
    assert_nothing_of_ours_remains(tiny_model, clone_ref, baseline)


def test_split_cond_uncond_runs_the_model_once_per_cond(comfy_nodes, tiny_model):
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size())[0]
    calls = []
    budgeted.set_model_unet_function_wrapper(
        lambda apply, args: calls.append(args["input"].shape[0]) or apply(args["input"], args["timestep"], **args["c"]))
    budgeted.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 1, "times": 1}
    batched, _ = sample_watching_residency(tiny_model)
    samples, _ = sample_watching_residency(budgeted)
    assert [rung.name for rung in records(budgeted)[0].rungs] == ["run cond and uncond separately"]
    assert calls[-3:] == [1, 1, 1] and len(calls) == 6  # 3 steps x (cond, uncond) one at a time
    assert torch.allclose(samples, batched, rtol=1e-4, atol=1e-5)  # batch 1 vs 2: float rounding only


def test_all_four_sampler_paths_run_under_the_budget(comfy_nodes, tiny_model):
    budget = tiny_model.model_size() // 4
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=budget)[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    k_sampler = comfy_nodes.KSampler().sample(budgeted, 3, 2, 4.0, "euler", "normal", POSITIVE, NEGATIVE, latent)
    advanced = comfy_nodes.KSamplerAdvanced().sample(budgeted, "enable", 3, 2, 4.0, "euler", "normal", POSITIVE,
                                                     NEGATIVE, latent, 0, 10000, "disable")
    sigmas = comfy.samplers.calculate_sigmas(budgeted.get_model_object("model_sampling"), "normal", 2)
    sampler = comfy.samplers.sampler_object("euler")
    noise = comfy.sample.prepare_noise(latent["samples"], 3)
    custom = comfy.sample.sample_custom(budgeted, noise, 4.0, sampler, sigmas, POSITIVE, NEGATIVE,
                                        latent["samples"], seed=3)  # what SamplerCustom calls
    guider = comfy.samplers.CFGGuider(budgeted)  # what SamplerCustomAdvanced drives
    guider.set_conds(POSITIVE, NEGATIVE)
    guider.set_cfg(4.0)
    custom_advanced = guider.sample(noise, latent["samples"], sampler, sigmas, seed=3)
    runs = records(budgeted)
    assert len(runs) == 4 and all(run.outcome == "success" for run in runs)
    floor, ceiling = fill_bounds(tiny_model, budget)
    assert all(floor <= resident <= ceiling for run in runs for resident in run.resident_after_loads)
    assert all(floor <= run.measured_resident_bytes <= ceiling for run in runs)
    assert k_sampler[0]["samples"].equal(advanced[0]["samples"])
    assert custom.equal(custom_advanced)


def test_keep_free_plans_from_the_free_memory_it_read(comfy_nodes, tiny_model):
    weights = tiny_model.model_size()
    activations = int(tiny_model.memory_required([2, 4, 8, 8]))  # ComfyUI's own estimate: cond + uncond, 64x64
    # leave all but 30 MB (+ the activations) free: the plan keeps about 30 MB of the 52 MB of weights resident
    keep_free = model_management.get_free_memory(tiny_model.load_device) + tiny_model.loaded_size() \
        - activations - 30 * MB
    budgeted = offload(comfy_nodes, tiny_model, keep_free_bytes=keep_free)[0]
    _, residency = sample_watching_residency(budgeted)
    (record,) = records(budgeted)
    # keep_free_gb's rule, on the figure the plan itself read: what is left after the reserve and the
    # activations stays resident (free memory moves between any two readings, so only the plan's counts)
    kept_after_reserve = int(keep_free / GB * GB)  # the node takes GB
    assert record.planned_resident_bytes == record.usable_bytes - kept_after_reserve - activations
    assert 0 < record.planned_resident_bytes < weights
    assert max(residency) <= record.planned_resident_bytes


def test_text_encoder_and_vae_move_off_after_use(comfy_nodes, loaded_checkpoint):
    model, _, vae = loaded_checkpoint
    clip = generated_models.small_clip()

    def loaded_patchers():
        return [entry.model for entry in model_management.current_loaded_models]

    _, kept_clip, kept_vae, _ = offload(comfy_nodes, model, clip=clip, vae=vae, policy="keep loaded")
    kept_clip.encode_from_tokens_scheduled(kept_clip.tokenize("a lighthouse"))
    kept_vae.decode(torch.zeros(1, 4, 8, 8))
    assert kept_clip.patcher in loaded_patchers() and kept_vae.patcher in loaded_patchers()
    model_management.unload_all_models()

    _, moving_clip, moving_vae, plan = offload(comfy_nodes, model, clip=clip, vae=vae,
                                               policy="move off the GPU after use")
    conditioning = moving_clip.encode_from_tokens_scheduled(moving_clip.tokenize("a lighthouse"))
    assert moving_clip.patcher not in loaded_patchers()
    image = moving_vae.decode(torch.zeros(1, 4, 8, 8))
    assert moving_vae.patcher not in loaded_patchers()
    assert loaded_patchers() == []
    assert conditioning[0][0].shape == (1, 77, 768) and image.shape == (1, 64, 64, 3)
    assert "move off the GPU after use" in plan
    # the incoming CLIP and VAE are not wrapped
    assert "encode_from_tokens_scheduled" not in vars(clip) and "decode" not in vars(vae)


@pytest.mark.parametrize("inputs, named", [
    (dict(budget_gb=-1.0), "budget_gb"),
    (dict(keep_free_gb=-0.5), "keep_free_gb"),
    (dict(budget_gb=1.0, keep_free_gb=1.0), "budget_gb"),
    (dict(budget_gb=100000.0), "budget_gb"),
])
def test_bad_budgets_are_refused_naming_the_input(comfy_nodes, tiny_model, inputs, named):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomOffloadModel"]
    arguments = dict(model=tiny_model, budget_gb=0.0, keep_free_gb=0.0, text_encoder_and_vae="keep loaded")
    arguments.update(inputs)
    with pytest.raises(ValueError, match=named):
        comfy_host.run_v3_node(node, **arguments)


def test_a_non_diffusion_model_is_refused_naming_the_input(comfy_nodes):
    clip = generated_models.small_clip()
    node = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomOffloadModel"]
    with pytest.raises(ValueError, match="^model: Offload Model needs a diffusion model"):
        comfy_host.run_v3_node(node, model=clip.patcher, budget_gb=1.0, keep_free_gb=0.0,
                               text_encoder_and_vae="keep loaded")


def attention_targets(caplog):
    """The target of each Sliced Attention call, from its DEBUG line."""
    return [record.getMessage().split(" target=")[1].split()[0] for record in caplog.records
            if record.getMessage().startswith("Headroom attention:")]


def sliced(nodes, model, target_mb, method="chunked"):
    node = nodes.NODE_CLASS_MAPPINGS["HeadroomSlicedAttention"]
    return comfy_host.run_v3_node(node, model=model, target_mb=target_mb, method=method, fp32=False).args[0]


def test_sliced_attention_auto_takes_the_activation_memory_the_budget_planned(comfy_nodes, tiny_model, caplog):
    import logging
    budgeted = offload(comfy_nodes, sliced(comfy_nodes, tiny_model, target_mb=0), budget_bytes=8 * MB)
    caplog.set_level(logging.DEBUG, logger="headroom")
    sample_watching_residency(budgeted[0], steps=1)
    planned_mb = tiny_model.memory_required([2, 4, 8, 8]) / MB  # ComfyUI's estimate: cond + uncond, one 64x64 latent
    targets = set(attention_targets(caplog))
    assert len(targets) == 1 and targets.pop().endswith("MB")
    (target_mb,) = {float(target[:-2]) for target in attention_targets(caplog)}
    assert abs(target_mb - planned_mb) <= 0.01 * planned_mb  # the log prints 3 significant digits


def test_the_ladder_halves_sliced_attention_chunks(comfy_nodes, tiny_model, caplog):
    import logging
    baseline, _ = sample_watching_residency(tiny_model)
    budgeted = offload(comfy_nodes, sliced(comfy_nodes, tiny_model, target_mb=8), budget_bytes=16 * MB)[0]
    budgeted.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 1, "times": 2}
    caplog.set_level(logging.DEBUG, logger="headroom")
    samples, _ = sample_watching_residency(budgeted)
    (record,) = records(budgeted)
    assert record.outcome == "success"
    assert [rung.name for rung in record.rungs] == ["run cond and uncond separately",
                                                    "halve attention chunks (target 4 MB)"]
    assert attention_targets(caplog)[-1] == "4MB"  # the attempt that succeeded ran with the halved target
    assert torch.allclose(samples, baseline, rtol=1e-4, atol=1e-4)  # split cond/uncond: float rounding only
