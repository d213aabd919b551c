"""Learn a model of one table from its own observed cells: shard, size, train under a time budget, calibrate.

:func:`fit_table` is what ``tools/impute.py`` runs when no ``--model`` is
given, and what :class:`maskdiff.tasks.imputer.MaskdiffImputer` runs in ``fit``:

1. set aside a tenth of the observed cells of each column (at most 1,000) for calibration
   (:func:`maskdiff.tasks.imputation_calibration.validation_cells`) and write the
   rest as ``RUN/fit-input.<csv|parquet>``;
2. shard that into ``RUN/shards`` (missing cells are not tokens, so only
   observed cells are learned; free-text, date and empty columns are passed
   through, see :mod:`maskdiff.adapters.tabular`);
3. choose the batch and the step cap from the table (:func:`plan_fit`):
   batches of about a tenth of the rows (16 to 256), at most ``MAX_EPOCHS``
   passes; training stops when the budget is spent (``train.minutes``,
   which the learning-rate decay follows too);
4. train with the regular trainer (DeepSpeed, one process) in ``RUN/model``,
   which holds the configuration it used (``config.yaml``), the metrics and
   the bundle (``RUN/model/bundle``, reusable with ``--model``); meanwhile
   each checkpoint fills the set-aside cells, the run is stopped once that
   fill stops improving, and the bundle keeps the weights that filled them
   best (:mod:`maskdiff.tasks.fit_selection`);
5. when the budget has room for more (a small table), train further models
   with other seeds for that many steps in ``RUN/model-2`` ...
   (:func:`more_members`); imputation averages their conditionals;
6. fill the set-aside cells (and the other cells missing in the rows the
   regressions learn from) and store each column's correction in the bundle:
   how much of the model's guess, of a row model (a regression or classifier of
   the column on the row's other cells) and of the column mean / mode a best
   guess takes (:func:`calibrate`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from maskdiff.adapters.tabular import DEFAULT_NA

from maskdiff.bundle import ENSEMBLE, adapter_of, annotate, load_bundle
from maskdiff.errors import UserError
from maskdiff.config import RunConfig, to_run_config, validate
from .fit_selection import CheckpointWatch, checkpoint_every
from .imputation_calibration import BUNDLE_KEY, REGRESSION_ROWS, fit_calibration, to_json, validation_cells
from .imputation_quality import finite_number, with_hidden
from maskdiff.data.shards import REJECTS, ShardSet, write_shards
from maskdiff.data.tables import Table, read_table, write_table

MIN_ROWS = 30  # fewer rows with observed cells than this: too little to learn a joint model from
MAX_EPOCHS = 300  # passes over the rows; small tables need many, large ones reach the budget first
START_S = 30.0  # the trainer's start in its own process (imports, DeepSpeed's engine): planned for
ENGINE_S = 15.0  # what is left of it once the child runs (the engine, the shards); the loop gets the rest
MAX_MEMBERS = 4  # models averaged when the budget allows more than one (small tables)
POLL_S = 2.0  # how often the parent looks for new checkpoints of a training child
NUMBERS_SHARE = 0.9  # a categorical column with at least this share of number cells gets a hint (see number_columns_learned_as_categories)
FILL_S_PER_ROW = 0.004  # one imputation pass, per row, on a busy 2-core machine (measured: about 2 ms quiet)
ROW_MODELS_S_PER_CELL = 2e-4  # the calibration's row models, per cell of the rows they learn from (measured, one thread:
# 5.5 s for adult's 3,257 x 15; 2.2 s for one 50-category column of 5,000 rows x 20; 0.5-1.1 s per numeric column of 5,000 rows with its kernels)


@dataclass(frozen=True)
class FitPlan:
    """What :func:`plan_fit` chose, and why (written to the run's config and printed)."""

    rows: int
    row_tokens: int
    batch_rows: int
    steps: int  # at most; the time budget usually ends training first
    budget_s: float  # of the training loop (``train.minutes``)

    def describe(self) -> str:
        return (f"{self.rows} rows x {self.row_tokens} learned columns; batches of {self.batch_rows} rows; "
                f"up to {self.steps} steps ({MAX_EPOCHS} passes), at most {self.budget_s / 60:.1f} min of training")


def base_config(shard_dir: Path, run_dir: Path, seed: int = 0) -> DictConfig:
    """The recipe for one table; :func:`plan_fit` fills in the batch, the steps and the time."""
    recipe: dict[str, Any] = {
        "name": run_dir.name,
        "seed": seed,
        "run_dir": str(run_dir),
        "data": {"sources": {"tabular": {"dirs": [str(shard_dir.resolve())], "weight": 1.0}}, "heldout": 0.0, "shuffle_buffer": 4096,
                 "bucket": 1, "batch_size": None},
        # dropout and weight decay: a table of a few thousand rows is seen hundreds of times
        "model": {"dim": 128, "depth": 4, "heads": 4, "dropout": 0.1},
        "schedules": {"tabular": {"kind": "linear"}},
        "optim": {"lr": 2.0e-3, "weight_decay": 0.01, "warmup_steps": 50, "decay": "cosine", "min_lr_ratio": 0.1},
        "deepspeed": {"zero_stage": 0},
        "train": {"log_every": 50, "eval_every": 10**9, "checkpoint_every": 10**9, "keep_checkpoints": 1},
    }
    return OmegaConf.merge(OmegaConf.structured(RunConfig), recipe)  # type: ignore[return-value]


def plan_fit(rows: int, row_tokens: int, budget_s: float) -> FitPlan:
    """Batch and step cap for ``rows`` rows; training stops after ``budget_s`` seconds or the cap."""
    if rows < MIN_ROWS:
        raise UserError(f"the table has {rows} rows with observed cells; at least {MIN_ROWS} are needed to learn from it")
    batch_rows = int(min(256, max(16, rows // 10)))
    return FitPlan(rows, row_tokens, batch_rows, math.ceil(MAX_EPOCHS * rows / batch_rows), budget_s)


def after_training_s(rows_filled: int, members: int, row_model_cells: int) -> float:
    """Seconds a fit needs once training ends: filling ``rows_filled`` rows (those the calibration reads,
    then the table) with ``members`` models, and the calibration's row models."""
    return FILL_S_PER_ROW * members * rows_filled + ROW_MODELS_S_PER_CELL * row_model_cells


def training_budget(minutes: float, spent_s: float, after_s: float) -> float:
    """Seconds of ``minutes`` left for the training loop after what was spent and what comes after it:
    the trainer's start (about half a minute) and ``after_s`` (:func:`after_training_s`)."""
    return max(10.0, minutes * 60 - spent_s - START_S - after_s)


def fit_table(source: str | Path, run_dir: str | Path, *, minutes: float, adapter_options: Mapping[str, Any] | None = None,
              seed: int = 0, overwrite: bool = False, progress: bool = False, log: Callable[[str], None] = print) -> tuple[Path, FitPlan]:
    """Shard ``source`` (CSV or Parquet) into ``run_dir``, train within ``minutes``, calibrate; return the bundle and the plan."""
    if not math.isfinite(minutes) or minutes <= 0:
        raise UserError(f"--minutes {minutes}: must be a finite number > 0")
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"run directory {run_dir} already exists; pass --overwrite to replace it, or reuse it with --model {run_dir / 'model' / 'bundle'}")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _fit(Path(source), run_dir, minutes, dict(adapter_options or {}), seed, progress, log, started)
    except BaseException:
        if created:  # a failed fit leaves nothing behind that would block a retry
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _fit(source: Path, run_dir: Path, minutes: float, adapter_options: dict[str, Any], seed: int, progress: bool,
         log: Callable[[str], None], started: float) -> tuple[Path, FitPlan]:
    shard_dir, model_dir = run_dir / "shards", run_dir / "model"
    delimiter = adapter_options.get("delimiter", ",")
    table = read_table(source, delimiter, _names(adapter_options.get("na_values", DEFAULT_NA)))
    given = set(_names(adapter_options.get("passthrough")))
    held = validation_cells(table, [c for c in table.columns if c not in given], np.random.default_rng(seed))
    learn_from = with_hidden(table, held)
    fit_input = write_table(learn_from, {}, run_dir / f"fit-input{'.parquet' if table.kind == 'parquet' else source.suffix or '.csv'}", delimiter)
    manifest = write_shards("tabular", [fit_input], shard_dir, progress=progress, overwrite=True, **adapter_options)
    adapter = adapter_of(ShardSet([shard_dir], rank=0, world_size=1).adapters, "tabular")
    for name, why in adapter.passthrough.items():
        log(f"column {name!r} is passed through, not learned: {why}")
    for hint in number_columns_learned_as_categories(table, adapter, _names(adapter_options.get("categorical"))):
        log(hint)
    held = [(r, c) for r, c in held if table.columns[c] in adapter.columns]  # a column found not learnable has nothing to judge
    calibration_rows = len(regression_rows(table.num_rows, {r for r, _ in held}, seed))
    after = lambda members: after_training_s(calibration_rows + table.num_rows, members, calibration_rows * len(adapter.columns))  # noqa: E731
    if manifest["records_rejected"]:
        log(f"{manifest['records_rejected']} row(s) could not be read and are left as they are (reasons in {shard_dir / REJECTS})")
    plan = plan_fit(manifest["records_written"], len(adapter.columns),
                    training_budget(minutes, time.perf_counter() - started, after(1)))
    cfg = OmegaConf.merge(base_config(shard_dir, model_dir, seed),
                          {"data": {"batch_tokens": plan.batch_rows * plan.row_tokens},
                           "train": {"steps": plan.steps, "minutes": plan.budget_s / 60,
                                     "checkpoint_every": checkpoint_every(plan.steps), "keep_checkpoints": 3}})
    validate(to_run_config(cfg))
    log(f"fitting {source}: {plan.describe()}; {len(held)} observed cells set aside to calibrate and to stop training "
        f"when their fill stops improving; {torch.get_num_threads()} thread(s); run directory {run_dir}")
    # deadlines on the wall clock, so that a slow start (a busy machine) comes out of training, not on top
    fit_ends = time.time() + minutes * 60 - (time.perf_counter() - started)
    t0 = time.time()
    watch = CheckpointWatch(cfg, table, learn_from, held, seed, log)
    bundle = train_in_child(cfg, progress, ends_at=fit_ends - after(1), poll=watch.poll)
    trained = int(load_bundle(bundle).info["step"])
    watch.keep_best(bundle)
    best = watch.best_step or trained
    # further models train for the chosen number of steps (their learning rate decays over them)
    member_cfg = OmegaConf.merge(cfg, {"train": {"steps": best, "checkpoint_every": best, "keep_checkpoints": 1}})
    member_s = START_S + (time.time() - t0 - START_S) * best / max(trained, 1)
    members = more_members(member_cfg, run_dir, fit_ends - after(MAX_MEMBERS), member_s, progress, log)
    if members:
        annotate(bundle, ENSEMBLE, [os.path.relpath(m, bundle) for m in members])
    calibrate(bundle, table, learn_from, held, log, seed)
    return bundle, plan


def more_members(cfg: DictConfig, run_dir: Path, deadline: float, member_s: float, progress: bool, log: Callable[[str], None]) -> list[Path]:
    """Spend what the budget has left after the first model, when it stopped early (a small table), on
    further models with other seeds, each expected to take ``member_s``: their conditionals are averaged
    when imputing, which removes much of the run-to-run spread that a few hundred rows leave (``RUN/model-2`` ...)."""
    members: list[Path] = []
    while len(members) + 1 < MAX_MEMBERS and deadline - time.time() > 1.2 * member_s:
        k = len(members) + 2
        log(f"the budget allows another model: training member {k} in {run_dir / f'model-{k}'}")
        member_cfg = OmegaConf.merge(cfg, {"seed": int(cfg.seed) + k - 1, "name": f"model-{k}", "run_dir": str(run_dir / f"model-{k}")})
        members.append(train_in_child(member_cfg, progress, ends_at=deadline))
    return members


def calibrate(bundle_path: Path, truth: Table, learn_from: Table, held: Sequence[tuple[int, int]], log: Callable[[str], None],
              seed: int = 0) -> None:
    """Fill the set-aside cells with the trained model (and the rest of their rows, and a sample of the
    other rows, for the regressions to learn from) and store each column's correction in the bundle."""
    from .imputation import impute

    bundle = load_bundle(bundle_path)
    adapter = bundle.adapter("tabular")
    held = [(r, c) for r, c in held if truth.columns[c] in adapter.columns]
    rows = regression_rows(learn_from.num_rows, {r for r, _ in held}, seed)
    at = {r: i for i, r in enumerate(rows)}
    imp = impute(bundle, Table(learn_from.columns, [learn_from.values[r] for r in rows], "frame"), calibrate=False)
    filled = imp.draws[0]
    refused = {rows[i] for i, _ in imp.refused}  # rows the model cannot read (an inf): neither guessed nor learned from
    guesses = {(r, c): filled[(at[r], c)] for r, c in held if (at[r], c) in filled}
    index = {name: c for c, name in enumerate(learn_from.columns)}
    completed = {r: {name: filled.get((at[r], index[name]), learn_from.values[r][index[name]]) for name in adapter.columns}
                 for r in rows if r not in refused}
    kinds = {c: adapter.kind(c) for c in adapter.columns}
    distributions = {(r, c): imp.distributions[(at[r], c)] for r, c in held if (at[r], c) in imp.distributions}
    calibration = fit_calibration(truth, held, guesses, kinds, completed, distributions)
    annotate(bundle_path, BUNDLE_KEY, to_json(calibration))
    for name, cal in calibration.items():
        log(cal.describe(name))


def regression_rows(num_rows: int, held_rows: set[int], seed: int) -> list[int]:
    """The rows the calibration fills: those with set-aside cells, and of the others a sample that brings
    the count to REGRESSION_ROWS (all of them in a smaller table)."""
    others = np.array(sorted(set(range(num_rows)) - held_rows), dtype=np.int64)
    take = max(0, min(len(others), REGRESSION_ROWS - len(held_rows)))
    sample = np.random.default_rng(seed).choice(others, size=take, replace=False) if take < len(others) else others
    return sorted(held_rows | {int(r) for r in sample})


def number_columns_learned_as_categories(table: Table, adapter: Any, named: Sequence[str]) -> list[str]:
    """A line for each column learned as categories only because a few of its cells are not numbers
    (at least NUMBERS_SHARE are), naming those texts: often they mean 'missing' (``unknown``, ``-``)."""
    hints = []
    position = {name: c for c, name in enumerate(table.columns)}
    for name in adapter.columns:
        if adapter.kind(name) != "categorical" or name in named:
            continue
        c = position[name]
        cells = [row[c] for row in table.values if row[c] is not None]
        others = Counter(str(v) for v in cells if finite_number(v) is None)
        if others and len(cells) - sum(others.values()) >= NUMBERS_SHARE * len(cells):
            shown = ", ".join(repr(t) for t, _ in others.most_common(3)) + (" ..." if len(others) > 3 else "")
            hints.append(f"column {name!r} is learned as categories: {sum(others.values())} of its {len(cells)} cells are not "
                         f"numbers ({shown}); if they mean 'missing', add them to --na-values and it is learned as numbers")
    return hints


def _names(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def train_in_child(cfg: DictConfig, progress: bool = False, ends_at: float | None = None, poll: Callable[[], None] | None = None) -> Path:
    """Train in a fresh process and return the bundle: DeepSpeed keeps process-wide state (its
    process groups) that a second run in the same process would trip over, and a child gives
    its memory back when it ends. ``poll`` is called every POLL_S while the child trains."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),)) as pool:
        future = pool.submit(_train, OmegaConf.to_yaml(cfg), progress, ends_at)
        while poll is not None and not future.done():
            poll()
            wait([future], timeout=POLL_S)
        bundle = future.result()
    return Path(bundle)


def _train(config_yaml: str, progress: bool, ends_at: float | None) -> str:
    from maskdiff.training.trainer import train

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(config_yaml))
    if ends_at is not None:  # the loop ends by ends_at (time.time()), whatever this process's start cost
        left = max(0.05, (ends_at - time.time() - ENGINE_S) / 60)
        cfg.train.minutes = min(cfg.train.minutes, left) if cfg.train.minutes else left
    result = train(cfg, overwrite=True, progress=progress)  # type: ignore[arg-type]
    if result.bundle is None:
        raise UserError(f"training in {result.run_dir} stopped at step {result.step} without a bundle")
    return str(result.bundle)


__all__ = ["FitPlan", "MAX_EPOCHS", "MIN_ROWS", "base_config", "calibrate", "fit_table", "plan_fit", "training_budget"]
