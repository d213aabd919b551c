"""Training under DeepSpeed: one run from a resolved configuration, its start and its step loop.

The rooms it uses: the process group (:mod:`maskdiff.training.distributed`), the run
directory (:mod:`maskdiff.training.run_dir`), the optimiser and learning-rate schedule
(:mod:`maskdiff.training.optimizer`, :mod:`maskdiff.training.time_budget`), the DeepSpeed engine
(:mod:`maskdiff.training.engine`), the data (:mod:`maskdiff.data.loader`), metrics
(:mod:`maskdiff.training.train_metrics`, :mod:`maskdiff.training.metrics_log`), checkpoints
(:mod:`maskdiff.training.training_checkpoint`), held-out evaluation
(:mod:`maskdiff.training.heldout_eval`) and the export of a finished run
(:mod:`maskdiff.training.export`).

A resumed run restores model, optimizer, LR schedule, RNG states and the data
position, so it continues the same trajectory. A step whose loss or gradients
are not finite is skipped and counted (``skipped_steps`` in the metrics), and
:data:`MAX_SKIPPED_IN_A_ROW` such steps in a row stop the run, as do
non-finite weights, before anything is saved or exported.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from maskdiff.core.batch import Batch, drop_fields
from .checkpoints import Choice
from maskdiff.config import ConfigError, to_run_config
from .distributed import close_distributed, device_for, gathered, init_distributed, max_over_ranks, on_every_rank, on_rank_zero, sum_over_ranks
from .engine import start_engine
from .export import export_run
from .heldout_eval import HeldoutEvaluation
from maskdiff.core.joint import JointModel
from maskdiff.data.loader import PositionMismatch, batches, ensure_shards, open_sources, train_dataset
from .metrics_log import MetricsLog, report_line
from .optimizer import all_finite, lr_lambda, make_optimizer
from maskdiff.progress import progress_enabled
from .run_dir import METRICS, STOP, SUMMARY, RunDirectory, run_dir_of
from .tensorboard_log import TENSORBOARD
from .time_budget import TimeBudget
from .train_metrics import Tally, peak_memory_mb
from .training_checkpoint import load_checkpoint, own_state, restore_rng, save_checkpoint
from maskdiff.core.tokens import VocabSpec

MAX_SKIPPED_IN_A_ROW = 10  # non-finite steps in a row that stop a run


class DivergedError(ConfigError):
    """Training produced non-finite values it cannot recover from (too high a learning rate, bad data)."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    finished: bool
    train_bits: dict[str, float]
    heldout_bits: dict[str, float]
    tokens_per_s: float
    peak_mem_mb: float
    bundle: Path | None


