"""Memory Report: what recording a stage costs, and the server's RAM over many prompts of the combined workflow.

    python3 bench/bench_memory_report.py [--prompts N] [--stages N]

Runs in the newest pinned ComfyUI (prepared like the test suite), CPU.
  stage cost   in process: `Journal.stage()` around an empty block (reading and resetting the peak counters,
               the RSS at its end), median of --stages calls, against one step of the tiny SD1.5 model at
               256x256 sampled in the same run (median of 20), so the ratio says what a stage adds to a step.
  prompts      `main.py --cpu` with the pack; the combined workflow (big_model_small_gpu, generated model with a
               text encoder, 256x256, 4 steps) queued --prompts times through POST /prompt, a new seed each time
               so nothing is cached; after each: the server's RSS once settled, the Memory Report's peak RAM and
               stage count, the prompt's wall time. The acceptance check: RSS after the last within 5 % of after
               the second, and no "Potential memory leak" in ComfyUI's log.
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
MIB = 2 ** 20


def main(prompts: int, stages: int) -> None:
    import comfy_host
    import generated_models
    from example_workflows import for_checkpoint, load_api_workflow
    from server import ComfyServer

    nodes = comfy_host.import_comfyui()
    comfy_host.load_pack(nodes)
    journal_class = comfy_host.pack_module("memory.report").Journal
    journal = journal_class("bench")

    def one_stage():
        with journal.stage("sampling", "bench", "cpu"):
            pass

    for _ in range(100):
        one_stage()
    samples = []
    for _ in range(stages):
        journal.stages.clear()
        started = time.perf_counter()
        one_stage()
        samples.append(time.perf_counter() - started)
    per_stage = statistics.median(samples)

    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(str(generated_models.tiny_sd15_checkpoint()),
                                                  output_vae=False, output_clip=False)[0]
    comfy_host.sample(nodes, model, steps=1, size=256)  # warm-up
    step_times = []
    for seed in range(20):
        started = time.perf_counter()
        comfy_host.sample(nodes, model, seed=seed, steps=1, size=256)
        step_times.append(time.perf_counter() - started)
    per_step = statistics.median(step_times)

    checkpoint = generated_models.tiny_sd15_te_checkpoint()
    server = ComfyServer(comfy_host.comfyui_dir(), checkpoints=[checkpoint], with_test_nodes=False).start()
    rows = []
    try:
        for seed in range(prompts):
            workflow = for_checkpoint(load_api_workflow("big_model_small_gpu"), checkpoint.name,
                                      without_text_encoder=False, steps=4, size=256)
            workflow["8"]["inputs"]["seed"] = workflow["14"]["inputs"]["seed"] = seed
            started = time.perf_counter()
            run = server.run(workflow)
            seconds = time.perf_counter() - started
            assert run.succeeded, run.error()
            (report,) = run.outputs("15")["headroom_report"]
            rows.append((server.settled_rss(), report["peak_ram_bytes"], len(report["stages"]), seconds))
        leak_warnings = server.log_text().count("Potential memory leak")
    finally:
        server.cleanup()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"ComfyUI at {comfy_host.comfyui_dir().name[:8]}, CPU")
    print(f"stage cost: {per_stage * 1e6:.0f} µs per stage (median of {stages}); one sampling step of the tiny "
          f"model at 256x256: {per_step * 1e3:.1f} ms; stage/step = {per_stage / per_step:.4f}")
    print("| prompt | server RSS after | report peak RAM | stages | seconds |")
    print("|---|---|---|---|---|")
    for index, (rss, peak, count, seconds) in enumerate(rows, 1):
        print(f"| {index} | {rss / MIB:.1f} MiB | {peak / MIB:.1f} MiB | {count} | {seconds:.2f} |")
    if len(rows) >= 2:
        growth = (rows[-1][0] - rows[1][0]) / rows[1][0]
        print(f"RSS after prompt {len(rows)} vs after prompt 2: {growth:+.2%} (acceptance: within ±5 %); "
              f"median prompt {statistics.median(row[3] for row in rows):.2f} s; "
              f"'Potential memory leak' in the log: {leak_warnings}")


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--prompts", type=int, default=20)
    arguments.add_argument("--stages", type=int, default=2000)
    arguments.add_argument("--host", default="newest",
                           help="the pinned ComfyUI to run on (tests/hosts.toml): newest (default) or a name such as v0.12.1")
    arguments.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parsed = arguments.parse_args()
    if not parsed.inside:
        from hosts import exec_in_host
        exec_in_host(pathlib.Path(__file__), ["--inside", *sys.argv[1:]], parsed.host)
    main(parsed.prompts, parsed.stages)
