"""Headless Chromium driven over the Chrome DevTools Protocol (a websocket), with what a person does:
look at the page, click where something is shown, type, pick a file, take a screenshot.

Only websocket-client is needed (it is in every host environment); no WebDriver.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

CHROMIUM = "/usr/bin/chromium"


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, width: int = 1600, height: int = 1000):
        if not pathlib.Path(CHROMIUM).exists():
            raise BrowserError(f"{CHROMIUM} is missing: sudo apt-get install chromium")
        self.profile = pathlib.Path(tempfile.mkdtemp(prefix="headroom-chromium-"))
        self.process = subprocess.Popen(
            # no background networking, QUIC, component updates or sync: a machine with a closed network
            # refuses those connections by the dozen, and a test needs none of them
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import websocket  # websocket-client, from the host environment (not needed to find chromium)
        port = self._devtools_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []  # what the page reported while we waited for answers
        for domain in ("Page", "Runtime", "DOM"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        # a file chooser the page opens is reported to us (Page.fileChooserOpened) instead of shown
        self.send("Page.setInterceptFileChooserDialog", enabled=True)

    def _devtools_port(self, timeout: float = 30) -> int:
        # Chromium writes the port it chose into the profile once it listens
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited with {self.process.returncode} while starting")
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            time.sleep(0.1)
        raise BrowserError("chromium did not open its DevTools port")

    def close(self) -> None:
        self.socket.close()
        os.killpg(self.process.pid, signal.SIGTERM)  # chromium and its renderers: its own session
        self.process.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if "method" in message:
                self.events.append(message)
            elif message.get("id") == message_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message["result"]

    def wait_for_event(self, method: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = next((event for event in self.events if event["method"] == method), None)
            if found:
                self.events.remove(found)
                return found
            if time.monotonic() > deadline:
                raise BrowserError(f"no {method} within {timeout:.0f} s")
            self.evaluate("0")  # collects the events that arrived meanwhile
            time.sleep(0.1)

    def errors(self) -> list[str]:
        """What the page logged as errors (console.error, uncaught exceptions) since the last call."""
        found, kept = [], []
        for event in self.events:
            params = event["params"]
            if event["method"] == "Runtime.consoleAPICalled" and params["type"] == "error":
                found.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description", details["text"]))
            else:
                kept.append(event)
        self.events = kept
        return found

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def center_of(self, element_js: str) -> tuple[float, float] | None:
        """Where the element that `element_js` evaluates to is shown, scrolled into view; None if not shown."""
        return self.evaluate(f"""(() => {{
            const element = {element_js};
            if (!element) return null;
            element.scrollIntoView({{block: 'nearest'}});
            const box = element.getBoundingClientRect();
            return box.width && box.height ? [box.x + box.width / 2, box.y + box.height / 2] : null;
        }})()""")

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type_text(self, text: str) -> None:
        self.send("Input.insertText", text=text)

    def press(self, key: str, code: str, key_code: int, modifiers: int = 0, commands: tuple[str, ...] = ()) -> None:
        """A key press; modifiers: 2 = Ctrl. commands: the editing commands the key means in a text field
        (headless Chromium does not derive them from the keys, e.g. "selectAll" for Ctrl+A)."""
        self.send("Input.dispatchKeyEvent", type="keyDown", key=key, code=code, windowsVirtualKeyCode=key_code,
                  modifiers=modifiers, commands=list(commands))
        self.send("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=key_code,
                  modifiers=modifiers)

    def choose_file(self, path: pathlib.Path) -> None:
        """Answer the file chooser the page has opened with `path`."""
        chooser = self.wait_for_event("Page.fileChooserOpened")
        self.send("DOM.setFileInputFiles", files=[str(path)], backendNodeId=chooser["params"]["backendNodeId"])

    def screenshot(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
