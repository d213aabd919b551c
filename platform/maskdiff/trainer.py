"""Training under DeepSpeed: engine setup, the step loop, metrics, checkpoints and resume.

``deepspeed.initialize`` always drives the step, also in a plain
single-process run (:func:`init_distributed` then sets up a one-rank process
group itself); launchers (``deepspeed``, ``torchrun``) provide the
environment for N processes on one or several nodes.

A run directory holds ``config.yaml`` (the resolved configuration),
``metrics.jsonl`` (one JSON object per log / evaluation), ``checkpoints/``
(DeepSpeed checkpoints; each tag also holds one ``rank<r>.pt`` per process
with its RNG states and data position), ``bundle/`` (the inference bundle,
see :mod:`maskdiff.bundle`), ``summary.json``, ``plots/`` and ``tensorboard/``
(the metrics as TensorBoard event files, unless ``train.tensorboard=false``).

A resumed run restores model, optimizer, LR schedule, RNG states and the data
position (the stream seeks to it: shard, window and record per process and
DataLoader worker), so it continues the same trajectory.
Checkpoints are sealed with checksums and loaded without arbitrary unpickling
(see :mod:`maskdiff.checkpoints`); a damaged newest one falls back to the
previous complete one.

Guards: one process at a time writes a run directory (an exclusive lock on
``.lock``, which holds the writer's PID); a start that fails leaves no run
directory behind; a step whose loss or gradients are not finite is skipped and
counted (``skipped_steps`` in the metrics), and :data:`MAX_SKIPPED_IN_A_ROW`
such steps in a row stop the run, as do non-finite weights, before anything
is saved or exported.
"""

from __future__ import annotations

import errno
import fcntl
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
from .bits import bits_per_token
from .checkpoints import CheckpointError, Choice, choose, safe_load, seal, step_of, tag_for, use_safe_loader, write_latest
from .config import ConfigError, RunConfig, save_config, to_run_config
from .joint import JointModel
from .loader import PositionMismatch, batches, ensure_shards, heldout_batches, open_sources, train_dataset
from .progress import progress_enabled
from .shards import ShardSet, field_lengths
from .split import training_records
from .tensorboard_log import TENSORBOARD, TensorBoardLog
from .tokens import MODALITIES, VocabSpec

CHECKPOINTS, METRICS, CONFIG, SUMMARY, LOCK = "checkpoints", "metrics.jsonl", "config.yaml", "summary.json", ".lock"
MAX_SKIPPED_IN_A_ROW = 10  # non-finite steps in a row that stop a run


class DivergedError(ConfigError):
    """Training produced non-finite values it cannot recover from (too high a learning rate, bad data)."""


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


