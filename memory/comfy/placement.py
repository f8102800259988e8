"""Pick GPU: the devices ComfyUI uses, and MODEL/CLIP/VAE clones placed on a device."""
from __future__ import annotations

from .host import model_management
from .models import is_dynamic
from .use import offloads_after_use, watch_use


def devices_comfy_uses() -> tuple[set[str] | None, str]:
    """The device names ComfyUI itself runs on when it limits them (None: every device torch sees), and why."""
    management = model_management()
    if management.cpu_state == management.CPUState.CPU:
        return {"cpu"}, "ComfyUI runs with --cpu"
    # ComfyUI after v0.12 has its own multi-GPU nodes and lists the devices they may use
    all_torch_devices = getattr(management, "get_all_torch_devices", None)
    if all_torch_devices is None:
        return None, ""
    names = {str(device) for device in all_torch_devices(exclude_current=False)}
    return names | {"cpu"}, "not among the devices ComfyUI uses (model_management.get_all_torch_devices)"


def native_placement(patcher) -> str | None:
    """Why ComfyUI's own multi-GPU nodes (after v0.12) already chose this patcher's device; None when they did not."""
    if patcher.get_additional_models_with_key("multigpu"):
        return "ComfyUI's MultiGPU CFG Split runs it on several GPUs"
    if hasattr(patcher.model, "_select_base_load_device"):  # set by ComfyUI's Select Model/CLIP/VAE Device
        return "ComfyUI's Select Device node placed it"
    return None


def place_model(model, device: str):
    """A clone of a MODEL that loads on `device`; the incoming MODEL keeps its devices."""
    import torch
    target = torch.device(device)
    _refuse_dynamic_move(model, target)
    placed = model.clone()
    _set_devices(placed, target)
    return placed


def place_clip(clip, device: str):
    """A copy of a CLIP whose text encoder loads on `device` (v0.12 sets its execution device from it)."""
    import torch
    target = torch.device(device)
    _refuse_dynamic_move(clip.patcher, target)
    placed = watch_use(clip, "CLIP", offloads_after_use(clip, "CLIP"))  # one clone, of the incoming patcher
    _set_devices(placed.patcher, target)
    return placed


def place_vae(vae, device: str):
    """A copy of a VAE that loads on `device`: its patcher (a clone) and vae.device, which encode/decode move
    inputs to."""
    import torch
    target = torch.device(device)
    _refuse_dynamic_move(vae.patcher, target)
    placed = watch_use(vae, "VAE", offloads_after_use(vae, "VAE"))
    _set_devices(placed.patcher, target)
    placed.device = target
    return placed


def _set_devices(patcher, target) -> None:
    import torch
    patcher.load_device = target
    patcher.offload_device = torch.device("cpu")  # off a GPU the weights wait in RAM; on the CPU they stay


def _refuse_dynamic_move(patcher, target) -> None:
    if is_dynamic(patcher) and patcher.load_device != target:
        raise ValueError(f"ComfyUI's dynamic VRAM (--fast dynamic_vram) pages this model's weights on "
                         f"{patcher.load_device} only and cannot move it to {target}; start ComfyUI without "
                         "--fast dynamic_vram to choose devices per model, or one ComfyUI per GPU (--cuda-device N)")
