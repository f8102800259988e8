"""The README's main job (workflows/run.py) on this host: headless run, Force GC record printed, image saved."""
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_main_job_runs_the_example_workflow_on_the_generated_model(tmp_path, tiny_checkpoint):
    result = subprocess.run(
        [sys.executable, "-P", str(REPO_ROOT / "workflows" / "run.py"), "--inside", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record_lines = [line for line in result.stdout.splitlines() if line.startswith("[HeadroomForceGC #6]")]
    assert len(record_lines) == 1, result.stdout
    assert "unloaded=[SD15]" in record_lines[0]
    saved = list(tmp_path.glob("headroom_force_gc_*.png"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0
