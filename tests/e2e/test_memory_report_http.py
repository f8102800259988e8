"""Memory Report through ComfyUI's HTTP API, in the combined workflow (Pick GPU -> Offload Model -> Sliced
Attention -> KSampler -> Force GC -> VAE decode -> Tiled Inpaint -> Memory Report): every stage in the
order it ran with its node, the same numbers in /history and in the JSON output, the chart as an image the
UI shows and SaveImage saves; a failed prompt's stages say so and the next prompt starts clean; 20 prompts
in a row keep the server's RAM flat."""
import io
import json
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from example_workflows import for_checkpoint, load_api_workflow

REPORT, CHART_SAVE = "15", "17"
EXPECTED_STAGES = [  # (kind, node type, depth): the two text encodes run in ComfyUI's order, 6 before 5
    ("text encode", "CLIPTextEncode", 0), ("text encode", "CLIPTextEncode", 0), ("sampling", "KSampler", 0),
    ("GC", "HeadroomForceGC", 0), ("VAE decode", "VAEDecode", 0), ("tiles", "HeadroomTiledInpaint", 0),
    ("VAE encode", "HeadroomTiledInpaint", 1), ("sampling", "HeadroomTiledInpaint", 1),
    ("VAE decode", "HeadroomTiledInpaint", 1)]


def combined(checkpoint_name: str, seed: int = 42) -> dict:
    workflow = for_checkpoint(load_api_workflow("big_model_small_gpu"), checkpoint_name, without_text_encoder=False,
                              steps=2, size=256)
    workflow["8"]["inputs"]["seed"] = workflow["14"]["inputs"]["seed"] = seed  # a new seed: nothing cached
    return workflow


def view(server, image: dict) -> Image.Image:
    query = urllib.parse.urlencode({key: image[key] for key in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


@pytest.fixture(scope="module")
def combined_run(server, text_encoder_checkpoint):
    run = server.run(combined(text_encoder_checkpoint.name))
    assert run.succeeded, run.error()
    return run


def test_object_info_lists_memory_report_with_tooltips(server):
    info = server.get("/object_info/HeadroomMemoryReport")["HeadroomMemoryReport"]
    assert info["display_name"] == "Memory Report" and info["category"] == "Headroom"
    assert info["output_name"] == ["value", "chart", "report_json"] and info["output_node"] is True
    assert info["input"]["optional"]["value"][1]["tooltip"]


def test_the_report_lists_every_stage_in_order_with_its_node(combined_run):
    (report,) = combined_run.outputs(REPORT)["headroom_report"]
    assert report["prompt_id"] == combined_run.prompt_id
    stages = report["stages"]
    assert [(stage["kind"], stage["node_type"], stage["depth"]) for stage in stages] == EXPECTED_STAGES
    assert all(stage["outcome"] == "success" and stage["device"] == "cpu" for stage in stages)
    assert all(stage["peak_ram_bytes"] > 0 and stage["seconds"] > 0 for stage in stages)
    assert all(stage["peak_vram_bytes"] is None for stage in stages)  # --cpu: no VRAM to report
    sampling = stages[2]
    assert sampling["planned_ram_bytes"] > 0 and sampling["resident_bytes"] > 0 and sampling["rungs"] == []
    assert sampling["detail"].startswith("2 steps; plan: cpu:")
    assert "1 sampled, 3 skipped" in stages[5]["detail"]  # the mask touches one tile of the 2x2 grid
    assert stages[5]["peak_ram_bytes"] >= max(stage["peak_ram_bytes"] for stage in stages[6:])
    (budget,) = report["budgets"]
    assert budget["device"] == "cpu" and budget["label"].startswith("keep_free_gb: 1.00 GB")
    assert report["peak_ram_bytes"] == max(stage["peak_ram_bytes"] for stage in stages)
    (text,) = combined_run.outputs(REPORT)["text"]
    assert text.startswith("Memory Report: 9 stages, peak VRAM n/a") and "node=8(KSampler)" in text


def test_the_chart_is_shown_in_the_ui_and_saved_by_save_image(server, combined_run):
    (preview,) = combined_run.outputs(REPORT)["images"]
    assert preview["type"] == "temp"  # a preview on the node, as the frontend shows it
    (saved,) = combined_run.outputs(CHART_SAVE)["images"]
    assert saved["type"] == "output" and saved["filename"].startswith("headroom_memory_report")
    shown, kept = view(server, preview), view(server, saved)
    assert shown.size == kept.size == (960, 540)
    assert shown.tobytes() == kept.tobytes()


def test_the_json_output_carries_the_numbers_of_history(server, combined_run, text_encoder_checkpoint):
    workflow = combined(text_encoder_checkpoint.name, seed=43)
    workflow["18"] = {"class_type": "PreviewAny", "inputs": {"source": ["15", 2]}}  # shows a STRING in the UI
    if "PreviewAny" not in server.get("/object_info"):
        pytest.skip("this ComfyUI has no PreviewAny node")
    run = server.run(workflow)
    assert run.succeeded, run.error()
    (from_history,) = run.outputs(REPORT)["headroom_report"]
    (json_text,) = run.outputs("18")["text"]
    assert json.loads(json_text) == from_history


def test_a_failed_prompt_records_the_failure_and_the_next_prompt_starts_clean(server, text_encoder_checkpoint):
    workflow = combined(text_encoder_checkpoint.name, seed=44)
    workflow["14"]["inputs"]["mask"] = ["12", 0]  # a 56 px mask on a 256 px image: Tiled Inpaint refuses it
    failed = server.run(workflow)
    assert not failed.succeeded and "mask" in failed.error()["exception_message"]
    after = server.run(combined(text_encoder_checkpoint.name, seed=45))
    assert after.succeeded, after.error()
    (report,) = after.outputs(REPORT)["headroom_report"]
    assert report["prompt_id"] == after.prompt_id
    assert [(stage["kind"], stage["node_type"], stage["depth"]) for stage in report["stages"]] == EXPECTED_STAGES


def least_squares_slope(values: list[float]) -> float:
    """The slope of the least-squares line through (0, values[0]), (1, values[1]), ..."""
    count = len(values)
    mean_x, mean_y = (count - 1) / 2, sum(values) / count
    return (sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
            / sum((x - mean_x) ** 2 for x in range(count)))


def test_least_squares_slope_reads_a_known_line():
    assert least_squares_slope([5.0, 8.0, 11.0, 14.0]) == 3.0
    assert least_squares_slope([1.0, 3.0, 1.0, 3.0, 1.0, 3.0]) == 6 / 35  # by hand: 3.0 / 17.5


def test_twenty_prompts_in_a_row_succeed_and_keep_ram_flat(server, text_encoder_checkpoint):
    rss = []
    for seed in range(100, 120):
        run = server.run(combined(text_encoder_checkpoint.name, seed=seed))
        assert run.succeeded, (seed, run.error())
        rss.append(server.settled_rss())
    mib = [value / 2 ** 20 for value in rss]
    # the trend after the first two prompts (which load models and warm caches): a leak of a few MiB a prompt
    # is a line through the readings, even when it is small next to the server's RSS
    slope = least_squares_slope(mib[2:])
    print(f"RSS after run 3: {mib[2]:.1f} MiB, after run 20: {mib[-1]:.1f} MiB; trend over runs 3-20: "
          f"{slope:+.3f} MiB a prompt; all: {[round(value) for value in mib]}")
    assert slope < 0.5, (slope, [round(value) for value in mib])
    assert "Potential memory leak" not in server.log_text()
