"""Pick GPU: the devices ComfyUI uses, and MODEL/CLIP/VAE clones placed on a device."""
from __future__ import annotations

from ..decisions import placement_route
from .host import features, model_management
from .models import is_dynamic, model_name
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
    return placed_patcher(model, device)


def place_clip(clip, device: str):
    """A copy of a CLIP whose text encoder loads on `device` (v0.12+ sets its execution device from it)."""
    placed = placed_patcher(clip.patcher, device)
    return watch_use(clip, "CLIP", offloads_after_use(clip, "CLIP"), patcher=placed)


def place_vae(vae, device: str):
    """A copy of a VAE that loads on `device`: its patcher (a clone) and vae.device, which encode/decode move
    inputs to."""
    import torch
    placed = watch_use(vae, "VAE", offloads_after_use(vae, "VAE"), patcher=placed_patcher(vae.patcher, device))
    placed.device = torch.device(device)
    return placed


def placed_patcher(patcher, device: str):
    """A clone of `patcher` whose load device is `device`, made the way the host can (memory.decisions.
    placement_route): a legacy clone retargeted; a dynamic one as ComfyUI's own Select Device nodes make it
    (a legacy twin for the CPU, a deep clone with its own weights on another GPU); or a ValueError saying
    why not and what to change."""
    import torch
    target = torch.device(device)
    route = placement_route(features(), is_dynamic(patcher), str(patcher.load_device), str(target))
    if route.how == "refuse":
        raise ValueError(route.message)
    try:
        if route.how == "legacy twin":
            placed = patcher.clone(disable_dynamic=True)
        elif route.how == "deep clone":
            placed = patcher.deepclone_multigpu(new_load_device=target)
            placed.register_load_device(target)
        else:
            placed = patcher.clone()
    except RuntimeError as error:  # ComfyUI's reason: a loader that cannot load the weights again, say
        raise ValueError(f"cannot place {model_name(patcher)} on {target}: {error}") from None
    if route.how in ("retarget", "legacy twin"):
        placed.load_device = target
        # off a GPU the weights wait in RAM; on the CPU they stay
        placed.offload_device = target if route.how == "legacy twin" else torch.device("cpu")
    return placed
