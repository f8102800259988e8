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


def test_pins_name_both_hosts():
    pinned, default = hosts.pinned_hosts()
    assert [(h.name, h.commit[:8]) for h in pinned] == [("v0.3.64", "a125cd84"), ("v0.12.1", "fe251146")]
    assert default.startswith("https://github.com/")


def test_a_comfyui_dir_that_is_not_comfyui_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))
    with pytest.raises(hosts.HostError, match="is not a ComfyUI folder"):
        hosts.prepare_hosts()
