"""Installing the pack the way users do, with the real tools from PyPI (tests/support/tools.py).

- ComfyUI-Manager's cm-cli installs it from a git URL into a user's ComfyUI (tests/support/user_install.py),
  which then starts and loads all six nodes
- comfy-cli validates pyproject.toml for the Registry and builds the package `comfy node publish` uploads;
  the package holds what users run and nothing else
- the malware scanner nodesafe does not call that package malicious
- ComfyUI-Manager's node scanner is not shown the test-only nodes

They check the repository, not the host, so they run on the newest pinned host only.
"""
import json
import os
import pathlib
import re
import subprocess
import zipfile

import pytest

import comfy_host
import hosts
import install_tools as tools
import user_install
from server import PACK_FOLDER_NAME, TEST_NODES_DIR, ComfyServer

NEWEST_HOST = hosts.newest_pinned_host().name
if os.environ.get("HEADROOM_HOST") != NEWEST_HOST:
    pytest.skip(f"the install checks run on the newest pinned host ({NEWEST_HOST}) only: they check the "
                "repository, not the host", allow_module_level=True)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HEADROOM_NODES = {"HeadroomForceGC", "HeadroomMemoryReport", "HeadroomOffloadModel", "HeadroomPickGPU",
                  "HeadroomSlicedAttention", "HeadroomTiledInpaint"}
# The Registry package: what users run, and nothing of tests/, bench/, .ci/, docs/ or workflows/run.py
SHIPPED = [r"__init__\.py", r"pyproject\.toml", r"README\.md", r"LICENSE", r"requirements\.txt",
           r"nodes/[^/]+\.py", r"memory/(comfy/)?[^/]+\.py", r"workflows/[^/]+\.json"]
REPOSITORY_URL = "https://github.com/comfyui-headroom/ComfyUI-Headroom"
ICON_URL_PREFIX = "https://raw.githubusercontent.com/comfyui-headroom/ComfyUI-Headroom/main/"
# The Registry's accelerator classifiers for the devices memory/devices.py runs on: CUDA, ROCm (torch's
# cuda:N), XPU (Intel Arc) and MPS (Apple Metal). The CPU has none: every pack runs there.
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "GPU :: Apple Metal"}
# pyproject.toml as comfy-cli's parser reads it for `comfy node publish`, as JSON (its dataclasses hold tomlkit values)
READ_AS_THE_REGISTRY = """
import dataclasses, json
from comfy_cli.registry.config_parser import extract_node_configuration
def plain(value):
    if dataclasses.is_dataclass(value):
        return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value if value is None or isinstance(value, (bool, int, float)) else str(value)
print(json.dumps(plain(extract_node_configuration("pyproject.toml"))))
"""
# comfy-cli asks whether to send telemetry on its first run otherwise
TOOL_ENV = {**os.environ, "DO_NOT_TRACK": "1"}


