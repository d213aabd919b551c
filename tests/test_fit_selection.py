"""Early stopping of a table fit by its set-aside cells: the loss that scores a fill, and the watch over checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from maskdiff.tasks import fit_selection
from maskdiff.training.checkpoints import seal, tag_for
from maskdiff.tasks.fit_selection import MODEL_STATES, PATIENCE, CheckpointWatch, fill_loss
from maskdiff.data.tables import Table


def test_fill_loss_is_the_mean_over_columns_of_squared_relative_rmse_and_error_rate() -> None:
    truth = Table(["x", "c"], [[1.0, "a"], [3.0, "b"], [5.0, "a"], [7.0, "a"]], "frame")
    cells = [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1)]
    guesses = {(0, 0): 2.0, (1, 0): 3.0, (2, 0): 5.0, (3, 0): 4.0, (0, 1): "a", (1, 1): "a", (2, 1): "b"}
    mse = (1.0**2 + 0 + 0 + 3.0**2) / 4
    var = torch.tensor([1.0, 3.0, 5.0, 7.0]).var(unbiased=False).item()  # the std of the hidden values scales the RMSE
    expected = (mse / var + 2 / 3) / 2  # x: (RMSE / std)^2; c: 2 of 3 wrong
    assert fill_loss(truth, cells, guesses, {"x": "numeric", "c": "categorical"}) == pytest.approx(expected)


def test_fill_loss_leaves_out_columns_with_too_few_cells_to_judge() -> None:
    """A mostly empty column with one set-aside cell has no spread to scale by: its raw error must not decide."""
    rows = [[float(i), 300.0 if i == 0 else None] for i in range(12)]
    truth = Table(["x", "sparse"], rows, "frame")
    cells = [(r, 0) for r in range(12)] + [(0, 1)]
    guesses = {(r, 0): float(r) + (1.0 if r % 2 else -1.0) for r in range(12)} | {(0, 1): 0.0}
    x_only = fill_loss(truth, cells[:12], guesses, {"x": "numeric", "sparse": "numeric"})
    assert x_only == pytest.approx(1.0 / np.var(np.arange(12.0)))
    assert fill_loss(truth, cells, guesses, {"x": "numeric", "sparse": "numeric"}) == pytest.approx(x_only)


def _checkpoint(run_dir: Path, step: int) -> None:
    tag = run_dir / "checkpoints" / tag_for(step)
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.tensor([float(step)])}}, tag / MODEL_STATES)
    seal(tag, step)


def test_the_watch_keeps_the_best_weights_and_stops_the_run_after_patience_worse_checkpoints(tmp_path: Path, monkeypatch) -> None:
    table = Table(["x"], [[None], [2.0]], "frame")
    watch = CheckpointWatch(OmegaConf.create({"run_dir": str(tmp_path)}), table, table, [(0, 0)], seed=0, log=lambda _: None)
    losses = {100: 0.9, 200: 0.7, 300: 0.75}
    losses.update({300 + 100 * k: 0.8 for k in range(1, PATIENCE)})
    monkeypatch.setattr(watch, "_score", lambda state: losses[int(state["w"].item())])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / tag_for(50)).mkdir()  # being written: not complete, not scored
    watch.poll()
    assert watch.scores == {} and watch.best_step is None
    for step in sorted(losses):
        _checkpoint(tmp_path, step)
        assert not (tmp_path / "STOP").exists()
        watch.poll()
    # the PATIENCE-th checkpoint after the best one that did not beat it asks the run to stop
    assert (tmp_path / "STOP").exists() and sum(s > 200 for s in watch.scores) == PATIENCE
    assert watch.best_step == 200 and watch.best is not None and watch.best[1]["w"].item() == 200.0
    assert set(watch.scores) == set(losses)


def test_the_watch_scores_a_bounded_sample_of_rows(monkeypatch) -> None:
    monkeypatch.setattr(fit_selection, "SCORED_ROWS", 3)
    table = Table(["x"], [[float(r)] for r in range(10)], "frame")
    held = [(r, 0) for r in range(10)]
    watch = CheckpointWatch(OmegaConf.create({"run_dir": "unused"}), table, table, held, seed=0, log=lambda _: None)
    assert watch.table.num_rows == 3 and len(watch.cells) == 3
    # the scored rows keep their own truth beside them
    assert [watch.truth.values[r][0] for r, _ in watch.cells] == [watch.table.values[r][0] for r, _ in watch.cells]


def test_without_set_aside_cells_the_watch_never_stops_the_run(tmp_path: Path) -> None:
    table = Table(["x"], [[1.0], [2.0]], "frame")
    watch = CheckpointWatch(OmegaConf.create({"run_dir": str(tmp_path)}), table, table, [], seed=0, log=lambda _: None)
    for step in range(1, PATIENCE + 3):
        _checkpoint(tmp_path, 100 * step)
        watch.poll()
    assert not (tmp_path / "STOP").exists() and watch.best_step is None and watch.scores == {}
