"""Learn a model of one table from its own observed cells: shard, size, train under a time budget.

:func:`fit_table` is what ``tools/impute.py`` runs when no ``--model`` is
given, and what :class:`maskdiff.imputer.MaskdiffImputer` runs in ``fit``:

1. shard the table into ``RUN/shards`` (missing cells are not tokens, so only
   observed cells are learned; free-text, date and empty columns are passed
   through, see :mod:`maskdiff.adapters.tabular`);
2. choose the model, the batch and the number of steps from the table and the
   budget (:func:`plan_fit`): batches of about a tenth of the rows (16 to 256),
   the step time measured on this machine, as many steps as fit in the budget
   up to ``MAX_EPOCHS`` passes over the rows;
3. train with the regular trainer (DeepSpeed, one process) in ``RUN/model``,
   which holds the configuration it used (``config.yaml``), the metrics and
   the bundle (``RUN/model/bundle``, reusable with ``--model``).
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from .batch import collate
from .cli import UserError
from .config import RunConfig, to_run_config, validate
from .joint import JointModel
from .shards import REJECTS, ShardSet, write_shards

MIN_ROWS = 30  # fewer rows with observed cells than this: too little to learn a joint model from
MAX_EPOCHS = 300  # passes over the rows; small tables need many, large ones reach the budget first
MIN_STEPS = 100


@dataclass(frozen=True)
class FitPlan:
    """What :func:`plan_fit` chose, and why (written to the run's config and printed)."""

    rows: int
    row_tokens: int
    batch_rows: int
    steps: int
    epochs: float
    seconds_per_step: float
    budget_s: float

    def describe(self) -> str:
        return (f"{self.rows} rows x {self.row_tokens} learned columns; batches of {self.batch_rows} rows; {self.steps} steps "
                f"({self.epochs:.0f} passes, about {self.steps * self.seconds_per_step / 60:.1f} min at {self.seconds_per_step * 1000:.0f} ms/step)")


def base_config(shard_dir: Path, run_dir: Path, seed: int = 0) -> DictConfig:
    """The recipe for one table; :func:`plan_fit` fills in the batch and the steps."""
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


def measure_step(cfg: DictConfig, shards: ShardSet, batch_rows: int, repeats: int = 4) -> float:
    """Seconds per optimiser step of this configuration on this machine (after one warm-up step)."""
    rc = to_run_config(cfg)
    torch.manual_seed(0)
    model = JointModel(shards.spec, rc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    records = []
    for rec in shards:
        records.append(rec)
        if len(records) == batch_rows:
            break
    batch = collate(records, shards.spec)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def plan_fit(rows: int, row_tokens: int, budget_s: float, seconds_per_step: Callable[[int], float]) -> FitPlan:
    """Batch, steps and passes for ``rows`` rows within ``budget_s`` seconds of training."""
    if rows < MIN_ROWS:
        raise UserError(f"the table has {rows} rows with observed cells; at least {MIN_ROWS} are needed to learn from it")
    batch_rows = int(min(256, max(16, rows // 10)))
    per_step = seconds_per_step(batch_rows)
    steps_in_budget = int(budget_s / per_step)
    steps_for_epochs = math.ceil(MAX_EPOCHS * rows / batch_rows)
    steps = max(MIN_STEPS, min(steps_in_budget, steps_for_epochs))
    return FitPlan(rows, row_tokens, batch_rows, steps, steps * batch_rows / rows, per_step, budget_s)


def fit_table(source: str | Path, run_dir: str | Path, *, minutes: float, adapter_options: Mapping[str, Any] | None = None,
              seed: int = 0, overwrite: bool = False, progress: bool = False, log: Callable[[str], None] = print) -> tuple[Path, FitPlan]:
    """Shard ``source`` (CSV or Parquet) into ``run_dir``, train within ``minutes``; return the bundle and the plan."""
    if not math.isfinite(minutes) or minutes <= 0:
        raise UserError(f"--minutes {minutes}: must be a finite number > 0")
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"run directory {run_dir} already exists; pass --overwrite to replace it, or reuse it with --model {run_dir / 'model' / 'bundle'}")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _fit(source, run_dir, minutes, dict(adapter_options or {}), seed, progress, log, started)
    except BaseException:
        if created:  # a failed fit leaves nothing behind that would block a retry
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _fit(source: str | Path, run_dir: Path, minutes: float, adapter_options: dict[str, Any], seed: int, progress: bool,
         log: Callable[[str], None], started: float) -> tuple[Path, FitPlan]:
    shard_dir, model_dir = run_dir / "shards", run_dir / "model"
    manifest = write_shards("tabular", [source], shard_dir, progress=progress, overwrite=True, **adapter_options)
    shards = ShardSet([shard_dir], rank=0, world_size=1)
    adapter = shards.adapters["tabular"]
    for name, why in adapter.passthrough.items():
        log(f"column {name!r} is passed through, not learned: {why}")
    if manifest["records_rejected"]:
        log(f"{manifest['records_rejected']} row(s) could not be read and are left as they are (reasons in {shard_dir / REJECTS})")
    cfg = base_config(shard_dir, model_dir, seed)
    # the budget covers training; set-up, the engine start and imputation take about a fifth, at least 30 s
    train_s = max(10.0, minutes * 60 * 0.8 - 30 - (time.perf_counter() - started))
    plan = plan_fit(manifest["records_written"], len(adapter.columns), train_s,
                    lambda rows: measure_step(cfg, shards, rows))
    cfg = OmegaConf.merge(cfg, {"data": {"batch_tokens": plan.batch_rows * plan.row_tokens}, "train": {"steps": plan.steps}})
    validate(to_run_config(cfg))
    log(f"fitting {source}: {plan.describe()}; {torch.get_num_threads()} thread(s); run directory {run_dir}")
    return train_in_child(cfg, progress), plan


def train_in_child(cfg: DictConfig, progress: bool = False) -> Path:
    """Train in a fresh process and return the bundle: DeepSpeed keeps process-wide state (its
    process groups) that a second run in the same process would trip over, and a child gives
    its memory back when it ends."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),)) as pool:
        bundle = pool.submit(_train, OmegaConf.to_yaml(cfg), progress).result()
    return Path(bundle)


def _train(config_yaml: str, progress: bool) -> str:
    from .trainer import train

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(config_yaml))
    result = train(cfg, overwrite=True, progress=progress)  # type: ignore[arg-type]
    if result.bundle is None:
        raise UserError(f"training in {result.run_dir} stopped at step {result.step} without a bundle")
    return str(result.bundle)


__all__ = ["FitPlan", "MAX_EPOCHS", "MIN_ROWS", "base_config", "fit_table", "measure_step", "plan_fit"]
