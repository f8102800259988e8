"""Pick GPU inside real ComfyUI (CPU): MODEL, CLIP and VAE placed on clones that run there, the incoming
objects untouched, composition with Offload Model in both orders, round robin, bad inputs named, and
ComfyUI's own device limits respected. GPU placement is checked on a recorded two-GPU device table."""
import math

import comfy.model_management as model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import pytest
import torch

import comfy_host
import generated_models

GB = 2 ** 30
POSITIVE = generated_models.text_conditioning(1)
NEGATIVE = generated_models.text_conditioning(2)
CPU = torch.device("cpu")
no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the node says on a machine without a GPU")


def pick(nodes, policy="by name", device="cpu", min_free_gb=4.0, **models):
    """(MODEL, CLIP, VAE, choice) from the node, run the way ComfyUI's executor runs it."""
    node = nodes.NODE_CLASS_MAPPINGS["HeadroomPickGPU"]
    return comfy_host.run_v3_node(node, policy=policy, device=device, min_free_gb=min_free_gb, **models).args


def offload(nodes, model, budget_bytes, clip=None, vae=None, policy="keep loaded"):
    node = nodes.NODE_CLASS_MAPPINGS["HeadroomOffloadModel"]
    inputs = dict(model=model, budget_gb=budget_bytes / GB, keep_free_gb=0.0, text_encoder_and_vae=policy)
    inputs.update({name: value for name, value in (("clip", clip), ("vae", vae)) if value is not None})
    return comfy_host.run_v3_node(node, **inputs).args


def sample_watching_residency(model, seed=5, steps=3):
    """Latents from ComfyUI's sampling entry point, and the weight bytes resident at each step."""
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    resident = []
    samples = comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", POSITIVE, NEGATIVE, latent,
                                  callback=lambda *_: resident.append(model.loaded_size()), seed=seed)
    return samples, resident


def outer_sample_wrappers(model) -> list[str]:
    return [wrapper.__name__ for wrapper in model.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
                                                                "headroom")]


def nvml_note() -> str:
    """What the node says about NVML on this machine: nothing when it works, else why not."""
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as error:
        return f"NVML not available: {error}"
    return ""


def loaded_patchers():
    return [entry.model for entry in model_management.current_loaded_models]


def has_headroom_hooks(patcher) -> bool:
    return comfy_host.pack_module("memory.comfy.models").has_headroom_hooks(patcher)


def devices_of(model, clip, vae) -> tuple:
    return (model.load_device, model.offload_device, clip.patcher.load_device, clip.patcher.offload_device,
            vae.patcher.load_device, vae.patcher.offload_device, vae.device)


@pytest.fixture
def checkpoint_and_clip(loaded_checkpoint):
    model, _, vae = loaded_checkpoint
    return model, generated_models.small_clip(), vae


@pytest.fixture
def recorded_devices(monkeypatch):
    """The node reads a recorded device table (an RTX 4090 as cuda:0, an RTX 3060 with less free memory
    as cuda:1, the CPU) instead of this machine's; returns the pack's devices module."""
    devices = comfy_host.pack_module("memory.devices")
    table = [devices.DeviceInfo("cuda:0", "NVIDIA GeForce RTX 4090", 20 * GB, 24 * GB, "nvml"),
             devices.DeviceInfo("cuda:1", "NVIDIA GeForce RTX 3060", 11 * GB, 12 * GB, "nvml"),
             devices.DeviceInfo("cpu", "CPU (system RAM)", 30 * GB, 64 * GB, "cpu")]
    monkeypatch.setattr(comfy_host.pack_module("nodes.pick_gpu"), "list_devices", lambda: (list(table), []))
    return devices


@pytest.fixture
def two_gpus(recorded_devices, monkeypatch):
    """A ComfyUI that runs on GPUs (not --cpu) on a machine with the recorded two GPUs. Nothing here
    samples on them: the tests check where the clones would load."""
    monkeypatch.setattr(model_management, "cpu_state", model_management.CPUState.GPU)
    if hasattr(model_management, "get_all_torch_devices"):  # newer hosts list the GPUs they use (torch sees none here)
        monkeypatch.setattr(model_management, "get_all_torch_devices",
                            lambda exclude_current=False: [torch.device("cuda", 0), torch.device("cuda", 1)])


