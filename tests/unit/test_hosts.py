"""Host setup: checkouts tolerate a missing blob; a host that cannot be found fails with directions."""
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "support"))
import hosts  # noqa: E402


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repository(tmp_path):
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "main.py").write_text("print('hello')\n")
    (repo / "comfy").mkdir()
    (repo / "comfy" / "big.json").write_text('{"large": true}\n')
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return repo, git(repo, "rev-parse", "HEAD")


def test_checkout_skips_a_missing_blob_and_lists_it(repository, tmp_path, monkeypatch):
    repo, commit = repository
    blob = git(repo, "rev-parse", f"{commit}:comfy/big.json")
    (repo / ".git" / "objects" / blob[:2] / blob[2:]).unlink()  # as in snapshots without large blobs
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checkout, missing = hosts.ensure_checkout(hosts.Host("test", commit), [str(repo)])
    assert missing == ["comfy/big.json"]
    assert (checkout / "main.py").read_text() == "print('hello')\n"
    assert os.access(checkout / "run.sh", os.X_OK)
    assert not (checkout / "comfy" / "big.json").exists()
    # cached: a second call needs no source at all
    assert hosts.ensure_checkout(hosts.Host("test", commit), []) == (checkout, ["comfy/big.json"])


def test_first_source_that_has_the_commit_wins(repository, tmp_path, monkeypatch):
    repo, commit = repository
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checkout, _ = hosts.ensure_checkout(hosts.Host("test", commit), [str(other), str(repo)])
    assert (checkout / ".headroom-commit").read_text() == commit


def test_a_commit_no_source_has_fails_saying_how_to_provide_a_host(repository, tmp_path, monkeypatch):
    repo, _ = repository
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(hosts.HostError) as failure:
        hosts.ensure_checkout(hosts.Host("test", "0" * 40), [str(repo), str(tmp_path / "nowhere")])
    message = str(failure.value)
    assert "commit not in this repository" in message
    assert "HEADROOM_COMFYUI_SOURCES" in message and "COMFYUI_DIR" in message


def test_sources_come_from_the_environment_with_upstream_as_default(monkeypatch):
    monkeypatch.delenv("HEADROOM_COMFYUI_SOURCES", raising=False)
    assert hosts.git_sources("https://example.invalid/ComfyUI.git") == ["https://example.invalid/ComfyUI.git"]
    monkeypatch.setenv("HEADROOM_COMFYUI_SOURCES", "/a /b")
    assert hosts.git_sources("https://example.invalid/ComfyUI.git") == ["/a", "/b"]


def test_pins_name_three_hosts_each_with_its_torch_and_constraints():
    pinned, default = hosts.pinned_hosts()
    assert [(h.name, h.commit[:8], h.torch_version) for h in pinned] == [
        ("v0.3.64", "a125cd84", "2.13.0"), ("v0.12.1", "fe251146", "2.13.0"), ("v0.33.0", "2f35f4a0", "2.11.0")]
    assert default.startswith("https://github.com/")
    assert hosts.newest_pinned_host().name == "v0.33.0"
    for host in pinned:
        pins = dict(line.split("==", 1) for line in hosts._pins_of(host.constraints).splitlines())
        for pin in host.torch:  # the torch packages and the constraints agree
            name, version = pin.split("==")
            assert pins[name] == version, (host.name, pin)
    v0_33 = pinned[-1]
    assert "torchaudio==2.11.0" in v0_33.torch
    v0_33_pins = hosts._pins_of(v0_33.constraints)
    assert "comfy-aimdo==0.4.13" in v0_33_pins and "comfy-kitchen==0.2.31" in v0_33_pins  # its requirements' pins


def test_a_host_is_chosen_by_name_newest_or_all():
    pinned, _ = hosts.pinned_hosts()
    assert hosts.select_hosts(pinned, "all") == pinned
    assert [h.name for h in hosts.select_hosts(pinned, "newest")] == ["v0.33.0"]
    assert [h.name for h in hosts.select_hosts(pinned, "v0.12.1,v0.3.64")] == ["v0.12.1", "v0.3.64"]
    with pytest.raises(hosts.HostError, match="no pinned host named v9.9"):
        hosts.select_hosts(pinned, "v9.9")


def test_requirements_skip_torch_and_take_only_the_optional_extras_a_host_lists(tmp_path):
    (tmp_path / "requirements.txt").write_text(
        "torch\ntorchvision\ntorchaudio\nnumpy>=1.25.0\ncomfy-aimdo==0.4.13\n#non essential dependencies:\n"
        "kornia>=0.7.1\nspandrel\nPyOpenGL>=3.1.8\ncomfy-angle\n")
    assert hosts._host_requirements(tmp_path, ("kornia", "spandrel")) == [
        "numpy>=1.25.0", "comfy-aimdo==0.4.13", "kornia>=0.7.1", "spandrel"]
    assert hosts._host_requirements(tmp_path, ()) == ["numpy>=1.25.0", "comfy-aimdo==0.4.13"]


def test_a_comfyui_dir_that_is_not_comfyui_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))
    with pytest.raises(hosts.HostError, match="is not a ComfyUI folder"):
        hosts.prepare_hosts()
