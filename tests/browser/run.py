"""A real-browser check: ComfyUI's own frontend, in headless Chromium, used as a person uses it.

    python3 tests/browser/run.py                          # the newest pinned ComfyUI
    python3 tests/browser/run.py --host all               # every pinned ComfyUI (or --host v0.3.64)
    python3 tests/browser/run.py --workflow force_gc --out DIR

Needs Debian's Chromium (`sudo apt-get install chromium`); the suite (tests/run.py) runs it on the
newest host. For each host it prepares ComfyUI exactly as the suite does (tests/support/hosts.py), starts
`main.py --cpu` with the pack and the generated checkpoints the workflow names, and drives
/usr/bin/chromium over the DevTools protocol (tests/browser/cdp.py) through visible UI only:
buttons found by their text or accessible label, the search box by its placeholder, tree items and
tabs by their text, the keyboard, and the file chooser. It prints one line per check:

  node library  the "Node Library" sidebar button, "Headroom" typed into its search box: every
                node /object_info puts in category Headroom is listed by its display name
  open workflow Ctrl+O (ComfyUI's "Open Workflow" shortcut) and the file chooser it opens get
                workflows/<name>.json: its tab appears, no dialog (missing nodes or models) and no
                error in the page's console
  run           the "Run" button queues it; the server's /history records it as a success with images

Screenshots go to <out>/<host>/: 1-node-library.png, 2-workflow-loaded.png, 3-run-finished.png
(and failure.png). It exits 0 only when every check passed on every host it ran.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

BROWSER_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = BROWSER_DIR.parents[1]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
sys.path[:0] = [str(BROWSER_DIR), str(REPO_ROOT / "tests" / "support")]

from cdp import CHROMIUM, Browser, BrowserError  # noqa: E402

RUN_TIMEOUT_S = 900


class CheckFailed(Exception):
    pass


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="newest", help="a pinned host name (tests/hosts.toml), newest or all")
    parser.add_argument("--workflow", default="big_model_small_gpu",
                        help="name of workflows/<name>.json, or the path of a UI-format workflow file")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("headroom-output/browser"),
                        help="folder for the screenshots (default: ./headroom-output/browser)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- in each host's environment -----------------------------------------------------------------

def visible(selector: str, test: str = "true") -> str:
    """JS: the first shown element matching `selector` for which `test` (on `e`) holds."""
    return f"[...document.querySelectorAll({json.dumps(selector)})].find(e => e.getClientRects().length && ({test}))"


def button(label: str) -> str:
    """JS: the shown button that reads `label`, else the one whose accessible label starts with it (e.g.
    "Node Library (n)" on an icon). What it reads comes first: newer frontends (v0.33) label the menu
    arrow beside the Run button "Run", and the Run button itself only by its text."""
    text = visible("button", f"e.innerText.trim().split('\\n')[0].trim() === {json.dumps(label)}")
    labelled = visible("button", f"(e.getAttribute('aria-label') || '').startsWith({json.dumps(label)})")
    return f"({text} || {labelled})"


SHOWN_DIALOG = visible("[role=dialog]")


class Page:
    def __init__(self, browser: Browser, shots: pathlib.Path):
        self.browser = browser
        self.shots = shots

    def wait_until(self, what: str, probe, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise CheckFailed(f"{what}: not within {timeout:.0f} s")
            time.sleep(0.2)

    def click(self, what: str, element_js: str) -> None:
        self.browser.click(*self.wait_until(f"{what} shown", lambda: self.browser.center_of(element_js)))

    def click_until(self, what: str, element_js: str, shown: str, shown_js: str, timeout: float = 60) -> None:
        """Click until `shown_js` is shown: while the app still starts up a click may do nothing, and
        a first-start dialog (the template browser) may open over it; a person closes it and retries."""
        deadline = time.monotonic() + timeout
        while True:
            self.close_dialogs()
            self.click(what, element_js)
            try:
                self.wait_until(f"{shown} after clicking {what}", lambda: self.browser.center_of(shown_js), timeout=3)
                return
            except CheckFailed:
                if time.monotonic() > deadline:
                    raise

    def close_dialogs(self) -> None:
        # first-start dialogs (the template browser) cover the page; a person closes them with Escape
        for _ in range(5):
            if not self.browser.evaluate(f"!!{SHOWN_DIALOG}"):
                return
            self.browser.press("Escape", "Escape", 27)
            time.sleep(0.5)

    def screenshot(self, name: str) -> pathlib.Path:
        path = self.shots / name
        self.browser.screenshot(path)
        return path


def check_node_library(page: Page, headroom_nodes: list[str]) -> str:
    # "Search Nodes..." in older frontends, "Search..." in the node library of newer ones (v0.33); not the
    # search box of a dialog (the template browser has one too)
    search_box = visible("input", "e.placeholder.startsWith('Search') && !e.closest('[role=dialog]')")
    page.click_until("the Node Library button", button("Node Library"), "the node search box", search_box)

    def listed():
        return page.browser.evaluate(
            "[...document.querySelectorAll('[role=treeitem]')].filter(e => e.getClientRects().length)"
            ".map(e => e.innerText.trim().split('\\n')[0].trim())")

    for attempt in range(3):
        # a first-start dialog can open over the page while we type, taking the keys: a person closes
        # it, selects what the search box holds (Ctrl+A) and types again
        page.close_dialogs()
        page.click("the node search box", search_box)
        page.browser.press("a", "KeyA", 65, modifiers=2, commands=("selectAll",))
        page.browser.type_text("Headroom")
        try:
            page.wait_until("every Headroom node listed", lambda: set(headroom_nodes) <= set(listed()), timeout=20)
            break
        except CheckFailed:
            if attempt == 2 or not page.browser.evaluate(f"!!{SHOWN_DIALOG}"):
                raise
    shot = page.screenshot("1-node-library.png")
    page.click("the Node Library button", button("Node Library"))  # closes the sidebar, leaves the search box
    return f"search 'Headroom' lists {', '.join(headroom_nodes)} ({shot})"


def check_open_workflow(page: Page, workflow_file: pathlib.Path) -> str:
    page.close_dialogs()
    page.browser.errors()  # only what loading logs counts
    page.browser.press("o", "KeyO", 79, modifiers=2)
    page.browser.choose_file(workflow_file)
    page.wait_until(f"a tab named {workflow_file.stem}",
                    lambda: page.browser.center_of(visible("button", f"e.innerText.trim().split('\\n')[0].trim() === "
                                                                     f"{json.dumps(workflow_file.stem)}")))
    time.sleep(1)  # the canvas draws on the next frames
    shot = page.screenshot("2-workflow-loaded.png")
    dialog = page.browser.evaluate(f"({SHOWN_DIALOG})?.innerText")
    if dialog:
        raise CheckFailed(f"a dialog opened: {dialog[:300]!r} ({shot})")
    errors = page.browser.errors()
    if errors:
        raise CheckFailed(f"the page logged {len(errors)} error(s), first: {errors[0][:400]} ({shot})")
    return f"{workflow_file.name} opened through the file chooser ({shot})"


def check_run(page: Page, server) -> str:
    page.close_dialogs()
    started = time.monotonic()
    page.click("the Run button", button("Run"))

    def queued():
        queue = server.get("/queue")
        if queue["queue_running"] or queue["queue_pending"] or server.get("/history"):
            return True
        dialog = page.browser.evaluate(f"({SHOWN_DIALOG})?.innerText")
        if dialog:  # the frontend shows a prompt the server refused as a dialog
            raise CheckFailed(f"a dialog opened: {dialog[:400]!r}")

    # fails fast when the click queued nothing, instead of waiting for the whole run's time-out
    page.wait_until("the prompt queued after clicking Run", queued, timeout=60)

    def finished():
        records = list(server.get("/history").values())
        if records and records[0].get("status", {}).get("status_str"):
            return records
        dialog = page.browser.evaluate(f"({SHOWN_DIALOG})?.innerText")
        if dialog:  # the frontend shows a prompt the server refused as a dialog
            raise CheckFailed(f"a dialog opened: {dialog[:400]!r}")

    record = page.wait_until("the prompt recorded in /history", finished, timeout=RUN_TIMEOUT_S)[0]
    time.sleep(2)  # the image reaches the Save Image node over the websocket
    shot = page.screenshot("3-run-finished.png")
    status = record["status"]["status_str"]
    images = [image for output in record["outputs"].values() for image in output.get("images", [])]
    if status != "success" or not images:
        errors = [f"{error['node_type']} #{error['node_id']}: {error['exception_message'].strip()}"
                  for kind, error in record["status"].get("messages", []) if kind == "execution_error"]
        raise CheckFailed(f"status {status}, {len(images)} image(s) {errors} ({shot})")
    return f"queued from the Run button, success in {time.monotonic() - started:.1f} s, {len(images)} image(s) ({shot})"


def workflow_path(workflow: str) -> pathlib.Path:
    return pathlib.Path(workflow).resolve() if workflow.endswith(".json") else WORKFLOWS_DIR / f"{workflow}.json"


def checkpoint_names(workflow: dict) -> list[str]:
    return sorted({node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == "CheckpointLoaderSimple"})


def inside(args) -> int:
    import comfy_host
    import generated_models
    from server import ComfyServer

    workflow_file = workflow_path(args.workflow)
    generators = generated_models.GENERATED_CHECKPOINTS  # checkpoint name -> what writes that file
    comfy_host.import_comfyui()  # the generators take the module shapes from ComfyUI itself
    names = checkpoint_names(json.loads(workflow_file.read_text()))
    unknown = [name for name in names if name not in generators]
    if unknown:
        print(f"FAIL checkpoints: {workflow_file.name} names {unknown}; generated here: {sorted(generators)}")
        return 1
    server = ComfyServer(comfy_host.comfyui_dir(), checkpoints=[generators[name]() for name in names],
                         with_test_nodes=True, cpu=True)
    print(f"[browser] ComfyUI on {server.url} (log: {server.log_path})", flush=True)
    try:
        server.start()
        headroom_nodes = sorted(info["display_name"] for info in server.get("/object_info").values()
                                if info["category"] == "Headroom")
        # big enough that a workflow fitted into the view is drawn with its text (not the zoomed-out outline)
        browser = Browser(width=3200, height=1800)
        try:
            page = Page(browser, args.out)
            browser.goto(server.url)
            page.wait_until("the Run button", lambda: browser.center_of(button("Run")), timeout=60)
            for name, check in [("node library", lambda: check_node_library(page, headroom_nodes)),
                                ("open workflow", lambda: check_open_workflow(page, workflow_file)),
                                ("run", lambda: check_run(page, server))]:
                try:
                    print(f"ok   {name}: {check()}", flush=True)
                except (CheckFailed, BrowserError) as failure:
                    print(f"FAIL {name}: {failure} (page now: {page.screenshot('failure.png')})", flush=True)
                    return 1
            return 0
        finally:
            browser.close()
    finally:
        server.cleanup()


# -- on the machine's python3 ---------------------------------------------------------------------

def main(args) -> int:
    import hosts
    if not pathlib.Path(CHROMIUM).exists():
        print(f"[browser] {CHROMIUM} not found: sudo apt-get install chromium", file=sys.stderr)
        return 1
    try:
        prepared = hosts.prepare_hosts(args.host)
    except hosts.HostError as error:
        print(f"[browser] {error}", file=sys.stderr)
        return 1
    results = {}
    for ready in prepared:
        print(f"[browser] ComfyUI {ready.host.name} at {ready.comfyui_dir}", flush=True)
        env = {**os.environ, "HEADROOM_COMFYUI_DIR": str(ready.comfyui_dir)}
        command = [str(ready.python), "-P", __file__, "--inside", "--workflow", str(workflow_path(args.workflow)),
                   "--out", str(args.out / ready.host.name)]
        results[ready.host.name] = subprocess.run(command, env=env).returncode
    for name, returncode in results.items():
        print(f"[browser] {name}: {'passed' if returncode == 0 else 'FAILED'}")
    return 0 if all(returncode == 0 for returncode in results.values()) else 1


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    sys.exit(inside(arguments) if arguments.inside else main(arguments))
