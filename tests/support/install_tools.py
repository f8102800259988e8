"""The tools users install and check the pack with, from PyPI: ComfyUI-Manager (cm-cli), comfy-cli
(comfy node validate / pack) and nodesafe, pinned by tests/tools/requirements.txt.

They live in an environment of their own, ${XDG_CACHE_HOME:-~/.cache}/comfyui-headroom/envs/tools-<hash
of the pins>/, built on first use and never in a host's environment (their dependencies would fight its
pins). None of them may pull in torch: the build checks it. Only the standard library is used here.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys

from hosts import HostError, cache_root, pip_install

REQUIREMENTS = pathlib.Path(__file__).resolve().parents[1] / "tools" / "requirements.txt"
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")


class ToolsError(RuntimeError):
    """The tools environment could not be built; the message says why."""


def tools_env() -> pathlib.Path:
    """The folder of the tools environment, built first if it is missing or its pins changed."""
    pins = REQUIREMENTS.read_text()
    env_dir = cache_root() / "envs" / f"tools-{hashlib.sha256(pins.encode()).hexdigest()[:16]}"
    stamp = env_dir / ".headroom-ready"
    if stamp.exists():
        return env_dir
    print(f"[tools] creating the tools environment in {env_dir}", flush=True)
    shutil.rmtree(env_dir, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    try:
        pip_install(env_dir / "bin" / "python", "-r", str(REQUIREMENTS))
    except HostError as error:
        raise ToolsError(str(error)) from None
    pulled = [name for name in TORCH_PACKAGES if _installed(env_dir, name)]
    if pulled:
        raise ToolsError(f"the tools pulled in {', '.join(pulled)} ({REQUIREMENTS}); pin what pulls it to a release "
                         "that does not")
    stamp.write_text(pins)
    return env_dir


def _installed(env_dir: pathlib.Path, name: str) -> bool:
    found = importlib.metadata.distributions(path=[str(site_packages(env_dir))])
    return any((found_one.metadata["Name"] or "").lower() == name for found_one in found)


def site_packages(env_dir: pathlib.Path) -> pathlib.Path:
    return env_dir / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def tool(name: str) -> pathlib.Path:
    """A command of the tools environment: cm-cli, comfy, nodesafe."""
    return tools_env() / "bin" / name
