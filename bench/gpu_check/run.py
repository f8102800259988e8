"""The GPU check: every GPU claim of the pack measured in one run on a lent GPU machine, under a time budget.

On the GPU machine (from the repository root, with .gpu-payload carried; README "GPU check"):

    python3 bench/gpu_check/run.py --out "$OUT"

unpacks the payload (prepare.py made it) into a scratch folder, installs each host's wheels there with pip
(no network), then runs every check (gpu_checks.py) in one process per host and patcher kind, in this order:
v0.33.0 with dynamic VRAM (its default), v0.33.0 with --disable-dynamic-vram, v0.12.1 (legacy). Each variant
gets an equal share of what is left of the budget (7.5 minutes by default); a check whose estimate does not
fit its share is skipped and recorded as skipped. Prints each check's time, figures and goals; writes
results.json and results.md (and one log per variant) into --out. Exits 1 when a check failed or erred.

The dry run runs the same workers and checks on the CPU with tiny shapes. With the payload, in a Python 3.12
like the GPU machine's (the same command plus --dry-run):

    python3 bench/gpu_check/run.py --dry-run --out DIR

and on one ComfyUI checkout, in this Python (the host's environment; the suite runs it on every pinned host),
on a slim copy of DIR made by the same rule as the payload's trees:

    python3 bench/gpu_check/run.py --dry-run --host v0.33.0 --comfyui-dir DIR --out DIR

so neither the checks, the slimming nor the payload can rot between GPU loans.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_payload as payload  # noqa: E402

DEFAULT_BUDGET_S = 450.0
GRACE_S = 20.0  # a worker past its deadline by this much is stopped; what it finished stays


def variants_of(host: str, dry_run: bool) -> list[dict]:
    """The variants (host and patcher kind) a host runs. v0.33.0: dynamic VRAM (its default) and legacy."""
    cpu = ["--cpu"] if dry_run else []
    if host == "v0.33.0":
        return [{"name": "v0.33.0-dynamic", "host": host, "dynamic": True, "flags": cpu},
                {"name": "v0.33.0-legacy", "host": host, "dynamic": False, "flags": ["--disable-dynamic-vram", *cpu]}]
    return [{"name": f"{host}-legacy", "host": host, "dynamic": False, "flags": cpu}]


def run_worker(variant: dict, comfyui_dir: str, site: str | None, out: pathlib.Path, deadline: float,
               checks: str, dry_run: bool) -> dict:
    result_file = out / f"{variant['name']}.json"
    log_file = out / f"log-{variant['name']}.txt"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-P", str(HERE / "gpu_worker.py"), "--variant", variant["name"], "--host",
               variant["host"], "--comfyui-dir", comfyui_dir, f"--flags={' '.join(variant['flags'])}",
               "--out", str(result_file), "--log", str(log_file), "--deadline", str(deadline), "--checks", checks]
    if variant["dynamic"]:
        command.append("--dynamic")
    if dry_run:
        command.append("--dry-run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH", "")]))
    started = time.time()
    stopped = None
    with tempfile.TemporaryDirectory(prefix="headroom-gpu-check-cwd-") as neutral:  # never the pack's nodes/
        process = subprocess.Popen(command, cwd=neutral, env=env)
        try:
            returncode = process.wait(timeout=max(1.0, deadline - time.time() + GRACE_S))
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
            stopped = f"stopped at the time budget ({time.time() - started:.0f} s)"
    results = json.loads(result_file.read_text()) if result_file.exists() else {
        "variant": variant["name"], "host": variant["host"], "checks": []}
    if not result_file.exists() and not stopped:  # stopped by the budget is recorded as such, not as an error
        results["error"] = f"the worker wrote no results (exit code {returncode})"
    results["exit_code"] = returncode
    results["wall_seconds"] = round(time.time() - started, 2)
    if stopped:
        results["stopped"] = stopped
    return results


def minimal_seconds(variant: dict, wanted: list[str], dry_run: bool) -> float:
    """The estimated time of a variant's start and its short checks (all but the two long benchmarks)."""
    from gpu_checks import LONG_CHECKS, START_ESTIMATE_S, applies, checks_in_run_order
    mode = "dry" if dry_run else "gpu"
    return START_ESTIMATE_S[mode] + sum(
        check.dry_estimate_s if dry_run else check.gpu_estimate_s for check in checks_in_run_order()
        if applies(check, variant["dynamic"]) and check.id not in LONG_CHECKS and (not wanted or check.id in wanted))


