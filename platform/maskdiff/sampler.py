"""Order-free reverse sampling: fill any masked subset of a batch given the rest.

``ancestral`` (and ``genmd4``): from t to s < t a masked position becomes
value i with probability ``r_i * mu_i``, ``r_i = (alpha_s[i] - alpha_t[i]) /
(1 - alpha_t[i])``, and stays masked otherwise. For an MD4 schedule r is the
same for every i; for a GenMD4 schedule it is the state-dependent rate of its
value. ``topk`` (MaskGIT / LLaDA style) unmasks, per row, as many positions as
the schedule expects, choosing the most confident draws (optionally with
Gumbel noise on the confidence, annealed with t).

Positions that are not masked at the start (the given fields) are never
touched. Draws are made in float64 by inverse CDF, so the tails of mu are not
truncated. Classifier-free guidance combines the conditional prediction with
one whose conditioning fields are masked: ``(1 + w) log p(x | c) - w log p(x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .batch import Batch, collate, split
from .elbo import Denoiser
from .schedules import ModalitySchedules
from .tokens import MODALITIES, Record, VocabSpec

GRIDS = ("linear", "cosine")
METHODS = ("ancestral", "genmd4", "topk")


def time_grid(steps: int, kind: str = "linear", dtype=torch.float64) -> Tensor:
    """Times 1 = t_0 > t_1 > ... > t_steps = 0 of a reverse run.

    ``cosine``: t_k = cos(pi/2 * k / steps), fine steps near t = 1 (where a
    linear schedule unmasks few tokens) and coarse ones near 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    frac = torch.arange(steps + 1, dtype=dtype) / steps
    if kind == "linear":
        return 1.0 - frac
    if kind == "cosine":
        grid = torch.cos(0.5 * math.pi * frac)
        grid[-1] = 0.0
        return grid
    raise ValueError(f"unknown time grid {kind!r}; expected one of {GRIDS}")


@dataclass
class SamplerOptions:
    steps: int = 100
    grid: str = "cosine"  # linear | cosine
    method: str = "ancestral"  # ancestral | genmd4 | topk
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus: keep the smallest set of values with this much mass
    guidance: float = 0.0  # classifier-free guidance weight w (0 = off)
    guidance_supports: tuple[int, ...] = ()  # support ids of the fields dropped for the unconditional pass
    confidence_noise: float = 0.0  # topk: scale of the Gumbel noise on the confidence (times t)
    progress: bool = False

    def check(self, schedules: ModalitySchedules) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}; expected one of {METHODS}")
        if self.method == "genmd4" and not schedules.state_dependent:
            raise ValueError("method 'genmd4' needs a model trained with a genmd4 schedule; use 'ancestral'")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown time grid {self.grid!r}; expected one of {GRIDS}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.guidance < 0 or self.steps < 1:
            raise ValueError(f"need steps >= 1, temperature > 0, 0 < top_p <= 1, guidance >= 0; got {self}")
        if self.guidance > 0 and not self.guidance_supports:
            raise ValueError("guidance needs the conditioning fields (guidance_supports)")


@dataclass
class SampleResult:
    tokens: Tensor  # (B, L) global ids, no mask left at filled positions
    network_calls: int


