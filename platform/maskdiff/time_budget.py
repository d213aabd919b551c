"""``train.minutes``: a wall-clock budget for the training loop that every process agrees on."""

from __future__ import annotations

import time

import torch

from .distributed import max_over_ranks


class TimeBudget:
    """The share of the loop's wall-clock budget spent, agreed by every process.

    All ranks must stop at the same step and use the same learning rate, so the
    fraction is the maximum over ranks (one scalar all-reduce per step).
    """

    def __init__(self, minutes: float | None, device: torch.device):
        self.limit_s = None if minutes is None else minutes * 60.0
        self.device = device
        self.started = time.perf_counter()
        self.spent = 0.0  # fraction of the budget, in [0, inf)

    def restart(self) -> None:
        self.started, self.spent = time.perf_counter(), 0.0

    def tick(self) -> bool:
        """Update the fraction spent; True once the budget is used up."""
        if self.limit_s is None:
            return False
        self.spent = max_over_ranks((time.perf_counter() - self.started) / self.limit_s, self.device)
        return self.spent >= 1.0


__all__ = ["TimeBudget"]
