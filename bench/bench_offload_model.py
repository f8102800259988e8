"""Offload Model on the CPU: what a budget costs, and what the node costs when it changes nothing.

    python3 bench/bench_offload_model.py [--repeats 3] [--size 512] [--steps 4]

In-process in the newest pinned ComfyUI (prepared like the test suite), `--cpu`, a full-size
SD1.5-shaped UNet (860 M params, random weights generated into the cache: time does not depend on
the values), euler, cfg 7, batch 1. Three configurations, interleaved repeat by repeat (A B C A B C ...)
so that drift on this shared machine hits all alike; each figure is the median of the repeats:
  plain       the model as loaded (no Headroom node)
  generous    Offload Model with a budget of all the weights (nothing is trimmed: the node's idle cost)
  budget 25%  Offload Model with 25 % of the weights resident; ComfyUI streams the rest
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
GB = 2 ** 30


def main(repeats: int, size: int, steps: int) -> None:
    import comfy_host
    import generated_models
    nodes = comfy_host.import_comfyui()
    comfy_host.load_pack(nodes)
    import comfy.sample
    import comfy.sd
    import torch

    unet_path = generated_models.full_sd15_unet()
    model = comfy.sd.load_diffusion_model(str(unet_path))
    weights = model.model_size()
    offload = nodes.NODE_CLASS_MAPPINGS["HeadroomOffloadModel"]

    def with_budget(share):
        return comfy_host.run_v3_node(offload, model=model, budget_gb=weights * share / GB, keep_free_gb=0.0,
                                      text_encoder_and_vae="keep loaded").args[0]

    configurations = {"plain": model, "generous": with_budget(1.0), "budget 25%": with_budget(0.25)}
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    positive, negative = generated_models.text_conditioning(1), generated_models.text_conditioning(2)
    peak_resident = {name: 0 for name in configurations}

    def run(name):
        patcher = configurations[name]

        def each_step(step, x0, x, total):
            peak_resident[name] = max(peak_resident[name], patcher.loaded_size())

        started = time.perf_counter()
        comfy.sample.sample(patcher, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                            callback=each_step, seed=0, disable_pbar=True)
        return time.perf_counter() - started

    run("plain")  # warm-up: first load, allocator growth
    seconds = {name: [] for name in configurations}
    for _ in range(repeats):
        for name in configurations:
            seconds[name].append(run(name))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, ComfyUI at {comfy_host.comfyui_dir().name[:8]}, --cpu; "
          f"UNet {weights / GB:.2f} GB fp32, {size}x{size}, {steps} steps, {repeats} repeats interleaved")
    print("| configuration | median s | ratio to plain | max resident weights |")
    print("|---|---|---|---|")
    for name in configurations:
        print(f"| {name} | {median[name]:.2f} | {median[name] / median['plain']:.3f} | "
              f"{peak_resident[name] / GB:.2f} GB |")
    print("raw seconds:", {name: [round(value, 2) for value in values] for name, values in seconds.items()})


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--repeats", type=int, default=3)
    arguments.add_argument("--size", type=int, default=512)
    arguments.add_argument("--steps", type=int, default=4)
    arguments.add_argument("--host", default="newest",
                           help="the pinned ComfyUI to run on (tests/hosts.toml): newest (default) or a name such as v0.12.1")
    arguments.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parsed = arguments.parse_args()
    if not parsed.inside:
        from hosts import exec_in_host
        exec_in_host(pathlib.Path(__file__), ["--inside", *sys.argv[1:]], parsed.host)
    main(parsed.repeats, parsed.size, parsed.steps)
