"""Sliced Attention: peak memory and time of one attention call, Headroom's chunks vs ComfyUI's kernels.

    python3 bench/bench_sliced_attention.py [--tokens 4096 8192 16384] [--target-mb 256] [--repeats 3]
                                            [--max-gb 12] [--device cpu|cuda]

Runs in the newest pinned ComfyUI (prepared like the test suite): the baselines are ComfyUI's own
attention functions, Headroom runs through the override the node installs (method "chunked").
Shapes: batch 2 (cond + uncond), 8 heads, head size 40, fp32 — SD1.5's first level, where 4096
tokens is 512x512 and 16384 is 1024x1024. Kernels:
  math            ComfyUI attention_basic: q @ k^T, softmax, @ v over the whole score matrix
  sdpa            ComfyUI attention_pytorch: PyTorch SDPA unchunked (on this CPU its flash kernel),
                  the fastest unchunked kernel available here
  headroom        Headroom chunked under the target, SDPA per chunk (the node's "chunked" method)
  headroom-math   the same chunks through the math kernel: what a device without a memory-efficient
                  kernel (Kepler, MPS, math-only SDPA) materialises per chunk
Memory (CPU): every measurement in a fresh subprocess; peak RSS (ru_maxrss) after the call minus
ru_maxrss just before it, with the inputs already allocated. A case whose predicted peak exceeds
--max-gb (or what the machine has free) is not run: its figure is computed from the formula.
Time: in this process, kernels interleaved repeat by repeat; medians; ratios in the same run:
headroom / sdpa (goal <= 1.10) and headroom-math / math (the price of chunking on the math path).
--device cuda measures torch.cuda.max_memory_allocated in-process instead of RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
BATCH, HEADS, HEAD_DIM, FP32 = 2, 8, 40, 4
MB, GB = 2 ** 20, 2 ** 30
KERNELS = ("math", "sdpa", "headroom", "headroom-math")


def predicted_peak_bytes(kernel: str, tokens: int, target_bytes: int) -> int:
    """What a kernel allocates for one call, by formula (upper bounds for the fused SDPA kernels)."""
    inputs = BATCH * tokens * HEADS * HEAD_DIM * FP32  # one of q, k, v, or the output
    if kernel == "math":
        # attention_basic: [B*heads, N, dim] copies of q, k, v; scores and their softmax alive together
        return 2 * BATCH * HEADS * tokens * tokens * FP32 + 4 * inputs
    if kernel == "sdpa":
        return inputs  # the flash kernel keeps only the output and per-thread blocks
    return target_bytes  # Headroom sizes its chunks so the whole call fits


def comfy_kernels():
    """ComfyUI (imported on the CPU, as the test hosts run it) and its attention functions."""
    import comfy_host
    nodes = comfy_host.import_comfyui()
    comfy_host.load_pack(nodes)
    import comfy.ldm.modules.attention as attention
    return comfy_host, attention


def attention_call(kernel: str, target_bytes: int, comfy_host, attention, records=None):
    """fn(q, k, v) running one ComfyUI-layout attention call with `kernel`; Headroom's calls
    append what they did (memory.attention.AttentionCall) to `records`."""
    if kernel == "math":
        return lambda q, k, v: attention.attention_basic(q, k, v, HEADS)
    if kernel == "sdpa":
        return lambda q, k, v: attention.attention_pytorch(q, k, v, HEADS)
    core = comfy_host.pack_module("memory.attention")
    plan = core.AttentionPlan(target_bytes=target_bytes, method="chunked",
                              kernel="sdpa" if kernel == "headroom" else "math")
    override = core.make_attention_override(plan, on_call=None if records is None else records.append)
    # exactly what ComfyUI's wrap_attn does when the node's override is installed on a model
    return lambda q, k, v: override(attention.attention_pytorch, q, k, v, HEADS,
                                    transformer_options={}, _inside_attn_wrapper=True)


def inputs(tokens: int, device: str):
    import torch
    generator = torch.Generator().manual_seed(tokens)
    return [torch.randn(BATCH, tokens, HEADS * HEAD_DIM, generator=generator).to(device) for _ in range(3)]


def measure_memory_here(kernel: str, tokens: int, target_bytes: int, device: str) -> dict:
    """One call in this (fresh) process: extra peak bytes over the state just before it."""
    import psutil
    import torch
    comfy_host, attention = comfy_kernels()
    call = attention_call(kernel, target_bytes, comfy_host, attention)
    q, k, v = inputs(tokens, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call(q, k, v)
        torch.cuda.synchronize()
        return {"extra_bytes": torch.cuda.max_memory_allocated() - before, "baseline_gap_bytes": 0}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the baseline is a high-water mark: it only stands for "just before" if nothing earlier peaked above now
    gap = before - psutil.Process().memory_info().rss
    call(q, k, v)
    return {"extra_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
            "baseline_gap_bytes": gap}


def measure_memory(kernel: str, tokens: int, target_bytes: int, device: str) -> dict:
    command = [sys.executable, "-P", __file__, "--inside", "--child", kernel, str(tokens),
               "--target-mb", str(target_bytes // MB), "--device", device]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def fits(predicted: int, max_bytes: int, device: str) -> bool:
    import psutil
    if device == "cuda":
        import torch
        return predicted <= min(max_bytes, torch.cuda.mem_get_info()[0])
    margin = 2 * GB  # the child's own ComfyUI import and inputs
    return predicted <= max_bytes and predicted + margin <= psutil.virtual_memory().available


def memory_table(tokens_list, target_bytes: int, max_bytes: int, device: str) -> None:
    print(f"\nPeak extra memory of one call ({'max_memory_allocated' if device == 'cuda' else 'RSS'}), "
          f"target {target_bytes // MB} MB; goal: headroom <= {1.1 * target_bytes / MB:.0f} MB")
    print("| tokens | " + " | ".join(KERNELS) + " |")
    print("|---|" + "---|" * len(KERNELS))
    for tokens in tokens_list:
        cells = []
        for kernel in KERNELS:
            predicted = predicted_peak_bytes(kernel, tokens, target_bytes)
            if not fits(predicted, max_bytes, device):
                cells.append(f"not run: {predicted / GB:.1f} GB by formula")
                continue
            measured = measure_memory(kernel, tokens, target_bytes, device)
            cell = f"{measured['extra_bytes'] / MB:.0f} MB"
            if measured["baseline_gap_bytes"] > 16 * MB:
                cell += f" (baseline peak {measured['baseline_gap_bytes'] / MB:.0f} MB above RSS)"
            cells.append(cell)
        print(f"| {tokens} | " + " | ".join(cells) + " |", flush=True)


def time_table(tokens_list, target_bytes: int, repeats: int, max_bytes: int, device: str) -> None:
    import torch
    comfy_host, attention = comfy_kernels()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"\nTime of one call, median of {repeats} interleaved repeats (after one warm-up each)")
    print("| tokens | sdpa | headroom | headroom / sdpa | math | headroom-math | headroom-math / math |")
    print("|---|---|---|---|---|---|---|")
    chunking = []
    for tokens in tokens_list:
        q, k, v = inputs(tokens, device)
        records = {kernel: [] for kernel in KERNELS}
        calls = {kernel: attention_call(kernel, target_bytes, comfy_host, attention, records[kernel])
                 for kernel in KERNELS if fits(predicted_peak_bytes(kernel, tokens, target_bytes), max_bytes, device)}
        seconds = {kernel: [] for kernel in calls}
        for kernel, call in calls.items():
            call(q, k, v)  # warm-up
        for _ in range(repeats):
            for kernel, call in calls.items():
                sync()
                started = time.perf_counter()
                call(q, k, v)
                sync()
                seconds[kernel].append(time.perf_counter() - started)
        median = {kernel: statistics.median(values) for kernel, values in seconds.items()}

        def cell(kernel):
            return f"{median[kernel] * 1e3:.0f} ms" if kernel in median else "not run"

        def ratio(kernel, baseline):
            return f"{median[kernel] / median[baseline]:.3f}" if {kernel, baseline} <= set(median) else "—"

        print(f"| {tokens} | {cell('sdpa')} | {cell('headroom')} | {ratio('headroom', 'sdpa')} | {cell('math')} | "
              f"{cell('headroom-math')} | {ratio('headroom-math', 'math')} |", flush=True)
        chunking += [f"{kernel} at {tokens}: {record.chunk_count} chunk(s) of {record.query_chunk} rows "
                     f"({record.kernel}, estimate {record.estimated_bytes / MB:.0f} MB)"
                     for kernel in ("headroom", "headroom-math") for record in records[kernel][-1:]]
        del q, k, v
    print("\n".join(["Headroom's chunks:", *chunking]))


def main(tokens_list, target_mb: int, repeats: int, max_gb: float, device: str) -> None:
    import torch
    target_bytes, max_bytes = target_mb * MB, int(max_gb * GB)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"Python {platform.python_version()}, torch {torch.__version__}, "
          f"ComfyUI at {os.environ['HEADROOM_COMFYUI_DIR'].rstrip('/').split('/')[-1][:8]}, device {device}; "
          f"batch {BATCH}, {HEADS} heads, head size {HEAD_DIM}, fp32; no case above {max_gb:g} GB")
    memory_table(tokens_list, target_bytes, max_bytes, device)
    time_table(tokens_list, target_bytes, repeats, max_bytes, device)


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    arguments.add_argument("--target-mb", type=int, default=256)
    arguments.add_argument("--repeats", type=int, default=3)
    arguments.add_argument("--max-gb", type=float, default=12.0)
    arguments.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    arguments.add_argument("--host", default="newest",
                           help="the pinned ComfyUI to run on (tests/hosts.toml): newest (default) or a name such as v0.12.1")
    arguments.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    arguments.add_argument("--child", nargs=2, metavar=("KERNEL", "TOKENS"), help=argparse.SUPPRESS)
    parsed = arguments.parse_args()
    if not parsed.inside:
        from hosts import exec_in_host
        exec_in_host(pathlib.Path(__file__), ["--inside", *sys.argv[1:]], parsed.host)
    if parsed.child:
        print(json.dumps(measure_memory_here(parsed.child[0], int(parsed.child[1]), parsed.target_mb * MB,
                                             parsed.device)))
    else:
        main(parsed.tokens, parsed.target_mb, parsed.repeats, parsed.max_gb, parsed.device)
