"""Loading the pack changes nothing in ComfyUI: same latents, same global functions, nodes registered."""
import json
import os
import pathlib
import subprocess
import sys

SUPPORT_DIR = pathlib.Path(__file__).resolve().parents[1] / "support"


def test_loading_the_pack_leaves_sampling_bit_identical():
    result = subprocess.run([sys.executable, "-P", str(SUPPORT_DIR / "check_pack_loading.py")],
                            capture_output=True, text=True, cwd=SUPPORT_DIR, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(SUPPORT_DIR)})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"registered_before": False, "registered_after": True,
                      "bit_identical": True, "changed_globals": []}
