"""Tiled Inpaint on the CPU: memory follows the tile and the image buffers; time follows the masked tiles.

    flock /tmp/headroom-bench.lock python3 bench/bench_tiled_inpaint.py [--processes 3] [--repeats 2] [--steps 2]

Every configuration runs in `processes` FRESH subprocesses of the newest pinned ComfyUI (prepared like
the test suite), `--cpu`, on the generated tiny SD1.5 model + TAESD, tiles of 512 px with 64 px overlap,
mask grow and feather 16 px, euler, cfg 7. A subprocess loads the model and warms up with one tile on a
512x512 image, so model loading and one tile's sampling are in its baseline; then it reads its peak
RSS (ru_maxrss), makes the image and mask, runs the node once and reads the peak again: the growth is
what this image size added. Then it runs the node `repeats` more times, timed. Figures are medians over
the processes (memory) and over all their timed runs (time).
  memory + time vs image area: 1024^2, 2048^2, 4096^2, the same 32 px square masked (one tile)
  memory + time vs masked tiles: 2048^2 with squares in 1, 2 and 4 tiles
  memory of the node's own code: the image-area series again with test-double VAE and sampler, which
  takes ComfyUI's working set (sized by ComfyUI from the free RAM of the moment) out of the figure
Image buffers: the input IMAGE and its MASK (made by the subprocess, as a loader would), the output
IMAGE, and the initial noise of the whole image in latent space (float32, 4 x H/8 x W/8).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))
MB = 2 ** 20
TILE, OVERLAP, REACH = 512, 64, 16  # REACH: mask grow and feather, each
# (image side, grid tiles (row, column) holding a masked square)
AREA_SERIES = [(1024, [(0, 0)]), (2048, [(0, 0)]), (4096, [(0, 0)])]
TILES_SERIES = [(2048, [(0, 0), (0, 2)]), (2048, [(0, 0), (0, 2), (2, 0), (2, 2)])]


def image_buffer_bytes(side: int) -> dict[str, int]:
    latent_side = -(-side // 8)
    return {"image": side * side * 3 * 4, "mask": side * side * 4, "output": side * side * 3 * 4,
            "noise": 4 * latent_side * latent_side * 4}


def test_double_backend(tile_backend):
    """The node's own code without ComfyUI's VAE and sampler: 8x8 average pooling as the encoder,
    nearest upscaling as the decoder, a sampler that keeps the latent. Isolates the tiling's memory."""
    import torch
    import torch.nn.functional as F

    def encode(pixels):
        pooled = F.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)

    def decode(latent):
        return F.interpolate(latent[:, :3], scale_factor=8).movedim(1, -1)

    return tile_backend(encode=encode, encode_tiled=encode, sample=lambda latent, *rest: latent, decode=decode,
                        decode_tiled=decode, free_memory=list, is_out_of_memory=lambda error: False,
                        progress=lambda done, total: None)


def inside_child(side: int, cells: list, repeats: int, steps: int, doubles: bool) -> dict:
    """One configuration, in this fresh process: peak RSS growth of the first run, then timed runs."""
    import gc
    import resource
    import time

    import comfy_host
    import generated_models
    nodes = comfy_host.import_comfyui()
    comfy_host.load_pack(nodes)
    import comfy.sd
    import torch
    tiles = comfy_host.pack_module("memory.tiles")

    model, _, vae = comfy.sd.load_checkpoint_guess_config(str(generated_models.tiny_sd15_checkpoint()),
                                                          output_vae=True, output_clip=False)[:3]
    node = nodes.NODE_CLASS_MAPPINGS["HeadroomTiledInpaint"]
    positive, negative = generated_models.text_conditioning(1), generated_models.text_conditioning(2)

    def masked_squares(size, where):
        grid = tiles.plan_grid(size, size, TILE, OVERLAP)
        rows = sorted({tile.y for tile in grid})
        columns = sorted({tile.x for tile in grid})
        mask = torch.zeros(1, size, size)
        for row, column in where:  # a 32 px square in the middle of that grid tile
            y, x = rows[row] + TILE // 2 - 16, columns[column] + TILE // 2 - 16
            mask[0, y:y + 32, x:x + 32] = 1.0
        selected = tiles.select_tiles(grid, mask, REACH, REACH)
        assert len(selected) == len(where), (size, where, selected)
        return mask

    inpainting = comfy_host.pack_module("memory.inpaint")
    doubles_backend = test_double_backend(inpainting.TileBackend)
    settings = inpainting.InpaintSettings(TILE, OVERLAP, REACH, REACH, seed=0)

    def inpaint(image, mask):
        if doubles:
            result, report = inpainting.inpaint_tiled(image, mask, positive, negative, settings, doubles_backend)
            return result, report.describe()
        return comfy_host.run_v3_node(
            node, model=model, positive=positive, negative=negative, vae=vae, image=image, mask=mask,
            tile_size=TILE, overlap=OVERLAP, mask_grow=REACH, mask_feather=REACH, seed=0, steps=steps, cfg=7.0,
            sampler_name="euler", scheduler="normal", denoise=1.0).args

    def peak_rss_bytes():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    inpaint(torch.rand(1, TILE, TILE, 3), masked_squares(TILE, [(0, 0)]))  # warm-up: one tile
    gc.collect()
    baseline = peak_rss_bytes()
    image = torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(0))
    mask = masked_squares(side, cells)
    result, plan = inpaint(image, mask)
    growth = peak_rss_bytes() - baseline
    del result
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        inpaint(image, mask)
        seconds.append(time.perf_counter() - started)
    return {"side": side, "masked_tiles": len(cells), "plan": plan, "baseline": baseline, "growth": growth,
            "seconds": seconds, "torch": torch.__version__}


