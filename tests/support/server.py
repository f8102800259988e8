"""A real ComfyUI server (`main.py --cpu`) on a free loopback port, with the pack installed, and a client.

The server gets its own base directory: custom_nodes/ holds the pack (as ComfyUI-Headroom) and the
test-only nodes, models/checkpoints/ the generated checkpoint, and output/ what SaveImage writes.
The client speaks ComfyUI's public HTTP API: POST /prompt, the /ws websocket, /history, /object_info.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

SUPPORT_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = SUPPORT_DIR.parents[1]
PACK_FOLDER_NAME = "ComfyUI-Headroom"
# Hidden (a leading dot): ComfyUI-Manager's node scanner skips such folders, so it never credits the
# pack with these test-only nodes.
TEST_NODES_DIR = SUPPORT_DIR / ".comfy_test_nodes"


class PromptRejected(Exception):
    """POST /prompt answered 400: the prompt failed validation."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body))
        self.body = body


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_dir: pathlib.Path, python: str = sys.executable,
                 checkpoints: list[pathlib.Path] = (), with_pack: bool = True, with_test_nodes: bool = True,
                 cpu: bool = True, extra_args: list[str] = (), custom_nodes: pathlib.Path | None = None):
        """custom_nodes: a custom_nodes folder to load as it is (one a user or ComfyUI-Manager installed
        into) instead of one holding the pack and the test-only nodes."""
        self.comfyui_dir = pathlib.Path(comfyui_dir)
        self.python = python
        self.base_dir = pathlib.Path(tempfile.mkdtemp(prefix="headroom-comfyui-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = self.base_dir / "server.log"
        self.process: subprocess.Popen | None = None
        if custom_nodes is not None:
            (self.base_dir / "custom_nodes").symlink_to(custom_nodes, target_is_directory=True)
        else:
            folder = self.base_dir / "custom_nodes"
            folder.mkdir()
            if with_pack:
                (folder / PACK_FOLDER_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
            if with_test_nodes:
                (folder / "headroom_test_nodes").symlink_to(TEST_NODES_DIR, target_is_directory=True)
        checkpoint_dir = self.base_dir / "models" / "checkpoints"
        checkpoint_dir.mkdir(parents=True)
        for checkpoint in checkpoints:
            (checkpoint_dir / checkpoint.name).symlink_to(checkpoint)
        self.output_dir = self.base_dir / "output"
        self.extra_args = (["--cpu"] if cpu else []) + list(extra_args)

    def start(self, timeout: float = 300) -> "ComfyServer":
        command = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base_dir), "--database-url", f"sqlite:///{self.base_dir / 'comfyui.db'}",
                   *self.extra_args]
        log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.get("/system_stats")
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def settled_rss(self) -> int:
        """The server's RSS once it has settled after a prompt (two readings 0.2 s apart within 1 MiB, at most
        3 s): its worker thread is still finishing up when the last websocket event arrives."""
        import psutil
        process = psutil.Process(self.process.pid)
        previous = process.memory_info().rss
        for _ in range(15):
            time.sleep(0.2)
            current = process.memory_info().rss
            if abs(current - previous) < 2 ** 20:
                return current
            previous = current
        return previous

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_mark(self) -> int:
        """Where the server log ends now; `log_since` reads what was written after it."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int) -> str:
        """The server log written since `mark` (from `log_mark`)."""
        with open(self.log_path, "rb") as log:
            log.seek(mark)
            return log.read().decode(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP -------------------------------------------------------------------------------

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def queue(self, prompt: dict) -> str:
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as error:
            if error.code == 400:
                raise PromptRejected(json.loads(error.read())) from None
            raise

    def upload_image(self, name: str, data: bytes) -> str:
        """POST /upload/image, as the frontend's upload button does (multipart form); returns the stored name."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + data + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
                f"--{boundary}--\r\n").encode()
        request = urllib.request.Request(self.url + "/upload/image", data=body,
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["name"]

    def run(self, prompt: dict, timeout: float = 600) -> "PromptRun":
        """Queue a prompt, follow its websocket events to the end, and return them with its history."""
        import websocket
        socket_ = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                              timeout=timeout)
        try:
            prompt_id = self.queue(prompt)
            events = []
            while True:
                message = socket_.recv()
                if not isinstance(message, str):
                    continue  # binary previews
                event = json.loads(message)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                events.append(event)
                if event["type"] in ("execution_error", "execution_interrupted"):
                    break
                if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
        finally:
            socket_.close()
        return PromptRun(prompt_id, events, self._final_history(prompt_id))

    def _final_history(self, prompt_id: str, timeout: float = 60) -> dict:
        # the worker records history just after its last websocket event: wait for the record
        deadline = time.monotonic() + timeout
        while True:
            history = self.get(f"/history/{prompt_id}").get(prompt_id, {})
            if history.get("status", {}).get("status_str") or time.monotonic() > deadline:
                return history
            time.sleep(0.1)


class PromptRun:
    def __init__(self, prompt_id: str, events: list[dict], history: dict):
        self.prompt_id = prompt_id
        self.events = events
        self.history = history

    @property
    def succeeded(self) -> bool:
        return self.history.get("status", {}).get("status_str") == "success"

    def error(self) -> dict | None:
        return next((e["data"] for e in self.events if e["type"] == "execution_error"), None)

    def outputs(self, node_id: str) -> dict:
        return self.history.get("outputs", {}).get(node_id, {})

    def event_types(self) -> list[str]:
        return [event["type"] for event in self.events]