def run_tool(command: list, cwd: pathlib.Path, env: dict = TOOL_ENV, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    print(f"$ {' '.join(str(part) for part in command)}  (exit {result.returncode})\n{result.stdout[-3000:]}"
          f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """(path, commit): this working tree committed into a scratch repository named as users clone it."""
    repository = tmp_path_factory.mktemp("source") / PACK_FOLDER_NAME
    return repository, user_install.snapshot_repository(repository)


@pytest.fixture(scope="module")
def registry_package(snapshot, tmp_path_factory):
    """(names, folder): the zip `comfy node pack` builds (what `comfy node publish` uploads), unpacked."""
    repository, _ = snapshot
    result = run_tool([tools.tool("comfy"), "node", "pack"], cwd=repository)
    assert result.returncode == 0 and (repository / "node.zip").exists(), "comfy node pack failed"
    folder = tmp_path_factory.mktemp("package")
    with zipfile.ZipFile(repository / "node.zip") as package:
        names = set(package.namelist())
        package.extractall(folder)
    return names, folder


def test_comfy_node_validate_passes_and_the_registry_reads_every_field(snapshot):
    repository, _ = snapshot
    result = run_tool([tools.tool("comfy"), "node", "validate"], cwd=repository)

    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert "All validation checks passed" in output
    assert "Warning" not in output  # an invalid classifier or license is only a warning
    # what `comfy node publish` sends the Registry, as comfy-cli's own parser reads it
    read = run_tool([tools.tools_env() / "bin" / "python", "-c", READ_AS_THE_REGISTRY], cwd=repository)
    config = json.loads(read.stdout.strip().splitlines()[-1])
    project, comfy = config["project"], config["tool_comfy"]
    assert project["urls"] == {"homepage": REPOSITORY_URL, "documentation": f"{REPOSITORY_URL}#readme",
                               "repository": REPOSITORY_URL, "issues": f"{REPOSITORY_URL}/issues"}
    assert set(project["supported_accelerators"]) == ACCELERATORS
    assert project["supported_os"] == ["OS Independent"]
    assert project["supported_comfyui_version"] == ">=0.3.64"
    assert comfy["publisher_id"] and comfy["display_name"] == "ComfyUI-Headroom"
    # the icon URL is the raw file of one committed here: a square PNG
    assert comfy["icon"].startswith(ICON_URL_PREFIX), comfy["icon"]
    icon = repository / comfy["icon"].removeprefix(ICON_URL_PREFIX)
    assert icon.is_file(), f"{comfy['icon']} names {icon.name}, which the repository does not have"
    header = icon.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width == height and 64 <= width <= 512, (width, height)


def test_registry_package_holds_what_users_run_and_nothing_else(snapshot, registry_package):
    repository, _ = snapshot
    names, _ = registry_package
    tracked = subprocess.run(["git", "ls-files"], cwd=repository, check=True, capture_output=True,
                             text=True).stdout.split()
    wanted = {name for name in tracked if any(re.fullmatch(pattern, name) for pattern in SHIPPED)}

    assert not [name for name in names if name.split("/")[0] in ("tests", "bench", ".ci", "docs")]
    assert names == wanted, f"in the package but not wanted: {sorted(names - wanted)}; " \
                            f"wanted but missing: {sorted(wanted - names)}"
    assert {"nodes/force_gc.py", "memory/comfy/__init__.py", "workflows/big_model_small_gpu.json"} <= names


def test_nodesafe_does_not_call_the_package_malicious(registry_package):
    _, folder = registry_package
    result = run_tool([tools.tool("nodesafe"), "scan", "--format", "json", "--fail-on", "malicious", folder],
                      cwd=folder)
    report = json.loads(result.stdout)
    serious = [f"{finding['severity']}: {finding['title']} ({finding.get('file')}:{finding.get('line')})"
               for finding in report["findings"] if finding["severity"] in ("high", "critical")]

    assert report["verdict"]["label"] != "malicious", serious
    assert report["recommendation"] != "do_not_install", serious
    assert result.returncode == 0


def test_cm_cli_installs_from_a_git_url_and_comfyui_loads_all_nodes(snapshot, tmp_path):
    repository, commit = snapshot
    comfyui = user_install.comfyui_copy(comfy_host.comfyui_dir(), tmp_path / "ComfyUI")
    requirements = user_install.requirement_names(REPO_ROOT / "requirements.txt")
    python = user_install.user_environment(tmp_path / "env", leave_out=requirements,
                                           extra_site=tools.site_packages(tools.tools_env()))
    where = "import importlib.metadata as m, json, sys; print(json.dumps({n: str(m.distribution(n).locate_file('')) " \
            "for n in sys.argv[1:] if any(True for _ in m.distributions(name=n))}))"

    before = json.loads(subprocess.run([python, "-c", where, *requirements], check=True, capture_output=True,
                                       text=True).stdout)
    # cm-cli as it runs in ComfyUI's environment (it pip-installs with the python that runs it); it refuses
    # file:/// URLs, so the scratch repository is named file://localhost/...
    result = run_tool([python, "-m", "cm_cli", "install", "--exit-on-fail", f"file://localhost{repository}"],
                      cwd=tmp_path, env={**TOOL_ENV, "COMFYUI_PATH": str(comfyui)})
    after = json.loads(subprocess.run([python, "-c", where, *requirements], check=True, capture_output=True,
                                      text=True).stdout)

    assert before == {}, "the user environment already had the pack's requirements"
    assert result.returncode == 0 and "[INSTALLED]" in result.stdout
    clone = comfyui / "custom_nodes" / PACK_FOLDER_NAME
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, check=True, capture_output=True,
                          text=True).stdout.strip() == commit
    own_site = str(tmp_path / "env" / "venv" / "lib")
    assert set(after) == set(requirements) and all(path.startswith(own_site) for path in after.values()), after

    server = ComfyServer(comfyui, python=str(python), custom_nodes=comfyui / "custom_nodes")
    try:
        server.start()
        object_info = server.get("/object_info")
        log = server.log_text()
    finally:
        server.cleanup()
    loaded = {name for name, info in object_info.items() if info["python_module"] == f"custom_nodes.{PACK_FOLDER_NAME}"}

    # ComfyUI's own extras may miss optional packages here (comfy_angle); only the pack's lines count
    pack_lines = [line for line in log.splitlines() if f"custom_nodes/{PACK_FOLDER_NAME}" in line]

    assert loaded == HEADROOM_NODES
    assert any("seconds:" in line for line in pack_lines), log[-4000:]  # the import-time line of the clone
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line], pack_lines


def test_managers_node_scanner_is_not_shown_the_test_only_nodes(snapshot):
    """ComfyUI-Manager's scanner (scanner.py in its repository, not on PyPI: run by hand, it lists the six
    nodes) reads every .py file of a clone but those under a folder whose name starts with a dot, and
    credits the pack with every node mapping it finds there."""
    repository, _ = snapshot
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=repository, check=True, capture_output=True,
                             text=True).stdout.split()
    mapping = re.compile(r"^\s*NODE_CLASS_MAPPINGS\s*(:[^=]+)?=", re.MULTILINE)
    defining = [name for name in tracked if mapping.search((repository / name).read_text())]
    scanned = [name for name in defining if not any(part.startswith(".") for part in name.split("/"))]

    # the pack defines no mapping (V3: comfy_entrypoint); the test-only nodes do, where the scanner does not look
    assert str(TEST_NODES_DIR.relative_to(REPO_ROOT) / "__init__.py") in defining
    assert scanned == []
