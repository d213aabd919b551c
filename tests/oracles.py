"""Exact denoisers for data whose likelihood is known in closed form."""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

from maskdiff.core.batch import Batch, collate
from maskdiff.core.schedules import ModalitySchedules
from maskdiff.core.tokens import Field, Record, Support, VocabSpec


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
        self.spec = data.spec
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
            one_minus = self.schedules.at(vals.reshape(B, -1), mods.reshape(B, -1)).mask_prob(t.to(torch.float64))
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
        """The exact posterior under a value-free (MD4) schedule, log-probabilities (B, 2, K)."""
        B = x_t.shape[0]
        return self.conditional(x_t, batch.mask_id, torch.ones(B, self.K, dtype=torch.float64)).log()

    def conditional(self, x_t: Tensor, mask_id: int, weight: Tensor) -> Tensor:
        """p(x0_n = i | x_t) for both positions n, given ``weight`` (B, K) = 1 - alpha_t[i] per row.

        Other position visible with value v: P(i, v) (1 - alpha_t[i]); masked too:
        sum_j P(i, j) (1 - alpha_t[i]) (1 - alpha_t[j]). Renormalised.
        """
        B = x_t.shape[0]
        out = torch.empty(B, 2, self.K, dtype=torch.float64)
        for n, other in ((0, 1), (1, 0)):
            P = self.joint if n == 0 else self.joint.T  # P[i, j]: position n = i, the other = j
            vis = x_t[:, other] != mask_id
            v = x_t[:, other].clamp(max=self.K - 1)
            seen = P[:, v].T  # (B, K)
            hidden = weight @ P.T  # sum_j P(i, j) w_j
            cond = torch.where(vis.unsqueeze(-1), seen, hidden) * weight
            out[:, n] = cond / cond.sum(-1, keepdim=True)
        return out


class PairOracle:
    """The exact denoiser of :class:`PairData` for any schedule (GenMD4's depends on t: time-conditioned)."""

    def __init__(self, pair: PairData, schedules: ModalitySchedules):
        self.pair, self.schedules, self.spec = pair, schedules, pair.spec
        self.time_conditioned = schedules.state_dependent
        self.calls = 0

    def weight(self, t: Tensor, batch: Batch) -> Tensor:
        """(B, K): 1 - alpha_t[i] of the field's modality, per row."""
        sched = self.schedules.for_modality(int(batch.modality_ids[0, 0]))
        vals = torch.arange(self.pair.K).view(1, -1)
        return sched.mask_prob(t.to(torch.float64).view(-1, 1), vals).to(torch.float64)

    def __call__(self, x_t: Tensor, batch: Batch, t: Tensor) -> Tensor:
        self.calls += 1
        return self.pair.conditional(x_t, batch.mask_id, self.weight(t, batch)).log()


@torch.no_grad()
def exact_sample_distribution(pair: PairData, schedules: ModalitySchedules, times: list[float], start: tuple[int | None, int | None] = (None, None),
                              method: str = "ancestral") -> Tensor:
    """Exact distribution (K, K) of what a reverse sampler returns for the pair, by dynamic programming.

    States are (a, b) with K standing for 'masked'. ``ancestral``: from t to s each
    masked position independently becomes i with probability r_i(t, s) mu_i(state, t).
    ``topk`` (no confidence noise): every masked position draws a value from mu; the
    round(sum of unmask probabilities) (at least 1) most confident draws are kept.
    """
    K = pair.K
    oracle = PairOracle(pair, schedules)
    sched = schedules.for_modality(int(pair.all.modality_ids[0, 0]))
    vals = torch.arange(K).view(1, -1)
    dist = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    dist[tuple(K if v is None else v for v in start)] = 1.0
    for t, s in zip(times[:-1], times[1:]):
        tt, ss = torch.tensor([[t]], dtype=torch.float64), torch.tensor([[s]], dtype=torch.float64)
        r = torch.ones(K, dtype=torch.float64) if s <= 0 else (1 - sched.mask_prob(ss, vals) / sched.mask_prob(tt, vals)).view(-1).double()
        new = torch.zeros_like(dist)
        for a in range(K + 1):
            for b in range(K + 1):
                if dist[a, b] == 0:
                    continue
                x = torch.tensor([[a if a < K else pair.spec.mask_id, b if b < K else pair.spec.mask_id]])
                mu = oracle.pair.conditional(x, pair.spec.mask_id, oracle.weight(torch.tensor([t]), pair.all)[:1])[0]  # (2, K)
                step = _topk_step(mu, r, (a, b), K) if method == "topk" else _ancestral_step(mu, r, (a, b), K)
                new += dist[a, b] * step
        dist = new
    assert float(dist[K, :].sum() + dist[:, K].sum()) < 1e-12  # everything is unmasked at s = 0
    return dist[:K, :K]


