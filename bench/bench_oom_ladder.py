"""The sampling out-of-memory ladder on the CPU: what a prompt that recovers at each rung costs.

    flock /tmp/headroom-bench.lock python3 bench/bench_oom_ladder.py [--repeats 3] [--host newest]

One process of a pinned ComfyUI (prepared like the test suite), `--cpu`. Two models: the generated tiny
SD1.5 checkpoint's UNet (latent 64x64, 3 steps) and a full-size SD1.5-shaped UNet with random weights
(latent 32x32, i.e. 256x256 pixels, 2 steps), each through Sliced Attention (chunked, 64 MB) then Offload
Model (budget: half the weights), batch 2, cfg 4, euler, so every rung of the ladder applies. A second
copy of the model is loaded before each run, so the first rung (free the other models) has something to
free. To reach rung r, out-of-memory errors are raised from inside the UNet (a forward pre-hook on its
first output block) at the first model call of the first r attempts, so a failed attempt costs little and
the figure is mostly what running under rung r's settings costs. Baseline: the same prompt, no error, in
the same process, interleaved with the injected runs. Figures: medians of `repeats` runs; ratio = median
of the recovered prompt ÷ median of the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
GB = 2 ** 30


def inside(repeats: int) -> None:
    import comfy_host
    import generated_models
    nodes = comfy_host.import_comfyui()
    comfy_host.load_pack(nodes)
    import comfy.model_management as model_management
    import comfy.sample
    import comfy.sd
    import torch

    positive, negative = generated_models.text_conditioning(1), generated_models.text_conditioning(2)

    def tiny():
        return comfy.sd.load_checkpoint_guess_config(str(generated_models.tiny_sd15_checkpoint()),
                                                     output_vae=False, output_clip=False)[0]

    def full():
        return comfy.sd.load_diffusion_model(str(generated_models.full_sd15_unet()))

    def with_headroom(model):
        sliced = comfy_host.run_v3_node(nodes.NODE_CLASS_MAPPINGS["HeadroomSlicedAttention"], model=model,
                                        target_mb=64, method="chunked", fp32=False).args[0]
        return comfy_host.run_v3_node(nodes.NODE_CLASS_MAPPINGS["HeadroomOffloadModel"], model=sliced,
                                      budget_gb=model.model_size() / 2 / GB, keep_free_gb=0.0,
                                      text_encoder_and_vae="keep loaded").args[0]

    def run_once(plain, model, other, latent_side, steps, failures):
        """Seconds of one prompt whose first `failures` attempts run out of memory; the rungs it recorded."""
        from comfy_execution.utils import CurrentNodeContext
        model_management.unload_all_models()
        model_management.load_models_gpu([other])  # what the first rung frees
        block = plain.model.diffusion_model.output_blocks[0][0]
        raised = [0]

        def hook(module, inputs):
            if raised[0] < failures:
                raised[0] += 1
                raise torch.OutOfMemoryError("CUDA out of memory (benchmark injection)")

        handle = block.register_forward_pre_hook(hook)
        latent = torch.zeros(2, 4, latent_side, latent_side)
        noise = comfy.sample.prepare_noise(latent, 0)
        prompt_id = f"bench-{time.perf_counter_ns()}"
        seconds = None
        try:
            with CurrentNodeContext(prompt_id, "3"):
                started = time.perf_counter()
                comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", positive, negative, latent,
                                    seed=0, disable_pbar=True)
                seconds = time.perf_counter() - started
        except torch.OutOfMemoryError:
            pass  # every rung failed: seconds stays None
        finally:
            handle.remove()
        journal = comfy_host.pack_module("memory.comfy.journal")
        with CurrentNodeContext(prompt_id, "3"):
            stage = [stage for stage in journal.prompt_journal().stages if stage.kind == "sampling"][-1]
        return seconds, [rung.name for rung in stage.rungs]

    results = []
    for label, load, latent_side, steps in (("tiny SD1.5", tiny, 64, 3), ("full-size SD1.5", full, 32, 2)):
        plain, other = load(), load()
        model = with_headroom(plain)
        run_once(plain, model, other, latent_side, steps, 0)  # warm-up
        ladder = len(run_once(plain, model, other, latent_side, steps, 99)[1])  # every rung fails: how many
        by_failures: dict[int, list[float]] = {}
        names: dict[int, list[str]] = {}
        for _ in range(repeats):
            for failures in range(0, ladder + 1):
                seconds, rungs = run_once(plain, model, other, latent_side, steps, failures)
                by_failures.setdefault(failures, []).append(seconds)
                names[failures] = rungs
        baseline = statistics.median(by_failures[0])
        for failures, seconds in sorted(by_failures.items()):
            results.append({"model": label, "latent": f"2x4x{latent_side}x{latent_side}", "steps": steps,
                            "rung": names[failures][-1] if names[failures] else "(no error: baseline)",
                            "rungs_tried": len(names[failures]), "median_s": statistics.median(seconds),
                            "ratio": statistics.median(seconds) / baseline, "seconds": seconds})
        del plain, other, model
        model_management.unload_all_models()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, ComfyUI at {comfy_host.comfyui_dir().name[:8]}, --cpu; "
          f"{repeats} runs per row")
    print("\n| model | latent | steps | recovered at rung | rungs tried | median s | ÷ no error |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['model']} | {row['latent']} | {row['steps']} | {row['rung']} | {row['rungs_tried']} "
              f"| {row['median_s']:.2f} | {row['ratio']:.2f} |")
    print("\nraw:", json.dumps(results))


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--repeats", type=int, default=3)
    arguments.add_argument("--host", default="newest",
                           help="the pinned ComfyUI to run on (tests/hosts.toml): newest (default) or a name such as v0.12.1")
    arguments.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parsed = arguments.parse_args()
    if not parsed.inside:
        from hosts import exec_in_host
        exec_in_host(pathlib.Path(__file__), ["--inside", *sys.argv[1:]], parsed.host)
    inside(parsed.repeats)
