"""Real ComfyUI, imported in-process as a library on the CPU.

tests/run.py sets HEADROOM_COMFYUI_DIR to a checkout of a pinned commit and runs pytest with that
host's environment. The pack is loaded the way ComfyUI loads it: by `nodes.load_custom_node` on a
custom_nodes folder in which the repository appears as `ComfyUI-Headroom`.
"""
from __future__ import annotations

import asyncio
import atexit
import inspect
import os
import pathlib
import shutil
import sys
import tempfile

from generated_models import text_conditioning

SUPPORT_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = SUPPORT_DIR.parents[1]
PACK_FOLDER_NAME = "ComfyUI-Headroom"


def comfyui_dir() -> pathlib.Path:
    value = os.environ.get("HEADROOM_COMFYUI_DIR")
    if not value:
        raise RuntimeError("HEADROOM_COMFYUI_DIR is not set: run the suite with `python3 tests/run.py`, "
                           "which prepares the pinned ComfyUI hosts and sets it")
    return pathlib.Path(value)


def import_comfyui():
    """Import ComfyUI from HEADROOM_COMFYUI_DIR, forced onto the CPU; return its `nodes` module."""
    root = str(comfyui_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    args.cpu = True  # before comfy.model_management is imported: it reads the device at import
    import comfy.model_management  # noqa: F401
    import nodes
    if not pathlib.Path(nodes.__file__).resolve().is_relative_to(pathlib.Path(root).resolve()):
        raise RuntimeError(f"`nodes` resolved to {nodes.__file__}, not ComfyUI's; the pack's own "
                           "nodes/ folder must never be importable as `nodes`")
    return nodes


def custom_nodes_folder() -> pathlib.Path:
    """A custom_nodes folder holding the pack (as ComfyUI-Headroom)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="headroom-custom-nodes-"))
    # kept for the life of the process: the pack's lazy imports resolve through this path
    atexit.register(shutil.rmtree, folder, True)
    (folder / PACK_FOLDER_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    return folder


def load_pack(nodes_module) -> None:
    """Load the pack into the in-process ComfyUI exactly as ComfyUI's start-up does."""
    folder = custom_nodes_folder()
    loaded = asyncio.run(nodes_module.load_custom_node(str(folder / PACK_FOLDER_NAME)))
    if not loaded:
        raise RuntimeError("ComfyUI failed to load the pack; see the log above")


def run_v3_node(node_class, **inputs):
    """Run a V3 node the way ComfyUI's executor does (class clone, locked, normalised output)."""
    from comfy_api.internal import make_locked_method_func
    node_class.VALIDATE_CLASS()
    parameter = next(iter(inspect.signature(node_class.PREPARE_CLASS_CLONE).parameters))
    # v0.3.64 takes the hidden inputs; v0.12 takes V3 data holding them
    clone = node_class.PREPARE_CLASS_CLONE({"hidden_inputs": {}} if parameter == "v3_data" else {})
    return make_locked_method_func(node_class, "EXECUTE_NORMALIZED", clone)(**inputs)


def sample(nodes, model, seed=0, steps=2, size=64):
    """Latents from ComfyUI's own KSampler on the tiny model, with conditioning built without CLIP."""
    latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    positive = text_conditioning(1)
    negative = text_conditioning(2)
    return nodes.KSampler().sample(model, seed, steps, 4.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def pack_module(name: str):
    """A module of the pack as ComfyUI loaded it (under the folder path), e.g. "memory.patching".

    Classes must come from here, not from the `comfyui_headroom` test import: the two loads are
    distinct module objects, and an exception class of one is not the other's.
    """
    # ComfyUI names the package after its folder's full path (dots replaced)
    root = next(module_name for module_name in list(sys.modules) if module_name.endswith("/" + PACK_FOLDER_NAME))
    return sys.modules[f"{root}.{name}"]
