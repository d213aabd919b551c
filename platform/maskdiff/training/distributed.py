"""The process group: one rank per process, set up by a launcher or, without one, as rank 0 of 1.

``deepspeed.initialize`` always drives the step, also in a plain
single-process run (:func:`init_distributed` then sets up a one-rank process
group itself); launchers (``deepspeed``, ``torchrun``) provide the
environment for N processes on one or several nodes. The helpers below are
the collectives the trainer needs; every rank must call them.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist

from maskdiff.config import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_accelerator() -> None:
    """Before DeepSpeed is imported: without a GPU, tell it the CPU is meant (else it warns that it found none)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a launcher-less process becomes rank 0 of 1."""
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    choose_accelerator()
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


def _over_ranks(value: float, device: torch.device, op: dist.ReduceOp) -> float:
    """``value`` reduced over all ranks by ``op``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


def max_over_ranks(value: float, device: torch.device) -> float:
    return _over_ranks(value, device, dist.ReduceOp.MAX)


def sum_over_ranks(value: int, device: torch.device) -> int:
    return round(_over_ranks(float(value), device, dist.ReduceOp.SUM))


def gathered(value: Any, world: int) -> list[Any]:
    """``value`` of every rank, in rank order."""
    out = [value] * world
    if world > 1:
        dist.all_gather_object(out, value)
    return out


def on_every_rank(fn: Callable[[], Any], world: int) -> Any:
    """Run ``fn`` on every rank; a user error on any rank stops all of them with its message."""
    err, out = "", None
    try:
        out = fn()
    except ConfigError as e:
        err = str(e)
    first = next((e for e in gathered(err, world) if e), "")
    if first:
        raise ConfigError(first)
    return out


def on_rank_zero(fn: Callable[[], Any], rank: int, world: int) -> Any:
    """Run ``fn`` on rank 0 only and hand its result to every rank (its user error stops all of them)."""
    out = [on_every_rank(lambda: fn() if rank == 0 else None, world)]
    if world > 1:
        dist.broadcast_object_list(out, src=0)
    return out[0]


__all__ = ["close_distributed", "device_for", "gathered", "init_distributed", "max_over_ranks", "on_every_rank", "on_rank_zero",
           "sum_over_ranks"]
