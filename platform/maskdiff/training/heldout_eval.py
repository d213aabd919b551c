"""Held-out evaluation during training: the ELBO of a fixed set of held-out batches every ``train.eval_every`` steps."""

from __future__ import annotations

from typing import Any

import torch

from maskdiff.core.batch import Batch
from maskdiff.config import RunConfig
from maskdiff.data.loader import heldout_batches
from maskdiff.core.tokens import VocabSpec
from .train_metrics import Tally


class HeldoutEvaluation:
    """This process's held-out batches (:func:`~maskdiff.data.loader.heldout_batches`, the same at every evaluation)
    and their ELBO (draws=1, no surrogate) summed over ranks; empty when ``data.heldout`` is 0."""

    def __init__(self, rc: RunConfig, spec: VocabSpec, rank: int, world: int, device: torch.device):
        self.rc, self.rank, self.device = rc, rank, device
        self.batches: dict[str, list[Batch]] = heldout_batches(rc, spec, rank, world, rc.train.eval_batches)

    def __bool__(self) -> bool:
        return bool(self.batches)

    def due(self, step: int, stop: int) -> bool:
        return bool(self) and (step % self.rc.train.eval_every == 0 or step == stop)

    @torch.no_grad()
    def tally(self, module: torch.nn.Module) -> Tally:
        """The negative ELBO of the batches per modality, summed over ranks (every rank must call it)."""
        module.eval()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.rc.seed * 7919 + self.rank + 1)
        tally = Tally()
        for mod in self.rc.modalities:
            for batch in self.batches.get(mod, []):
                batch = batch.to(self.device)
                tally.add(module(batch, generator=gen, draws=1).per_modality(), batch.tokens.numel())
        module.train()
        return tally.reduced(self.device)

    def record(self, module: torch.nn.Module, step: int) -> dict[str, Any]:
        """The ``eval`` metrics record of ``module`` at ``step``."""
        ev = self.tally(module)
        return {"kind": "eval", "step": step, "bits_per_token": ev.bits_per_token(), "tokens": ev.token_counts()}


__all__ = ["HeldoutEvaluation"]
