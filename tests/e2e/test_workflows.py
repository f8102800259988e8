"""Every example workflow: its UI format (drag-and-drop into ComfyUI) and its API format agree, checked
against the node definitions the running server publishes; and every API workflow runs, as shipped, on the
generated model (only shrunk: fewer steps, smaller images)."""
import io

import numpy
import pytest
from PIL import Image

import generated_models
from example_workflows import (
    WORKFLOWS_DIR,
    checkpoint_name,
    for_checkpoint,
    load_api_workflow,
    load_ui_workflow,
    ui_to_api,
)

NAMES = sorted(path.name[:-len(".api.json")] for path in WORKFLOWS_DIR.glob("*.api.json"))


def test_every_workflow_has_both_formats():
    ui_names = sorted(path.stem for path in WORKFLOWS_DIR.glob("*.json") if not path.name.endswith(".api.json"))
    assert NAMES and ui_names == NAMES
    assert "big_model_small_gpu" in NAMES  # the combined one


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_formats_agree(server, name):
    object_info = server.get("/object_info")
    assert ui_to_api(load_ui_workflow(name), object_info) == load_api_workflow(name)


def example_input_png() -> bytes:
    """Noise with a transparent square: LoadImage makes the square its mask."""
    rgba = numpy.random.default_rng(1).integers(0, 256, (128, 192, 4), dtype=numpy.uint8)
    rgba[..., 3] = 255
    rgba[40:80, 60:100, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", NAMES)
def test_every_api_workflow_runs_on_the_generated_model(server, name):
    workflow = load_api_workflow(name)
    named = checkpoint_name(workflow)
    assert named in generated_models.GENERATED_CHECKPOINTS  # runs out of the box on the main job
    workflow = for_checkpoint(workflow, named, without_text_encoder=generated_models.lacks_text_encoder(named),
                              steps=2, size=128)
    for node in workflow.values():
        if node["class_type"] == "LoadImage":
            server.upload_image(node["inputs"]["image"], example_input_png())
    run = server.run(workflow)
    assert run.succeeded, run.error()
    saved = [image for node_id, node in workflow.items() if node["class_type"] == "SaveImage"
             for image in run.outputs(node_id).get("images", [])]
    assert saved and all(image["type"] == "output" for image in saved)
    headroom_nodes = [node_id for node_id, node in workflow.items() if node["class_type"].startswith("Headroom")
                      and node["class_type"] != "HeadroomTestConditioning"]
    executed = {event["data"]["node"] for event in run.events if event["type"] == "executing"}
    assert headroom_nodes and set(headroom_nodes) <= executed
