"""How long a table's model trains, chosen by the cells set aside from it (early stopping).

A table of a few hundred rows is learned by heart long before a time budget
of minutes ends: the training bits keep falling while the fill of cells the
model has not seen gets worse (wine, 178 rows: RMSE / std of hidden cells
0.79 after 60 passes, 0.88 after 300). The set-aside cells of the fit
(:func:`maskdiff.tasks.imputation_calibration.validation_cells`) measure exactly
that: while the trainer runs in its own process, :class:`CheckpointWatch`
fills them with each checkpoint the run writes, keeps the weights that fill
them best, and asks the run to stop (``STOP`` in its run directory, see
:class:`maskdiff.training.trainer.TimeBudget`) once :data:`PATIENCE` checkpoints in a
row did no better. :meth:`CheckpointWatch.keep_best` then puts the best
weights in the run's bundle.
"""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from maskdiff.bundle import Bundle, annotate, export_bundle, load_bundle
from maskdiff.training.checkpoints import damage, safe_load, step_of
from maskdiff.config import to_run_config
from .imputation import impute
from .imputation_calibration import MIN_TO_CALIBRATE
from .imputation_quality import score
from maskdiff.core.joint import JointModel
from maskdiff.data.loader import open_sources
from maskdiff.data.tables import Table
from maskdiff.training.run_dir import CHECKPOINTS, STOP

Cell = tuple[int, int]
CHECKPOINTS_PER_RUN = 30  # over the planned steps: one every 10 passes at the 300-pass cap
PATIENCE = 5  # checkpoints in a row without a better fill before the run is stopped
SCORED_ROWS = 500  # rows whose set-aside cells score a checkpoint (a large table's score needs no more)
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file of the module's weights in a checkpoint
BUNDLE_KEY = "selected_step"  # bundle.json: the step whose weights the bundle holds, and the scores behind it


def fill_loss(truth: Table, cells: Sequence[Cell], guesses: dict[Cell, Any], kinds: dict[str, str]) -> float:
    """Mean over columns of a fill's loss on ``cells``: (RMSE / std)^2 for a numeric column (about 1 for
    the column mean), the error rate for a categorical one. Lower is better.

    Only columns with at least MIN_TO_CALIBRATE cells count (all of them when none has that many): the
    std of a handful of cells is noise, and that of one cell is zero, which left a mostly empty
    column's raw squared error (thousands) to decide which checkpoint was best."""
    per = score(truth, [cell for cell in cells if cell in guesses], guesses, kinds)  # none for a row the model cannot read
    columns = [v for name, v in per.items() if name != "all"]
    judged = [v for v in columns if v["cells"] >= MIN_TO_CALIBRATE] or columns
    return float(np.mean([v["nrmse"] ** 2 if "nrmse" in v else 1.0 - v["accuracy"] for v in judged]))


def checkpoint_every(planned_steps: int) -> int:
    return max(1, math.ceil(planned_steps / CHECKPOINTS_PER_RUN))


@contextmanager
def one_thread() -> Iterator[None]:
    """Score on one thread: the training process beside this one keeps the other cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CheckpointWatch:
    """Scores a training run's checkpoints as they appear, keeps the best weights, stops the run when they stop improving."""

    def __init__(self, cfg: DictConfig, truth: Table, learn_from: Table, held: Sequence[Cell], seed: int, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.run_dir)
        rows = sorted({r for r, _ in held})
        if len(rows) > SCORED_ROWS:
            rows = sorted(np.random.default_rng(seed).choice(rows, size=SCORED_ROWS, replace=False).tolist())
        at = {r: i for i, r in enumerate(rows)}
        # the scored rows as a table of their own: their set-aside cells are missing in it, as in training
        self.table = Table(learn_from.columns, [learn_from.values[r] for r in rows], "frame")
        self.truth = Table(truth.columns, [truth.values[r] for r in rows], "frame")
        self.cells = [(at[r], c) for r, c in held if r in at]
        self.scores: dict[int, float] = {}
        self.best: tuple[int, dict[str, torch.Tensor]] | None = None
        self._bundle: Bundle | None = None

    def poll(self) -> None:
        """Score the complete checkpoints not scored yet; ask the run to stop when PATIENCE did no better than the best."""
        if not self.cells:  # nothing set aside (a table too small for it): nothing to judge by, the budget decides
            return
        root = self.run_dir / CHECKPOINTS
        tags = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None), key=lambda p: p.name) if root.is_dir() else []
        for tag in tags:
            step = step_of(tag.name)
            if step in self.scores or damage(tag) is not None:  # not written completely yet (or pruned meanwhile)
                continue
            try:
                state = safe_load(tag / MODEL_STATES)["module"]
            except (OSError, RuntimeError, KeyError):  # pruned by the trainer while being read: it was not the newest
                continue
            self.scores[step] = loss = self._score(state)
            if self.best is None or loss < self.scores[self.best[0]] or not math.isfinite(self.scores[self.best[0]]):
                self.best = (step, {k: v.clone() for k, v in state.items()})
        if self.best is not None and sum(s > self.best[0] for s in self.scores) >= PATIENCE and not (self.run_dir / STOP).exists():
            self.log(f"no better fill of the set-aside cells in {PATIENCE} checkpoints after step {self.best[0]}: stopping the run")
            (self.run_dir / STOP).touch()

    def _score(self, state: dict[str, torch.Tensor]) -> float:
        bundle = self._scoring_bundle()
        bundle.model.load_state_dict(state)
        with one_thread():
            guesses = impute(bundle, self.table, calibrate=False).draws[0]
        adapter = bundle.adapter("tabular")
        return fill_loss(self.truth, self.cells, guesses, {c: adapter.kind(c) for c in adapter.columns})

    def _scoring_bundle(self) -> Bundle:
        """The run's model and adapters, built as the trainer builds them (the run has not exported a bundle yet)."""
        if self._bundle is None:
            config = to_run_config(self.cfg)
            sets, spec = open_sources(config, 0, 1, shuffle_buffer=1, seed=0, repeat=False)
            adapters = {key: a for s in sets.values() for key, a in s.adapters.items()}
            self._bundle = Bundle(JointModel(spec, config).eval(), self.cfg, config, spec, adapters, {})
        return self._bundle

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else self.best[0]

    def keep_best(self, bundle_path: Path) -> None:
        """Put the best-scoring weights in the run's bundle (when they are not the last ones) and record the choice."""
        self.poll()  # the final checkpoint, written just before the bundle
        bundle = load_bundle(bundle_path)
        step = int(bundle.info["step"])
        if self.best is not None and self.best[0] != step:
            bundle.model.load_state_dict(self.best[1])
            export_bundle(bundle_path, bundle.model, bundle.cfg, bundle.spec, bundle.adapters, step=self.best[0],
                          metrics=bundle.info.get("metrics"), lengths=bundle.info.get("lengths"))
            self.log(f"the weights of step {self.best[0]} fill the set-aside cells best (loss {self.scores[self.best[0]]:.3f}, "
                     f"step {step}: {self.scores.get(step, math.nan):.3f}): the bundle holds them")
        annotate(bundle_path, BUNDLE_KEY, {"step": self.best_step if self.best is not None else step,
                                           "trained_steps": step, "scores": {str(k): round(v, 5) for k, v in sorted(self.scores.items())}})
        shutil.rmtree(self.run_dir / CHECKPOINTS, ignore_errors=True)  # kept for scoring only: a table fit is not resumed
        self._bundle = None