def mark_missing(results: dict, wanted: list[str], dry_run: bool) -> None:
    """Checks a worker never reached (it was stopped or failed to start) are recorded as skipped."""
    from gpu_checks import CHECKS
    seen = {check["id"] for check in results["checks"]}
    order = {check.id: index for index, check in enumerate(CHECKS)}
    error_lines = [line.strip() for line in results.get("error", "").splitlines() if line.strip()]
    reason = results.get("stopped") or (error_lines[-1] if error_lines else "the worker ended early")
    for check in CHECKS:
        if check.id not in seen and (not wanted or check.id in wanted):
            results["checks"].append({"id": check.id, "title": check.title, "status": "skipped",
                                      "reason": f"not reached: {reason}"})
    results["checks"].sort(key=lambda check: order.get(check["id"], len(order)))  # the order


def headline(check: dict) -> str:
    """The figures and goals of one check, for the table."""
    if check["status"] == "skipped":
        return check.get("reason", "")
    if check["status"] == "error":
        lines = [line for line in (check.get("error") or "").strip().splitlines() if line.strip()]
        return "error: " + (lines[-1][:160] if lines else "?")
    parts = []
    for goal in check.get("goals", []):
        mark = {True: "✓", False: "✗", None: "·"}[goal["met"]]
        figure = goal["figure"]
        if isinstance(figure, int) and abs(figure) >= 2 ** 20:
            figure = f"{figure / 2 ** 30:.2f} GiB"
        elif isinstance(figure, (int, float)) and not isinstance(figure, bool):
            figure = f"{figure:.3g}" if isinstance(figure, float) else str(figure)
        goal_text = goal["goal"]
        number = goal_text.split(" ", 1)[-1]
        if number.isdigit() and int(number) >= 2 ** 20:
            goal_text = f"{goal_text.split(' ')[0]} {int(number) / 2 ** 30:.2f} GiB"
        parts.append(f"{mark} {goal['name']}: {figure} ({goal_text})")
    return "<br>".join(parts)


