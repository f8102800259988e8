"""The whole test suite: `python3 tests/run.py` (the README's test command; .ci/run calls it).

1. Prepares the pinned ComfyUI hosts (tests/hosts.toml) and their environments, or the single
   COMFYUI_DIR host (tests/support/hosts.py says how; nothing is skipped silently: a host that
   cannot be prepared fails the run with a message saying how to provide one).
2. Runs tests/unit once, then tests/comfy and tests/e2e against every host, each with that host's
   own Python environment.
3. Runs the real-browser check (tests/browser/run.py: Debian's Chromium on ComfyUI's own page) on the
   newest host, counted as one test; a missing browser fails it, saying how to install one.
Then it prints one closing line: "suite: N passed, N failed, N skipped".
Extra arguments go to every pytest run (e.g. `-k force_gc`, `-x`); with them the browser check is not run
(it selects no pytest test), and the run says so.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR / "support"))
from hosts import HostError, cache_root, prepare_hosts  # noqa: E402


def run_pytest(label: str, python: pathlib.Path, paths: list[str], env: dict, extra: list[str]) -> dict:
    # one report per run of this script: two suites running at once never count each other's tests
    report = cache_root() / "reports" / f"{os.getpid()}-{label}.xml"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    # -P and a neutral working directory: the pack's nodes/ folder must never shadow ComfyUI's `nodes`
    command = [str(python), "-P", "-m", "pytest", "-c", str(REPO_ROOT / "pyproject.toml"),
               "--rootdir", str(REPO_ROOT), f"--junitxml={report}", "-o", f"junit_suite_name={label}", "-rs",
               *[str(REPO_ROOT / path) for path in paths], *extra]
    print(f"\n===== {label}: {' '.join(paths)} ({python})", flush=True)
    returncode = subprocess.run(command, cwd=TESTS_DIR / "support", env=env).returncode
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if report.exists():
        for suite in ElementTree.parse(report).getroot().iter("testsuite"):
            tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            counts["passed"] += tests - skipped - failed
            counts["failed"] += failed
            counts["skipped"] += skipped
        report.unlink()
    if returncode not in (0, 1) or (returncode == 1 and counts["failed"] == 0):
        counts["failed"] += 1  # pytest itself broke (collection, usage, no tests): count it as a failure
        print(f"[suite] {label}: pytest exited with {returncode}", flush=True)
    return counts


def run_browser_check(host_name: str, extra: list[str]) -> dict:
    """tests/browser/run.py on one host, as one test."""
    print(f"\n===== browser: tests/browser/run.py --host {host_name}", flush=True)
    if extra:
        print(f"[suite] browser check not run: pytest arguments given ({' '.join(extra)})", flush=True)
        return {"passed": 0, "failed": 0, "skipped": 1}
    command = [sys.executable, str(TESTS_DIR / "browser" / "run.py"), "--host", host_name,
               "--out", str(REPO_ROOT / "headroom-output" / "browser")]
    passed = subprocess.run(command, cwd=REPO_ROOT).returncode == 0
    return {"passed": int(passed), "failed": int(not passed), "skipped": 0}


def main(extra: list[str]) -> int:
    try:
        hosts = prepare_hosts()
    except HostError as error:
        print(f"[suite] a ComfyUI host could not be prepared: {error}", flush=True)
        print("suite: 0 passed, 1 failed")
        return 1
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for index, prepared in enumerate(hosts):
        env = {**os.environ, "HEADROOM_COMFYUI_DIR": str(prepared.comfyui_dir),
               "HEADROOM_HOST": prepared.host.name, "PYTHONDONTWRITEBYTECODE": "1"}
        runs = [("comfy+e2e", ["tests/comfy", "tests/e2e"])]
        if index == 0:
            runs.insert(0, ("unit", ["tests/unit"]))  # the core needs no ComfyUI: run it once
        for label, paths in runs:
            counts = run_pytest(f"{prepared.host.name}-{label}", prepared.python, paths, env, extra)
            for key in totals:
                totals[key] += counts[key]
    counts = run_browser_check(hosts[-1].host.name, extra)  # hosts.toml lists the newest last
    for key in totals:
        totals[key] += counts[key]
    print(f"\nhosts: {', '.join(f'{p.host.name} ({p.host.commit[:8] or p.comfyui_dir})' for p in hosts)}")
    print(f"suite: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 0 if totals["failed"] == 0 and totals["passed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
