"""Force GC: what one call costs, below the threshold and when it acts, inside real ComfyUI.

    python3 bench/bench_force_gc.py [--repeats N]

Runs in-process in the newest pinned ComfyUI (prepared like the test suite), CPU. The node is run
through ComfyUI's own V3 machinery. Three cases, each the median of N calls in this one run:
  skip     threshold 100 %: the node must return without collecting (the cost of leaving it in a workflow)
  empty    threshold 0, nothing loaded: gc.collect + cleanup + cache emptying + malloc_trim
  loaded   threshold 0 with the tiny SD1.5 model loaded by ComfyUI: the above plus unloading it
Anchor: SD.Next's forced GC costs ~0.1-0.33 s per call (research/anchors.md).
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


def median_seconds(call, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main(repeats: int) -> None:
    import comfy_host
    import generated_models
    nodes = comfy_host.import_comfyui()
    comfy_host.load_pack(nodes)
    import comfy.model_management as model_management
    import comfy.sd
    force_gc = nodes.NODE_CLASS_MAPPINGS["HeadroomForceGC"]

    def run(threshold):
        record = comfy_host.run_v3_node(force_gc, value=None, threshold_percent=threshold,
                                        unload_models=True, trim_ram=True).args[1]
        assert ("skipped" in record) == (threshold == 100.0), record
        return record

    model = comfy.sd.load_checkpoint_guess_config(str(generated_models.tiny_sd15_checkpoint()),
                                                  output_vae=False, output_clip=False)[0]

    def loaded_then_gc():
        model_management.load_models_gpu([model])
        started = time.perf_counter()
        record = run(0.0)
        assert "unloaded=[SD15]" in record, record
        return time.perf_counter() - started

    run(0.0)  # warm-up: first-call imports and allocations
    skip = median_seconds(lambda: run(100.0), repeats * 10)
    empty = median_seconds(lambda: run(0.0), repeats)
    loaded = statistics.median(loaded_then_gc() for _ in range(repeats))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"ComfyUI at {comfy_host.comfyui_dir().name[:8]}, CPU")
    print("| case | median per call | calls |")
    print("|---|---|---|")
    print(f"| below threshold (skip) | {skip * 1e6:.0f} µs | {repeats * 10} |")
    print(f"| forced, nothing loaded | {empty * 1e3:.1f} ms | {repeats} |")
    print(f"| forced, tiny SD1.5 loaded (unloads it) | {loaded * 1e3:.1f} ms | {repeats} |")
    print(f"skip / forced-with-model = {skip / loaded:.4f}")


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--repeats", type=int, default=20)
    arguments.add_argument("--host", default="newest",
                           help="the pinned ComfyUI to run on (tests/hosts.toml): newest (default) or a name such as v0.12.1")
    arguments.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parsed = arguments.parse_args()
    if not parsed.inside:
        from hosts import exec_in_host
        exec_in_host(pathlib.Path(__file__), ["--inside", *sys.argv[1:]], parsed.host)
    main(parsed.repeats)