def compact(summary: dict) -> str:
    """One line per check, goals not met spelled out: what a terminal (or a device run's output tail) shows."""
    lines = [f"GPU check: {summary['counts']}; {summary['seconds']:.0f} s of {summary['budget_s']:.0f} s"]
    for variant in summary["variants"]:
        if variant.get("error"):
            lines.append(f"  {variant['variant']}: could not start ({variant['error'].strip().splitlines()[-1][:150]})")
        for check in variant["checks"]:
            seconds = f" {check['seconds']:.1f}s" if "seconds" in check else ""
            detail = ""
            if check["status"] == "skipped":
                detail = f": {check.get('reason', '')}"
            elif check["status"] == "error":
                detail = ": " + headline(check)
            else:
                missed = [goal for goal in check.get("goals", []) if goal["met"] is False]
                detail = "".join(f"; NOT MET {goal['name']}: {goal['figure']} ({goal['goal']})" for goal in missed)
            lines.append(f"  {variant['variant']} {check['id']}: {check['status']}{seconds}{detail}"[:400])
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    lines = [f"GPU check ({'dry run, CPU' if summary['dry_run'] else summary.get('gpu', 'GPU')}), "
             f"{summary['started']}: {summary['counts']}; {summary['seconds']:.0f} s of a "
             f"{summary['budget_s']:.0f} s budget.", "",
             "| variant | check | status | s | figures (✓ met, ✗ not met, · not judged) |", "|---|---|---|---|---|"]
    for variant in summary["variants"]:
        if variant.get("error"):
            error = [line for line in variant["error"].strip().splitlines() if line.strip()][-1:]
            lines.append(f"| {variant['variant']} | (start) | error |  | {' '.join(error)[:200].replace('|', '/')} |")
        for check in variant["checks"]:
            seconds = f"{check['seconds']:.1f}" if "seconds" in check else ""
            lines.append(f"| {variant['variant']} | {check['id']} | {check['status']} | {seconds} | "
                         f"{headline(check).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(os.environ.get("OUT") or payload.REPO_ROOT / "headroom-output" / "gpu-check"))
    parser.add_argument("--payload", type=pathlib.Path, default=payload.PAYLOAD_DIR)
    parser.add_argument("--scratch", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "headroom-gpu-check")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="stop starting checks after this many seconds (default 450 = 7.5 minutes)")
    parser.add_argument("--variants", default="", help="comma-separated subset, e.g. v0.33.0-dynamic")
    parser.add_argument("--checks", default="", help="comma-separated check ids, e.g. 1-offload-sdxl,2-flux")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, this Python, --host's tree")
    parser.add_argument("--host", help="dry run: the pinned host whose tree --comfyui-dir is")
    parser.add_argument("--comfyui-dir", type=pathlib.Path, help="dry run: the ComfyUI checkout to slim and run")
    options = parser.parse_args()
    started = time.time()
    deadline = started + options.budget_s
    options.out.mkdir(parents=True, exist_ok=True)
    summary = {"dry_run": options.dry_run, "budget_s": options.budget_s,
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "variants": []}

    if options.dry_run and options.comfyui_dir:
        if not options.host:
            parser.error("--dry-run with --comfyui-dir needs --host")
        slim_dir = options.scratch / "comfyui" / options.host
        import shutil
        shutil.rmtree(slim_dir, ignore_errors=True)
        summary["slim_tree"] = payload.slim_tree(options.comfyui_dir.resolve(), slim_dir)
        comfyui_dirs, sites = {options.host: str(slim_dir)}, {options.host: None}
        variants = variants_of(options.host, dry_run=True)
    else:
        manifest = payload.unpack(options.payload, options.scratch)
        print(f"[gpu-check] payload unpacked and installed in {manifest['unpack_seconds']} s "
              f"(pack {manifest['pack_commit']})", flush=True)
        summary["payload"] = {key: manifest[key] for key in ("archive_sha256", "pack_commit", "unpack_seconds")}
        comfyui_dirs, sites = manifest["comfyui_dirs"], manifest["sites"]
        variants = [variant for host in ("v0.33.0", "v0.12.1") for variant in variants_of(host, options.dry_run)]
    wanted_variants = [name for name in options.variants.split(",") if name]
    variants = [variant for variant in variants if not wanted_variants or variant["name"] in wanted_variants]
    wanted_checks = [name for name in options.checks.split(",") if name]

    for index, variant in enumerate(variants):
        # each variant may run until the time the later ones need for their short checks (by estimate);
        # what an earlier variant leaves over goes to the later ones
        reserved = sum(minimal_seconds(later, wanted_checks, options.dry_run) for later in variants[index + 1:])
        variant_deadline = deadline - reserved
        print(f"[gpu-check] {variant['name']}: until {max(0.0, variant_deadline - time.time()):.0f} s from now "
              f"({reserved:.0f} s kept for the variants after it)", flush=True)
        results = run_worker(variant, comfyui_dirs[variant["host"]], sites[variant["host"]], options.out,
                             variant_deadline, options.checks, options.dry_run)
        mark_missing(results, wanted_checks, options.dry_run)
        summary["variants"].append(results)
        if results.get("setup", {}).get("gpu"):
            summary["gpu"] = results["setup"]["gpu"]

    statuses = [check["status"] for variant in summary["variants"] for check in variant["checks"]]
    summary["counts"] = ", ".join(f"{statuses.count(s)} {s}" for s in ("pass", "fail", "error", "ran", "skipped")
                                  if statuses.count(s))
    summary["seconds"] = round(time.time() - started, 1)
    (options.out / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    table = markdown(summary)
    (options.out / "results.md").write_text(table)
    for variant in summary["variants"]:
        (options.out / f"{variant['variant']}.json").unlink(missing_ok=True)  # merged into results.json
    print(compact(summary), flush=True)  # the whole table is in results.md (a device run returns only the tail)
    failed = any(status in ("fail", "error") for status in statuses) or any(
        variant.get("error") for variant in summary["variants"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