# ---------------------------------------------------------------------------- on this machine: the CPU

def test_model_clip_and_vae_picked_to_cpu_run_there_and_the_incoming_ones_are_untouched(
        comfy_nodes, checkpoint_and_clip):
    model, clip, vae = checkpoint_and_clip
    before = devices_of(model, clip, vae)
    baseline, _ = sample_watching_residency(model)
    tokens = clip.tokenize("a lighthouse on a cliff")
    encoded_by_incoming = clip.encode_from_tokens_scheduled(tokens)
    model_management.unload_all_models()

    picked_model, picked_clip, picked_vae, choice = pick(comfy_nodes, model=model, clip=clip, vae=vae)

    assert devices_of(picked_model, picked_clip, picked_vae) == (CPU,) * 7
    assert picked_model is not model and picked_clip.patcher is not clip.patcher
    assert picked_vae is not vae and picked_vae.patcher is not vae.patcher
    samples, _ = sample_watching_residency(picked_model)
    assert samples.equal(baseline)
    encoded = picked_clip.encode_from_tokens_scheduled(tokens)
    assert encoded[0][0].shape == (1, 77, 768) and encoded[0][0].equal(encoded_by_incoming[0][0])
    image = picked_vae.decode(samples)
    assert image.shape == (1, 64, 64, 3) and image.device == CPU
    assert picked_vae.patcher in loaded_patchers() and vae.patcher not in loaded_patchers()
    assert image.equal(vae.decode(samples))
    # the incoming objects: same devices, no wrappers; only the clone carries the device guard
    assert devices_of(model, clip, vae) == before
    assert not any(has_headroom_hooks(patcher) for patcher in (model, clip.patcher, vae.patcher))
    assert outer_sample_wrappers(picked_model) == ["_run_sampling", "_device_guard"]  # the stage outermost
    assert choice.startswith("Pick GPU: cpu (CPU (system RAM), ")
    assert ": asked for 'cpu'; MODEL, CLIP, VAE on cpu" in choice


@no_gpu_here
@pytest.mark.parametrize("policy", ["most free memory", "round robin", "first with min_free_gb free"])
def test_every_policy_picks_the_cpu_here_and_says_why(comfy_nodes, loaded_checkpoint, policy):
    model, _, vae = loaded_checkpoint

    picked_model, picked_clip, picked_vae, choice = pick(comfy_nodes, policy=policy, min_free_gb=0.5,
                                                         model=model, vae=vae)

    assert picked_clip is None
    assert (picked_model.load_device, picked_vae.device, picked_vae.patcher.load_device) == (CPU, CPU, CPU)
    assert ": no GPU found: running on the CPU; MODEL, VAE on cpu; notes: " in choice
    notes = choice.split("; notes: ")[1]
    assert notes.startswith(nvml_note()) and notes.endswith(": running on CPU")
    assert "no CUDA device visible" in notes
    samples, _ = sample_watching_residency(picked_model, steps=2)
    assert picked_vae.decode(samples).shape == (1, 64, 64, 3)


def test_nothing_connected_still_says_what_was_chosen(comfy_nodes):
    model, clip, vae, choice = pick(comfy_nodes)
    assert (model, clip, vae) == (None, None, None)
    assert ": asked for 'cpu'; nothing placed" in choice


def test_only_by_name_may_be_served_from_cache(comfy_nodes):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomPickGPU"]
    assert node.fingerprint_inputs(policy="by name", device="cpu", min_free_gb=4.0) is None
    for policy in ("most free memory", "round robin", "first with min_free_gb free"):
        assert math.isnan(node.fingerprint_inputs(policy=policy, device="cpu", min_free_gb=4.0))


# ---------------------------------------------------------------------------- with Offload Model

