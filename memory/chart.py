"""The Memory Report's chart: peak memory per stage as bars, the budgets as lines (Pillow only)."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from .budget import GB
from .report import MemoryReport, Stage

WIDTH, HEIGHT = 960, 540
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 64, 70  # plot margins (px)
MAX_BARS = 32  # top-level stages drawn; the rest are counted in the title
COLOURS = {"vram": (66, 133, 244), "ram": (251, 188, 5), "budget": (219, 68, 55), "planned": (40, 40, 40),
           "after": (15, 157, 88), "axis": (90, 90, 90), "grid": (230, 230, 230), "text": (20, 20, 20)}
SHORT_KIND = {"text encode": "text enc", "sampling": "sampling", "VAE decode": "VAE dec", "VAE encode": "VAE enc",
              "tiles": "tiles", "GC": "GC"}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def _nice_step(top: float) -> float:
    """A round tick step (1, 2 or 5 x 10^n GB) giving about five ticks up to `top`."""
    raw = top / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(step * magnitude for step in (1, 2, 5, 10) if step * magnitude >= raw)


def render_chart(report: MemoryReport) -> Image.Image:
    """Bars: peak VRAM and peak RAM of each top-level stage; ticks: memory left when it ended; hollow box:
    the planned VRAM; dashed lines: the budgets set in the prompt. One axis in GB."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    title_font, font = _font(18), _font(12)
    stages = [stage for stage in report.stages if stage.depth == 0]
    shown = stages[:MAX_BARS]
    title = "Headroom Memory Report" + (f" - prompt {report.prompt_id[:8]}" if report.prompt_id else "")
    if len(stages) > len(shown):
        title += f" (first {len(shown)} of {len(stages)} stages)"
    draw.text((LEFT, 12), title, fill=COLOURS["text"], font=title_font)
    _legend(draw, font, any(stage.peak_vram_bytes is not None for stage in shown), bool(report.budgets))
    plot = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)
    if not shown:
        draw.text((LEFT, HEIGHT // 2), "No Headroom stage has run in this prompt yet.", fill=COLOURS["text"], font=font)
        return image
    values = []
    for stage in shown:
        values += [value for value in (stage.peak_vram_bytes, stage.peak_ram_bytes, stage.planned_vram_bytes)
                   if value is not None]
    # a budget far above every bar (keep-free on a big card, or on the CPU) would flatten them: name it instead
    in_scale = [line for line in report.budgets if line.bytes <= 3 * max(values)]
    above = [line for line in report.budgets if line not in in_scale]
    top_gb = max(max(values + [line.bytes for line in in_scale]) / GB * 1.1, 0.01)
    step = _nice_step(top_gb)
    top_gb = math.ceil(top_gb / step) * step

    def y_of(n_bytes: float) -> float:
        return plot[3] - (plot[3] - plot[1]) * (n_bytes / GB) / top_gb

    for index in range(int(round(top_gb / step)) + 1):
        y = y_of(index * step * GB)
        draw.line((plot[0], y, plot[2], y), fill=COLOURS["grid"])
        draw.text((plot[0] - 8, y), f"{index * step:g}", fill=COLOURS["axis"], font=font, anchor="rm")
    draw.text((12, plot[1] - 22), "GB", fill=COLOURS["axis"], font=font)
    draw.line((plot[0], plot[1], plot[0], plot[3], plot[2], plot[3]), fill=COLOURS["axis"], width=1)
    slot = (plot[2] - plot[0]) / len(shown)
    for index, stage in enumerate(shown):
        _stage_bars(draw, font, stage, plot[0] + slot * index, slot, y_of, plot[3], index + 1)
    for index, line in enumerate(above):
        draw.text((plot[2] - 4, plot[1] + 4 + 16 * index), f"{line.device} {line.label}: {line.bytes / GB:.2f} GB, "
                  "above the chart", fill=COLOURS["budget"], font=font, anchor="ra")
    for line in in_scale:
        y = y_of(line.bytes)
        for x in range(plot[0], plot[2], 12):
            draw.line((x, y, min(x + 7, plot[2]), y), fill=COLOURS["budget"], width=2)
        label = f"{line.device} {line.label}"
        box = draw.textbbox((plot[2] - 4, y - 3), label, font=font, anchor="rd")
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 2, box[3] + 1), fill="white")
        draw.text((plot[2] - 4, y - 3), label, fill=COLOURS["budget"], font=font, anchor="rd")
    return image


def _stage_bars(draw, font, stage: Stage, left: float, slot: float, y_of, base: float, number: int) -> None:
    bars = [(stage.peak_vram_bytes, stage.vram_after_bytes, "vram"),
            (stage.peak_ram_bytes, stage.ram_after_bytes, "ram")]
    bars = [bar for bar in bars if bar[0] is not None]
    width = min(28.0, slot * 0.8 / len(bars))
    start = left + (slot - width * len(bars)) / 2
    for offset, (peak, after, colour) in enumerate(bars):
        x0 = start + offset * width
        draw.rectangle((x0, y_of(peak), x0 + width - 2, base), fill=COLOURS[colour])
        if after is not None:
            y = y_of(after)
            draw.line((x0 - 2, y, x0 + width, y), fill=COLOURS["after"], width=3)
    if stage.planned_vram_bytes is not None:
        y = y_of(stage.planned_vram_bytes)
        draw.rectangle((start - 3, y - 3, start + width + 1, y + 3), outline=COLOURS["planned"], width=2)
    centre = left + slot / 2
    label = SHORT_KIND.get(stage.kind, stage.kind) + ("" if stage.outcome == "success" else " (!)")
    draw.text((centre, base + 6), str(number), fill=COLOURS["axis"], font=font, anchor="ma")
    if slot >= 44:  # room for words
        draw.text((centre, base + 22), label, fill=COLOURS["text"], font=font, anchor="ma")
        draw.text((centre, base + 38), f"{stage.seconds:.1f}s", fill=COLOURS["axis"], font=font, anchor="ma")


def _legend(draw, font, with_vram: bool, with_budget: bool) -> None:
    entries = ([("vram", "peak VRAM")] if with_vram else []) + [("ram", "peak RAM"), ("after", "at stage end")]
    if with_vram:
        entries.append(("planned", "planned VRAM"))
    if with_budget:
        entries.append(("budget", "budget"))
    x = LEFT
    for colour, text in entries:
        draw.rectangle((x, 44, x + 12, 54), fill=COLOURS[colour])
        draw.text((x + 16, 49), text, fill=COLOURS["text"], font=font, anchor="lm")
        x += 24 + int(draw.textlength(text, font=font)) + 12
