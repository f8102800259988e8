"""Example workflows (workflows/*.api.json) adapted to a checkpoint, or to the generated model."""
from __future__ import annotations

import copy
import json
import pathlib

WORKFLOWS_DIR = pathlib.Path(__file__).resolve().parents[2] / "workflows"


def load_api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text())


def checkpoint_name(workflow: dict) -> str:
    """The one checkpoint an API-format workflow loads."""
    (name,) = {node["inputs"]["ckpt_name"] for node in workflow.values()
               if node["class_type"] == "CheckpointLoaderSimple"}
    return name


def for_checkpoint(workflow: dict, checkpoint_name: str, without_text_encoder: bool, steps: int | None = None,
                   size: int | None = None) -> dict:
    """Point every checkpoint loader at `checkpoint_name`.

    A checkpoint without a text encoder (the tiny generated one) gets the test-only
    HeadroomTestConditioning (seeded SD1.5-shaped conditioning) in place of each CLIPTextEncode.
    `steps` shrinks the run; `size` sets the image side and scales what is measured in pixels with it
    (masks, their position, the Tiled Inpaint tiles), so the example's layout stays the same.
    """
    adapted = copy.deepcopy(workflow)
    widths = [node["inputs"]["width"] for node in adapted.values() if node["class_type"] == "EmptyLatentImage"]
    scale = size / widths[0] if size is not None and widths else 1.0

    def scaled(value: int, multiple: int = 1, least: int = 0) -> int:
        return max(least, multiple * round(value * scale / multiple))

    for node_id, node in adapted.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint_name
        elif kind == "CLIPTextEncode" and without_text_encoder:
            adapted[node_id] = {"class_type": "HeadroomTestConditioning", "inputs": {"seed": int(node_id)}}
        elif kind == "EmptyLatentImage" and size is not None:
            inputs["width"] = inputs["height"] = size
        elif kind == "SolidMask":
            inputs["width"], inputs["height"] = scaled(inputs["width"]), scaled(inputs["height"])
        elif kind == "MaskComposite":
            inputs["x"], inputs["y"] = scaled(inputs["x"]), scaled(inputs["y"])
        if kind == "HeadroomTiledInpaint" and scale != 1.0:
            inputs["tile_size"] = scaled(inputs["tile_size"], 8, 64)
            inputs["overlap"] = scaled(inputs["overlap"], 8)
            inputs["mask_grow"], inputs["mask_feather"] = scaled(inputs["mask_grow"]), scaled(inputs["mask_feather"])
        if kind in ("KSampler", "KSamplerAdvanced", "HeadroomTiledInpaint") and steps is not None:
            inputs["steps"] = steps
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


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    """A UI-format workflow (loads by drag-and-drop) for an API-format prompt; the inverse of ui_to_api.

    Nodes are laid out in columns by their depth in the graph.
    """
    depth = {}

    def depth_of(node_id):
        if node_id not in depth:
            sources = [value[0] for value in prompt[node_id]["inputs"].values() if isinstance(value, list)]
            depth[node_id] = 1 + max((depth_of(source) for source in sources), default=-1)
        return depth[node_id]

    links, nodes, rows = [], [], {}
    for node_id in sorted(prompt, key=int):
        depth_of(node_id)
    for order, node_id in enumerate(sorted(prompt, key=lambda n: (depth[n], int(n)))):
        node = prompt[node_id]
        info = object_info[node["class_type"]]
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order_names = info.get("input_order", {})
        names = order_names.get("required", []) + order_names.get("optional", []) if order_names else list(declared)
        inputs, widgets = [], []
        for name in names:
            value = node["inputs"].get(name)
            kind = declared[name][0]
            options = declared[name][1] if len(declared[name]) > 1 else {}
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), len(inputs),
                              object_info[prompt[value[0]]["class_type"]]["output"][value[1]]])
                inputs.append({"name": name, "type": kind if isinstance(kind, str) else "COMBO",
                               "link": links[-1][0]})
            elif isinstance(kind, list) or kind in WIDGET_TYPES:
                if value is None:
                    continue
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
            elif value is None:
                inputs.append({"name": name, "type": kind, "link": None})
        row = rows.get(depth[node_id], 0)
        rows[depth[node_id]] = row + 1
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [40 + 380 * depth[node_id], 80 + 300 * row],
                      "size": [340, 260], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets})
    by_id = {node["id"]: node for node in nodes}
    for node in nodes:
        info = object_info[node["type"]]
        node["outputs"] = [{"name": name, "type": kind, "slot_index": slot,
                            "links": [link[0] for link in links if link[1] == node["id"] and link[2] == slot]}
                           for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    assert set(by_id) == {int(n) for n in prompt}
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}
