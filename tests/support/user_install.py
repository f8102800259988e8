"""A user's machine in a scratch folder, for installing the pack the way users do.

- snapshot_repository: a git repository whose one commit is this working tree (what `git ls-files` would
  commit now), so the tests install what is here, committed or not, and the shared checkout is untouched
- comfyui_copy: the host's ComfyUI as a user has it (its own custom_nodes/, user/, models/ folders); the
  code folders are links into the shared checkout, the top-level files copies (folder_paths.py finds
  ComfyUI's base by its own real path)
- user_environment: ComfyUI's Python environment as a user has it before installing the pack: this
  host's environment without the pack's requirements, plus the tools (ComfyUI-Manager), with a
  site-packages of its own that pip installs into
"""
from __future__ import annotations

import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# ComfyUI's folders for a user's data: each copy gets its own, empty
DATA_FOLDERS = {"custom_nodes", "user", "models", "input", "output", "temp"}


def _git(*args: str, cwd: pathlib.Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def snapshot_repository(dest: pathlib.Path) -> str:
    """Make dest a git repository holding this working tree's files in one commit; return its sha."""
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT)
    dest.mkdir(parents=True)
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():  # a file deleted but not yet committed is left out, as a commit would
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    _git("init", "-q", cwd=dest)
    _git("add", "-A", cwd=dest)
    _git("-c", "user.name=headroom-tests", "-c", "user.email=tests@localhost", "commit", "-q", "-m", "snapshot",
         cwd=dest)
    return _git("rev-parse", "HEAD", cwd=dest).strip()


def comfyui_copy(checkout: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    dest.mkdir(parents=True)
    for entry in checkout.iterdir():
        if entry.name in DATA_FOLDERS:
            (dest / entry.name).mkdir()
        elif entry.is_dir():
            (dest / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copy2(entry, dest / entry.name)
    return dest


def requirement_names(requirements: pathlib.Path) -> list[str]:
    """The distribution names a requirements file asks for."""
    names = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0])
    return names


def _top_level_entries(distribution: str) -> set[str]:
    """What an installed distribution put directly into this environment's site-packages."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {file.parts[0] for file in files if file.parts and file.parts[0] != ".."}


def user_environment(dest: pathlib.Path, leave_out: list[str], extra_site: pathlib.Path) -> pathlib.Path:
    """A virtual environment in dest that sees this environment's packages except the distributions
    `leave_out` names, then extra_site's; it installs into its own site-packages. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(dest / "venv")], check=True)
    python = dest / "venv" / "bin" / "python"
    own_site = pathlib.Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    host_site = pathlib.Path(sysconfig.get_paths()["purelib"])
    left_out = set().union(*(_top_level_entries(name) for name in leave_out))
    seen = dest / "host-site"  # this environment's site-packages, less what leave_out installed
    seen.mkdir()
    for entry in host_site.iterdir():
        if entry.name not in left_out:
            (seen / entry.name).symlink_to(entry)
    # addsitedir (not a plain path line) so the .pth files there (the shared torch) are read too
    (own_site / "headroom_layers.pth").write_text(
        f"import site; site.addsitedir({str(seen)!r}); site.addsitedir({str(extra_site)!r})\n")
    return python
