"""A training checkpoint: DeepSpeed's engine state plus each process's own state, so a resumed run continues
the same trajectory.

Each tag (``checkpoints/stepNNNNNNNN/``) holds the engine's files and one
``rank<r>.pt`` per process with its step, RNG states, data position (the
stream seeks to it: shard, window and record per process and DataLoader
worker) and count of skipped steps. Tags are sealed with checksums and loaded
without arbitrary unpickling (see :mod:`maskdiff.training.checkpoints`); a damaged
newest one falls back to the previous complete one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .checkpoints import CheckpointError, Choice, safe_load, seal, step_of, tag_for, write_latest
from maskdiff.config import ConfigError


def own_state(step: int, micro_batches: int, data_position: dict[str, Any], generator: torch.Generator, world: int,
              skipped_total: int, device: torch.device) -> dict[str, Any]:
    """What this process saves beside the engine."""
    state = {"step": step, "micro_batches": micro_batches, "data_position": json.dumps(data_position), "torch_rng": torch.get_rng_state(),
             "generator": generator.get_state(), "world_size": world, "skipped_total": skipped_total}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["generator"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any], *, rank: int, keep: int) -> None:
    """Every rank writes its files into a fresh tag; then rank 0 seals it, points ``latest`` at it and drops
    all but the newest ``keep`` tags."""
    tag = tag_for(step)
    if rank == 0:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # e.g. a damaged one passed over on resume
    dist.barrier()
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpt_dir / tag / f"rank{rank}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        seal(ckpt_dir / tag, step)
        write_latest(ckpt_dir, tag)
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(engine: Any, run_dir: Path, ckpt_dir: Path, choice: Choice, *, rank: int, world: int,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Load the chosen checkpoint (verified on rank 0) into the engine; this process's own state.
    A file that is not plain state is refused unexecuted."""
    for note in choice.notes:
        log(f"warning: {note}; passing over it")
    if choice.notes:
        log(f"resuming from the previous complete checkpoint {choice.tag}")
        if rank == 0:
            for p in ckpt_dir.iterdir():  # the damaged newer tags: their steps are replayed
                if p.is_dir() and (step_of(p.name) or 0) > choice.step:
                    shutil.rmtree(p, ignore_errors=True)
    where = f"--resume {run_dir}"
    try:
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=choice.tag)
        state_file = ckpt_dir / choice.tag / f"rank{rank}.pt"
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
    if state["world_size"] != world:
        raise ConfigError(f"{where}: saved with {state['world_size']} processes, resumed with {world}; resume with "
                          f"{state['world_size']} (torchrun --nproc_per_node {state['world_size']} tools/train.py --resume {run_dir}): "
                          f"each process continues its own share of the data, which another split would not match")
    return state


__all__ = ["load_checkpoint", "own_state", "restore_rng", "save_checkpoint"]
