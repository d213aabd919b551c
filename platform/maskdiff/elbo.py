"""The MD4 / GenMD4 negative ELBO, continuous and discrete time (arXiv 2406.04329).

For one position with clean value x0 (support size K), the negative ELBO is

    recon:  (1 - alpha_{t_min}[x0]) * log K          masked at t_min, decoded uniformly
    diff:   ∫_{t_min}^1 E_q[ 1{x_t masked} * integrand(t) ] dt
    prior:  alpha_1[x0] * log K                       KL to "masked, else uniform" at t = 1

with, writing c_i = -alpha'_t[i] / (1 - alpha_t[i]) >= 0 and mu the denoiser's
distribution over clean values (eq. 5 for MD4, eq. 8 for GenMD4):

    continuous   c_{x0} * (-log mu[x0]) + sum_i c_i * (mu_i - x0_i)
    discrete     T * [ r_{x0} * (-log mu[x0]) + (1 - r_{x0}) * log((1 - r_{x0}) / (1 - sum_i r_i mu_i)) ]
                 r_i = (alpha_s[i] - alpha_t[i]) / (1 - alpha_t[i]), s = t - (1 - t_min) / T

The terms after the first vanish for an MD4 (value-free) schedule. Time is
drawn once per example, stratified across the batch (antithetic). The GenMD4
gradient with respect to w also flows through the draw of x_t; it is
estimated with REINFORCE leave-one-out over ``draws >= 2`` masks per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .batch import Batch
from .schedules import ModalitySchedules
from .tokens import MODALITIES


class Denoiser(Protocol):
    def __call__(self, x_t: Tensor, batch: Batch, t: Tensor) -> Tensor:
        """Log-probabilities (B, L, num_clean) over clean values; -inf outside each field's support."""
        ...


@dataclass
class ELBOResult:
    loss: Tensor  # scalar to minimise: nats per valid token, with the RLOO surrogate's gradient
    nelbo: Tensor  # (B,) negative ELBO in nats per example, averaged over draws, no surrogate
    position_nats: Tensor  # (B, L) detached, averaged over draws
    batch: Batch

    def per_modality(self) -> dict[str, tuple[float, int]]:
        """modality name -> (nats, valid tokens) summed over the batch."""
        out = {}
        mods, valid = self.batch.modality_ids, self.batch.valid
        for mid in mods[valid].unique().tolist():
            sel = valid & (mods == mid)
            out[MODALITIES[mid]] = (float(self.position_nats[sel].sum()), int(sel.sum()))
        return out

    def bits_per_token(self) -> dict[str, float]:
        return {m: nats / (n * math.log(2)) for m, (nats, n) in self.per_modality().items()}


def antithetic_times(batch_size: int, t_min: float, generator: torch.Generator | None = None, device=None) -> Tensor:
    """t = t_min + (1 - t_min) * ((u + i/B) mod 1): one t per example, stratified."""
    u = torch.rand((), generator=generator, device=device)
    strata = (u + torch.arange(batch_size, device=device) / batch_size) % 1.0
    return t_min + (1.0 - t_min) * strata


