"""Ancestral reverse sampling for MD4 and GenMD4 (state-dependent) schedules.

From t to s < t a masked position becomes value i with probability
``r_i * mu_i``, ``r_i = (alpha_s[i] - alpha_t[i]) / (1 - alpha_t[i])``, and
stays masked otherwise (MD4: r is the same for every i). Positions that are
not masked at the start (the given fields) are never touched. Draws are made
in float64 by inverse CDF, so the tails of mu are not truncated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import Batch
from .elbo import Denoiser
from .schedules import ModalitySchedules

GRIDS = ("linear", "cosine")


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
class SampleResult:
    tokens: Tensor  # (B, L) global ids, no mask left at filled positions
    network_calls: int


def categorical(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of unnormalised non-negative float64 weights (inverse CDF)."""
    cdf = weights.to(torch.float64).cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=torch.float64, generator=generator, device=cdf.device) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def unmask_rates(schedules: ModalitySchedules, batch: Batch, t: float, s: float, values: Tensor) -> Tensor:
    """r = (alpha_s - alpha_t) / (1 - alpha_t) per masked position and value.

    ``values`` is (1, V) for the whole vocabulary; the result is (B, L, V) for
    state-dependent schedules, (B, L, 1) otherwise. At s = 0 everything unmasks.
    """
    B, L = batch.shape
    dtype = torch.float64
    if s <= 0.0:
        return torch.ones(B, L, 1, dtype=dtype, device=values.device)
    tt = torch.full((B,), t, dtype=dtype, device=values.device)
    ss = torch.full((B,), s, dtype=dtype, device=values.device)
    mods = batch.modality_ids
    if not schedules.state_dependent:
        zero = torch.zeros_like(batch.tokens)
        m_t = schedules.per_position("mask_prob", tt, zero, mods)
        m_s = schedules.per_position("mask_prob", ss, zero, mods)
        return (1.0 - m_s / m_t).unsqueeze(-1)
    V = values.shape[-1]
    vals = values.expand(B * L, V).reshape(B, L * V)
    mods_v = mods.unsqueeze(-1).expand(B, L, V).reshape(B, L * V)
    m_t = schedules.per_position("mask_prob", tt, vals, mods_v)
    m_s = schedules.per_position("mask_prob", ss, vals, mods_v)
    return (1.0 - m_s / m_t).view(B, L, V).nan_to_num(0.0)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    batch: Batch,
    schedules: ModalitySchedules,
    steps: int = 100,
    grid: str = "cosine",
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Fill every position of ``batch.tokens`` that holds the mask id.

    The network is not called again on a step where no token changed, when it
    is time-free (``denoiser.time_conditioned`` is False) and every schedule is
    value-free: its output is then the same as at the previous step.
    """
    x = batch.tokens.clone()
    times = time_grid(steps, grid).tolist()
    can_cache = not getattr(denoiser, "time_conditioned", True) and not schedules.state_dependent
    logp, calls = None, 0
    for t, s in zip(times[:-1], times[1:]):
        masked = x == batch.mask_id
        if not masked.any():
            break
        if logp is None or not can_cache:
            logp = denoiser(x, batch.with_tokens(x), torch.full((x.shape[0],), t, device=x.device))
            calls += 1
        mu = logp[masked].to(torch.float64).exp()  # (M, V) at the masked positions only
        vocab = torch.arange(mu.shape[-1], device=x.device).view(1, -1)
        weights = unmask_rates(schedules, batch, t, s, vocab)[masked] * mu  # P(value i at s)
        stay = (1.0 - weights.sum(-1)).clamp(min=0.0)
        draw = categorical(torch.cat((weights, stay.unsqueeze(-1)), dim=-1), generator)
        if (draw < mu.shape[-1]).any():
            x = x.masked_scatter(masked, torch.where(draw < mu.shape[-1], draw, batch.mask_id))
            logp = None  # tokens changed: the cached output is stale
    return SampleResult(x, calls)
