"""Test hosts: real upstream ComfyUI checkouts and their Python environments.

Everything is cached outside the repository, under ${XDG_CACHE_HOME:-~/.cache}/comfyui-headroom/:
  checkouts/<commit>/   the files of a pinned commit (a blob missing from a snapshot is skipped
                        and listed in .headroom-missing)
  git/                  a bare repository that remote sources are fetched into
  envs/torch-<version>/ torch + torchvision (+ torchaudio where a host needs it), installed once per
                        torch version and shared by the hosts pinned to it
  envs/<host>-<commit>/ one virtual environment per host (their frontend packages differ), which
                        sees its torch environment through a .pth file

Only the standard library is used here: this module runs before any environment exists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

TESTS_DIR = pathlib.Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
PINS_FILE = TESTS_DIR / "hosts.toml"
PACK_REQUIREMENTS = REPO_ROOT / "requirements.txt"
TEST_TOOLS = ["pytest", "websocket-client"]
# v0.3.64's server imports requests without listing it in its requirements.
HOST_RUNTIME_EXTRAS = ["requests"]
# Installed from the host's own torch environment (hosts.toml `torch`), never from its requirements.
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}
# ComfyUI's optional extras: installed only where hosts.toml lists them for a host (`optional`), under
# its constraints, so they can never pull in another torch.
OPTIONAL_REQUIREMENTS = {"spandrel", "kornia", "pyopengl", "comfy-angle"}
PYTHON_VERSION = (3, 11)
SYSTEM_CA_BUNDLE = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")
HOW_TO_PROVIDE = (
    "Provide a host in one of these ways:\n"
    "  - HEADROOM_COMFYUI_SOURCES='<git url or local git repository/mirror> ...' (space-separated;\n"
    "    the first that has the commit wins), e.g. a clone of https://github.com/comfyanonymous/ComfyUI\n"
    "  - COMFYUI_DIR=/path/to/ComfyUI for a single-host run on an existing checkout\n"
    "See README.md, 'Running the tests'.")


class HostError(RuntimeError):
    """A host could not be prepared; the message says how to provide one."""


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    commit: str  # full sha; "" for a COMFYUI_DIR checkout of unknown commit
    torch: tuple[str, ...] = ()  # pins of torch, torchvision (and torchaudio) for this host
    constraints: pathlib.Path | None = None  # the versions of everything else its environment gets
    optional: tuple[str, ...] = ()  # ComfyUI's optional requirements installed for it (kornia, spandrel)

    @property
    def torch_version(self) -> str:
        return next(pin.split("==", 1)[1] for pin in self.torch if pin.startswith("torch=="))


@dataclasses.dataclass(frozen=True)
class PreparedHost:
    host: Host
    comfyui_dir: pathlib.Path
    python: pathlib.Path
    missing_files: tuple[str, ...]


def cache_root() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "comfyui-headroom"


def pinned_hosts() -> tuple[list[Host], str]:
    pins = tomllib.loads(PINS_FILE.read_text())
    hosts = [Host(h["name"], h["commit"], tuple(h["torch"]), TESTS_DIR / h["constraints"], tuple(h.get("optional", ())))
             for h in pins["host"]]
    return hosts, pins["default_source"]


def newest_pinned_host() -> Host:
    return pinned_hosts()[0][-1]  # hosts.toml lists them oldest first


def git_sources(default_source: str) -> list[str]:
    configured = os.environ.get("HEADROOM_COMFYUI_SOURCES", "").split()
    return configured or [default_source]


def _git(*args: str, git_dir: pathlib.Path | None = None, check: bool = True,
         capture: bool = True) -> subprocess.CompletedProcess:
    command = ["git"] + ([f"--git-dir={git_dir}"] if git_dir else []) + list(args)
    return subprocess.run(command, check=check, capture_output=capture, text=True)


def _has_commit(git_dir: pathlib.Path, commit: str) -> bool:
    return _git("cat-file", "-e", f"{commit}^{{commit}}", git_dir=git_dir, check=False).returncode == 0


def _local_git_dir(source: str) -> pathlib.Path | None:
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        return None
    found = _git("-C", str(path), "rev-parse", "--absolute-git-dir", check=False)
    return pathlib.Path(found.stdout.strip()) if found.returncode == 0 else None


def _git_dir_with_commit(commit: str, sources: list[str]) -> pathlib.Path:
    """The first source that has the commit: a local repository as it is, a URL fetched into the cache."""
    tried = []
    for source in sources:
        local = _local_git_dir(source)
        if local is not None:
            if _has_commit(local, commit):
                return local
            tried.append(f"{source}: commit not in this repository")
            continue
        if "://" not in source and "@" not in source:
            tried.append(f"{source}: neither a local git repository nor a git URL")
            continue
        fetched = cache_root() / "git"
        if not fetched.exists():
            _git("init", "--bare", "-q", str(fetched))
        result = _git("fetch", "-q", "--depth=1", source, commit, git_dir=fetched, check=False)
        if result.returncode == 0 and _has_commit(fetched, commit):
            return fetched
        tried.append(f"{source}: fetch failed ({result.stderr.strip().splitlines()[-1:] or '?'})")
    raise HostError(f"ComfyUI commit {commit} was found in no source:\n  " + "\n  ".join(tried)
                    + "\n" + HOW_TO_PROVIDE)


def _export_commit(git_dir: pathlib.Path, commit: str, dest: pathlib.Path) -> list[str]:
    """Write the files of `commit` into dest; return the paths whose blobs the repository lacks.

    Not `git checkout`/`git archive`: both abort on a missing blob, and some stored snapshots
    lack comfy/text_encoders/llama_tokenizer/tokenizer.json (which the suite never reads).
    """
    listing = _git("ls-tree", "-r", "-z", "--full-tree", commit, git_dir=git_dir).stdout
    entries = []
    for record in filter(None, listing.split("\0")):
        meta, path = record.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob":
            entries.append((mode, sha, path))
    reader = subprocess.Popen(["git", f"--git-dir={git_dir}", "cat-file", "--batch"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    missing = []
    try:
        for mode, sha, path in entries:
            reader.stdin.write(f"{sha}\n".encode())
            reader.stdin.flush()
            header = reader.stdout.readline().decode().split()
            if header[-1] == "missing":
                missing.append(path)
                continue
            content = reader.stdout.read(int(header[2]))
            reader.stdout.read(1)  # the newline after each object
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode == "120000":
                target.symlink_to(content.decode())
            else:
                target.write_bytes(content)
                if mode == "100755":
                    target.chmod(0o755)
    finally:
        reader.stdin.close()
        reader.wait()
    return missing


def ensure_checkout(host: Host, sources: list[str]) -> tuple[pathlib.Path, list[str]]:
    dest = cache_root() / "checkouts" / host.commit
    stamp = dest / ".headroom-commit"
    if stamp.exists() and stamp.read_text().strip() == host.commit:
        return dest, (dest / ".headroom-missing").read_text().split()
    git_dir = _git_dir_with_commit(host.commit, sources)
    partial = dest.with_name(dest.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    missing = _export_commit(git_dir, host.commit, partial)
    (partial / ".headroom-missing").write_text("\n".join(missing))
    (partial / ".headroom-commit").write_text(host.commit)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest, missing


def _base_python() -> str:
    """A CPython 3.11 to build environments from."""
    if sys.version_info[:2] == PYTHON_VERSION:
        return sys.executable
    candidate = shutil.which("python%d.%d" % PYTHON_VERSION)
    if candidate:
        return candidate
    raise HostError("the test environments need CPython 3.11 (python3.11 on PATH); none was found")


def pip_install(python: pathlib.Path, *args: str) -> None:
    # --isolated: ignore this machine's pip configuration, whose local wheel folder holds a
    # CPU-only torch build that cannot load the registry's torchvision.
    cert = ["--cert", str(SYSTEM_CA_BUNDLE)] if SYSTEM_CA_BUNDLE.exists() else []
    command = [str(python), "-m", "pip", "install", "--isolated", "--disable-pip-version-check",
               "-q", *cert, *args]
    result = subprocess.run(command)
    if result.returncode != 0:
        raise HostError(f"pip failed ({' '.join(command)}); see its output above")


def _site_packages(python: pathlib.Path) -> pathlib.Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return pathlib.Path(out)


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _pins_of(constraints: pathlib.Path) -> str:
    """The constraints file without its comments: what an environment is built from."""
    lines = (line.split("#", 1)[0].strip() for line in constraints.read_text().splitlines())
    return "\n".join(line for line in lines if line)


def _ready(env_dir: pathlib.Path, fingerprint: str) -> bool:
    stamp = env_dir / ".headroom-ready"
    return stamp.exists() and stamp.read_text() == fingerprint


def _mark_ready(env_dir: pathlib.Path, fingerprint: str) -> None:
    (env_dir / ".headroom-ready").write_text(fingerprint)


def _python_of(env_dir: pathlib.Path) -> pathlib.Path:
    return env_dir / "bin" / "python"


def ensure_torch_env(host: Host) -> pathlib.Path:
    """The environment holding the host's torch packages, shared by every host pinned to the same ones."""
    env_dir = cache_root() / "envs" / f"torch-{host.torch_version}"
    fingerprint = _fingerprint(*sorted(host.torch), _pins_of(host.constraints))
    if not _ready(env_dir, fingerprint):
        print(f"[hosts] creating the torch {host.torch_version} environment in {env_dir}", flush=True)
        shutil.rmtree(env_dir, ignore_errors=True)
        subprocess.run([_base_python(), "-m", "venv", str(env_dir)], check=True)
        pip_install(_python_of(env_dir), "-c", str(host.constraints), *host.torch)
        modules = ", ".join(pin.split("==", 1)[0] for pin in host.torch)
        check = subprocess.run([str(_python_of(env_dir)), "-c", f"import {modules}"])
        if check.returncode != 0:
            raise HostError(f"{', '.join(host.torch)} were installed but do not import together; the "
                            "registry's torchvision and torchaudio need its full torch build of the same release")
        _mark_ready(env_dir, fingerprint)
    return env_dir


