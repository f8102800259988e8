"""One host and patcher kind of the GPU check, in its own process (ComfyUI is imported once per process).

    python3 -P bench/gpu_check/gpu_worker.py --variant v0.33.0-dynamic --comfyui-dir DIR --flags "" \
        --out results.json --log log.txt --deadline EPOCH [--checks 1-offload-sdxl,...] [--dry-run]

run.py starts it; it imports ComfyUI from DIR the way that version's main.py starts (ComfyUI's own argument
parser on --flags, comfy-aimdo set up as main.py does it, cudaMallocAsync where main.py enables it), loads the
pack with ComfyUI's custom-node loader, runs the checks in order and rewrites --out after each one, so a worker
stopped at the deadline leaves what it finished. A check whose estimate does not fit before --deadline is
recorded as skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def start_comfyui(comfyui_dir: pathlib.Path, flags: list[str]) -> dict:
    """Import ComfyUI as its main.py does for these command-line flags, up to the point where main.py would
    start the server; return what was set up. Mirrors main.py of v0.33.0 (aimdo.control.init before torch,
    cuda_malloc, then init_devices and ModelPatcherDynamic as the core patcher) and of v0.12.1 (imports
    comfy_aimdo; dynamic VRAM only with --fast dynamic_vram, which the check never passes)."""
    sys.path.insert(0, str(comfyui_dir))
    sys.argv = [str(comfyui_dir / "main.py"), *flags]
    import comfy.options
    comfy.options.enable_args_parsing()
    from comfy import cli_args
    args = cli_args.args
    new_style = hasattr(args, "disable_dynamic_vram")  # v0.15+: dynamic VRAM is the default on NVIDIA
    setup = {"flags": flags, "dynamic_vram_requested": False, "aimdo_enabled": False}
    if new_style and cli_args.enables_dynamic_vram():
        import comfy_aimdo.control
        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
        except TypeError:  # the protocols of older comfy-aimdo releases, as main.py tries them
            try:
                comfy_aimdo.control.init(simple_vram_headroom=headroom)
            except TypeError:
                comfy_aimdo.control.init()
    if (comfyui_dir / "cuda_malloc.py").exists():
        import cuda_malloc  # noqa: F401  (main.py: cudaMallocAsync on cu130 torch, before torch is imported)
    setup["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    import torch
    import comfy.utils  # noqa: F401
    import nodes
    import comfy.model_management as management
    import comfy.model_patcher as model_patcher
    if new_style:
        import comfy.memory_management as memory_management
        import comfy_aimdo.control
        if args.enable_dynamic_vram or (cli_args.enables_dynamic_vram() and management.is_nvidia()):
            setup["dynamic_vram_requested"] = True
            if args.enable_dynamic_vram or management.torch_version_numeric >= (2, 8):
                devices = management.get_all_torch_devices()
                try:
                    ready = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3))
                                                             for d in devices)
                except TypeError:
                    ready = comfy_aimdo.control.init_devices(d.index for d in devices)
                if ready:
                    comfy_aimdo.control.set_log_info()
                    model_patcher.CoreModelPatcher = model_patcher.ModelPatcherDynamic
                    memory_management.aimdo_enabled = True
                    setup["aimdo_enabled"] = True
    elif hasattr(cli_args, "enables_dynamic_vram"):
        import comfy_aimdo.control  # noqa: F401  (v0.12.1's main.py imports both)
        import comfy_aimdo.torch  # noqa: F401
    core = getattr(model_patcher, "CoreModelPatcher", model_patcher.ModelPatcher)
    setup.update(core_patcher=core.__name__, torch=torch.__version__, python=platform.python_version(),
                 device=str(management.get_torch_device()))
    for package in ("comfy-aimdo", "comfy-kitchen", "av", "transformers"):
        try:
            import importlib.metadata
            setup[f"{package} version"] = importlib.metadata.version(package)
        except Exception:
            setup[f"{package} version"] = None
    return {"nodes": nodes, "setup": setup}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--dynamic", action="store_true", help="the variant is the dynamic VRAM one")
    parser.add_argument("--comfyui-dir", type=pathlib.Path, required=True)
    parser.add_argument("--flags", default="")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--log", type=pathlib.Path, required=True)
    parser.add_argument("--deadline", type=float, required=True)
    parser.add_argument("--checks", default="")
    parser.add_argument("--dry-run", action="store_true")
    options = parser.parse_args()
    started = time.time()

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    to_file = logging.FileHandler(options.log, mode="w")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.ERROR)
    root.addHandler(to_console)

    results = {"variant": options.variant, "host": options.host, "dry_run": options.dry_run,
               "dynamic_variant": options.dynamic, "comfyui_dir": str(options.comfyui_dir), "checks": []}

    def write() -> None:
        partial = options.out.with_suffix(".part")
        partial.write_text(json.dumps(results, indent=1, sort_keys=True))
        partial.replace(options.out)

    try:
        started_comfy = time.perf_counter()
        flags = options.flags.split()
        comfyui = start_comfyui(options.comfyui_dir.resolve(), flags)
        # after ComfyUI's folder: tests/support has a server.py, and ComfyUI's `server` must win
        sys.path.extend([str(HERE), str(REPO_ROOT / "tests" / "support")])
        import comfy_host
        import torch
        from gpu_checks import Context, checks_in_run_order, run_check
        from gpu_probes import Cards, MemorySampler, ProcessMemory
        nodes = comfyui["nodes"]
        import comfy.utils
        comfy.utils.PROGRESS_BAR_ENABLED = False  # KSampler's and Tiled Inpaint's bars would fill the output
        comfy_host.load_pack(nodes)
        if options.dry_run:
            device, index = torch.device("cpu"), None
        else:
            import comfy.model_management
            device = comfy.model_management.get_torch_device()
            index = device.index or 0
        memory = ProcessMemory(index)
        if index is not None:
            torch.empty(1, device=device)  # the CUDA context, so NVML lists this process
            memory.bind_process()
        sampler = MemorySampler(memory).start()
        cards = Cards(memory, sampler, index)
        ctx = Context(nodes, options.variant, options.dry_run, device, memory, sampler, cards)
        results["setup"] = {**comfyui["setup"], "memory_source": memory.source,
                            "start_seconds": round(time.perf_counter() - started_comfy, 2)}
        if options.dry_run and options.dynamic:
            results["setup"]["note"] = ("dry run: the dynamic variant runs the legacy ModelPatcher on the CPU "
                                        "(ComfyUI's ModelPatcherDynamic needs a GPU load device)")
        if index is not None:
            results["setup"]["gpu"] = torch.cuda.get_device_name(index)
        print(f"[gpu-check] {options.variant}: ComfyUI started in {results['setup']['start_seconds']} s, "
              f"core patcher {results['setup']['core_patcher']}, aimdo "
              f"{'on' if results['setup']['aimdo_enabled'] else 'off'}, memory from {memory.source}", flush=True)
        write()
    except Exception:
        results["error"] = traceback.format_exc()
        write()
        print(f"[gpu-check] {options.variant}: could not start ComfyUI:\n{results['error']}", flush=True)
        return 1

    wanted = [name for name in options.checks.split(",") if name]
    for check in checks_in_run_order():
        if wanted and check.id not in wanted:
            continue
        estimate = check.dry_estimate_s if options.dry_run else check.gpu_estimate_s
        left = options.deadline - time.time()
        skip = None
        if check.dynamic_only and not options.dynamic:
            skip = "dynamic VRAM only"
        elif check.dynamic_only and not ctx.is_dynamic and not options.dry_run:
            skip = "dynamic VRAM did not start on this machine"
        elif estimate > left:
            skip = f"time budget: needs ~{estimate:.0f} s (estimate), {max(0.0, left):.0f} s left"
        if skip:
            results["checks"].append({"id": check.id, "title": check.title, "status": "skipped", "reason": skip})
            print(f"[gpu-check] {options.variant} {check.id}: skipped ({skip})", flush=True)
            write()
            continue
        print(f"[gpu-check] {options.variant} {check.id}: {check.title} ...", flush=True)
        result = run_check(ctx, check)
        results["checks"].append(result)
        write()
        print(f"[gpu-check] {options.variant} {check.id}: {result['status']} in {result['seconds']:.1f} s "
              f"(estimate {estimate:.0f} s)", flush=True)
        for goal in result["goals"]:
            met = {True: "met", False: "NOT MET", None: "not judged"}[goal["met"]]
            print(f"    {goal['name']}: {goal['figure']} (goal {goal['goal']}) {met}", flush=True)
        if result["error"]:
            print("    " + result["error"].strip().replace("\n", "\n    "), flush=True)
    sampler.stop()
    results["seconds"] = round(time.time() - started, 2)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