@pytest.mark.parametrize("order", ["pick then offload", "offload then pick"])
def test_composes_with_offload_model_in_both_orders_under_the_budget(comfy_nodes, loaded_checkpoint, order):
    model, _, _ = loaded_checkpoint
    baseline, _ = sample_watching_residency(model)
    budget = model.model_size() // 4
    if order == "pick then offload":
        combined = offload(comfy_nodes, pick(comfy_nodes, model=model)[0], budget)[0]
    else:
        combined = pick(comfy_nodes, model=offload(comfy_nodes, model, budget)[0])[0]

    assert outer_sample_wrappers(combined) == ["_run_sampling", "_device_guard"]  # one stage and ladder, outermost
    samples, residency = sample_watching_residency(combined)
    assert samples.equal(baseline)
    assert len(residency) == 3 and max(residency) <= budget
    (record,) = combined.model_options["transformer_options"]["headroom"]["offload"].records.records
    assert (record.outcome, record.device) == ("success", "cpu")
    assert record.measured_resident_bytes == max(residency)
    assert not has_headroom_hooks(model)
    assert loaded_patchers() == [combined]  # our clone stays loaded within its budget, as ComfyUI leaves any model


@pytest.mark.parametrize("order", ["pick then offload", "offload then pick"])
def test_text_encoder_and_vae_keep_offload_models_after_use_policy_in_both_orders(
        comfy_nodes, checkpoint_and_clip, order):
    model, clip, vae = checkpoint_and_clip
    after_use = "move off the GPU after use"
    if order == "pick then offload":
        _, picked_clip, picked_vae, _ = pick(comfy_nodes, clip=clip, vae=vae)
        _, final_clip, final_vae, _ = offload(comfy_nodes, model, 0, clip=picked_clip, vae=picked_vae, policy=after_use)
    else:
        _, offloaded_clip, offloaded_vae, _ = offload(comfy_nodes, model, 0, clip=clip, vae=vae, policy=after_use)
        _, final_clip, final_vae, _ = pick(comfy_nodes, clip=offloaded_clip, vae=offloaded_vae)

    conditioning = final_clip.encode_from_tokens_scheduled(final_clip.tokenize("a lighthouse"))
    assert final_clip.patcher not in loaded_patchers()  # moved off after use
    image = final_vae.decode(torch.zeros(1, 4, 8, 8))
    assert loaded_patchers() == []
    assert conditioning[0][0].shape == (1, 77, 768) and image.shape == (1, 64, 64, 3)
    assert (final_clip.patcher.load_device, final_vae.patcher.load_device, final_vae.device) == (CPU, CPU, CPU)
    assert "decode" not in vars(vae) and "encode_from_tokens_scheduled" not in vars(clip)


@pytest.mark.parametrize("order", ["pick only", "offload then pick", "pick then offload"])
def test_a_placed_clip_or_vae_dropped_while_loaded_is_not_a_memory_leak(comfy_nodes, checkpoint_and_clip, order,
                                                                         caplog):
    """A placed copy stays loaded after use (unless Offload Model moves it off); when ComfyUI's cache drops it,
    ComfyUI's loaded-model list falls back to its patcher's parent, which must still be alive: the copies of
    upstream nodes (held by the cache too), never a throwaway clone of ours."""
    import gc
    model, clip, vae = checkpoint_and_clip
    upstream = []  # what ComfyUI's cache holds of the nodes before the last one
    if order == "offload then pick":
        upstream = offload(comfy_nodes, model, 0, clip=clip, vae=vae, policy="keep loaded")
        clip, vae = upstream[1:3]
    _, placed_clip, placed_vae, _ = pick(comfy_nodes, clip=clip, vae=vae)
    if order == "pick then offload":
        upstream = [placed_clip, placed_vae]
        _, placed_clip, placed_vae, _ = offload(comfy_nodes, model, 0, clip=placed_clip, vae=placed_vae,
                                                policy="keep loaded")
    placed_clip.encode_from_tokens_scheduled(placed_clip.tokenize("a lighthouse"))
    placed_vae.decode(torch.zeros(1, 4, 8, 8))
    assert len(loaded_patchers()) == 2  # kept loaded: ComfyUI's usual behaviour
    del placed_clip, placed_vae, upstream  # the last node's outputs first, as when a prompt's outputs are replaced
    gc.collect()
    with caplog.at_level("INFO"):
        model_management.cleanup_models_gc()
    assert "memory leak" not in caplog.text
    assert not any(entry.is_dead() for entry in model_management.current_loaded_models)