def _host_requirements(checkout: pathlib.Path, optional: tuple[str, ...]) -> list[str]:
    wanted = []
    for line in (checkout / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line
        for separator in "=<>~!;[ ":
            name = name.split(separator, 1)[0]
        name = name.lower()
        if name in TORCH_PACKAGES or (name in OPTIONAL_REQUIREMENTS and name not in optional):
            continue
        wanted.append(line)
    return wanted


def ensure_host_env(host: Host, checkout: pathlib.Path) -> pathlib.Path:
    torch_env = ensure_torch_env(host)
    requirements = _host_requirements(checkout, host.optional)
    env_dir = cache_root() / "envs" / f"{host.name}-{(host.commit or 'local')[:8]}"
    fingerprint = _fingerprint(str(checkout), *requirements, *HOST_RUNTIME_EXTRAS, *TEST_TOOLS,
                               PACK_REQUIREMENTS.read_text(), _pins_of(host.constraints),
                               (torch_env / ".headroom-ready").read_text())
    python = _python_of(env_dir)
    if _ready(env_dir, fingerprint):
        return python
    print(f"[hosts] creating the environment for ComfyUI {host.name} in {env_dir}", flush=True)
    shutil.rmtree(env_dir, ignore_errors=True)
    subprocess.run([_base_python(), "-m", "venv", str(env_dir)], check=True)
    # torch is shared: the host environment sees the torch environment's packages through a .pth file.
    (_site_packages(python) / "headroom_shared_torch.pth").write_text(
        str(_site_packages(_python_of(torch_env))) + "\n")
    # the pack's own requirements.txt too, as ComfyUI Manager installs it
    pip_install(python, "-c", str(host.constraints), "-r", str(PACK_REQUIREMENTS), *requirements, *HOST_RUNTIME_EXTRAS,
         *TEST_TOOLS)
    modules = ", ".join(pin.split("==", 1)[0] for pin in host.torch)
    check = subprocess.run([str(python), "-c", f"import {modules}, aiohttp, pytest; "
                            f"assert torch.__version__.startswith({host.torch_version!r}), torch.__version__"])
    if check.returncode != 0:
        raise HostError(f"the environment for ComfyUI {host.name} was built but does not import "
                        f"{modules} (torch {host.torch_version}), aiohttp and pytest")
    _mark_ready(env_dir, fingerprint)
    return python


def _version_of(checkout: pathlib.Path) -> str:
    version_file = checkout / "comfyui_version.py"
    if version_file.exists():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return "v" + line.split("=", 1)[1].strip().strip("\"'")
    return "local"


def select_hosts(hosts: list[Host], which: str) -> list[Host]:
    """`which`: "all", "newest" (the last in hosts.toml), or host names separated by commas."""
    if which == "all":
        return hosts
    if which == "newest":
        return hosts[-1:]
    by_name = {host.name: host for host in hosts}
    wanted = [name.strip() for name in which.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown or not wanted:
        raise HostError(f"no pinned host named {', '.join(unknown) or repr(which)}; the pinned hosts are "
                        f"{', '.join(by_name)} (tests/hosts.toml), or say newest or all")
    return [by_name[name] for name in wanted]


def prepare_hosts(which: str = "all") -> list[PreparedHost]:
    """The pinned hosts `which` names (see select_hosts), or the single COMFYUI_DIR host, checked out and
    with their environments."""
    comfyui_dir = os.environ.get("COMFYUI_DIR")
    if comfyui_dir:
        checkout = pathlib.Path(comfyui_dir).expanduser().resolve()
        if not (checkout / "main.py").exists() or not (checkout / "comfy").is_dir():
            raise HostError(f"COMFYUI_DIR={comfyui_dir} is not a ComfyUI folder (no main.py and comfy/)\n"
                            + HOW_TO_PROVIDE)
        head = _git("-C", str(checkout), "rev-parse", "HEAD", check=False)
        # an unknown ComfyUI gets the environment of the pinned host of its version, else of the newest one
        version = _version_of(checkout)
        pinned = {host.name: host for host in pinned_hosts()[0]}
        settings = pinned.get(version, newest_pinned_host())
        host = dataclasses.replace(settings, name=version, commit=head.stdout.strip() if head.returncode == 0 else "")
        return [PreparedHost(host, checkout, ensure_host_env(host, checkout), ())]
    hosts, default_source = pinned_hosts()
    sources = git_sources(default_source)
    prepared = []
    for host in select_hosts(hosts, which):
        checkout, missing = ensure_checkout(host, sources)
        prepared.append(PreparedHost(host, checkout, ensure_host_env(host, checkout), tuple(missing)))
    return prepared


def exec_in_host(script: pathlib.Path, argv: list[str], which: str = "newest") -> None:
    """Prepare one pinned host (the newest unless `which` names another; or COMFYUI_DIR) and replace this
    process by `script` run in its environment, with HEADROOM_COMFYUI_DIR set. For the main job and the
    benchmarks."""
    try:
        prepared = prepare_hosts(which)
        if len(prepared) != 1:
            raise HostError(f"name one host, not {which!r}")
    except HostError as error:
        sys.exit(f"[headroom] {error}")
    print(f"[headroom] ComfyUI {prepared[0].host.name} at {prepared[0].comfyui_dir}", flush=True)
    env = {**os.environ, "HEADROOM_COMFYUI_DIR": str(prepared[0].comfyui_dir), "HEADROOM_HOST": prepared[0].host.name}
    command = [str(prepared[0].python), "-P", str(script), *argv]
    os.execve(command[0], command, env)


if __name__ == "__main__":
    try:
        for ready in prepare_hosts(sys.argv[1] if len(sys.argv) > 1 else "all"):
            print(f"{ready.host.name}\t{ready.comfyui_dir}\t{ready.python}")
    except HostError as error:
        sys.exit(f"[hosts] {error}")
