"""Training under DeepSpeed: engine setup, the step loop, metrics, checkpoints and resume.

``deepspeed.initialize`` always drives the step, also in a plain
single-process run (:func:`init_distributed` then sets up a one-rank process
group itself); launchers (``deepspeed``, ``torchrun``) provide the
environment for N processes on one or several nodes.

A run directory holds ``config.yaml`` (the resolved configuration),
``metrics.jsonl`` (one JSON object per log / evaluation), ``checkpoints/``
(DeepSpeed checkpoints; each tag also holds one ``rank<r>.pt`` per process
with its RNG states and data position), ``bundle/`` (the inference bundle,
see :mod:`maskdiff.bundle`), ``summary.json`` and ``plots/``.

A resumed run restores model, optimizer, LR schedule, RNG states and the data
position (the stream is replayed to it), so it continues the same trajectory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .batch import Batch, drop_fields
from .config import ConfigError, RunConfig, save_config, to_run_config
from .joint import JointModel
from .loader import batches, ensure_shards, heldout_batches, is_heldout, open_sources, train_dataset
from .shards import ShardSet, field_lengths
from .tokens import MODALITIES, VocabSpec

CHECKPOINTS, METRICS, CONFIG, SUMMARY = "checkpoints", "metrics.jsonl", "config.yaml", "summary.json"
LN2 = math.log(2)


# --- process group -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a launcher-less process becomes rank 0 of 1."""
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not dist.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def close_distributed(clean: bool = True) -> None:
    """Tear the process group down (after a barrier, unless a rank failed)."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def device_for(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(local_rank))


# --- optimizer and engine ----------------------------------------------------------------------


def lr_lambda(rc: RunConfig) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warmup, then the configured decay."""
    o, total = rc.optim, rc.train.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.decay == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1.0 - progress
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape

    return f