def run_children(side: int, cells: list, processes: int, repeats: int, steps: int, doubles: bool = False) -> dict:
    """The configuration in `processes` fresh subprocesses: median growth, all timed runs."""
    runs = []
    for _ in range(processes):
        command = [sys.executable, "-P", __file__, "--inside", "--child", json.dumps([side, cells, doubles]),
                   "--repeats", str(repeats), "--steps", str(steps)]
        finished = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if finished.returncode:
            sys.exit(f"benchmark subprocess failed ({side}, {cells}):\n{finished.stderr[-4000:]}")
        runs.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    return {**runs[0], "growths": [run["growth"] for run in runs],
            "growth": statistics.median(run["growth"] for run in runs),
            "seconds": [second for run in runs for second in run["seconds"]]}


def main(processes: int, repeats: int, steps: int) -> None:
    import comfy_host
    area = [run_children(side, cells, processes, repeats, steps) for side, cells in AREA_SERIES]
    by_tiles = [next(run for run in area if run["side"] == 2048)]
    by_tiles += [run_children(side, cells, processes, repeats, steps) for side, cells in TILES_SERIES]
    doubled = [run_children(side, cells, processes, repeats, steps, doubles=True) for side, cells in AREA_SERIES]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {area[0]['torch']}, ComfyUI at {comfy_host.comfyui_dir().name[:8]}, --cpu; tiny SD1.5 + TAESD, "
          f"tile {TILE} px, overlap {OVERLAP} px, {steps} steps; {processes} fresh processes per row, "
          f"{repeats} timed runs each")
    print("\n| image | masked tiles | peak RSS growth | image buffers (image + mask + output + noise) "
          "| growth - buffers | median s | time / 1024² |")
    print("|---|---|---|---|---|---|---|")
    base_time = statistics.median(area[0]["seconds"])
    for run in area:
        buffers = image_buffer_bytes(run["side"])
        total = sum(buffers.values())
        parts = " + ".join(f"{value / MB:.1f}" for value in buffers.values())
        median = statistics.median(run["seconds"])
        print(f"| {run['side']}² | {run['masked_tiles']} | {run['growth'] / MB:.1f} MB | {total / MB:.1f} MB "
              f"({parts}) | {(run['growth'] - total) / MB:+.1f} MB | {median:.2f} | {median / base_time:.2f} |")
    print("\nThe node's own code alone (test-double VAE and sampler, same process setup):")
    print("\n| image | peak RSS growth | image buffers | growth - buffers |")
    print("|---|---|---|---|")
    for run in doubled:
        total = sum(image_buffer_bytes(run["side"]).values())
        print(f"| {run['side']}² | {run['growth'] / MB:.1f} MB | {total / MB:.1f} MB | "
              f"{(run['growth'] - total) / MB:+.1f} MB |")
    print("\n| image | masked tiles | plan | peak RSS growth | median s | time / 1 tile |")
    print("|---|---|---|---|---|---|")
    one_tile = statistics.median(by_tiles[0]["seconds"])
    for run in by_tiles:
        median = statistics.median(run["seconds"])
        print(f"| {run['side']}² | {run['masked_tiles']} | {run['plan']} | {run['growth'] / MB:.1f} MB "
              f"| {median:.2f} | {median / one_tile:.2f} |")
    print("\nraw:", json.dumps([{key: run[key] for key in ("side", "masked_tiles", "growths", "seconds")}
                                for run in area + by_tiles[1:] + doubled]))


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--processes", type=int, default=3)
    arguments.add_argument("--repeats", type=int, default=2)
    arguments.add_argument("--steps", type=int, default=2)
    arguments.add_argument("--host", default="newest",
                           help="the pinned ComfyUI to run on (tests/hosts.toml): newest (default) or a name such as v0.12.1")
    arguments.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    arguments.add_argument("--child", help=argparse.SUPPRESS)
    parsed = arguments.parse_args()
    if not parsed.inside:
        from hosts import exec_in_host
        exec_in_host(pathlib.Path(__file__), ["--inside", *sys.argv[1:]], parsed.host)
    if parsed.child:
        side, cells, doubles = json.loads(parsed.child)
        print(json.dumps(inside_child(side, cells, parsed.repeats, parsed.steps, doubles)))
    else:
        main(parsed.processes, parsed.repeats, parsed.steps)
