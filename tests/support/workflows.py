"""Example workflows (workflows/*.api.json) adapted to a checkpoint, or to the generated model."""
from __future__ import annotations

import copy
import json
import pathlib

WORKFLOWS_DIR = pathlib.Path(__file__).resolve().parents[2] / "workflows"


def load_api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text())


def for_checkpoint(workflow: dict, checkpoint_name: str, generated: bool, steps: int | None = None,
                   size: int | None = None) -> dict:
    """Point every checkpoint loader at `checkpoint_name`.

    The generated model has no text encoder, so for it each CLIPTextEncode becomes the test-only
    HeadroomTestConditioning (seeded SD1.5-shaped conditioning). `steps`/`size` shrink the run.
    """
    adapted = copy.deepcopy(workflow)
    for node_id, node in adapted.items():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint_name
        elif node["class_type"] == "CLIPTextEncode" and generated:
            adapted[node_id] = {"class_type": "HeadroomTestConditioning", "inputs": {"seed": int(node_id)}}
        elif node["class_type"] in ("KSampler", "KSamplerAdvanced") and steps is not None:
            inputs["steps"] = steps
        elif node["class_type"] == "EmptyLatentImage" and size is not None:
            inputs["width"] = inputs["height"] = size
    return adapted