def categorical(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of unnormalised non-negative float64 weights (inverse CDF)."""
    cdf = weights.to(torch.float64).cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=torch.float64, generator=generator, device=cdf.device) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def unmask_rates(schedules: ModalitySchedules, t: float, s: float, num_values: int, device=None) -> Tensor:
    """r = (alpha_s - alpha_t) / (1 - alpha_t) as a table (num_modalities, V) (rows of absent modalities are 0).

    Every row is constant for an MD4 schedule. At s = 0 everything unmasks.
    """
    table = torch.zeros(len(MODALITIES), num_values, dtype=torch.float64, device=device)
    vals = torch.arange(num_values, device=device).view(1, -1)
    tt = torch.tensor([[t]], dtype=torch.float64, device=device)
    ss = torch.tensor([[s]], dtype=torch.float64, device=device)
    for mid, sched in schedules.items():
        table[mid] = 1.0 if s <= 0.0 else (1.0 - sched.mask_prob(ss, vals) / sched.mask_prob(tt, vals)).to(torch.float64)
    return table


def shape_distribution(logp: Tensor, temperature: float, top_p: float) -> Tensor:
    """Temperature and nucleus (top-p) filtering of log-probabilities (..., V); -inf stays -inf."""
    if temperature != 1.0:
        logp = torch.log_softmax(logp / temperature, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = logp.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        sorted_lp = sorted_lp.masked_fill(mass_before >= top_p, -math.inf)  # the top value always stays
        logp = torch.log_softmax(torch.empty_like(logp).scatter_(-1, order, sorted_lp), dim=-1)
    return logp


def guided(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """(1 + w) log p(x | c) - w log p(x), renormalised over each field's support."""
    mix = torch.where(torch.isfinite(cond), (1.0 + w) * cond - w * uncond.clamp(min=-1e4), cond)
    return torch.log_softmax(mix, dim=-1)


class _Predictor:
    """Network calls (with guidance), cached while nothing changes."""

    def __init__(self, denoiser: Denoiser, batch: Batch, schedules: ModalitySchedules, opts: SamplerOptions):
        self.denoiser, self.batch, self.opts = denoiser, batch, opts
        self.cacheable = not getattr(denoiser, "time_conditioned", True) and not schedules.state_dependent
        self.drop = torch.isin(batch.support_ids, torch.tensor(opts.guidance_supports, dtype=torch.long, device=batch.tokens.device))
        self.calls, self._cached = 0, None

    def __call__(self, x: Tensor, t: float) -> Tensor:
        if self._cached is not None and self.cacheable:
            return self._cached
        tt = torch.full((x.shape[0],), t, device=x.device)
        logp = self.denoiser(x, self.batch.with_tokens(x), tt)
        self.calls += 1
        if self.opts.guidance > 0:
            x_u = torch.where(self.drop, self.batch.mask_id, x)
            logp = guided(logp, self.denoiser(x_u, self.batch.with_tokens(x_u), tt), self.opts.guidance)
            self.calls += 1
        self._cached = logp
        return logp

    def invalidate(self) -> None:
        self._cached = None


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    batch: Batch,
    schedules: ModalitySchedules,
    opts: SamplerOptions | None = None,
    generator: torch.Generator | None = None,
    **overrides,
) -> SampleResult:
    """Fill every position of ``batch.tokens`` that holds the mask id (``overrides`` set options).

    The network is not called again on a step where no token changed when it
    is time-free (``denoiser.time_conditioned`` is False) and every schedule is
    value-free: its output would be the same as at the previous step.
    """
    opts = replace(opts or SamplerOptions(), **overrides)
    opts.check(schedules)
    x = batch.tokens.clone()
    times = time_grid(opts.steps, opts.grid).tolist()
    predict = _Predictor(denoiser, batch, schedules, opts)
    bar = tqdm(total=opts.steps, desc="sampling", disable=not opts.progress, leave=False)
    for t, s in zip(times[:-1], times[1:]):
        bar.update()
        masked = x == batch.mask_id
        if not masked.any():
            break
        logp = predict(x, t)[masked].to(torch.float64)  # (M, V) at the masked positions only
        mu = shape_distribution(logp, opts.temperature, opts.top_p).exp()
        rates = unmask_rates(schedules, t, s, mu.shape[-1], x.device)[batch.modality_ids[masked]]
        if opts.method == "topk":
            new = _topk_step(x, masked, mu, rates, t, opts.confidence_noise, batch.mask_id, generator)
        else:
            weights = rates * mu  # P(value i at s)
            stay = (1.0 - weights.sum(-1)).clamp(min=0.0)
            draw = categorical(torch.cat((weights, stay.unsqueeze(-1)), dim=-1), generator)
            new = torch.where(draw < mu.shape[-1], draw, batch.mask_id)
        if (new != batch.mask_id).any():
            x = x.masked_scatter(masked, new)
            predict.invalidate()
    bar.close()
    return SampleResult(x, predict.calls)


def _topk_step(x: Tensor, masked: Tensor, mu: Tensor, rates: Tensor, t: float, noise: float, mask_id: int, generator) -> Tensor:
    """Draw every masked position, keep the most confident ones: as many per row as the schedule expects."""
    draw = categorical(mu, generator)
    expected = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    expected[masked] = (rates * mu).sum(-1)  # probability each position unmasks in this step
    k = torch.round(expected.sum(-1)).long().clamp(min=1)  # per row; >= 1 keeps progress
    conf = torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device)
    conf[masked] = mu.gather(-1, draw.unsqueeze(-1)).squeeze(-1).log()
    if noise > 0:
        u = torch.rand(conf.shape, dtype=torch.float64, generator=generator, device=x.device).clamp(1e-300, 1.0)
        conf = conf + noise * t * -torch.log(-torch.log(u))
    rank = conf.argsort(dim=-1, descending=True).argsort(dim=-1)
    chosen = (rank < k.unsqueeze(-1)) & masked
    return torch.where(chosen[masked], draw, mask_id)


@torch.no_grad()
def complete(
    denoiser: Denoiser,
    records: Sequence[Record],
    spec: VocabSpec,
    schedules: ModalitySchedules,
    opts: SamplerOptions | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    **overrides,
) -> tuple[list[Record], SampleResult]:
    """Fill every MISSING local id of ``records`` given the rest; returns new records."""
    batch = collate(records, spec).to(device)
    result = sample(denoiser, batch, schedules, opts, generator, **overrides)
    return split(batch, records, spec, result.tokens), result
