"""The main job: run the combined example workflow headless through ComfyUI's HTTP API and print the
Memory Report.

    python3 workflows/run.py                      # the generated model, on a pinned ComfyUI
    python3 workflows/run.py --checkpoint my_sd15.safetensors --gpu
    COMFYUI_DIR=/path/to/ComfyUI python3 workflows/run.py

It prepares what it needs (a ComfyUI checkout and its Python environment, cached under
${XDG_CACHE_HOME:-~/.cache}/comfyui-headroom/, exactly as the test suite does), starts
`main.py` headless on a free loopback port with the pack installed (on the CPU unless --gpu),
queues the workflow (default: big_model_small_gpu, Pick GPU -> Offload Model -> Sliced Attention ->
KSampler -> Force GC -> VAE decode -> Tiled Inpaint -> Memory Report), follows it over the
websocket, prints what each Headroom node reported (the Memory Report last), saves the images,
the chart and the report's JSON into --out, stops the server and exits 0 (1 if the prompt failed).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SUPPORT_DIR = REPO_ROOT / "tests" / "support"
sys.path.insert(0, str(SUPPORT_DIR))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default="big_model_small_gpu", help="name of workflows/<name>.api.json")
    parser.add_argument("--checkpoint", type=pathlib.Path,
                        help="your SD1.5-family checkpoint; without it a tiny generated model is used "
                             "(random weights: the images are noise, the memory report is real)")
    parser.add_argument("--steps", type=int, help="override the sampler steps")
    parser.add_argument("--size", type=int, help="override the image width and height (px)")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("headroom-output"),
                        help="folder for the images, the chart and the report (default: ./headroom-output)")
    parser.add_argument("--host", default="newest",
                        help="the pinned ComfyUI to run on (tests/hosts.toml): newest (default) or a name such as v0.12.1")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def inside(args) -> int:
    import comfy_host
    import generated_models
    from server import ComfyServer
    from example_workflows import checkpoint_name, for_checkpoint, load_api_workflow

    workflow = load_api_workflow(args.workflow)
    if args.checkpoint is None:
        comfy_host.import_comfyui()  # the generator takes the module shapes from ComfyUI itself
        named = checkpoint_name(workflow)
        checkpoint = generated_models.GENERATED_CHECKPOINTS[named]()
        without_text_encoder = generated_models.lacks_text_encoder(named)
        steps, size = args.steps or 4, args.size or 256
    else:
        checkpoint, without_text_encoder = args.checkpoint.resolve(), False
        steps, size = args.steps, args.size
    workflow = for_checkpoint(workflow, checkpoint.name, without_text_encoder, steps, size)

    server = ComfyServer(comfy_host.comfyui_dir(), checkpoints=[checkpoint], with_test_nodes=without_text_encoder,
                         cpu=not args.gpu)
    print(f"[headroom] starting ComfyUI on {server.url} (log: {server.log_path})", flush=True)
    server.start()
    try:
        run = server.run(workflow)
        reports = []
        for node_id, node in sorted(workflow.items(), key=lambda item: int(item[0])):
            outputs = run.outputs(node_id)
            if node["class_type"].startswith("Headroom"):
                for text in outputs.get("text", []):
                    print(f"[{node['class_type']} #{node_id}] {text}")
            reports += outputs.get("headroom_report", [])
        if not run.succeeded:
            print(f"[headroom] the prompt failed: {run.error()}", file=sys.stderr)
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        for node_output in run.history.get("outputs", {}).values():
            for image in node_output.get("images", []):
                if image.get("type") != "output":
                    continue  # previews live in ComfyUI's temp folder; SaveImage wrote the same pictures
                source = server.output_dir / image["subfolder"] / image["filename"]
                shutil.copy2(source, args.out / image["filename"])
                print(f"[headroom] saved {args.out / image['filename']}")
        for index, report in enumerate(reports):
            path = args.out / (f"memory_report_{index + 1}.json" if len(reports) > 1 else "memory_report.json")
            path.write_text(json.dumps(report, indent=2, sort_keys=True))
            print(f"[headroom] saved {path}")
        return 0
    finally:
        server.cleanup()


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if not arguments.inside:
        from hosts import exec_in_host
        exec_in_host(pathlib.Path(__file__), ["--inside", *sys.argv[1:]], arguments.host)
    sys.exit(inside(arguments))