def test_pick_gpu_after_offload_model_moves_the_budgeted_model_to_the_chosen_gpu(
        comfy_nodes, loaded_checkpoint, two_gpus):
    model, _, _ = loaded_checkpoint
    budgeted = offload(comfy_nodes, model, model.model_size() // 2)[0]
    picked = pick(comfy_nodes, device="cuda:1", model=budgeted)[0]
    # Offload Model plans from the patcher's load device when the run starts: cuda:1 now
    assert (picked.load_device, picked.offload_device) == (torch.device("cuda:1"), CPU)
    assert outer_sample_wrappers(picked) == ["_run_sampling", "_device_guard"]
    assert (budgeted.load_device, model.load_device) == (CPU, CPU)


# ---------------------------------------------------------------------------- on a recorded two-GPU table

def test_round_robin_advances_across_prompts_and_places_everything_on_that_gpu(
        comfy_nodes, checkpoint_and_clip, two_gpus):
    model, clip, vae = checkpoint_and_clip
    picks = [pick(comfy_nodes, policy="round robin", model=model, clip=clip, vae=vae) for _ in range(3)]

    calls = []
    for picked_model, picked_clip, picked_vae, choice in picks:
        device = picked_model.load_device
        assert devices_of(picked_model, picked_clip, picked_vae) == (device, CPU, device, CPU, device, CPU, device)
        call, position = choice.split("round robin: call ")[1].split(" takes GPU ")
        calls.append(int(call))
        assert position.startswith(f"{device.index + 1} of 2; MODEL, CLIP, VAE on {device}")
    assert calls == [calls[0], calls[0] + 1, calls[0] + 2]  # the count survives between prompts
    assert [p[0].load_device.index for p in picks] == [(calls[0] + n) % 2 for n in range(3)]
    assert devices_of(model, clip, vae) == (CPU,) * 7


def test_most_free_and_first_with_free_use_the_recorded_free_memory(comfy_nodes, loaded_checkpoint, two_gpus):
    model, _, _ = loaded_checkpoint
    most_free, _, _, choice = pick(comfy_nodes, policy="most free memory", model=model)
    assert most_free.load_device == torch.device("cuda:0")
    assert choice.startswith("Pick GPU: cuda:0 (NVIDIA GeForce RTX 4090, 20.0 GiB free of 24.0 GiB): "
                             "most free memory of 2 GPUs; MODEL on cuda:0")
    first, _, _, choice = pick(comfy_nodes, policy="first with min_free_gb free", min_free_gb=10.0, model=model)
    assert first.load_device == torch.device("cuda:0")
    assert ": first GPU with at least 10.0 GiB free; MODEL on cuda:0" in choice
    with pytest.raises(ValueError) as raised:
        pick(comfy_nodes, policy="first with min_free_gb free", min_free_gb=21.0, model=model)
    assert str(raised.value).startswith(
        f"min_free_gb: no GPU has 21.0 GiB free (min_free_bytes={21 * GB}); devices here: "
        "cuda:0 (NVIDIA GeForce RTX 4090, 20.0 GiB free of 24.0 GiB), "
        "cuda:1 (NVIDIA GeForce RTX 3060, 11.0 GiB free of 12.0 GiB), cpu (CPU (system RAM), ")


def test_the_device_guard_makes_the_chosen_gpu_current_while_sampling(
        comfy_nodes, loaded_checkpoint, two_gpus, monkeypatch):
    model, _, _ = loaded_checkpoint
    entered = []

    class RecordingDevice:  # stands in for torch.cuda.device: this machine has no CUDA to switch to
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(("enter", self.device))

        def __exit__(self, *exc_info):
            entered.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)

    def run_outer_sample(patched):
        """ComfyUI's own wrapper executor over the clone's OUTER_SAMPLE wrappers, as CFGGuider.sample builds it."""
        guider = comfy.samplers.CFGGuider(patched)
        wrappers = patched.get_all_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE)
        sampling = lambda *args, **kwargs: entered.append(("sampling", args)) or "latents"  # noqa: E731
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(sampling, guider, wrappers).execute("noise")

    assert run_outer_sample(pick(comfy_nodes, device="cuda:1", model=model)[0]) == "latents"
    assert entered == [("enter", torch.device("cuda:1")), ("sampling", ("noise",)), ("exit", torch.device("cuda:1"))]
    entered.clear()
    assert run_outer_sample(pick(comfy_nodes, device="cpu", model=model)[0]) == "latents"
    assert entered == [("sampling", ("noise",))]  # no CUDA device to make current for the CPU