def position_nats(
    denoiser: Denoiser,
    batch: Batch,
    schedules: ModalitySchedules,
    t: Tensor,
    masked: Tensor,
    steps: int | None = None,
) -> Tensor:
    """Negative ELBO per position (B, L) for given times t (B,) and mask pattern.

    Deterministic in (t, masked): Monte Carlo estimators average it over
    draws; tests can average it exactly by enumerating mask patterns.
    ``steps=None`` is the continuous-time ELBO, an integer T the T-step one.
    """
    valid, mods = batch.valid, batch.modality_ids
    masked = masked & valid
    x0 = torch.where(valid, batch.tokens, 0)
    x_t = torch.where(masked, batch.mask_id, batch.tokens)
    logp = denoiser(x_t, batch, t)
    log_k = torch.log((logp > -math.inf).sum(-1).clamp(min=1).to(logp.dtype))
    ce = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    ce = torch.where(masked, ce, 0.0)  # unmasked positions may hold -inf entries: keep them out
    t_min = schedules.t_min
    t = t.to(logp.dtype)

    def at(fn: str, tt: Tensor) -> Tensor:
        return schedules.per_position(fn, tt, x0, mods)

    if steps is None:
        diff = (1.0 - t_min) * at("rate", t) * ce
    else:
        s = (t - (1.0 - t_min) / steps).clamp(min=t_min)
        r = 1.0 - at("mask_prob", s) / at("mask_prob", t)  # (alpha_s - alpha_t) / (1 - alpha_t)
        diff = steps * r * ce
    vocab = torch.arange(logp.shape[-1], device=logp.device)
    for mid, sched in schedules.items():
        if not sched.state_dependent:
            continue
        sel = masked & (mods == mid)
        if not sel.any():
            continue
        mu = logp.exp()
        if steps is None:  # sum_i c_i (mu_i - x0_i)
            c = sched.rate(t.view(-1, 1), vocab.view(1, -1))  # (B, V)
            extra = (1.0 - t_min) * (torch.einsum("blv,bv->bl", mu, c) - at("rate", t))
        else:  # (1 - r_x0) log((1 - r_x0) / (1 - sum_i r_i mu_i))
            r_all = 1.0 - sched.mask_prob(s.view(-1, 1), vocab.view(1, -1)) / sched.mask_prob(t.view(-1, 1), vocab.view(1, -1))
            stay_model = 1.0 - torch.einsum("blv,bv->bl", mu, r_all)
            extra = steps * (1.0 - r) * (torch.log1p(-r) - torch.log(stay_model))
        diff = torch.where(sel, diff + extra, diff)
    diff = torch.where(masked, diff, 0.0)
    recon = at("mask_prob", torch.full_like(t, t_min)) * log_k
    prior = at("alpha", torch.ones_like(t)) * log_k
    return torch.where(valid, diff + recon + prior, 0.0)


def draw_mask(batch: Batch, schedules: ModalitySchedules, t: Tensor, generator=None) -> tuple[Tensor, Tensor]:
    """Forward process q(x_t | x0): mask each valid position with prob 1 - alpha_t[x0].

    Returns the mask pattern and its log-probability per example (for REINFORCE).
    """
    x0 = torch.where(batch.valid, batch.tokens, 0)
    p_mask = schedules.per_position("mask_prob", t, x0, batch.modality_ids)
    u = torch.rand(batch.shape, generator=generator, device=batch.tokens.device, dtype=p_mask.dtype)
    masked = batch.valid & (u < p_mask)
    log_q = torch.where(masked, torch.log(p_mask), torch.log1p(-p_mask))
    return masked, torch.where(batch.valid, log_q, 0.0).sum(-1)


def elbo(
    denoiser: Denoiser,
    batch: Batch,
    schedules: ModalitySchedules,
    *,
    steps: int | None = None,
    draws: int = 1,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ELBOResult:
    """Monte Carlo negative ELBO of a batch, with the RLOO surrogate for GenMD4's w.

    With a state-dependent schedule present and ``draws >= 2``, the loss's
    gradient adds sum_k (l_k - mean_{j != k} l_j) grad log q(x_t^k) / K, the
    leave-one-out REINFORCE term for the dependence of the mask draw on w.
    Its value is left unchanged, so ``loss`` is always the ELBO estimate.
    """
    schedules.check_covers(batch.modality_ids, batch.valid)
    B = batch.shape[0]
    if t is None:
        t = antithetic_times(B, schedules.t_min, generator, batch.tokens.device)
        if steps is not None:  # snap to the T-step grid t_i = t_min + (1 - t_min) i / T, i = 1..T
            i = torch.ceil((t - schedules.t_min) / (1.0 - schedules.t_min) * steps).clamp(1, steps)
            t = schedules.t_min + (1.0 - schedules.t_min) * i / steps
    rep = batch.repeat(draws) if draws > 1 else batch
    t_rep = t.repeat(draws)
    masked, log_q = draw_mask(rep, schedules, t_rep, generator)
    nats = position_nats(denoiser, rep, schedules, t_rep, masked, steps)
    per_draw = nats.sum(-1).view(draws, B)
    nelbo = per_draw.mean(0)
    tokens = batch.valid.sum().clamp(min=1)
    loss = nelbo.sum() / tokens
    if schedules.state_dependent and draws >= 2 and torch.is_grad_enabled():
        others = (per_draw.sum(0, keepdim=True) - per_draw) / (draws - 1)
        advantage = (per_draw - others).detach()
        surrogate = (advantage * log_q.view(draws, B)).mean(0).sum() / tokens
        loss = loss + (surrogate - surrogate.detach())
    return ELBOResult(loss, nelbo.detach(), nats.detach().view(draws, B, -1).mean(0), batch)
