"""Offload Model inside real ComfyUI (CPU): budgets honoured, results unchanged, OOM survived, nothing left behind."""
import comfy.model_management as model_management
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


def records(model):
    return model.model_options["transformer_options"]["headroom"]["offload"].records.records


def assert_nothing_of_ours_remains(original):
    has_headroom_hooks = comfy_host.pack_module("memory.comfy.models").has_headroom_hooks
    assert not has_headroom_hooks(original)
    for entry in model_management.current_loaded_models:
        assert entry.model is None or not has_headroom_hooks(entry.model), "a Headroom clone is still loaded"


@pytest.fixture
def tiny_model(loaded_checkpoint):
    return loaded_checkpoint[0]


@pytest.mark.parametrize("share", [1.0, 0.5, 0.25, 0.10, None], ids=["100%", "50%", "25%", "10%", "1MB"])
def test_resident_weights_stay_within_budget_and_latents_are_bit_identical(comfy_nodes, tiny_model, share):
    baseline, full_residency = sample_watching_residency(tiny_model)
    assert full_residency == [tiny_model.model_size()] * 3  # without a budget ComfyUI loads it all on CPU
    budget = int(tiny_model.model_size() * share) if share else 1 * MB
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=budget)[0]
    samples, residency = sample_watching_residency(budgeted)
    assert len(residency) == 3 and max(residency) <= budget
    assert samples.equal(baseline)
    (record,) = records(budgeted)
    assert record.outcome == "success" and record.steps == 3 * 1  # euler: one model call per step
    assert record.planned_resident_bytes == min(budget, tiny_model.model_size())
    assert record.measured_resident_bytes == max(residency)
    assert_nothing_of_ours_remains(tiny_model)


def test_an_oom_at_step_2_is_survived_through_the_ladder(comfy_nodes, tiny_model):
    baseline, _ = sample_watching_residency(tiny_model)
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size() // 2)[0]
    budgeted.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 2, "times": 1}
    samples, residency = sample_watching_residency(budgeted)
    assert samples.equal(baseline)
    (record,) = records(budgeted)
    assert record.outcome == "success"
    assert len(record.rungs) == 1 and record.rungs[0].startswith("halve resident weights")
    assert max(residency[-3:]) <= tiny_model.model_size() // 4  # the retry ran under the halved budget
    assert_nothing_of_ours_remains(tiny_model)


def test_when_every_rung_fails_the_error_lists_them_and_nothing_remains(comfy_nodes, tiny_model):
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size())[0]
    budgeted.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 1, "times": 99}
    budget_exhausted = comfy_host.pack_module("memory.patching").BudgetExhausted
    with pytest.raises(budget_exhausted) as failure:
        sample_watching_residency(budgeted)
    message = str(failure.value)
    for rung in ("halve resident weights", "run cond and uncond separately", "stream all weights"):
        assert rung in message
    assert isinstance(failure.value, model_management.OOM_EXCEPTION)  # ComfyUI still shows its OOM advice
    assert records(budgeted)[0].outcome == "failed: BudgetExhausted"
    assert_nothing_of_ours_remains(tiny_model)
    baseline_again, _ = sample_watching_residency(tiny_model)  # the plain model still samples as before
    assert baseline_again.equal(sample_watching_residency(tiny_model)[0])


def test_an_interrupted_run_leaves_nothing_behind(comfy_nodes, tiny_model):
    baseline, _ = sample_watching_residency(tiny_model)
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size() // 4)[0]
    model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            sample_watching_residency(budgeted)
    finally:
        model_management.interrupt_current_processing(False)
    assert records(budgeted)[0].outcome == "interrupted"
    assert_nothing_of_ours_remains(tiny_model)
    after, residency = sample_watching_residency(tiny_model)
    assert after.equal(baseline) and residency == [tiny_model.model_size()] * 3


def test_split_cond_uncond_runs_the_model_once_per_cond(comfy_nodes, tiny_model):
    budgeted = offload(comfy_nodes, tiny_model, budget_bytes=tiny_model.model_size())[0]
    calls = []
    budgeted.set_model_unet_function_wrapper(
        lambda apply, args: calls.append(args["input"].shape[0]) or apply(args["input"], args["timestep"], **args["c"]))
    budgeted.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 1, "times": 2}
    batched, _ = sample_watching_residency(tiny_model)
    samples, _ = sample_watching_residency(budgeted)
    assert records(budgeted)[0].rungs[1] == "run cond and uncond separately"
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
    assert all(run.measured_resident_bytes <= budget for run in runs)
    assert k_sampler[0]["samples"].equal(advanced[0]["samples"])
    assert custom.equal(custom_advanced)
    assert_nothing_of_ours_remains(tiny_model)


def test_keep_free_plans_from_free_memory(comfy_nodes, tiny_model):
    free = model_management.get_free_memory(tiny_model.load_device)
    # leave all but 30 MB free: the plan keeps less than the 52 MB of weights resident
    budgeted = offload(comfy_nodes, tiny_model, keep_free_bytes=free - 30 * MB)[0]
    _, residency = sample_watching_residency(budgeted)
    (record,) = records(budgeted)
    assert record.planned_resident_bytes < tiny_model.model_size()
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
    planned = tiny_model.memory_required([2, 4, 8, 8])  # cond + uncond of one 64x64 latent
    mb = comfy_host.pack_module("memory.attention")._mb
    assert set(attention_targets(caplog)) == {mb(planned).replace(" ", "")}


def test_the_ladder_halves_sliced_attention_chunks(comfy_nodes, tiny_model, caplog):
    import logging
    baseline, _ = sample_watching_residency(tiny_model)
    budgeted = offload(comfy_nodes, sliced(comfy_nodes, tiny_model, target_mb=8), budget_bytes=16 * MB)[0]
    budgeted.model_options["transformer_options"]["headroom"]["test_inject_oom"] = {"step": 1, "times": 3}
    caplog.set_level(logging.DEBUG, logger="headroom")
    samples, _ = sample_watching_residency(budgeted)
    (record,) = records(budgeted)
    assert record.outcome == "success"
    assert record.rungs[2] == "halve attention chunks (target 4 MB)"
    assert attention_targets(caplog)[-1] == "4MB"  # the attempt that succeeded ran with the halved target
    assert torch.allclose(samples, baseline, rtol=1e-4, atol=1e-4)  # split cond/uncond: float rounding only
    assert_nothing_of_ours_remains(tiny_model)
