"""Training checkpoints on disk: safe loading, checksums, completeness and the ``latest`` pointer.

A checkpoint tag directory (``checkpoints/stepNNNNNNNN/``) is *complete* once
``complete.json`` is written: it lists the sha256 of every other file in the
tag and is written last, after every process has saved; ``latest`` is updated
only after that. Loading verifies the checksums first and unpickles with
``torch.load(weights_only=True)`` restricted to tensors, plain containers and
the few DeepSpeed state classes allowed below, so a planted pickle cannot run
code. A damaged newest checkpoint falls back to the previous complete one.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from maskdiff.errors import CheckpointError, UnsafeCheckpointError
from maskdiff.files import sha256_file, write_atomic

COMPLETE, LATEST = "complete.json", "latest"
TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG.match(tag)
    return int(m.group(1)) if m else None


# --- safe unpickling ---------------------------------------------------------------------------


def _allowed_globals() -> list[Any]:
    """DeepSpeed classes found in its optimizer state (plain data holders without custom unpickling)."""
    from .distributed import choose_accelerator

    choose_accelerator()  # a process that reads checkpoints without training (a table fit's scorer) imports DeepSpeed here
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` of tensors and plain state only; anything else is refused unexecuted."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the file is refused below if it matters
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line or "global" in line.lower()), "not plain state")
        raise UnsafeCheckpointError(f"{path}: refused to load: it holds objects other than tensors and training state ({reason})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def use_safe_loader(engine: Any) -> None:
    """Route every file DeepSpeed's ``load_checkpoint`` reads through :func:`safe_load`."""
    engine.checkpoint_engine.load = safe_load


# --- completeness and checksums -------------------------------------------------------------


def seal(tag_dir: Path, step: int) -> None:
    """Mark a fully written tag complete: the checksums of all its files, written last."""
    files = {p.name: sha256_file(p) for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != COMPLETE}
    write_atomic(tag_dir / COMPLETE, json.dumps({"step": step, "files": files}, indent=1) + "\n")


def damage(tag_dir: Path) -> str | None:
    """Why a tag cannot be used (missing, unsealed, a file missing or changed), or None if it verifies."""
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    try:
        sealed = json.loads((tag_dir / COMPLETE).read_text())
        files = sealed["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError
    except FileNotFoundError:
        return f"{tag_dir} is incomplete ({COMPLETE} is missing: the save did not finish)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{tag_dir / COMPLETE} is unreadable"
    for name, digest in files.items():
        p = tag_dir / str(name)
        if Path(str(name)).name != name or not p.is_file():
            return f"{p} is missing"
        if sha256_file(p) != digest:
            return f"{p} does not match its checksum in {COMPLETE}"
    return None


def write_latest(ckpt_dir: Path, tag: str) -> None:
    write_atomic(ckpt_dir / LATEST, tag + "\n")


@dataclass
class Choice:
    tag: str
    step: int
    notes: list[str]  # why newer checkpoints were passed over


def choose(ckpt_dir: Path) -> Choice:
    """The checkpoint to resume from: ``latest`` if it verifies, else the newest older complete one."""
    latest = ckpt_dir / LATEST
    try:
        named = latest.read_text(errors="replace").strip()
    except FileNotFoundError:
        raise CheckpointError(f"{latest} is missing: no checkpoint to resume from") from None
    if step_of(named) is None:
        raise CheckpointError(f"{latest}: names {named[:40]!r}, not a checkpoint tag (stepNNNNNNNN)")
    limit = step_of(named)
    tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None), reverse=True)
    candidates = [named] + [t for t in tags if t != named and step_of(t) < limit]  # type: ignore[operator]
    notes = []
    for tag in candidates:
        why = damage(ckpt_dir / tag)
        if why is None:
            return Choice(tag, step_of(tag), notes)  # type: ignore[arg-type]
        notes.append(why)
    raise CheckpointError(f"no complete checkpoint in {ckpt_dir}: " + "; ".join(notes))


@contextmanager
def refusing(wrap: Callable[[str], Exception]) -> Iterator[None]:
    """Turn checkpoint errors into ``wrap(message)`` (e.g. the caller's one-line user error)."""
    try:
        yield
    except CheckpointError as e:
        raise wrap(str(e)) from None


__all__ = ["COMPLETE", "LATEST", "CheckpointError", "Choice", "UnsafeCheckpointError", "choose", "damage", "refusing", "safe_load", "seal",
           "sha256_file", "step_of", "tag_for", "use_safe_loader", "write_atomic", "write_latest"]
