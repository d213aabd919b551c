"""What a run leaves for people to watch: loss-curve PNGs (matplotlib) and TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_support import tensorboard_scalars

from maskdiff.training.plots import HELDOUT_COLOUR, TRAIN_COLOUR, line_figure, line_plot, metric_curves, plot_metrics
from maskdiff.training.tensorboard_log import TensorBoardLog, scalars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORDS = [
    {"kind": "eval", "step": 0, "bits_per_token": {"text": 8.0, "tabular": 3.0}, "tokens": {"text": 100, "tabular": 20}},
    {"kind": "train", "step": 5, "lr": 1e-3, "loss": 4.2, "bits_per_token": {"text": 6.5, "tabular": 2.5}, "tokens": {"text": 90, "tabular": 30},
     "w": {"text": {"mean": 1.01, "min": 0.9, "max": 1.2}}, "skipped_steps": 0, "note": "text is not a scalar", "flag": True},
    {"kind": "train", "step": 10, "lr": 9e-4, "loss": None, "bits_per_token": {"text": 5.0, "tabular": 2.0}, "tokens": {"text": 80, "tabular": 40},
     "w": {}, "skipped_steps": 1},
    {"kind": "eval", "step": 10, "bits_per_token": {"text": 5.5, "tabular": 2.2}, "tokens": {"text": 100, "tabular": 20}},
]


def write_metrics(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- plots -------------------------------------------------------------------------------------


def test_figure_draws_the_given_values() -> None:
    train, heldout = [(1, 5.0), (2, 4.0), (3, 3.5)], [(0, 6.0), (3, 3.9)]
    fig = line_figure([("train", train, TRAIN_COLOUR), ("held-out", heldout, HELDOUT_COLOUR)], "text")
    (ax,) = fig.axes
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()}
    assert drawn == {"train": train, "held-out": heldout}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "held-out"]
    assert ax.get_title() == "text" and ax.get_ylabel() == "bits/token"
    lo, hi = ax.get_ylim()
    assert lo <= 3.5 and hi >= 6.0


def test_png_is_valid_and_shows_the_curve(tmp_path: Path) -> None:
    path = line_plot([("train", [(0, 1.0), (10, 2.0)], "#ff0000")], tmp_path / "sub" / "curve.png", "t")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (400, 640, 3)
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    rows, cols = np.nonzero(red)
    assert red.sum() > 100  # the line (and its legend entry) are drawn in the given colour
    # the curve rises from left to right: in the leftmost red columns the pixels lie lower than in the rightmost
    left, right = cols < np.percentile(cols, 10), cols > np.percentile(cols, 60)
    assert rows[left].mean() > rows[right].mean()


def test_nothing_to_plot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to plot"):
        line_plot([("train", [], TRAIN_COLOUR)], tmp_path / "x.png", "empty")
    assert not (tmp_path / "x.png").exists()


def test_plot_metrics_one_png_per_modality(tmp_path: Path) -> None:
    metrics = write_metrics(tmp_path / "metrics.jsonl", RECORDS)
    assert metric_curves(metrics)["text"] == {"train": [(5, 6.5), (10, 5.0)], "eval": [(0, 8.0), (10, 5.5)]}
    out = plot_metrics(metrics, tmp_path / "plots")
    assert sorted(p.name for p in out) == ["tabular.png", "text.png"]
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in out)


# --- TensorBoard -------------------------------------------------------------------------------


def test_scalars_flatten_every_number_of_a_record() -> None:
    assert scalars(RECORDS[1]) == {
        "train/lr": 1e-3, "train/loss": 4.2, "train/bits_per_token/text": 6.5, "train/bits_per_token/tabular": 2.5,
        "train/tokens/text": 90.0, "train/tokens/tabular": 30.0, "train/w/text/mean": 1.01, "train/w/text/min": 0.9,
        "train/w/text/max": 1.2, "train/skipped_steps": 0.0,
    }
    assert "train/loss" not in scalars(RECORDS[2])  # null: nothing to log


def test_event_file_holds_the_records(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path / "tb")
    for r in RECORDS:
        log.write(r)
    log.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    got = tensorboard_scalars(tmp_path / "tb")
    assert got["eval/bits_per_token/text"] == [(0, 8.0), (10, 5.5)]
    assert got["train/bits_per_token/tabular"] == [(5, 2.5), (10, 2.0)]
    assert got["train/w/text/mean"] == [(5, pytest.approx(1.01))]
    assert set(got) == {tag for r in RECORDS for tag in scalars(r)}


def test_resume_drops_events_past_the_checkpoint(tmp_path: Path) -> None:
    first = TensorBoardLog(tmp_path / "tb")
    for step in (5, 10, 15):  # the run died after logging step 15; its checkpoint is at step 10
        first.write({"kind": "train", "step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardLog(tmp_path / "tb", resume_step=10)
    resumed.write({"kind": "train", "step": 15, "loss": 1.5})
    resumed.write({"kind": "train", "step": 20, "loss": 2.0})
    resumed.close()
    assert tensorboard_scalars(tmp_path / "tb")["train/loss"] == [(5, 5.0), (10, 10.0), (15, 1.5), (20, 2.0)]


def test_non_finite_values_are_kept_as_in_the_json(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path / "tb")
    log.write({"kind": "train", "step": 1, "loss": float("nan")})
    log.close()
    [(step, value)] = tensorboard_scalars(tmp_path / "tb")["train/loss"]
    assert step == 1 and math.isnan(value)
