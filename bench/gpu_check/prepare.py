"""Prepare the GPU check's payload: what a lent GPU machine lacks, in one ignored folder of at most 60 MiB.

    python3 bench/gpu_check/prepare.py [--out .gpu-payload] [--limit-mib 60]

Builds `.gpu-payload/payload.tar.xz` and `.gpu-payload/manifest.json` (gpu_payload.py says what is in
them): slim source trees of the GPU hosts (checked out into the test cache like the suite's hosts), the
Python 3.12 manylinux wheels of the packages they import that the machine lacks (downloaded from PyPI
with `pip download --isolated`, cached in ${XDG_CACHE_HOME:-~/.cache}/comfyui-headroom/gpu-check/),
and the manifest. The archive is cached by the hash of what it is made of, so a second run only copies it.
Prints the size; exits 1 when the payload is larger than --limit-mib.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import io
import json
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests" / "support"))
import gpu_payload as payload  # noqa: E402
import hosts  # noqa: E402  (tests/support/hosts.py: the pinned commits and their cached checkouts)

MIB = 2 ** 20


def gpu_check_cache() -> pathlib.Path:
    path = hosts.cache_root() / "gpu-check"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_wheel(requirement: str, wheels_dir: pathlib.Path) -> pathlib.Path:
    """The cached Python 3.12 manylinux (or pure) wheel of `requirement` ("name==version"), downloaded once."""
    name, version = payload.project_name(requirement), requirement.split("==")[1]

    def cached():
        return [path for path in wheels_dir.glob("*.whl")
                if payload.wheel_project(path.name) == name and payload.wheel_version(path.name) == version]

    if not cached():
        platforms = [option for platform in payload.PIP_PLATFORMS for option in ("--platform", platform)]
        # --isolated: this machine's pip configuration adds a local wheel folder and a torch constraint
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                                 "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                                 *platforms, "--disable-pip-version-check", "-d", str(wheels_dir), requirement],
                                capture_output=True, text=True)
        if result.returncode != 0 or not cached():
            raise SystemExit(f"[prepare] could not download {requirement} for Python 3.12 manylinux from "
                             f"PyPI:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    found = cached()
    if len(found) != 1:
        raise SystemExit(f"[prepare] {len(found)} cached wheels match {requirement}: {found}")
    return found[0]


def gpu_host_checkouts() -> dict[str, tuple[str, pathlib.Path]]:
    """{host name: (commit, checkout folder)} for the GPU hosts, checked out into the test cache if needed."""
    pinned, default_source = hosts.pinned_hosts()
    by_name = {host.name: host for host in pinned}
    missing = [name for name in payload.GPU_HOSTS if name not in by_name]
    if missing:
        raise SystemExit(f"[prepare] tests/hosts.toml pins no host named {', '.join(missing)}")
    found = {}
    for name in payload.GPU_HOSTS:
        checkout, _ = hosts.ensure_checkout(by_name[name], hosts.git_sources(default_source))
        found[name] = (by_name[name].commit, checkout)
    return found


def pack_commit() -> str:
    head = subprocess.run(["git", "-C", str(payload.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(payload.REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    commit = head.stdout.strip() or "unknown"
    return commit + ("+uncommitted changes" if dirty.stdout.strip() else "")


def build_tar(checkouts: dict, wheels: dict[str, list[pathlib.Path]], scratch: pathlib.Path) -> tuple[bytes, dict]:
    """The uncompressed archive and the manifest's content description."""
    contents = {"comfyui": {}, "wheels": {}}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (commit, checkout) in checkouts.items():
            slim_dir = scratch / "comfyui" / name
            summary = payload.slim_tree(checkout, slim_dir)
            payload.add_tree(tar, slim_dir, f"comfyui/{name}")
            contents["comfyui"][name] = {"commit": commit, **summary}
        for group, paths in wheels.items():
            for path in paths:
                drops = payload.WHEEL_DROPS.get(payload.wheel_project(path.name), ())
                data, dropped = payload.stored_wheel(path, drops)
                payload.add_file(tar, f"wheels/{group}/{path.name}", data)
                entry = {"group": group, "project": payload.wheel_project(path.name),
                         "version": payload.wheel_version(path.name), "download_bytes": path.stat().st_size,
                         "download_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                if dropped:
                    entry["left_out"] = sorted({prefix for prefix in drops})
                    entry["left_out_members"] = len(dropped)
                contents["wheels"][path.name] = entry
    return buffer.getvalue(), contents


def input_key(checkouts: dict, wheels: dict[str, list[pathlib.Path]]) -> str:
    """What the archive is made of: the hosts' commits, the downloaded wheels and the rules that slim and pack
    them (gpu_payload.py). The same key means the same archive, so a cached one is used without rebuilding."""
    digest = hashlib.sha256(f"format {payload.FORMAT_VERSION}\n".encode())
    rules = (payload.COMMON_WHEELS, payload.HOST_WHEELS, payload.WHEEL_DROPS, payload.SLIM_PACKAGES,
             payload.SLIM_TOP_LEVEL_FILES)
    digest.update(repr(rules).encode())
    for function in (payload.slim_tree, payload.stored_wheel, payload.add_file, payload.add_tree, build_tar):
        digest.update(inspect.getsource(function).encode())
    for name, (commit, _) in sorted(checkouts.items()):
        digest.update(f"{name} {commit}\n".encode())
    for group, paths in sorted(wheels.items()):
        for path in paths:
            digest.update(f"{group} {path.name} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def prepare(out: pathlib.Path, limit_mib: float) -> dict:
    cache = gpu_check_cache()
    wheels_dir = cache / "wheels"
    wheels_dir.mkdir(exist_ok=True)
    wheels = {"common": [ensure_wheel(requirement, wheels_dir) for requirement in payload.COMMON_WHEELS]}
    for name, requirements in payload.HOST_WHEELS.items():
        wheels[name] = [ensure_wheel(requirement, wheels_dir) for requirement in requirements]
    checkouts = gpu_host_checkouts()
    key = input_key(checkouts, wheels)
    cached_archive = cache / f"payload-{key}.tar.xz"
    cached_contents = cache / f"payload-{key}.json"
    if not (cached_archive.exists() and cached_contents.exists()):
        with tempfile.TemporaryDirectory(prefix="headroom-gpu-payload-") as scratch:
            tar_bytes, contents = build_tar(checkouts, wheels, pathlib.Path(scratch))
        print(f"[prepare] compressing {len(tar_bytes) / MIB:.1f} MiB with xz (once per content; a few minutes)",
              flush=True)
        partial = cached_archive.with_suffix(".part")
        partial.write_bytes(payload.compress(tar_bytes))
        partial.replace(cached_archive)
        cached_contents.write_text(json.dumps({"contents": contents, "uncompressed_bytes": len(tar_bytes)}))
        for stale in list(cache.glob("payload-*.tar.xz")) + list(cache.glob("payload-*.json")):
            if stale not in (cached_archive, cached_contents):
                stale.unlink()
    described = json.loads(cached_contents.read_text())
    contents, uncompressed = described["contents"], described["uncompressed_bytes"]
    archive_bytes = cached_archive.read_bytes()
    manifest = {
        "format": payload.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hosts": list(payload.GPU_HOSTS),
        "python": "3.12 (cp312 / abi3 / py3 wheels, manylinux x86_64)",
        "pack_commit": pack_commit(),
        "pack_note": "the pack is the working tree the run starts in; it is not copied into the payload",
        "archive": payload.ARCHIVE_NAME,
        "archive_bytes": len(archive_bytes),
        "archive_sha256": payload.sha256_of(archive_bytes),
        "uncompressed_bytes": uncompressed,
        "contents": contents,
    }
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / payload.ARCHIVE_NAME).write_bytes(archive_bytes)
    (out / payload.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(path.stat().st_size for path in out.iterdir())
    manifest["payload_bytes"] = total
    print(f"[prepare] {out}: {total / MIB:.2f} MiB ({uncompressed / MIB:.1f} MiB unpacked); limit {limit_mib:g} MiB")
    for name, entry in contents["wheels"].items():
        note = f", without {', '.join(entry['left_out'])}" if "left_out" in entry else ""
        print(f"[prepare]   {entry['group']}: {entry['project']} {entry['version']}{note}")
    for name, entry in contents["comfyui"].items():
        print(f"[prepare]   ComfyUI {name} ({entry['commit'][:8]}): {entry['files']} files, "
              f"{entry['bytes'] / MIB:.1f} MiB; left out: "
              + ", ".join(f"{what} {size / MIB:.1f} MiB" for what, size in entry["left_out"].items()))
    if total > limit_mib * MIB:
        print(f"[prepare] FAILED: the payload is {total / MIB:.2f} MiB, over the {limit_mib:g} MiB limit", flush=True)
        raise SystemExit(1)
    return manifest


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--out", type=pathlib.Path, default=payload.PAYLOAD_DIR)
    arguments.add_argument("--limit-mib", type=float, default=payload.LIMIT_MIB)
    parsed = arguments.parse_args()
    prepare(parsed.out.resolve(), parsed.limit_mib)
