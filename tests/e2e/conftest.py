"""End to end: a real ComfyUI server (`main.py --cpu`) with the pack installed, driven over HTTP."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "support"))
import comfy_host  # noqa: E402
import generated_models  # noqa: E402
from server import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint():
    comfy_host.import_comfyui()  # the generator builds the model from ComfyUI's own module classes
    return generated_models.tiny_sd15_checkpoint()


@pytest.fixture(scope="session")
def text_encoder_checkpoint(tiny_checkpoint):
    """The tiny checkpoint with a full-size SD1.5 text encoder, for workflows that encode text."""
    return generated_models.tiny_sd15_te_checkpoint()


@pytest.fixture(scope="session")
def server(tiny_checkpoint, text_encoder_checkpoint):
    comfy = ComfyServer(comfy_host.comfyui_dir(), checkpoints=[tiny_checkpoint, text_encoder_checkpoint]).start()
    yield comfy
    comfy.stop()
    log = comfy.log_text()
    comfy.cleanup()
    assert "Potential memory leak" not in log, "ComfyUI reported a leak:\n" + log[-4000:]
