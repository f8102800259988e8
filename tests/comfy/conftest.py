"""In-process tests: real ComfyUI (the host tests/run.py selected), CPU, real ModelPatcher and samplers."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "support"))
import comfy_host  # noqa: E402
import generated_models  # noqa: E402

comfy_host.import_comfyui()  # test modules of this layer import comfy.* at the top


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's `nodes` module, with the pack loaded through ComfyUI's own custom-node loader."""
    nodes = comfy_host.import_comfyui()
    if "HeadroomForceGC" not in nodes.NODE_CLASS_MAPPINGS:
        comfy_host.load_pack(nodes)
    return nodes


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_nodes):
    return generated_models.tiny_sd15_checkpoint()


@pytest.fixture
def loaded_checkpoint(comfy_nodes, tiny_checkpoint):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded by ComfyUI's checkpoint loader."""
    import comfy.sd
    return comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True, output_clip=False)[:3]


@pytest.fixture(autouse=True)
def no_models_left_loaded(comfy_nodes):
    """Each test starts and ends with nothing loaded, so one test's models never skew another's."""
    import comfy.model_management as model_management
    model_management.unload_all_models()
    yield
    model_management.unload_all_models()

