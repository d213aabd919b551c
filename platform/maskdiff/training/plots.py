"""Loss curves as PNG files, drawn with matplotlib (Agg: no display needed).

:func:`plot_metrics` reads ``metrics.jsonl`` and writes one PNG per modality:
training bits/token (every log) and held-out bits/token (every evaluation)
against the optimizer step. Figures are built with matplotlib's object API
(no ``pyplot``), so plotting leaves no global state behind in the caller.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = tuple[str, Sequence[tuple[float, float]], str]  # label, [(x, y), ...], matplotlib colour
TRAIN_COLOUR, HELDOUT_COLOUR = "tab:blue", "tab:red"
FIGSIZE_IN, DPI = (6.4, 4.0), 100
MARKERS_BELOW = 40  # points per series under which each point is also marked


def line_figure(series: Sequence[Series], title: str, xlabel: str = "step", ylabel: str = "bits/token") -> Figure:
    """``(label, [(x, y), ...], colour)`` series on shared axes, one line each."""
    if not any(points for _, points, _ in series):
        raise ValueError(f"{title}: nothing to plot")
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points, colour in series:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, color=colour, label=label, linewidth=1.5, marker="o" if len(points) < MARKERS_BELOW else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, color="0.9")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def line_plot(series: Sequence[Series], path: str | Path, title: str, xlabel: str = "step", ylabel: str = "bits/token") -> Path:
    """Draw the series (see :func:`line_figure`) and save them as a PNG."""
    fig = line_figure(series, title, xlabel, ylabel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def metric_curves(metrics_path: str | Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """modality -> {"train": [(step, bits)], "eval": [...]} from ``metrics.jsonl``; non-finite points left out."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in records:
        for mod, bits in r.get("bits_per_token", {}).items():
            c = curves.setdefault(mod, {"train": [], "eval": []})
            if isinstance(bits, (int, float)) and math.isfinite(bits):  # a diverged step has nothing to draw
                c[r["kind"]].append((r["step"], bits))
    return curves


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One ``<modality>.png`` per modality in ``metrics.jsonl``: train and held-out bits/token."""
    out = []
    for mod, c in metric_curves(metrics_path).items():
        series = [("train", c["train"], TRAIN_COLOUR), ("held-out", c["eval"], HELDOUT_COLOUR)]
        if c["train"] or c["eval"]:
            out.append(line_plot([s for s in series if s[1]], Path(out_dir) / f"{mod}.png", mod))
    return out


__all__ = ["line_figure", "line_plot", "metric_curves", "plot_metrics"]
