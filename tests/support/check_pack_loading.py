"""Run in a fresh interpreter: sample, load the pack through ComfyUI's loader, sample again.

Prints one JSON object: whether the latents are bit-identical and which ComfyUI globals changed.
A fresh process is the only honest "without the pack": once loaded, a module cannot be unloaded.
"""
import json
import sys

import comfy_host
import generated_models


def main():
    nodes = comfy_host.import_comfyui()
    import comfy.model_management as model_management
    import comfy.ops
    import comfy.sd
    checkpoint = str(generated_models.tiny_sd15_checkpoint())

    def fresh_model():
        return comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False)[0]

    watched = {name: getattr(model_management, name) for name in
               ("load_models_gpu", "free_memory", "get_torch_device", "unload_all_models", "cast_to",
                "soft_empty_cache", "get_free_memory")}
    watched["comfy.ops.cast_bias_weight"] = comfy.ops.cast_bias_weight
    registered_before = "HeadroomForceGC" in nodes.NODE_CLASS_MAPPINGS
    without_pack = comfy_host.sample(nodes, fresh_model(), seed=3)
    comfy_host.load_pack(nodes)
    with_pack = comfy_host.sample(nodes, fresh_model(), seed=3)
    current = {name: getattr(model_management, name) for name in watched if "." not in name}
    current["comfy.ops.cast_bias_weight"] = comfy.ops.cast_bias_weight
    json.dump({
        "registered_before": registered_before,
        "registered_after": "HeadroomForceGC" in nodes.NODE_CLASS_MAPPINGS,
        "bit_identical": bool(with_pack.equal(without_pack)),
        "changed_globals": sorted(name for name in watched if current[name] is not watched[name]),
    }, sys.stdout)


if __name__ == "__main__":
    main()
