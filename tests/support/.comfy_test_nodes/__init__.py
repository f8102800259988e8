"""Nodes the test servers load beside the pack; never shipped to users.

HeadroomTestConditioning: SD1.5-shaped conditioning without CLIP.
HeadroomTestLoadedModels: what ComfyUI keeps loaded right now (passes a LATENT through, so it can
be chained between two nodes and observe the state at that point of the prompt).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # tests/support
import generated_models  # noqa: E402  (tests/support/generated_models.py)


class HeadroomTestConditioning:
    CATEGORY = "Headroom/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def make(self, seed):
        return (generated_models.text_conditioning(seed),)


class HeadroomTestLoadedModels:
    CATEGORY = "Headroom/testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("LATENT", {})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def probe(self, value):
        import comfy.model_management as model_management
        loaded = [{"device": str(entry.device), "class": type(entry.model.model).__name__}
                  for entry in model_management.current_loaded_models if entry.model is not None]
        return {"ui": {"loaded_models": [json.dumps(loaded)]}, "result": (value,)}


NODE_CLASS_MAPPINGS = {
    "HeadroomTestConditioning": HeadroomTestConditioning,
    "HeadroomTestLoadedModels": HeadroomTestLoadedModels,
}
