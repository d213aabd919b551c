"""Exact denoisers for data whose likelihood is known in closed form."""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

from maskdiff.batch import Batch, collate
from maskdiff.schedules import ModalitySchedules
from maskdiff.tokens import Field, Record, Support, VocabSpec


class IndependentData:
    """Records whose positions are independent with known marginals.

    ``fields`` maps a field name to (support, list of per-position marginals).
    """

    def __init__(self, supports: list[Support], fields: dict[str, tuple[str, list[list[float]]]]):
        self.spec = VocabSpec(supports)
        self.fields = fields
        # marginal over the global clean vocabulary at each flattened position
        rows = []
        for support, marginals in fields.values():
            r = self.spec.id_range(support)
            for p in marginals:
                assert len(p) == len(r) and abs(sum(p) - 1) < 1e-12
                full = np.zeros(self.spec.num_clean)
                full[r.start : r.stop] = p
                rows.append(full)
        self.p = torch.tensor(np.stack(rows))  # (L, V) float64

    def sample(self, n: int, seed: int = 0) -> list[Record]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            fields = []
            for name, (support, marginals) in self.fields.items():
                fields.append(Field(name, support, [rng.choice(len(p), p=p) for p in marginals]))
            out.append(Record(fields))
        return out

    def batch(self, n: int, seed: int = 0) -> Batch:
        return collate(self.sample(n, seed), self.spec)

    def nll(self, batch: Batch) -> Tensor:
        """Exact -log p(x0) per example."""
        L = self.p.shape[0]
        probs = self.p.unsqueeze(0).expand(batch.shape[0], L, -1).gather(-1, batch.tokens[:, :L].unsqueeze(-1))
        return -torch.log(probs.squeeze(-1)).sum(-1)

    def entropy(self) -> float:
        p = self.p[self.p > 0]
        return float(-(p * p.log()).sum())


class PosteriorOracle:
    """The exact posterior of a masked position: p itself for value-free schedules,
    p_i (1 - alpha_t[i]) renormalised for state-dependent ones (``state_aware``)."""

    def __init__(self, data: IndependentData, schedules: ModalitySchedules, state_aware: bool = True):
        self.data, self.schedules, self.state_aware = data, schedules, state_aware
        self.time_conditioned = state_aware and schedules.state_dependent
        self.calls = 0

    def __call__(self, x_t: Tensor, batch: Batch, t: Tensor) -> Tensor:
        self.calls += 1
        B, L = x_t.shape
        p = self.data.p.unsqueeze(0).expand(B, -1, -1).to(torch.float64)
        if self.state_aware:
            V = p.shape[-1]
            vals = torch.arange(V).view(1, 1, V).expand(B, L, V)
            mods = batch.modality_ids.unsqueeze(-1).expand(B, L, V)
            one_minus = self.schedules.per_position("mask_prob", t.to(torch.float64), vals.reshape(B, -1), mods.reshape(B, -1))
            p = p * one_minus.view(B, L, V)
            p = p / p.sum(-1, keepdim=True)
        return torch.log(p)


class PairData:
    """Two positions of one support with a known joint distribution P (K x K).

    ``posterior`` is the exact denoiser: a masked position's distribution
    given the other position (its value when visible, its marginal when masked).
    """

    def __init__(self, joint: np.ndarray, modality: str = "text"):
        self.joint = torch.tensor(joint, dtype=torch.float64)
        self.K = joint.shape[0]
        self.spec = VocabSpec([Support(f"{modality}/v", modality, self.K)])
        records = [Record([Field("x", f"{modality}/v", [a, b])]) for a in range(self.K) for b in range(self.K)]
        self.all = collate(records, self.spec)  # every outcome once, row a*K + b
        self.prob = self.joint.reshape(-1)

    def nll(self) -> float:
        """Exact entropy of the pair, the NLL a perfect model attains."""
        p = self.prob[self.prob > 0]
        return float(-(p * p.log()).sum())

    def posterior(self, x_t: Tensor, batch: Batch, t: Tensor) -> Tensor:
        B = x_t.shape[0]
        m = batch.mask_id
        out = torch.empty(B, 2, self.K, dtype=torch.float64)
        marg = (self.joint.sum(1), self.joint.sum(0))
        for n, other in ((0, 1), (1, 0)):
            vis = x_t[:, other] != m
            v = x_t[:, other].clamp(max=self.K - 1)
            cond = self.joint[:, v].T if n == 0 else self.joint[v, :]
            cond = cond / cond.sum(-1, keepdim=True)
            out[:, n] = torch.where(vis.unsqueeze(-1), cond, marg[n].expand(B, -1))
        return out.log()


def expected_nelbo(denoiser, batch: Batch, prob: Tensor, schedules: ModalitySchedules, steps: int | None = None, n_t: int = 2000) -> Tensor:
    """E_{x0 ~ prob} of the negative ELBO, exactly: every mask pattern is enumerated.

    Continuous time is integrated by the midpoint rule after t = t_min + (1 - t_min) u^3
    (which resolves the 1/t behaviour near t_min); T-step time sums its grid.
    Differentiable in the schedule parameters.
    """
    B, L = batch.shape
    t_min = schedules.t_min
    if steps is None:
        u = (torch.arange(n_t, dtype=torch.float64) + 0.5) / n_t
        times, weights = t_min + (1 - t_min) * u**3, 3 * u**2 / n_t
    else:
        times = t_min + (1 - t_min) * torch.arange(1, steps + 1, dtype=torch.float64) / steps
        weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    patterns = torch.tensor([[(k >> n) & 1 for n in range(L)] for k in range(2**L)], dtype=torch.bool)
    from maskdiff.elbo import position_nats

    total = torch.zeros((), dtype=torch.float64)
    x0 = torch.where(batch.valid, batch.tokens, 0)
    for t, w in zip(times, weights):
        tt = t.repeat(B)
        p_mask = schedules.per_position("mask_prob", tt, x0, batch.modality_ids)
        for pat in patterns:
            masked = pat.expand(B, L) & batch.valid
            q = torch.where(masked, p_mask, 1 - p_mask).where(batch.valid, 1.0).prod(-1)
            nats = position_nats(denoiser, batch, schedules, tt, masked, steps).sum(-1)
            total = total + w * (prob * q * nats).sum()
    return total
