"""Load the pack as a package under its own name.

The repository root is the custom-node folder; its `nodes/` must never be importable as
`nodes` (ComfyUI has a module of that name), so tests import `comfyui_headroom.<module>`.
"""
import importlib.util
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_headroom"

if PACKAGE not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        PACKAGE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