def test_comfyui_with_cpu_flag_keeps_every_policy_on_the_cpu(comfy_nodes, loaded_checkpoint, recorded_devices):
    model, _, _ = loaded_checkpoint  # the in-process host runs with --cpu
    picked, _, _, choice = pick(comfy_nodes, policy="most free memory", model=model)
    assert picked.load_device == CPU
    assert choice.endswith("notes: cuda:0 not used: ComfyUI runs with --cpu; cuda:1 not used: ComfyUI runs with --cpu")
    with pytest.raises(ValueError) as raised:
        pick(comfy_nodes, device="cuda:0", model=model)
    assert str(raised.value).startswith("device: device 'cuda:0' does not exist; devices here: cpu (")
    assert str(raised.value).endswith("(notes: cuda:0 not used: ComfyUI runs with --cpu; "
                                      "cuda:1 not used: ComfyUI runs with --cpu)")


# ---------------------------------------------------------------------------- ComfyUI's own multi-GPU (after v0.12)

def test_a_device_comfyuis_select_device_node_chose_is_kept(comfy_nodes, checkpoint_and_clip, two_gpus):
    model, clip, vae = checkpoint_and_clip
    # what ComfyUI's Select Model Device (comfy_extras/nodes_multigpu.py, after v0.12) records on the model
    model.model._select_base_load_device = model.load_device
    picked_model, picked_clip, picked_vae, choice = pick(comfy_nodes, device="cuda:1", model=model, clip=clip, vae=vae)
    assert picked_model is model and not has_headroom_hooks(model)
    assert (picked_clip.patcher.load_device, picked_vae.device) == (torch.device("cuda:1"),) * 2
    assert "; CLIP, VAE on cuda:1; MODEL stays on cpu (ComfyUI's Select Device node placed it)" in choice


def test_comfyuis_own_device_list_limits_the_choice(comfy_nodes, loaded_checkpoint, two_gpus, monkeypatch):
    model, _, _ = loaded_checkpoint
    # ComfyUI after v0.12 lists the devices its multi-GPU nodes use; here it uses cuda:1 only
    monkeypatch.setattr(model_management, "get_all_torch_devices",
                        lambda exclude_current=True: [torch.device("cuda", 1)], raising=False)
    picked, _, _, choice = pick(comfy_nodes, policy="most free memory", model=model)
    assert picked.load_device == torch.device("cuda:1")  # cuda:0 has more free memory but ComfyUI does not use it
    assert choice.endswith("notes: cuda:0 not used: not among the devices ComfyUI uses "
                           "(model_management.get_all_torch_devices)")
    with pytest.raises(ValueError, match=r"^device: device 'cuda:0' does not exist; devices here: cuda:1 "):
        pick(comfy_nodes, device="cuda:0", model=model)


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("inputs, message", [
    (dict(device="cuda:7"), "device: device 'cuda:7' does not exist; devices here: "),
    (dict(device="gpu0"), "device: device name 'gpu0' is not valid; use cpu, cuda, cuda:N, xpu, xpu:N or mps "
                          "(AMD ROCm GPUs are cuda:N); devices here: "),
    (dict(policy="first with min_free_gb free", min_free_gb=1024.0),
     f"min_free_gb: no GPU found, and the CPU does not have 1024.0 GiB free (min_free_bytes={1024 * GB}); "
     "devices here: "),
])
def test_bad_input_names_the_input_and_lists_the_devices(comfy_nodes, loaded_checkpoint, inputs, message):
    model, _, _ = loaded_checkpoint
    with pytest.raises(ValueError) as raised:
        pick(comfy_nodes, model=model, **inputs)
    assert str(raised.value).startswith(message + "cpu (CPU (system RAM), ")
    assert not has_headroom_hooks(model)
    assert pick(comfy_nodes, model=model)[0].load_device == CPU  # the next call runs normally


@pytest.mark.parametrize("inputs, message", [
    (dict(policy="sideways"), "policy must be one of most free memory, round robin, first with min_free_gb free, "
                              "by name, got 'sideways'"),
    (dict(min_free_gb=-1.0), "min_free_gb must be 0 or a positive number of GB, got -1.0"),
])
def test_bad_policy_and_min_free_are_refused_naming_the_input(comfy_nodes, inputs, message):
    with pytest.raises(ValueError) as raised:
        pick(comfy_nodes, **inputs)
    assert str(raised.value) == message
