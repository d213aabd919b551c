"""The run directory: what it holds, the lock of the one process writing it, and its claim at the start of a run.

A run directory holds ``config.yaml`` (the resolved configuration),
``metrics.jsonl`` (:mod:`maskdiff.training.metrics_log`), ``checkpoints/``
(:mod:`maskdiff.training.training_checkpoint`), ``bundle/`` (the inference bundle, see
:mod:`maskdiff.bundle`), ``summary.json``, ``plots/`` and ``tensorboard/``.

One process at a time writes a run directory (an exclusive lock on ``.lock``,
which holds the writer's PID); a start that fails leaves no run directory
behind; a resume that would relabel, shorten or redo a run is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .checkpoints import CheckpointError, Choice, choose
from maskdiff.config import ConfigError, RunConfig, save_config

CHECKPOINTS, METRICS, CONFIG, SUMMARY, LOCK, BUNDLE, PLOTS = "checkpoints", "metrics.jsonl", "config.yaml", "summary.json", ".lock", "bundle", "plots"
STOP = "STOP"  # a file of this name in the run directory ends the run after the current step (see TimeBudget)


def run_dir_of(rc: RunConfig) -> Path:
    return Path(rc.run_dir or Path("runs") / rc.name)


def in_use(run_dir: Path, pid: str) -> str:
    return f"run directory {run_dir} is in use by process {pid} (another training run); wait for it to end or choose another run_dir"


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


def check_resume(run_dir: Path, choice: Choice, steps: int, until: int | None) -> None:
    """Refuse a resume that would relabel, shorten or redo a run (changes nothing)."""
    where = f"--resume {run_dir}"
    if choice.step > steps:
        raise ConfigError(f"{where}: train.steps={steps} is below the checkpoint's step {choice.step}; "
                          f"the weights would be labelled with a step they are not at (use --until to stop earlier in a longer run)")
    if choice.step == steps and (run_dir / BUNDLE / "bundle.json").is_file():
        raise ConfigError(f"{where}: the run already finished at step {steps} (its bundle is {run_dir / BUNDLE}); "
                          f"nothing to do; pass train.steps=N above {steps} to train further")
    if until is not None and until <= choice.step:
        raise ConfigError(f"--until {until}: the checkpoint {choice.tag} of {run_dir} is already at step {choice.step}")


class RunDirectory:
    """The directory of one run as the process that writes it sees it (rank 0 claims it; see the module docstring)."""

    def __init__(self, path: Path):
        self.path, self.lock, self.created = path, RunLock(path), False

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def claim(self, resume: bool, overwrite: bool, steps: int, until: int | None) -> Choice | None:
        """Lock the directory and check it may be written; the checkpoint to resume from. Changes nothing it refuses."""
        path = self.path
        try:
            if resume:
                if not path.is_dir():
                    raise ConfigError(f"--resume {path}: no such run directory")
                self.lock.acquire()
                try:
                    choice = choose(self.checkpoints)
                except CheckpointError as e:
                    raise ConfigError(f"--resume {path}: {e}") from None
                check_resume(path, choice, steps, until)
                return choice
            if path.exists() and not path.is_dir():
                raise ConfigError(f"run directory {path}: exists and is not a directory")
            pid = RunLock.holder(path)
            if pid is not None:
                raise ConfigError(in_use(path, pid))
            if self._contents() and not overwrite:
                raise ConfigError(f"run directory {path} already exists; pass --overwrite to replace it, or --resume {path}")
            self.created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            return None
        except OSError as e:
            raise self._os_error(e) from None
        except ConfigError:
            self.abandon(started=False)
            raise

    def start_fresh(self, cfg: DictConfig) -> DictConfig:
        """Replace what an overwritten run left and write the resolved config; that config, naming this directory."""
        try:
            for p in self._contents():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            cfg = OmegaConf.merge(cfg, {"run_dir": str(self.path)})  # type: ignore[assignment]
            save_config(cfg, self.path / CONFIG)
        except OSError as e:
            raise self._os_error(e) from None
        return cfg

    def abandon(self, started: bool) -> None:
        """After a failure: remove the directory if this start created it and training never began; release the lock."""
        if self.created and not started and self.lock.fd >= 0:
            shutil.rmtree(self.path, ignore_errors=True)
        self.lock.release()

    def _contents(self) -> list[Path]:
        """What the directory holds besides its lock file."""
        return [p for p in self.path.iterdir() if p.name != LOCK] if self.path.is_dir() else []

    def _os_error(self, e: OSError) -> ConfigError:
        return ConfigError(f"run directory {e.filename or self.path}: {e.strerror or e}")


__all__ = ["CHECKPOINTS", "CONFIG", "METRICS", "STOP", "SUMMARY", "RunDirectory", "RunLock", "check_resume", "in_use", "run_dir_of"]
