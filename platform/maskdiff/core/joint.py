"""The trained object: one denoiser plus the per-modality masking schedules.

GenMD4's learned rates ``w`` are parameters of this module, so the engine
trains, checkpoints and exports them together with the network. Building it
needs only the run configuration and the vocabulary spec (no DeepSpeed).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .batch import Batch
from maskdiff.config import RunConfig
from .elbo import ELBOResult, elbo
from .model import Denoiser, DenoiserConfig
from .schedules import LearnedPoly, ModalitySchedules, make_schedule
from .tokens import VocabSpec


def schedule_options(kind: str, init: float, b_min: float, b_max: float) -> dict[str, float]:
    if kind == "genmd4":
        return {"init": init}
    if kind == "geometric":
        return {"b_min": b_min, "b_max": b_max}
    return {}


class JointModel(nn.Module):
    """``forward(batch)`` is the Monte Carlo negative ELBO (:class:`ELBOResult`) of a batch."""

    def __init__(self, spec: VocabSpec, rc: RunConfig):
        super().__init__()
        m = rc.model
        self.spec, self.draws = spec, rc.draws
        conditions = tuple(rc.train.condition_fields) if m.condition_modulation else ()
        self.denoiser = Denoiser(spec, DenoiserConfig(m.dim, m.depth, m.heads, m.mlp_ratio, m.dropout, rc.time_conditioning,
                                                      condition_fields=conditions))
        schedules = {}
        for mod in rc.modalities:
            s = rc.schedules[mod]
            schedules[spec.modality_id(mod)] = make_schedule(s.kind, spec.num_clean, **schedule_options(s.kind, s.init, s.b_min, s.b_max))
        self.schedules = ModalitySchedules(schedules)
        self.modality_names = {spec.modality_id(mod): mod for mod in rc.modalities}

    def forward(self, batch: Batch, generator: torch.Generator | None = None, draws: int | None = None) -> ELBOResult:
        # A batch without some modality leaves its learned schedule out of the graph, or changes
        # when its gradient is ready. Data-parallel engines reduce gradients in the order they
        # become ready, which must be the same on every rank: tie every schedule parameter to the
        # start of the graph (zero weight), so its gradient is always ready last.
        params = self.schedule_parameters()
        idle = torch.stack([p.sum() for p in params]).sum() if params and torch.is_grad_enabled() else None
        low = self.denoiser.token_emb.weight.dtype  # bf16 when the engine has cast the module
        with torch.autocast(batch.tokens.device.type, dtype=low, enabled=low in (torch.bfloat16, torch.float16)):
            result = elbo(self.denoiser, batch, self.schedules, draws=self.draws if draws is None else draws, generator=generator)
        if idle is not None:
            result = replace(result, loss=result.loss + 0.0 * idle)
        return result

    def schedule_parameters(self) -> list[nn.Parameter]:
        return list(self.schedules.parameters())

    def value_ids(self, modality: str) -> torch.Tensor:
        """Global clean ids of every support of ``modality``."""
        ids = [torch.arange(r.start, r.stop) for s in self.spec.supports if s.modality == modality for r in [self.spec.id_range(s.name)]]
        return torch.cat(ids)

    @torch.no_grad()
    def w_stats(self) -> dict[str, dict[str, float]]:
        """Mean / std / min / max of the learned GenMD4 w over each such modality's values."""
        out = {}
        for mid, sched in self.schedules.items():
            if isinstance(sched, LearnedPoly):
                mod = self.modality_names[mid]
                w = sched.w.float()[self.value_ids(mod).to(sched.w_raw.device)]
                out[mod] = {"mean": float(w.mean()), "std": float(w.std()) if w.numel() > 1 else 0.0, "min": float(w.min()), "max": float(w.max())}
        return out


__all__ = ["JointModel", "schedule_options"]
