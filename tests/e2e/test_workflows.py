"""Every example workflow: its UI format (drag-and-drop into ComfyUI) and its API format agree,
checked against the node definitions the running server publishes."""
import pytest

from example_workflows import WORKFLOWS_DIR, load_api_workflow, load_ui_workflow, ui_to_api

NAMES = sorted(path.name[:-len(".api.json")] for path in WORKFLOWS_DIR.glob("*.api.json"))


def test_every_workflow_has_both_formats():
    ui_names = sorted(path.stem for path in WORKFLOWS_DIR.glob("*.json") if not path.name.endswith(".api.json"))
    assert NAMES and ui_names == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_formats_agree(server, name):
    object_info = server.get("/object_info")
    assert ui_to_api(load_ui_workflow(name), object_info) == load_api_workflow(name)
