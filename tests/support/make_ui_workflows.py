"""Write workflows/<name>.json (UI format) from workflows/<name>.api.json, using a real server's /object_info.

    cd tests/support && HEADROOM_COMFYUI_DIR=<checkout> PYTHONPATH=. <host python> make_ui_workflows.py NAME...

A maintenance tool: tests/e2e/test_workflows.py checks that the committed pairs agree. Where the UI file
exists, its layout (node positions and sizes, the saved view) is kept; new nodes are laid out in columns.
"""
import json
import sys

import comfy_host
from example_workflows import WORKFLOWS_DIR, api_to_ui, load_api_workflow
from server import ComfyServer

if __name__ == "__main__":
    server = ComfyServer(comfy_host.comfyui_dir()).start()
    try:
        object_info = server.get("/object_info")
    finally:
        server.cleanup()
    for name in sys.argv[1:]:
        ui = api_to_ui(load_api_workflow(name), object_info)
        path = WORKFLOWS_DIR / f"{name}.json"
        if path.exists():
            before = json.loads(path.read_text())
            laid_out = {node["id"]: node for node in before["nodes"]}
            for node in ui["nodes"]:
                if node["id"] in laid_out:
                    node["pos"], node["size"] = laid_out[node["id"]]["pos"], laid_out[node["id"]]["size"]
            ui["extra"] = before.get("extra", ui["extra"])
        path.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {WORKFLOWS_DIR / f'{name}.json'}")
