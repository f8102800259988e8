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


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def load_ui_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())


def ui_to_api(ui_workflow: dict, object_info: dict) -> dict:
    """The API-format prompt a UI-format workflow stands for, as ComfyUI's frontend builds it:
    links become [source id, slot]; widget values map, in the node's input order, onto the inputs
    that are widgets (a seed's "control after generate" value is the frontend's own and skipped)."""
    links = {link[0]: link for link in ui_workflow["links"]}
    prompt = {}
    for node in ui_workflow["nodes"]:
        info = object_info[node["type"]]
        inputs = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                source = links[socket["link"]]
                inputs[socket["name"]] = [str(source[1]), source[2]]
        values = iter(node.get("widgets_values", []))
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = order.get("required", []) + order.get("optional", []) if order else list(declared)
        for name in names:
            kind, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if not is_widget or options.get("forceInput") or name in inputs:
                continue
            inputs[name] = next(values)
            if options.get("control_after_generate"):
                next(values)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
