"""The optimiser: AdamW that skips non-finite updates, its parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from maskdiff.config import RunConfig
from maskdiff.core.joint import JointModel
from .time_budget import TimeBudget


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
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
        if self.skip_next or not all_finite(p.grad for g in self.param_groups for p in g["params"] if p.grad is not None):
            self.skipped += 1
            return None
        return super().step(closure)


def make_optimizer(model: JointModel, rc: RunConfig) -> GuardedAdamW:
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


__all__ = ["GuardedAdamW", "all_finite", "lr_lambda", "make_optimizer"]
