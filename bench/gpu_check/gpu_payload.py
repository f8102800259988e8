"""What the GPU check carries to a lent GPU machine, and how it is unpacked there. Standard library only.

The machine (one H200; see /work/.library/device/README.md and KINDS.md) has Python 3.12, torch
2.11.0+cu130, NVML and most of what ComfyUI imports, no network, and takes at most 64 MiB of files
with a command. What it lacks travels in one ignored folder, `.gpu-payload/`, that prepare.py
assembles here (at most 60 MiB) and run.py unpacks there:

  payload.tar.xz   comfyui/<host>/        a slim source tree of each GPU host (what in-process sampling
                                          imports: no frontend, tests, blueprints or tokenizer data)
                   wheels/common/*.whl    Python 3.12 manylinux wheels of the packages both hosts import
                                          that the machine lacks (stored uncompressed, so xz packs them)
                   wheels/<host>/*.whl    the comfy-aimdo each host pins
  manifest.json    what is inside, with versions, hashes, sizes and what was left out, and why

The pack itself is not in the payload: the run happens in the root of the working tree that travels,
which is the pack (a second copy could only be a stale one). The manifest names the pack's commit.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PAYLOAD_DIR = REPO_ROOT / ".gpu-payload"
ARCHIVE_NAME = "payload.tar.xz"
MANIFEST_NAME = "manifest.json"
LIMIT_MIB = 60
FORMAT_VERSION = 1  # bump when the layout changes, so cached archives are rebuilt

# The hosts the GPU check runs (tests/hosts.toml names their commits). v0.3.64 has no GPU variant: it is
# older than both and has neither patcher kind that differs.
GPU_HOSTS = ("v0.12.1", "v0.33.0")

# Packages ComfyUI's in-process import path needs that the GPU machine's image lacks (KINDS.md's package
# list, copied in device_packages.txt), at the versions the suite's constraints give the hosts. One version
# of each serves both hosts: both requirements allow it. tests/e2e/test_gpu_check.py traces the real
# imports of each host and fails when one of them is missing here.
COMMON_WHEELS = (
    "av==18.1.0",  # comfy_api.latest imports it at module level (both hosts' nodes.py import comfy_api.latest)
    "comfy-kitchen==0.2.31",  # v0.33.0's pin; v0.12.1 asks >=0.2.7. attention.py (v0.33.0) and quant_ops import it
    "torchsde==0.2.6",  # comfy.k_diffusion.sampling
    "trampoline==0.1.2",  # torchsde's
    "pydantic==2.14.4",  # comfy_config (read by nodes.load_custom_node for every custom node) via pydantic-settings
    "pydantic_core==2.50.5",
    "pydantic-settings==2.16.3",
    "python-dotenv==1.2.4",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",  # the image has one; pydantic 2.14 needs a recent one, so this one travels
)
HOST_WHEELS = {
    "v0.12.1": ("comfy-aimdo==0.1.7",),  # its requirements' minimum; v0.12.1 only imports it (legacy patcher)
    "v0.33.0": ("comfy-aimdo==0.4.13",),  # its pin: dynamic VRAM is its default
}
# Left out of comfy-kitchen: its ROCm kernels. comfy_kitchen/__init__.py imports backends/hip only when
# torch.version.hip is set, which it never is with a CUDA torch, so the folder is inert on the machine.
WHEEL_DROPS = {"comfy-kitchen": ("comfy_kitchen/backends/hip/",)}
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                 "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")

# The slim ComfyUI tree: the packages and top-level modules in-process sampling imports (with every .py
# of them, so paths only a GPU takes are there too) and their data files, minus tokenizer vocabularies
# (read only when a text encoder is built; the check builds conditioning directly).
SLIM_PACKAGES = ("comfy", "comfy_api", "comfy_config", "comfy_execution", "comfy_extras", "app", "utils")
SLIM_TOP_LEVEL_FILES = ("requirements.txt", "pyproject.toml")


def slim_tree(source: pathlib.Path, dest: pathlib.Path) -> dict:
    """Copy what in-process sampling needs of the ComfyUI checkout `source` into `dest` (which must not
    exist); returns {"files", "bytes", "left_out": {what: bytes}}."""
    kept_files = kept_bytes = 0
    left_out: dict[str, int] = {}

    def leave(reason: str, path: pathlib.Path) -> None:
        left_out[reason] = left_out.get(reason, 0) + path.stat().st_size

    def keep(path: pathlib.Path) -> None:
        nonlocal kept_files, kept_bytes
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        kept_files += 1
        kept_bytes += path.stat().st_size

    dest.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or path.name == "__pycache__":
            continue
        if path.is_file():
            if path.suffix == ".py" or path.name in SLIM_TOP_LEVEL_FILES:
                keep(path)
            else:
                leave("top-level files other than .py", path)
        elif path.is_dir() and path.name in SLIM_PACKAGES:
            for inner in sorted(path.rglob("*")):
                if not inner.is_file() or "__pycache__" in inner.parts:
                    continue
                relative_dirs = inner.relative_to(source).parts[:-1]
                if inner.suffix != ".py" and any("tokenizer" in part for part in relative_dirs):
                    leave("tokenizer vocabularies (no text encoder is built)", inner)
                else:
                    keep(inner)
        elif path.is_dir():
            for inner in path.rglob("*"):
                if inner.is_file():
                    leave(f"{path.name}/ (not imported by in-process sampling)", inner)
    return {"files": kept_files, "bytes": kept_bytes, "left_out": dict(sorted(left_out.items()))}


def project_name(requirement: str) -> str:
    return requirement.split("==")[0].lower().replace("_", "-")


def wheel_project(filename: str) -> str:
    return filename.split("-")[0].lower().replace("_", "-")


def wheel_version(filename: str) -> str:
    return filename.split("-")[1]


# --------------------------------------------------------------------------------------------- there

def unpack(payload_dir: pathlib.Path, scratch: pathlib.Path) -> dict:
    """Unpack the archive into `scratch` (once per archive: a stamp names its hash) and install each host's
    wheels into scratch/site-<host> with pip (no index, no dependencies: the list is complete). Returns the
    manifest with "sites" and "comfyui_dirs" by host and "unpack_seconds"."""
    started = time.perf_counter()
    archive = payload_dir / ARCHIVE_NAME
    if not archive.exists():
        raise FileNotFoundError(f"{archive} is missing: run `python3 bench/gpu_check/prepare.py` first "
                                "and name .gpu-payload in the device run's carry")
    manifest = json.loads((payload_dir / MANIFEST_NAME).read_text())
    stamp = scratch / ".unpacked"
    if not (stamp.exists() and stamp.read_text() == manifest["archive_sha256"]):
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        with lzma.open(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(scratch, filter="data")
        for host in manifest["hosts"]:
            wheels = sorted((scratch / "wheels" / "common").glob("*.whl")) + sorted(
                (scratch / "wheels" / host).glob("*.whl"))
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                            "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target",
                            str(scratch / f"site-{host}"), *map(str, wheels)], check=True)
        stamp.write_text(manifest["archive_sha256"])
    manifest["sites"] = {host: str(scratch / f"site-{host}") for host in manifest["hosts"]}
    manifest["comfyui_dirs"] = {host: str(scratch / "comfyui" / host) for host in manifest["hosts"]}
    manifest["unpack_seconds"] = round(time.perf_counter() - started, 2)
    return manifest


# ---------------------------------------------------------------------------------------------- here

def stored_wheel(wheel: pathlib.Path, drops: tuple[str, ...] = ()) -> tuple[bytes, list[str]]:
    """The wheel rewritten with its members stored uncompressed (xz then packs the whole archive far better
    than deflate packed each member), minus the members under `drops` (and their RECORD lines). Returns
    (bytes, paths dropped)."""
    dropped = []
    buffer = io.BytesIO()
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if any(info.filename.startswith(prefix) for prefix in drops):
                dropped.append(info.filename)
                continue
            data = source.read(info)
            if drops and info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines
                               if not any(line.startswith(prefix) for prefix in drops)).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.external_attr = info.external_attr
            target.writestr(fixed, data)
    return buffer.getvalue(), dropped


def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    """A reproducible member: fixed time and owner, so the same inputs give the same archive."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def add_tree(tar: tarfile.TarFile, root: pathlib.Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            add_file(tar, f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes(),
                     0o755 if os.access(path, os.X_OK) else 0o644)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compress(tar_bytes: bytes) -> bytes:
    # xz at its strongest preset: the archive is built once (and cached) and must fit 60 MiB
    return lzma.compress(tar_bytes, preset=9 | lzma.PRESET_EXTREME)
