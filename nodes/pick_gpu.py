"""Pick GPU: put a MODEL, CLIP and VAE on the device a policy picks; say what was chosen and why."""
import itertools
import logging

from ..memory.comfy import host, placement
from ..memory.devices import (
    GIB,
    list_devices,
    parse_device_name,
    pick_first_with_free,
    pick_most_free,
    pick_round_robin,
    restrict_devices,
)
from ..memory.patching import add_device_guard, add_run_hooks

_, io, ui = host.node_api()
log = logging.getLogger("headroom")

MOST_FREE = "most free memory"
ROUND_ROBIN = "round robin"
FIRST_WITH_FREE = "first with min_free_gb free"
BY_NAME = "by name"
POLICIES = [MOST_FREE, ROUND_ROBIN, FIRST_WITH_FREE, BY_NAME]

# Round robin spreads successive prompts over the GPUs, so its count lives as long as the ComfyUI process.
_round_robin_calls = itertools.count()


def available_devices():
    """(the devices to pick from, notes on what is missing and why): torch/NVML's view, limited to what ComfyUI uses."""
    devices, notes = list_devices()
    names, reason = placement.devices_comfy_uses()
    if names is not None:
        devices, dropped = restrict_devices(devices, names, reason)
        notes += dropped
    return devices, notes


def choose(policy, device, min_free_gb, devices, notes):
    """The DeviceChoice for the node's inputs; a ValueError names the input that cannot be satisfied."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not min_free_gb >= 0:  # NaN fails too
        raise ValueError(f"min_free_gb must be 0 or a positive number of GB, got {min_free_gb!r}")
    why_missing = f" (notes: {'; '.join(notes)})" if notes else ""
    try:
        if policy == BY_NAME:
            return parse_device_name(device, devices)
        if policy == FIRST_WITH_FREE:
            return pick_first_with_free(devices, round(min_free_gb * GIB))
    except ValueError as error:
        raise ValueError(f"{'device' if policy == BY_NAME else 'min_free_gb'}: {error}{why_missing}") from None
    if policy == ROUND_ROBIN:
        return pick_round_robin(devices, next(_round_robin_calls))
    return pick_most_free(devices)


class PickGPU(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadroomPickGPU",
            display_name="Pick GPU",
            category="Headroom",
            description="Puts the MODEL, CLIP and VAE (each optional) on one device: the one you name, the GPU "
                        "with the most free memory now, the next GPU in turn (round robin across prompts), or "
                        "the first GPU with enough free memory. Returns clones; the incoming models keep their "
                        "devices. Without a GPU everything runs on the CPU and the output says why.",
            inputs=[
                io.Combo.Input("policy", options=POLICIES, default=MOST_FREE,
                               tooltip="most free memory: the GPU with the most free memory right now (NVML "
                                       "counts other programs' memory too). round robin: each prompt takes the "
                                       "next GPU, spreading API clients over all GPUs. first with min_free_gb "
                                       "free: the first GPU (cuda:0, cuda:1, ...) with that much free. by name: "
                                       "the device in 'device'. Without a GPU every policy but 'by name' "
                                       "picks the CPU."),
                io.String.Input("device", default="cuda:0",
                                tooltip="For policy 'by name': cpu, cuda:N (NVIDIA, and AMD GPUs under ROCm), "
                                        "xpu:N (Intel) or mps (Apple). Numbered as torch numbers them, which "
                                        "follows CUDA_VISIBLE_DEVICES and can differ from nvidia-smi."),
                io.Float.Input("min_free_gb", default=4.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="For policy 'first with min_free_gb free': GB of free memory the GPU "
                                       "must have now. When no GPU has it, the prompt fails listing the devices."),
                io.Model.Input("model", optional=True,
                               tooltip="Diffusion model to place. It is cloned; the incoming model keeps its "
                                       "device. While it samples, the chosen GPU is torch's current device."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Text encoder to place on the same device (cloned)."),
                io.Vae.Input("vae", optional=True, tooltip="VAE to place on the same device (copied)."),
            ],
            outputs=[
                io.Model.Output("MODEL", display_name="MODEL",
                                tooltip="The model on the chosen device (None if none came in)."),
                io.Clip.Output("CLIP", display_name="CLIP",
                               tooltip="The text encoder on the chosen device (None if none came in)."),
                io.Vae.Output("VAE", display_name="VAE",
                              tooltip="The VAE on the chosen device (None if none came in)."),
                io.String.Output("choice", display_name="choice",
                                 tooltip="The device chosen and why (name, free/total memory), what was placed "
                                         "on it, and why NVML or a GPU was not used when they were not."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, policy=MOST_FREE, **kwargs):
        # free memory and the round-robin turn change between prompts: those policies run every time. A new
        # NaN each call: ComfyUI's cache compares keys by identity first, so the one math.nan would match itself
        return None if policy == BY_NAME else float("nan")

    @classmethod
    def execute(cls, policy=MOST_FREE, device="cuda:0", min_free_gb=4.0, model=None, clip=None, vae=None):
        devices, notes = available_devices()
        choice = choose(policy, device, min_free_gb, devices, notes)
        placed, kept = [], []

        def place(input_name, value, patcher, move):
            if value is None:
                return None
            reason = placement.native_placement(patcher)
            if reason is not None:  # ComfyUI's own multi-GPU nodes chose: do not fight them
                kept.append(f"{input_name.upper()} stays on {patcher.load_device} ({reason})")
                return value
            try:
                moved = move(value, choice.device)
            except ValueError as error:
                raise ValueError(f"{input_name}: {error}") from None
            placed.append(input_name.upper())
            return moved

        model = place("model", model, model,
                      lambda m, d: add_device_guard(add_run_hooks(placement.place_model(m, d))))
        clip = place("clip", clip, clip and clip.patcher, placement.place_clip)
        vae = place("vae", vae, vae and vae.patcher, placement.place_vae)
        parts = [f"Pick GPU: {choice.describe()}",
                 f"{', '.join(placed)} on {choice.device}" if placed else "nothing placed"] + kept
        if notes:
            parts.append(f"notes: {'; '.join(notes)}")
        line = "; ".join(parts)
        log.info(line)
        return io.NodeOutput(model, clip, vae, line, ui=ui.PreviewText(line))