def _position_moves(mu: Tensor, r: Tensor, state: int, K: int) -> Tensor:
    """(K + 1,) next-value distribution of one position (K = stays masked)."""
    out = torch.zeros(K + 1, dtype=torch.float64)
    if state < K:
        out[state] = 1.0
    else:
        out[:K] = r * mu
        out[K] = 1.0 - out[:K].sum()
    return out


def _ancestral_step(mu: Tensor, r: Tensor, state: tuple[int, int], K: int) -> Tensor:
    return torch.outer(_position_moves(mu[0], r, state[0], K), _position_moves(mu[1], r, state[1], K))


def _topk_step(mu: Tensor, r: Tensor, state: tuple[int, int], K: int) -> Tensor:
    a, b = state
    out = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    if a < K and b < K:
        out[a, b] = 1.0
        return out
    if a < K or b < K:  # one masked position: k >= 1 keeps its draw
        n = 0 if a == K else 1
        for i in range(K):
            out[(i, b) if n == 0 else (a, i)] += mu[n, i]
        return out
    k = round(float((r * mu[0]).sum() + (r * mu[1]).sum()))
    for i in range(K):
        for j in range(K):
            p = mu[0, i] * mu[1, j]
            if k >= 2:
                out[i, j] += p
            elif mu[0, i] >= mu[1, j]:  # ties go to the first position (stable ordering)
                out[i, K] += p
            else:
                out[K, j] += p
    return out


def expected_nelbo(denoiser, batch: Batch, prob: Tensor, schedules: ModalitySchedules, steps: int | None = None, n_t: int = 2000,
                   spec: VocabSpec | None = None) -> Tensor:
    """E_{x0 ~ prob} of the negative ELBO, exactly: every mask pattern is enumerated.

    Continuous time is integrated by the midpoint rule after t = t_min + (1 - t_min) u^3
    (which resolves the 1/t behaviour near t_min); T-step time sums its grid.
    Differentiable in the schedule parameters.
    """
    B = batch.shape[0]
    t_min = schedules.t_min
    if steps is None:
        u = (torch.arange(n_t, dtype=torch.float64) + 0.5) / n_t
        times, weights = t_min + (1 - t_min) * u**3, 3 * u**2 / n_t
    else:
        times = t_min + (1 - t_min) * torch.arange(1, steps + 1, dtype=torch.float64) / steps
        weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    from maskdiff.core.elbo import position_nats

    spec = spec if spec is not None else getattr(denoiser, "spec", None)
    rows, tt, masked, q = _every_mask(batch, schedules, times)
    nats = position_nats(denoiser, rows, schedules, tt, masked, steps, spec).sum(-1)
    return (weights.repeat_interleave(len(q) // len(times)) * prob.repeat(len(q) // B) * q * nats).sum()


def expected_reconstruction(denoiser, batch: Batch, prob: Tensor, schedules: ModalitySchedules, spec: VocabSpec | None = None) -> Tensor:
    """E_{x0 ~ prob} E_{z ~ q(. | x0) at t_min} of -log p(x0 | z), p the denoiser's prediction at t_min: exactly."""
    from maskdiff.core.elbo import reconstruction_nats

    spec = spec if spec is not None else getattr(denoiser, "spec", None)
    rows, _, masked, q = _every_mask(batch, schedules, torch.tensor([schedules.t_min], dtype=torch.float64))
    nats = reconstruction_nats(denoiser, rows, schedules.t_min, masked, spec).sum(-1)
    return (prob.repeat(len(q) // batch.shape[0]) * q * nats).sum()


def _every_mask(batch: Batch, schedules: ModalitySchedules, times: Tensor) -> tuple[Batch, Tensor, Tensor, Tensor]:
    """Every (time, mask pattern, example), row (i * P + j) * B + b: the rows, their times, masks and q(mask | x0)."""
    B, L = batch.shape
    patterns = torch.tensor([[(k >> n) & 1 for n in range(L)] for k in range(2**L)], dtype=torch.bool)
    P, N = len(patterns), len(times)
    rows = batch.repeat(N * P)
    tt = times.repeat_interleave(P * B)
    masked = patterns.repeat_interleave(B, dim=0).repeat(N, 1) & rows.valid
    x0 = torch.where(rows.valid, rows.tokens, 0)
    p_mask = schedules.at(x0, rows.modality_ids).mask_prob(tt)
    q = torch.where(masked, p_mask, 1 - p_mask).where(rows.valid, 1.0).prod(-1)
    return rows, tt, masked, q
