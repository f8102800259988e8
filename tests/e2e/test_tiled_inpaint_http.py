"""Tiled Inpaint through ComfyUI's HTTP API: listed with tooltips; the example workflow (an uploaded
PNG whose transparent parts are the mask, through LoadImage) runs with one websocket progress step per
sampled tile and keeps the pixels outside the mask; bad input is refused naming the input."""
import io
import json
import urllib.parse
import urllib.request

import numpy
import pytest
import torch
from PIL import Image

from comfyui_headroom.memory.tiles import feather_mask, grow_mask, plan_grid, select_tiles
from example_workflows import for_checkpoint, load_api_workflow
from server import PromptRejected

WIDTH, HEIGHT, TILE, OVERLAP = 1024, 256, 256, 32  # one row of 5 tiles
HOLES = [(100, 20), (100, 560), (100, 980)]  # (y, x) of 30 px transparent squares: 3 of the 5 tiles
INPAINT_NODE = "5"


def example_png() -> tuple[bytes, numpy.ndarray]:
    """An RGBA PNG of noise with transparent squares (LoadImage's mask is 1 - alpha), and its mask."""
    rgb = numpy.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=numpy.uint8)
    alpha = numpy.full((HEIGHT, WIDTH, 1), 255, dtype=numpy.uint8)
    for y, x in HOLES:
        alpha[y:y + 30, x:x + 30] = 0
    buffer = io.BytesIO()
    Image.fromarray(numpy.concatenate([rgb, alpha], axis=2), "RGBA").save(buffer, format="PNG")
    return buffer.getvalue(), (alpha[..., 0] == 0).astype(numpy.float32)


def saved_image(server, image: dict) -> numpy.ndarray:
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"],
                                    "type": image["type"]})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as response:
        return numpy.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


@pytest.fixture(scope="module")
def example(server, tiny_checkpoint):
    """The example workflow on the generated model with an uploaded image, plus a copy of the loaded image."""
    data, mask = example_png()
    workflow = for_checkpoint(load_api_workflow("tiled_inpaint"), tiny_checkpoint.name, without_text_encoder=True,
                              steps=1)
    assert server.upload_image(workflow["2"]["inputs"]["image"], data) == workflow["2"]["inputs"]["image"]
    workflow[INPAINT_NODE]["inputs"].update(tile_size=TILE, overlap=OVERLAP)
    workflow["7"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loaded_copy"}}
    return workflow, mask


def test_object_info_lists_tiled_inpaint_with_tooltips(server):
    info = server.get("/object_info/HeadroomTiledInpaint")["HeadroomTiledInpaint"]
    assert info["display_name"] == "Tiled Inpaint" and info["category"] == "Headroom"
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"model", "positive", "negative", "vae", "image", "mask", "tile_size", "overlap",
                           "mask_grow", "mask_feather", "seed", "steps", "cfg", "sampler_name", "scheduler",
                           "denoise"}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert inputs["tile_size"][1]["default"] == 640 and inputs["tile_size"][1]["step"] == 8
    assert "euler" in inputs["sampler_name"][1]["options"] and "normal" in inputs["scheduler"][1]["options"]
    assert info["output"] == ["IMAGE", "STRING"] and info["output_name"] == ["IMAGE", "plan"]


def test_the_example_workflow_reports_one_progress_step_per_sampled_tile(server, example):
    workflow, mask = example
    run = server.run(workflow)
    assert run.succeeded, run.error()
    final = feather_mask(grow_mask(torch.from_numpy(mask), 16), 16)  # the example's mask_grow/feather
    sampled = len(select_tiles(plan_grid(HEIGHT, WIDTH, TILE, OVERLAP), final))
    assert sampled == 3
    progress = [(event["data"]["value"], event["data"]["max"]) for event in run.events
                if event["type"] == "progress" and event["data"]["node"] == INPAINT_NODE]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert run.outputs(INPAINT_NODE)["text"] == ["tiles: 5 in grid (256 px, overlap 32 px), 3 sampled, 2 skipped"]
    inpainted = saved_image(server, run.outputs("6")["images"][0])
    loaded = saved_image(server, run.outputs("7")["images"][0])
    outside = final.numpy() == 0
    assert numpy.array_equal(inpainted[outside], loaded[outside])  # the same bytes as the image passed through
    holes = mask == 1
    assert (inpainted[holes] != loaded[holes]).any(axis=-1).mean() > 0.9
    assert "Headroom tiled inpaint: image=1024x256 batch=1 tile=256px overlap=32px grid=5 sampled=3 skipped=2" \
        in server.log_text()


@pytest.mark.parametrize("settings, message", [
    ({"tile_size": 100}, "tile_size 100 px is not a multiple of 8"),
    ({"tile_size": 256, "overlap": 256}, "overlap 256 px must be smaller than tile_size 256 px"),
])
def test_bad_tiling_is_refused_at_queue_time_naming_the_input(server, example, settings, message):
    workflow = json.loads(json.dumps(example[0]))
    del workflow["7"]  # ComfyUI runs the outputs that validate; only a prompt with none is rejected
    workflow[INPAINT_NODE]["inputs"].update(settings)
    with pytest.raises(PromptRejected) as rejected:
        server.queue(workflow)
    errors = rejected.value.body["node_errors"][INPAINT_NODE]["errors"]
    assert any(message in error["details"] for error in errors), errors


def test_a_mask_of_another_size_fails_naming_the_inputs_and_the_next_prompt_runs(server, example):
    workflow = json.loads(json.dumps(example[0]))
    workflow["8"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    workflow[INPAINT_NODE]["inputs"]["mask"] = ["8", 0]
    run = server.run(workflow)
    assert not run.succeeded
    error = run.error()
    assert error["node_type"] == "HeadroomTiledInpaint"
    assert "mask is 64x64 px but image is 1024x256 px" in error["exception_message"]
    again = server.run(example[0])
    assert again.succeeded, again.error()