class Trainer:
    """One training run from a resolved configuration (see the module docstring)."""

    def __init__(self, cfg: DictConfig, *, resume: bool = False, overwrite: bool = False, progress: bool | None = None,
                 log: Callable[[str], None] | None = None, until: int | None = None):
        self.cfg, self.rc = cfg, to_run_config(cfg)
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.device = device_for(int(os.environ.get("LOCAL_RANK", 0)))
        self.resume, self.run_dir = resume, run_dir_of(self.rc)
        self.directory, self.started = RunDirectory(self.run_dir), False
        self.skipped_total = 0
        self.choice: Choice | None = on_rank_zero(lambda: self.directory.claim(resume, overwrite, self.rc.train.steps, until),
                                                  self.rank, self.world)
        try:
            on_every_rank(lambda: ensure_shards(self.rc, self.log) if self.is_main else None, self.world)
            d = self.rc.data
            self.sets, self.spec = on_every_rank(
                lambda: open_sources(self.rc, self.rank, self.world, shuffle_buffer=d.shuffle_buffer, seed=self.rc.seed, repeat=True),
                self.world)
            self._check_same_spec(self.spec)
            for note in sorted({n for s in self.sets.values() for a in s.adapters.values() for n in a.notes()}):
                self.log(f"note: {note}")
            if not resume:
                on_rank_zero(self._start_fresh, self.rank, self.world)
        except BaseException:
            self.abandon()
            raise
        self.progress = progress_enabled(progress) and self.is_main

    def log(self, msg: str) -> None:
        if self.is_main:
            self._log(msg)

    def _start_fresh(self) -> None:
        """Clear an overwritten run and write the resolved config (after the data opened fine)."""
        self.cfg = self.directory.start_fresh(self.cfg)

    def abandon(self) -> None:
        """After a failure: close the metrics, give the run directory up (see :meth:`RunDirectory.abandon`)."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        self.directory.abandon(self.started)

    def _check_same_spec(self, spec: VocabSpec) -> None:
        prints = gathered(spec.fingerprint(), self.world)
        if len(set(prints)) != 1:
            raise ConfigError(f"processes see different vocabularies ({sorted(set(prints))}); build the shards once on storage all nodes share")

    # --- engine ---------------------------------------------------------------------------
    def _build_engine(self) -> None:
        torch.manual_seed(self.rc.seed)
        self.model = JointModel(self.spec, self.rc)
        self.optimizer = make_optimizer(self.model, self.rc)
        self.budget = TimeBudget(self.rc.train.minutes, self.device, self.run_dir / STOP)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.rc, self.budget))
        self.engine, self.scheduler = start_engine(self.model, self.optimizer, scheduler, self.rc)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.rc.seed * 1_000_003 + self.rank)
        self.condition_ids = self._condition_ids()
        torch.manual_seed(self.rc.seed * 1_000_003 + self.rank)  # dropout etc. differ per rank, deterministically

    @property
    def ckpt_dir(self) -> Path:
        return self.directory.checkpoints

    def save_checkpoint(self, step: int) -> None:
        """Refuse non-finite weights; else every rank saves its share (:func:`~maskdiff.training.training_checkpoint.save_checkpoint`)."""
        if not all_finite(p.detach() for p in self.engine.module.parameters()):
            raise DivergedError(f"step {step}: the weights are no longer finite; stopping without saving (lower optim.lr?); "
                                f"the last good checkpoint stays in {self.ckpt_dir}")
        state = own_state(step, step * self.rc.deepspeed.grad_accum, self.data.position(), self.generator, self.world,
                          self.skipped_total, self.device)
        save_checkpoint(self.engine, self.ckpt_dir, step, state, rank=self.rank, keep=self.rc.train.keep_checkpoints)

    def load_checkpoint(self) -> int:
        """Load the chosen checkpoint and restore this process's RNG states and data position; its step."""
        assert self.choice is not None
        state = load_checkpoint(self.engine, self.run_dir, self.ckpt_dir, self.choice, rank=self.rank, world=self.world, log=self.log)
        restore_rng(state, self.generator, self.device)
        self.skipped_total = int(state.get("skipped_total", 0))
        self.data_start = json.loads(state["data_position"]) if "data_position" in state else None
        if self.data_start is None:
            self.log(f"warning: {self.choice.tag} holds no data position (saved by an older version); the data stream starts afresh")
        return int(state["step"])

    # --- steps ------------------------------------------------------------------------------
    def _condition_ids(self) -> list[int]:
        for name in self.rc.train.condition_fields:
            if not self.spec.named(name):
                raise ConfigError(f"train.condition_fields: no field support {name!r} in the data; known: {', '.join(sorted(self.spec.index))}")
        return self.spec.named_ids(self.rc.train.condition_fields)

    def _train_step(self, it: Iterator[Batch], tally: Tally) -> bool:
        """One optimizer step; False when it was skipped for a non-finite loss or gradient (on any rank)."""
        before = (self.optimizer.skipped, self.engine.skipped_steps)
        for _ in range(self.rc.deepspeed.grad_accum):
            batch = drop_fields(next(it).to(self.device), self.condition_ids, self.rc.train.condition_dropout, self.generator)
            result = self.engine(batch, generator=self.generator)
            finite = bool(torch.isfinite(result.loss.detach()))
            self.optimizer.skip_next |= not finite
            self.engine.backward(result.loss)
            self.engine.step()
            if finite:
                tally.add(result.per_modality(), batch.tokens.numel())
        self.optimizer.skip_next = False
        skipped = float((self.optimizer.skipped, self.engine.skipped_steps) != before)
        return max_over_ranks(skipped, self.device) == 0.0

    def _guard(self, step: int, applied: bool, in_a_row: int) -> int:
        """Count skipped steps; too many in a row stop the run."""
        if applied:
            return 0
        self.skipped_total += 1
        in_a_row += 1
        if in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise DivergedError(f"step {step}: the loss or the gradients were not finite for {in_a_row} steps in a row; stopping "
                                f"(optim.lr={self.rc.optim.lr:g} may be too high; the last good checkpoint stays in {self.ckpt_dir})")
        return in_a_row

    def run(self, until: int | None = None) -> RunResult:
        """Train to ``train.steps`` (or stop with a checkpoint after step ``until``)."""
        rc, t = self.rc, self.rc.train
        self._build_engine()
        self.data_start: dict[str, Any] | None = None
        start = self.load_checkpoint() if self.resume else 0
        stop = min(t.steps, until) if until is not None else t.steps
        self.metrics = MetricsLog(self.run_dir / METRICS, self.is_main, start if self.resume else None,
                                  self.run_dir / TENSORBOARD if t.tensorboard else None)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"{'resuming' if self.resume else 'training'} {rc.name}: {n_params / 1e6:.2f}M parameters, modalities "
                 f"{', '.join(rc.modalities)}, {self.world} process(es) on {self.device.type}, ZeRO {rc.deepspeed.zero_stage}, "
                 f"steps {start} -> {stop} of {t.steps}, run dir {self.run_dir}")
        heldout = HeldoutEvaluation(rc, self.spec, self.rank, self.world, self.device)
        dataset = train_dataset(rc, self.sets, self.spec, self.rank, start=self.data_start)
        try:
            self.data = it = batches(dataset, rc.data.workers)
        except PositionMismatch as e:
            raise ConfigError(f"--resume {self.run_dir}: {e}") from None
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True)
        if heldout and start == 0:  # the untrained model's held-out ELBO: the baseline of the curves
            self._write(heldout.record(self.engine.module, 0), stop, bar)
        tally, window_time, train_time = Tally(), 0.0, 0.0
        last = {"train": {}, "eval": {}, "tps": 0.0, "mem": 0.0}
        total_tokens, skipped, in_a_row = 0, 0, 0
        records_logged = self.data.skipped_records  # bad-shard records this rank's loader skipped, at the previous metrics line
        self.started, out_of_time = True, False
        # a stop asked of an earlier start of this run is not one asked of this one (and every rank waits for its removal)
        on_every_rank(lambda: (self.run_dir / STOP).unlink(missing_ok=True) if self.is_main else None, self.world)
        self.budget.restart()
        for step in range(start + 1, stop + 1):
            t0 = time.perf_counter()
            applied = self._train_step(it, tally)
            in_a_row = self._guard(step, applied, in_a_row)
            skipped += not applied
            window_time += time.perf_counter() - t0
            if self.budget.tick() and step < stop:  # train.minutes spent: this step is the last
                stop, out_of_time = step, True
                if bar is not None:
                    bar.total = stop
            if bar is not None:
                bar.update(1)
            if step % t.log_every == 0 or step == stop:
                elapsed, window_time = window_time, 0.0
                train_time += elapsed
                red = tally.reduced(self.device)
                total_tokens += red.total_tokens
                records_now = self.data.skipped_records
                record = self._train_record(step, red, elapsed, skipped, sum_over_ranks(records_now - records_logged, self.device))
                records_logged = records_now
                self._write(record, stop, bar)
                last.update(train=record["bits_per_token"], tps=record["tokens_per_s"], mem=record["peak_mem_mb"])
                tally, skipped = Tally(), 0
            if heldout.due(step, stop):
                last["eval"] = self._write(heldout.record(self.engine.module, step), stop, bar)["bits_per_token"]
            if step % t.checkpoint_every == 0 or step == stop:
                self.save_checkpoint(step)
            if step == stop:  # reached train.steps, --until, or the end of train.minutes
                break
        if bar is not None:
            bar.close()
        self.metrics.close()
        finished = stop == t.steps or out_of_time
        if out_of_time:
            why = f"{self.run_dir / STOP} asked for a stop" if self.budget.stop_requested else f"train.minutes={t.minutes:g} spent"
            self.log(f"{why}: stopping at step {stop} of {t.steps}")
        bundle = None
        if finished and self.is_main:
            bundle = export_run(self.run_dir, self.engine.module, self.cfg, rc, self.spec, self.sets, stop, last["eval"])
        skipped_records = sum_over_ranks(self.data.skipped_records, self.device)  # the data position keeps it over resumes
        result = RunResult(self.run_dir, stop, finished, last["train"], last["eval"], total_tokens / max(train_time, 1e-9), last["mem"], bundle)
        if self.is_main:
            self._write_summary(result, out_of_time, n_params, skipped_records)
        dist.barrier()
        return result

    def _train_record(self, step: int, red: Tally, elapsed: float, skipped: int, skipped_records: int) -> dict[str, Any]:
        """The ``train`` metrics record of the steps since the previous one (``red``: their tally over ranks)."""
        return {"kind": "train", "step": step, "lr": self.scheduler.get_last_lr()[0], "loss": red.nats_per_token() if red.total_tokens else None,
                "bits_per_token": red.bits_per_token(), "tokens": red.token_counts(), "tokens_per_s": red.total_tokens / elapsed,
                "padding": 1.0 - red.total_tokens / max(1, red.positions), "peak_mem_mb": max_over_ranks(peak_memory_mb(self.device), self.device),
                "w": self.model.w_stats(), "skipped_steps": skipped, "skipped_records": skipped_records}

    def _write(self, record: dict[str, Any], stop: int, bar: Any) -> dict[str, Any]:
        """Log a metrics record and report it on the console (rank 0)."""
        self.metrics.write(record)
        if self.is_main:
            line = report_line(record, stop)
            if bar is not None:
                bar.write(line)
            else:
                self._log(line)
        return record

    def _write_summary(self, result: RunResult, out_of_time: bool, n_params: int, skipped_records: int) -> None:
        summary = {"step": result.step, "finished": result.finished, "out_of_time": out_of_time, "processes": self.world,
                   "train_bits_per_token": result.train_bits, "heldout_bits_per_token": result.heldout_bits, "tokens_per_s": result.tokens_per_s,
                   "peak_mem_mb": result.peak_mem_mb, "parameters": n_params, "w": self.model.w_stats(), "skipped_steps": self.skipped_total,
                   "skipped_records": skipped_records}
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
        which, bits = ("held-out", result.heldout_bits) if result.heldout_bits else ("training", result.train_bits)  # no held-out split: say so
        self.log(f"{'done' if result.finished else 'stopped'} at step {result.step}: {which} bits/token "
                 + ", ".join(f"{m} {b:.3f}" for m, b in bits.items()) + f"; {result.tokens_per_s:,.0f} tokens/s")


def train(cfg: DictConfig, *, resume: bool = False, overwrite: bool = False, until: int | None = None, progress: bool | None = None) -> RunResult:
    """Train one run; sets up and tears down the process group."""
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress, until=until)
        result = trainer.run(until)
    except BaseException:
        if trainer is not None:
            trainer.abandon()
        close_distributed(clean=False)
        raise
    trainer.directory.lock.release()
    close_distributed()
    return result


__all__ = ["DivergedError", "RunResult", "Trainer", "train"]
