"""What the adapter detects in each pinned ComfyUI, against what each host's source and environment hold
(read from ComfyUI's code and its comfy-aimdo, not from the adapter)."""
import os

import torch

import comfy_host

# host -> (host_is_oom, register_load_device, clone_disable_dynamic, deepclone_multigpu, vbar_set_watermark,
#          the flag that turns dynamic VRAM off)
EXPECTED = {
    "v0.3.64": (False, False, False, False, False, ""),  # no comfy-aimdo, no dynamic patcher
    "v0.12.1": (False, False, False, False, True, ""),  # opt-in dynamic VRAM; its environment has aimdo 0.6.0
    "v0.33.0": (True, True, True, True, True, "--disable-dynamic-vram"),  # aimdo 0.4.13 has set_watermark
}


def test_the_adapter_detects_what_this_host_offers(comfy_nodes):
    features = comfy_host.pack_module("memory.comfy.host").features()
    host = os.environ["HEADROOM_HOST"]
    assert (features.host_is_oom, features.register_load_device, features.clone_disable_dynamic,
            features.deepclone_multigpu, features.vbar_set_watermark, features.dynamic_vram_off_flag) == EXPECTED[host]
    assert features.version == host
    assert features.dynamic_vram_enabled is False  # --cpu: ModelPatcherDynamic never pages on a CPU
    assert features.nvml is False  # no NVIDIA driver on this machine


def test_a_plan_counts_the_models_own_weights_once(comfy_nodes, loaded_checkpoint):
    import comfy.model_management as model_management
    model = loaded_checkpoint[0]
    models = comfy_host.pack_module("memory.comfy.models")
    model_management.load_models_gpu([model])  # on the CPU the whole model is "resident"
    reading = models.free_memory_reading(model)
    assert reading.view == "device"  # legacy patcher, no aimdo paging here
    assert (reading.loaded_outside_vbar_bytes, reading.vbar_resident_bytes) == (model.loaded_size(), 0)
    facts = models.plan_device_facts(model)
    free_now = model_management.get_free_memory(torch.device("cpu"))
    # free RAM moves between two readings; the plan's figure is free memory plus the 52 MB it holds
    assert abs(facts.free_bytes - (free_now + model.loaded_size())) < 64 * 2 ** 20
