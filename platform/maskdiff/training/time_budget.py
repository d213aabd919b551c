"""``train.minutes``: a wall-clock budget for the training loop that every process agrees on."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .distributed import max_over_ranks


class TimeBudget:
    """The share of the loop's wall-clock budget spent, agreed by every process.

    All ranks must stop at the same step and use the same learning rate, so the
    fraction is the maximum over ranks (one scalar all-reduce per step). A file
    ``stop_file`` (the run directory's ``STOP``) spends the budget at once: the
    run ends after the current step as if its time were up (checkpoint and
    bundle included), which is how a user, or a caller watching the run, ends it early.
    """

    def __init__(self, minutes: float | None, device: torch.device, stop_file: Path | None = None):
        self.limit_s = None if minutes is None else minutes * 60.0
        self.device, self.stop_file = device, stop_file
        self.started = time.perf_counter()
        self.spent = 0.0  # fraction of the budget, in [0, inf)
        self.stop_requested = False

    def restart(self) -> None:
        self.started, self.spent = time.perf_counter(), 0.0

    def tick(self) -> bool:
        """Update the fraction spent; True once the budget is used up (or a stop was asked for)."""
        if self.limit_s is None and self.stop_file is None:
            return False
        spent = (time.perf_counter() - self.started) / self.limit_s if self.limit_s is not None else 0.0
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_requested, spent = True, max(spent, 1.0)
        self.spent = max_over_ranks(spent, self.device)
        return self.spent >= 1.0


__all__ = ["TimeBudget"]
