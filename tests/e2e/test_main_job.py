"""The README's main job (workflows/run.py) on this host: the combined workflow headless on the generated
model, the memory report printed, the images, the chart and the report's JSON saved."""
import json
import os
import pathlib
import subprocess
import sys

from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_main_job_runs_the_combined_workflow_and_prints_the_memory_report(tmp_path, text_encoder_checkpoint):
    result = subprocess.run(
        [sys.executable, "-P", str(REPO_ROOT / "workflows" / "run.py"), "--inside", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    report_at = next(index for index, line in enumerate(lines) if line.startswith("[HeadroomMemoryReport #15]"))
    assert "Memory Report: 9 stages" in lines[report_at]
    assert any(line.startswith("sampling: SD15 on cpu node=8(KSampler) success") for line in lines[report_at:])
    assert any(line.startswith("[HeadroomForceGC #9] Headroom GC:") for line in lines)
    (image,) = tmp_path.glob("headroom_big_model_*.png")
    (chart,) = tmp_path.glob("headroom_memory_report_*.png")
    assert Image.open(image).size == (256, 256) and Image.open(chart).size == (960, 540)
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert [stage["kind"] for stage in report["stages"]][:3] == ["text encode", "text encode", "sampling"]