class TimeBudget:
    """``train.minutes``: the share of the loop's wall-clock budget spent, agreed by every process.

    All ranks must stop at the same step and use the same learning rate, so the
    fraction is the maximum over ranks (one scalar all-reduce per step).
    """

    def __init__(self, minutes: float | None, device: torch.device, world: int):
        self.limit_s = None if minutes is None else minutes * 60.0
        self.device, self.world = device, world
        self.started = time.perf_counter()
        self.spent = 0.0  # fraction of the budget, in [0, inf)

    def restart(self) -> None:
        self.started, self.spent = time.perf_counter(), 0.0

    def tick(self) -> bool:
        """Update the fraction spent; True once the budget is used up."""
        if self.limit_s is None:
            return False
        spent = (time.perf_counter() - self.started) / self.limit_s
        if self.world > 1:
            t = torch.tensor([spent], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            spent = float(t.item())
        self.spent = spent
        return spent >= 1.0


def lr_lambda(rc: RunConfig, budget: TimeBudget | None = None) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warmup, then the configured decay.

    With a time budget the decay follows whichever runs out first, the steps or
    the time, so a run stopped by ``train.minutes`` still ends at the low rate.
    """
    o, total = rc.optim, rc.train.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.decay == "constant":
            return 1.0
        progress = min(1.0, max((step - o.warmup_steps) / max(1, total - o.warmup_steps), budget.spent if budget else 0.0))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1.0 - progress
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape

    return f


def _finite(tensors: Iterator[torch.Tensor]) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips an update whose gradients are not finite, or that the trainer marked (``skip_next``).

    Under ZeRO it sees this process's partition only; DeepSpeed's own overflow
    check skips the whole step there when the global gradient norm is not finite.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.skip_next, self.skipped = False, 0

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.skip_next or not _finite(p.grad for g in self.param_groups for p in g["params"] if p.grad is not None):
            self.skipped += 1
            return None
        return super().step(closure)


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
    return GuardedAdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def deepspeed_config(rc: RunConfig) -> dict[str, Any]:
    ds = rc.deepspeed
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": rc.data.batch_size or 1,  # bookkeeping only: batches are cut by the loader
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
        return {m: bits_per_token(self.nats[m], self.tokens[m]) for m in MODALITIES if self.tokens.get(m)}

    def nats_per_token(self) -> float:
        return sum(self.nats.values()) / max(1, self.total_tokens)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _over_ranks(value: float, device: torch.device, op: dist.ReduceOp) -> float:
    """``value`` reduced over all ranks by ``op`` (every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


def _max_over_ranks(value: float, device: torch.device) -> float:
    return _over_ranks(value, device, dist.ReduceOp.MAX)


def _sum_over_ranks(value: int, device: torch.device) -> int:
    return round(_over_ranks(float(value), device, dist.ReduceOp.SUM))


class MetricsLog:
    """``metrics.jsonl`` writer (rank 0), and the same scalars as TensorBoard events under ``tensorboard``
    when given; on resume, both drop what lies past the resumed step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: Path | None = None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and _metric_step(path, line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.events = TensorBoardLog(tensorboard, resume_step) if enabled and tensorboard is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.events is not None:
                self.events.write(record)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None


def _metric_step(path: Path, line: str) -> int:
    try:
        step = json.loads(line).get("step", 0)
        if isinstance(step, int):
            return step
    except (ValueError, AttributeError):
        pass
    raise ConfigError(f"{path}: a line is not a metrics record ({line[:60]!r}); repair or remove it to resume")


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


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` (which holds the writer's PID) while a process writes the run."""

    def __init__(self, run_dir: Path):
        self.path, self.fd = run_dir / LOCK, -1

    @staticmethod
    def holder(run_dir: Path) -> str | None:
        """The PID of the process holding the run's lock, or None when nobody does (changes nothing)."""
        try:
            fd = os.open(run_dir / LOCK, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(in_use(self.path.parent, pid)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def in_use(run_dir: Path, pid: str) -> str:
    return f"run directory {run_dir} is in use by process {pid} (another training run); wait for it to end or choose another run_dir"


def _contents(run_dir: Path) -> list[Path]:
    """What a run directory holds besides its lock file."""
    return [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []


def _clear(run_dir: Path) -> None:
    for p in _contents(run_dir):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _os_error(run_dir: Path, e: OSError) -> ConfigError:
    return ConfigError(f"run directory {e.filename or run_dir}: {e.strerror or e}")


def run_dir_of(rc: RunConfig) -> Path:
    return Path(rc.run_dir or Path("runs") / rc.name)


def check_resume(run_dir: Path, choice: Choice, steps: int, until: int | None) -> None:
    """Refuse a resume that would relabel, shorten or redo a run (changes nothing)."""
    where = f"--resume {run_dir}"
    if choice.step > steps:
        raise ConfigError(f"{where}: train.steps={steps} is below the checkpoint's step {choice.step}; "
                          f"the weights would be labelled with a step they are not at (use --until to stop earlier in a longer run)")
    if choice.step == steps and (run_dir / "bundle" / "bundle.json").is_file():
        raise ConfigError(f"{where}: the run already finished at step {steps} (its bundle is {run_dir / 'bundle'}); "
                          f"nothing to do; pass train.steps=N above {steps} to train further")
    if until is not None and until <= choice.step:
        raise ConfigError(f"--until {until}: the checkpoint {choice.tag} of {run_dir} is already at step {choice.step}")


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
        self.lock, self.created, self.started = RunLock(self.run_dir), False, False
        self.skipped_total = 0
        self.choice: Choice | None = self._on_main(lambda: self._claim(resume, overwrite, until))
        try:
            self._collective(lambda: ensure_shards(self.rc, self.log) if self.is_main else None)
            d = self.rc.data
            self.sets, self.spec = self._collective(
                lambda: open_sources(self.rc, self.rank, self.world, shuffle_buffer=d.shuffle_buffer, seed=self.rc.seed, repeat=True))
            self._check_same_spec(self.spec)
            if not resume:
                self._on_main(self._start_fresh)
        except BaseException:
            self.abandon()
            raise
        self.progress = progress_enabled(progress) and self.is_main

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

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and hand its result to every rank (its user error stops all of them)."""
        out = [self._collective(lambda: fn() if self.is_main else None)]
        if self.world > 1:
            dist.broadcast_object_list(out, src=0)
        return out[0]

    # --- the run directory ---------------------------------------------------------------------
    def _claim(self, resume: bool, overwrite: bool, until: int | None) -> Choice | None:
        """Lock the run directory and check it may be written (rank 0); changes nothing it refuses."""
        run_dir = self.run_dir
        try:
            if resume:
                if not run_dir.is_dir():
                    raise ConfigError(f"--resume {run_dir}: no such run directory")
                self.lock.acquire()
                try:
                    choice = choose(self.ckpt_dir)
                except CheckpointError as e:
                    raise ConfigError(f"--resume {run_dir}: {e}") from None
                check_resume(run_dir, choice, self.rc.train.steps, until)
                return choice
            if run_dir.exists() and not run_dir.is_dir():
                raise ConfigError(f"run directory {run_dir}: exists and is not a directory")
            pid = RunLock.holder(run_dir)
            if pid is not None:
                raise ConfigError(in_use(run_dir, pid))
            if _contents(run_dir) and not overwrite:
                raise ConfigError(f"run directory {run_dir} already exists; pass --overwrite to replace it, or --resume {run_dir}")
            self.created = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            return None
        except OSError as e:
            raise _os_error(run_dir, e) from None
        except ConfigError:
            self.abandon()
            raise

    def _start_fresh(self) -> None:
        """Replace what an overwritten run left and write the resolved config (after the data opened fine)."""
        try:
            _clear(self.run_dir)
            self.cfg = OmegaConf.merge(self.cfg, {"run_dir": str(self.run_dir)})  # type: ignore[assignment]
            save_config(self.cfg, self.run_dir / CONFIG)
        except OSError as e:
            raise _os_error(self.run_dir, e) from None

    def abandon(self) -> None:
        """After a failure: remove a run directory this start created and never trained in; release the lock."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if self.is_main and self.created and not self.started and self.lock.fd >= 0:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.lock.release()

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
        self.optimizer = make_optimizer(self.model, self.rc)
        self.budget = TimeBudget(self.rc.train.minutes, self.device, self.world)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.rc, self.budget))
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=self.model, optimizer=self.optimizer, lr_scheduler=scheduler,
                                                                 config=deepspeed_config(self.rc))
        use_safe_loader(self.engine)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.rc.seed * 1_000_003 + self.rank)
        self.condition_ids = self._condition_ids()
        torch.manual_seed(self.rc.seed * 1_000_003 + self.rank)  # dropout etc. differ per rank, deterministically

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS

    def save_checkpoint(self, step: int) -> None:
        """Every rank writes its files into a fresh tag; then rank 0 seals it and points ``latest`` at it."""
        if not _finite(p.detach() for p in self.engine.module.parameters()):
            raise DivergedError(f"step {step}: the weights are no longer finite; stopping without saving (lower optim.lr?); "
                                f"the last good checkpoint stays in {self.ckpt_dir}")
        tag = tag_for(step)
        if self.is_main:
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)  # e.g. a damaged one passed over on resume
        dist.barrier()
        (self.ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        state = {"step": step, "micro_batches": step * self.rc.deepspeed.grad_accum, "data_position": json.dumps(self.data.position()),
                 "torch_rng": torch.get_rng_state(),
                 "generator": self.generator.get_state(), "world_size": self.world, "skipped_total": self.skipped_total}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(state, self.ckpt_dir / tag / f"rank{self.rank}.pt")
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
        dist.barrier()
        if self.is_main:
            seal(self.ckpt_dir / tag, step)
            write_latest(self.ckpt_dir, tag)
            tags = sorted(p.name for p in self.ckpt_dir.glob("step*") if p.is_dir())
            for old in tags[: -self.rc.train.keep_checkpoints]:
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
        dist.barrier()

    def load_checkpoint(self) -> int:
        """Load the chosen checkpoint (verified on rank 0); a file that is not plain state is refused unexecuted."""
        choice = self.choice
        assert choice is not None
        for note in choice.notes:
            self.log(f"warning: {note}; passing over it")
        if choice.notes:
            self.log(f"resuming from the previous complete checkpoint {choice.tag}")
            if self.is_main:
                for p in self.ckpt_dir.iterdir():  # the damaged newer tags: their steps are replayed
                    if p.is_dir() and (step_of(p.name) or 0) > choice.step:
                        shutil.rmtree(p, ignore_errors=True)
        where = f"--resume {self.run_dir}"
        try:
            path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=choice.tag)
            state_file = self.ckpt_dir / choice.tag / f"rank{self.rank}.pt"
            if not state_file.is_file():
                raise ConfigError(f"{where}: {state_file} is missing (was the run saved with another number of processes?)")
            state = safe_load(state_file)
        except CheckpointError as e:
            raise ConfigError(f"{where}: {e}") from None
        except (KeyError, RuntimeError, ValueError, TypeError, AssertionError) as e:  # plain state, but not this model's
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ConfigError(f"{where}: checkpoint {choice.tag} does not fit this model and configuration ({msg})") from None
        if path is None:
            raise ConfigError(f"{where}: checkpoint {choice.tag} could not be loaded")
        if state["world_size"] != self.world:
            raise ConfigError(f"{where}: saved with {state['world_size']} processes, resumed with {self.world}; resume with "
                              f"{state['world_size']} (torchrun --nproc_per_node {state['world_size']} tools/train.py --resume {self.run_dir}): "
                              f"each process continues its own share of the data, which another split would not match")
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.skipped_total = int(state.get("skipped_total", 0))
        self.data_start = json.loads(state["data_position"]) if "data_position" in state else None
        if self.data_start is None:
            self.log(f"warning: {choice.tag} holds no data position (saved by an older version); the data stream starts afresh")
        return int(state["step"])

    # --- steps ------------------------------------------------------------------------------
    def _training_lengths(self, modality: str) -> dict[str, dict[int, int]]:
        """Length distribution of the variable-length fields of this modality's training records (all ranks' shards)."""
        every = ShardSet(self.sets[modality].dirs, rank=0, world_size=1, bad_shards=self.rc.data.bad_shards)
        return field_lengths(training_records(every, self.rc.data.heldout))

    def _condition_ids(self) -> list[int]:
        for name in self.rc.train.condition_fields:
            if not self.spec.named(name):
                raise ConfigError(f"train.condition_fields: no field support {name!r} in the data; known: {', '.join(sorted(self.spec.index))}")
        return [self.spec.support_id(s) for name in self.rc.train.condition_fields for s in self.spec.named(name)]

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
        return _max_over_ranks(skipped, self.device) == 0.0

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
        self.data_start: dict[str, Any] | None = None
        start = self.load_checkpoint() if self.resume else 0
        stop = min(t.steps, until) if until is not None else t.steps
        self.metrics = metrics = MetricsLog(self.run_dir / METRICS, self.is_main, start if self.resume else None,
                                            self.run_dir / TENSORBOARD if t.tensorboard else None)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"{'resuming' if self.resume else 'training'} {rc.name}: {n_params / 1e6:.2f}M parameters, modalities "
                 f"{', '.join(rc.modalities)}, {self.world} process(es) on {self.device.type}, ZeRO {rc.deepspeed.zero_stage}, "
                 f"steps {start} -> {stop} of {t.steps}, run dir {self.run_dir}")
        heldout = heldout_batches(rc, self.spec, self.rank, self.world, t.eval_batches)
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
            self._eval_record(heldout, 0, stop, metrics, bar)
        tally, window_time, train_time = Tally(), 0.0, 0.0
        last = {"train": {}, "eval": {}, "tps": 0.0, "mem": 0.0}
        total_tokens, skipped, in_a_row = 0, 0, 0
        records_logged = self.data.skipped_records  # bad-shard records this rank's loader skipped, at the previous metrics line
        self.started, out_of_time = True, False
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
                mem = _max_over_ranks(peak_memory_mb(self.device), self.device)
                records_now = self.data.skipped_records
                skipped_records = _sum_over_ranks(records_now - records_logged, self.device)
                records_logged = records_now
                record = {"kind": "train", "step": step, "lr": self.scheduler.get_last_lr()[0], "loss": red.nats_per_token() if red.total_tokens else None,
                          "bits_per_token": red.bits_per_token(), "tokens": red.token_counts(), "tokens_per_s": red.total_tokens / elapsed,
                          "padding": 1.0 - red.total_tokens / max(1, red.positions), "peak_mem_mb": mem, "w": self.model.w_stats(),
                          "skipped_steps": skipped, "skipped_records": skipped_records}
                metrics.write(record)
                last.update(train=record["bits_per_token"], tps=record["tokens_per_s"], mem=mem)
                self._report(bar, step, stop, record)
                tally, skipped = Tally(), 0
            if heldout and (step % t.eval_every == 0 or step == stop):
                last["eval"] = self._eval_record(heldout, step, stop, metrics, bar)
            if step % t.checkpoint_every == 0 or step == stop:
                self.save_checkpoint(step)
            if step == stop:  # reached train.steps, --until, or the end of train.minutes
                break
        if bar is not None:
            bar.close()
        metrics.close()
        finished = stop == t.steps or out_of_time
        if out_of_time:
            self.log(f"train.minutes={t.minutes:g} spent: stopping at step {stop} of {t.steps}")
        bundle = None
        if finished and self.is_main:
            lengths = {m: self._training_lengths(m) for m in self.sets if m in ("text", "protein")}
            bundle = export_bundle(self.run_dir / "bundle", self.engine.module, self.cfg, self.spec,
                                   {key: a for s in self.sets.values() for key, a in s.adapters.items()}, step=stop,
                                   metrics={"heldout_bits_per_token": last["eval"]}, lengths=lengths)
            if t.plots:
                plot_metrics(self.run_dir / METRICS, self.run_dir / "plots")
        skipped_records = _sum_over_ranks(self.data.skipped_records, self.device)  # the data position keeps it over resumes
        result = RunResult(self.run_dir, stop, finished, last["train"], last["eval"], total_tokens / max(train_time, 1e-9), last["mem"], bundle)
        if self.is_main:
            summary = {"step": stop, "finished": finished, "out_of_time": out_of_time, "processes": self.world, "train_bits_per_token": last["train"],
                       "heldout_bits_per_token": last["eval"], "tokens_per_s": result.tokens_per_s, "peak_mem_mb": last["mem"],
                       "parameters": n_params, "w": self.model.w_stats(), "skipped_steps": self.skipped_total,
                       "skipped_records": skipped_records}
            (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
            which, bits = ("held-out", last["eval"]) if last["eval"] else ("training", last["train"])  # no held-out split: say so
            self.log(f"{'done' if finished else 'stopped'} at step {stop}: {which} bits/token "
                     + ", ".join(f"{m} {b:.3f}" for m, b in bits.items()) + f"; {result.tokens_per_s:,.0f} tokens/s")
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
        bits = " ".join(f"{m} {b:.3f}" for m, b in record["bits_per_token"].items()) or "n/a"
        if record["kind"] == "train":
            loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
            line = f"step {step}/{stop} loss {loss} nats/token | bits/token {bits} | {record['tokens_per_s']:,.0f} tok/s"
            if record["skipped_steps"]:
                line += f" | {record['skipped_steps']} step(s) skipped: not finite"
            if record["skipped_records"]:
                line += f" | {record['skipped_records']} record(s) of bad shards skipped"
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
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress, until=until)
        result = trainer.run(until)
    except BaseException:
        if trainer is not None:
            trainer.abandon()
        close_distributed(clean=False)
        raise
    trainer.lock.release()
    close_distributed()
    return result


__all__ = ["MetricsLog", "RunResult", "Tally", "Trainer", "deepspeed_config", "init_distributed", "lr_lambda", "make_optimizer", "train"]