def make_optimizer(model: JointModel, rc: RunConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only; GenMD4's w with its own rate and no decay."""
    o = rc.optim
    sched = {id(p) for p in model.schedule_parameters()}
    net = [p for p in model.parameters() if id(p) not in sched and p.requires_grad]
    groups = [
        {"params": [p for p in net if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in net if p.ndim < 2], "weight_decay": 0.0},
    ]
    if sched:
        groups.append({"params": model.schedule_parameters(), "weight_decay": 0.0, "lr": o.schedule_lr or o.lr})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def deepspeed_config(rc: RunConfig) -> dict[str, Any]:
    ds = rc.deepspeed
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": rc.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg.update(OmegaConf.to_container(OmegaConf.create(dict(ds.extra)), resolve=True))  # type: ignore[arg-type]
    return cfg


# --- metrics -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """Per-modality nats and tokens, plus totals, summed over micro-batches (then over ranks)."""

    nats: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    positions: int = 0

    def add(self, per_modality: dict[str, tuple[float, int]], positions: int) -> None:
        for mod, (n, k) in per_modality.items():
            self.nats[mod] = self.nats.get(mod, 0.0) + n
            self.tokens[mod] = self.tokens.get(mod, 0) + k
        self.positions += positions

    def reduced(self, device: torch.device) -> Tally:
        """The sum over all ranks (every rank must call it)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self
        v = torch.tensor([self.nats.get(m, 0.0) for m in MODALITIES] + [self.tokens.get(m, 0) for m in MODALITIES] + [self.positions],
                         dtype=torch.float64, device=device)
        dist.all_reduce(v)
        k = len(MODALITIES)
        present = [i for i in range(k) if v[k + i] > 0]
        return Tally({MODALITIES[i]: float(v[i]) for i in present}, {MODALITIES[i]: int(v[k + i]) for i in present}, int(v[-1]))

    def token_counts(self) -> dict[str, int]:
        return {m: self.tokens[m] for m in MODALITIES if m in self.tokens}

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def bits_per_token(self) -> dict[str, float]:
        return {m: self.nats[m] / (self.tokens[m] * LN2) for m in MODALITIES if self.tokens.get(m)}

    def nats_per_token(self) -> float:
        return sum(self.nats.values()) / max(1, self.total_tokens)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _max_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


class MetricsLog:
    """``metrics.jsonl`` writer (rank 0); on resume, drops lines past the resumed step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- the run -----------------------------------------------------------------------------------


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


def prepare_run_dir(rc: RunConfig, resume: bool, overwrite: bool) -> Path:
    """The run directory; refuses to reuse a non-empty one unless resuming or overwriting."""
    run_dir = Path(rc.run_dir or Path("runs") / rc.name)
    if resume:
        if not (run_dir / CHECKPOINTS / "latest").is_file():
            raise ConfigError(f"--resume {run_dir}: no checkpoint to resume from ({run_dir / CHECKPOINTS / 'latest'} is missing)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"run directory {run_dir} already exists; pass --overwrite to replace it, or --resume {run_dir}")
    return run_dir


class Trainer:
    """One training run from a resolved configuration (see the module docstring)."""

    def __init__(self, cfg: DictConfig, *, resume: bool = False, overwrite: bool = False, progress: bool | None = None,
                 log: Callable[[str], None] | None = None):
        self.cfg, self.rc = cfg, to_run_config(cfg)
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.device = device_for(int(os.environ.get("LOCAL_RANK", 0)))
        self.resume = resume
        self.run_dir = self._collective(lambda: prepare_run_dir(self.rc, resume, overwrite))
        if self.is_main and not resume:
            if self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True)
            cfg = OmegaConf.merge(cfg, {"run_dir": str(self.run_dir)})
            save_config(cfg, self.run_dir / CONFIG)
        self.cfg = cfg
        self._collective(lambda: ensure_shards(self.rc, self.log) if self.is_main else None)
        d = self.rc.data
        self.sets, self.spec = self._collective(
            lambda: open_sources(self.rc, self.rank, self.world, shuffle_buffer=d.shuffle_buffer, seed=self.rc.seed, repeat=True))
        self._check_same_spec(self.spec)
        if progress is None:
            progress = sys.stderr.isatty() and not os.environ.get("CI")
        self.progress = progress and self.is_main

    def log(self, msg: str) -> None:
        if self.is_main:
            self._log(msg)

    def _collective(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank; a user error on any rank stops all of them with its message."""
        err, out = "", None
        try:
            out = fn()
        except ConfigError as e:
            err = str(e)
        errs: list[str] = [err] * self.world
        if self.world > 1:
            dist.all_gather_object(errs, err)
        first = next((e for e in errs if e), "")
        if first:
            raise ConfigError(first)
        return out

    def _check_same_spec(self, spec: VocabSpec) -> None:
        prints = [spec.fingerprint()] * self.world
        if self.world > 1:
            dist.all_gather_object(prints, spec.fingerprint())
        if len(set(prints)) != 1:
            raise ConfigError(f"processes see different vocabularies ({sorted(set(prints))}); build the shards once on storage all nodes share")

    # --- engine ---------------------------------------------------------------------------
    def _build_engine(self) -> None:
        import deepspeed

        torch.manual_seed(self.rc.seed)
        self.model = JointModel(self.spec, self.rc)
        optimizer = make_optimizer(self.model, self.rc)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.rc))
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                                                 config=deepspeed_config(self.rc))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.rc.seed * 1_000_003 + self.rank)
        self.condition_ids = self._condition_ids()
        torch.manual_seed(self.rc.seed * 1_000_003 + self.rank)  # dropout etc. differ per rank, deterministically

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS

    def save_checkpoint(self, step: int) -> None:
        tag = f"step{step:08d}"
        (self.ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        state = {"step": step, "micro_batches": step * self.rc.deepspeed.grad_accum, "torch_rng": torch.get_rng_state(),
                 "generator": self.generator.get_state(), "world_size": self.world}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(state, self.ckpt_dir / tag / f"rank{self.rank}.pt")
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"step": step})
        if self.is_main:
            tags = sorted(p.name for p in self.ckpt_dir.glob("step*") if p.is_dir())
            for old in tags[: -self.rc.train.keep_checkpoints]:
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
        dist.barrier()

    def load_checkpoint(self) -> int:
        tag = (self.ckpt_dir / "latest").read_text().strip()
        path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if path is None:
            raise ConfigError(f"--resume {self.run_dir}: checkpoint {tag} could not be loaded")
        state_file = self.ckpt_dir / tag / f"rank{self.rank}.pt"
        if not state_file.is_file():
            raise ConfigError(f"--resume {self.run_dir}: {state_file} is missing (was the run saved with another number of processes?)")
        state = torch.load(state_file, weights_only=True)
        if state["world_size"] != self.world:
            raise ConfigError(f"--resume {self.run_dir}: saved with {state['world_size']} processes, resumed with {self.world}; the data position would not match")
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        return int(state["step"])

    # --- steps ------------------------------------------------------------------------------
    def _training_lengths(self, modality: str) -> dict[str, dict[int, int]]:
        """Length distribution of the variable-length fields of this modality's training records (all ranks' shards)."""
        every = ShardSet(self.sets[modality].dirs, rank=0, world_size=1)
        return field_lengths(r for r in every if not is_heldout(r, self.rc.data.heldout))

    def _condition_ids(self) -> list[int]:
        known = {s.name for s in self.spec.supports}
        for name in self.rc.train.condition_fields:
            if name not in known:
                raise ConfigError(f"train.condition_fields: no field support {name!r} in the data; known: {', '.join(sorted(known))}")
        return [self.spec.support_id(name) for name in self.rc.train.condition_fields]

    def _train_step(self, it: Iterator[Batch], tally: Tally) -> None:
        for _ in range(self.rc.deepspeed.grad_accum):
            batch = drop_fields(next(it).to(self.device), self.condition_ids, self.rc.train.condition_dropout, self.generator)
            result = self.engine(batch, generator=self.generator)
            self.engine.backward(result.loss)
            self.engine.step()
            tally.add(result.per_modality(), batch.tokens.numel())

    @torch.no_grad()
    def evaluate(self, heldout: dict[str, list[Batch]]) -> Tally:
        """The ELBO (draws=1, no surrogate) of the fixed held-out batches, summed over ranks."""
        module = self.engine.module
        module.eval()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.rc.seed * 7919 + self.rank + 1)
        tally = Tally()
        for mod in self.rc.modalities:
            for batch in heldout.get(mod, []):
                batch = batch.to(self.device)
                tally.add(module(batch, generator=gen, draws=1).per_modality(), batch.tokens.numel())
        module.train()
        return tally.reduced(self.device)

    def run(self, until: int | None = None) -> RunResult:
        """Train to ``train.steps`` (or stop with a checkpoint after step ``until``)."""
        from .bundle import export_bundle
        from .plots import plot_metrics

        rc, t = self.rc, self.rc.train
        self._build_engine()
        start = self.load_checkpoint() if self.resume else 0
        stop = min(t.steps, until) if until is not None else t.steps
        metrics = MetricsLog(self.run_dir / METRICS, self.is_main, start if self.resume else None)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"{'resuming' if self.resume else 'training'} {rc.name}: {n_params / 1e6:.2f}M parameters, modalities "
                 f"{', '.join(rc.modalities)}, {self.world} process(es) on {self.device.type}, ZeRO {rc.deepspeed.zero_stage}, "
                 f"steps {start} -> {stop} of {t.steps}, run dir {self.run_dir}")
        heldout = heldout_batches(rc, self.spec, self.rank, self.world, t.eval_batches)
        dataset = train_dataset(rc, self.sets, self.spec, self.rank, start=start * rc.deepspeed.grad_accum)
        it = batches(dataset, rc.data.workers)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True)
        if heldout and start == 0:  # the untrained model's held-out ELBO: the baseline of the curves
            self._eval_record(heldout, 0, stop, metrics, bar)
        tally, window_time, train_time = Tally(), 0.0, 0.0
        last = {"train": {}, "eval": {}, "tps": 0.0, "mem": 0.0}
        total_tokens = 0
        for step in range(start + 1, stop + 1):
            t0 = time.perf_counter()
            self._train_step(it, tally)
            window_time += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
            if step % t.log_every == 0 or step == stop:
                elapsed, window_time = window_time, 0.0
                train_time += elapsed
                red = tally.reduced(self.device)
                total_tokens += red.total_tokens
                mem = _max_over_ranks(peak_memory_mb(self.device), self.device)
                record = {"kind": "train", "step": step, "lr": self.scheduler.get_last_lr()[0], "loss": red.nats_per_token(),
                          "bits_per_token": red.bits_per_token(), "tokens": red.token_counts(), "tokens_per_s": red.total_tokens / elapsed,
                          "padding": 1.0 - red.total_tokens / max(1, red.positions), "peak_mem_mb": mem, "w": self.model.w_stats()}
                metrics.write(record)
                last.update(train=record["bits_per_token"], tps=record["tokens_per_s"], mem=mem)
                self._report(bar, step, stop, record)
                tally = Tally()
            if heldout and (step % t.eval_every == 0 or step == stop):
                last["eval"] = self._eval_record(heldout, step, stop, metrics, bar)
            if step % t.checkpoint_every == 0 or step == stop:
                self.save_checkpoint(step)
        if bar is not None:
            bar.close()
        finished = stop == t.steps
        bundle = None
        if finished and self.is_main:
            lengths = {m: self._training_lengths(m) for m in self.sets if m in ("text", "protein")}
            bundle = export_bundle(self.run_dir / "bundle", self.engine.module, self.cfg, self.spec,
                                   {m: s.adapters[m] for m, s in self.sets.items()}, step=stop,
                                   metrics={"heldout_bits_per_token": last["eval"]}, lengths=lengths)
            if t.plots:
                plot_metrics(self.run_dir / METRICS, self.run_dir / "plots")
        result = RunResult(self.run_dir, stop, finished, last["train"], last["eval"], total_tokens / max(train_time, 1e-9), last["mem"], bundle)
        if self.is_main:
            summary = {"step": stop, "finished": finished, "processes": self.world, "train_bits_per_token": last["train"],
                       "heldout_bits_per_token": last["eval"], "tokens_per_s": result.tokens_per_s, "peak_mem_mb": last["mem"],
                       "parameters": n_params, "w": self.model.w_stats()}
            (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
            self.log(f"{'done' if finished else 'stopped'} at step {stop}: held-out bits/token "
                     + ", ".join(f"{m} {b:.3f}" for m, b in last["eval"].items()) + f"; {result.tokens_per_s:,.0f} tokens/s")
        dist.barrier()
        return result

    def _eval_record(self, heldout: dict[str, list[Batch]], step: int, stop: int, metrics: MetricsLog, bar: Any) -> dict[str, float]:
        ev = self.evaluate(heldout)
        record = {"kind": "eval", "step": step, "bits_per_token": ev.bits_per_token(), "tokens": ev.token_counts()}
        metrics.write(record)
        self._report(bar, step, stop, record)
        return record["bits_per_token"]

    def _report(self, bar: Any, step: int, stop: int, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        bits = " ".join(f"{m} {b:.3f}" for m, b in record["bits_per_token"].items())
        if record["kind"] == "train":
            line = f"step {step}/{stop} loss {record['loss']:.4f} nats/token | bits/token {bits} | {record['tokens_per_s']:,.0f} tok/s"
            if record["w"]:
                line += " | w " + " ".join(f"{m} {s['mean']:.3f}" for m, s in record["w"].items())
        else:
            line = f"step {step}/{stop} held-out bits/token {bits}"
        if bar is not None:
            bar.write(line)
        else:
            self._log(line)


def train(cfg: DictConfig, *, resume: bool = False, overwrite: bool = False, until: int | None = None, progress: bool | None = None) -> RunResult:
    """Train one run; sets up and tears down the process group."""
    try:
        result = Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress).run(until)
    except BaseException:
        close_distributed(clean=False)
        raise
    close_distributed()
    return result


__all__ = ["MetricsLog", "RunResult", "Tally", "Trainer", "deepspeed_config", "init_distributed", "lr_lambda", "make_optimizer", "read_metrics", "train"]
