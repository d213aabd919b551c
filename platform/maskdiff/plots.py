"""Loss curves as PNG files, drawn with Pillow (no plotting library needed).

:func:`plot_metrics` reads ``metrics.jsonl`` and writes one PNG per modality:
training bits/token (every log) and held-out bits/token (every evaluation)
against the optimizer step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

Series = tuple[str, Sequence[tuple[float, float]], tuple[int, int, int]]
SIZE, MARGIN = (640, 400), (64, 24, 24, 48)  # width, height; left, top, right, bottom


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def line_plot(series: Sequence[Series], path: str | Path, title: str, xlabel: str = "step", ylabel: str = "bits/token") -> Path:
    """Draw ``(label, [(x, y), ...], rgb)`` series on shared axes and save a PNG."""
    pts = [p for _, s, _ in series for p in s]
    if not pts:
        raise ValueError(f"{title}: nothing to plot")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    img = Image.new("RGB", SIZE, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline="black")
    for y in _ticks(y0, y1):
        _, py = to_px(x0, y)
        draw.line((left, py, right, py), fill=(225, 225, 225))
        draw.text((4, py - 6), f"{y:.3g}", fill="black", font=font)
    for x in _ticks(x0, x1):
        px, _ = to_px(x, y0)
        draw.text((px - 10, bottom + 6), f"{x:.0f}", fill="black", font=font)
    draw.text(((left + right) // 2 - 12, SIZE[1] - 18), xlabel, fill="black", font=font)
    draw.text((left, 6), f"{title} ({ylabel})", fill="black", font=font)
    for i, (label, s, rgb) in enumerate(series):
        xy = [to_px(x, y) for x, y in s]
        if len(xy) > 1:
            draw.line(xy, fill=rgb, width=2)
        for px, py in xy if len(xy) < 40 else []:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=rgb)
        ly = top + 14 + 14 * i
        draw.line((right - 130, ly, right - 110, ly), fill=rgb, width=2)
        draw.text((right - 104, ly - 6), label, fill=rgb, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One ``<modality>.png`` per modality in ``metrics.jsonl``: train and held-out bits/token."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in records:
        for mod, bits in r.get("bits_per_token", {}).items():
            c = curves.setdefault(mod, {"train": [], "eval": []})
            if isinstance(bits, (int, float)) and math.isfinite(bits):  # a diverged step has nothing to draw
                c[r["kind"]].append((r["step"], bits))
    out = []
    for mod, c in curves.items():
        series = [("train", c["train"], (31, 119, 180)), ("held-out", c["eval"], (214, 39, 40))]
        if c["train"] or c["eval"]:
            out.append(line_plot([s for s in series if s[1]], Path(out_dir) / f"{mod}.png", f"{mod}"))
    return out


__all__ = ["line_plot", "plot_metrics"]
