"""The MD4 / GenMD4 negative ELBO, continuous and discrete time (arXiv 2406.04329).

For one position with clean value x0 (support size K), the negative ELBO is

    recon:  E_q[ 1{x_{t_min} masked} * -log p(x0 | z_{t_min}) ]   masked at t_min, decoded by p
    diff:   ∫_{t_min}^1 E_q[ 1{x_t masked} * integrand(t) ] dt
    prior:  alpha_1[x0] * log K                       KL to "masked, else uniform" at t = 1

with, writing c_i = -alpha'_t[i] / (1 - alpha_t[i]) >= 0 and mu the denoiser's
distribution over clean values (eq. 5 for MD4, eq. 8 for GenMD4):

    continuous   c_{x0} * (-log mu[x0]) + sum_i c_i * (mu_i - x0_i)
    discrete     T * [ r_{x0} * (-log mu[x0]) + (1 - r_{x0}) * log((1 - r_{x0}) / (1 - sum_i r_i mu_i)) ]
                 r_i = (alpha_s[i] - alpha_t[i]) / (1 - alpha_t[i]), s = t - (1 - t_min) / T

The terms after the first vanish for an MD4 (value-free) schedule. The one
state-dependent schedule is GenMD4's polynomial, for which c_i = w_i / t and
1 - r_i = (s / t)^{w_i}, so both sums are expectations of a function of w
under mu, computed over the position's own support (``kernels.support_ce``).
K is the size of the position's support, from the vocabulary spec. The
reconstruction decodes with p = uniform over the support by default, whose
expectation is closed: (1 - alpha_{t_min}[x0]) log K. With ``decode="model"``
p is the model's own factorised prediction at t_min, mu(. | z_{t_min}) (one
more network call on a mask z_{t_min} ~ q drawn per record, restricted to its
masked positions): a tighter bound where many tokens are still masked at
t_min (GenMD4 with small w: 1 - alpha_{t_min} = t_min^w). Time is
drawn once per example, stratified across the batch (antithetic). The GenMD4
gradient with respect to w also flows through the draw of x_t; it is
estimated with REINFORCE leave-one-out over ``draws >= 2`` masks per example.

An example is a *record*: in a packed batch (several records per row, see
:class:`~maskdiff.core.batch.Batch`) each record gets its own t, its positions
take that t, its mask is drawn from it, and its nats, its log q(x_t) and its
RLOO baseline are summed over its own positions (``Batch.per_record_sum``),
so per-record nats do not depend on how records were laid out in rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import kernels
from .batch import Batch
from .bits import bits_per_token
from .outputs import AnyDenoiser, SupportGroup, spec_of, support_logits, support_sizes
from .schedules import ModalitySchedules, Schedule
from . import modalities
from .tokens import VocabSpec


DECODES = ("uniform", "model")  # how the reconstruction term decodes tokens still masked at t_min


@dataclass
class ELBOResult:
    loss: Tensor  # scalar to minimise: nats per valid token, with the RLOO surrogate's gradient
    nelbo: Tensor  # (records,) negative ELBO in nats per record, averaged over draws, no surrogate
    position_nats: Tensor  # (B, L) detached, averaged over draws
    batch: Batch

    def per_modality(self) -> dict[str, tuple[float, int]]:
        """modality name -> (nats, valid tokens) summed over the batch."""
        out = {}
        mods, valid = self.batch.modality_ids, self.batch.valid
        for mid in mods[valid].unique().tolist():
            sel = valid & (mods == mid)
            out[modalities.names()[mid]] = (float(self.position_nats[sel].sum()), int(sel.sum()))
        return out

    def bits_per_token(self) -> dict[str, float]:
        return {m: bits_per_token(nats, n) for m, (nats, n) in self.per_modality().items()}


def antithetic_times(batch_size: int, t_min: float, generator: torch.Generator | None = None, device=None) -> Tensor:
    """t = t_min + (1 - t_min) * ((u + i/B) mod 1): one t per example (record), stratified."""
    u = torch.rand((), generator=generator, device=device)
    strata = (u + torch.arange(batch_size, device=device) / batch_size) % 1.0
    return t_min + (1.0 - t_min) * strata


def position_nats(
    denoiser: AnyDenoiser,
    batch: Batch,
    schedules: ModalitySchedules,
    t: Tensor,
    masked: Tensor,
    steps: int | None = None,
    spec: VocabSpec | None = None,
    impl: str = "auto",
    masked_min: Tensor | None = None,
) -> Tensor:
    """Negative ELBO per position (B, L) for given times t (records,) and mask pattern.

    Deterministic in (t, masked, masked_min): Monte Carlo estimators average it
    over draws; tests can average it exactly by enumerating mask patterns.
    ``steps=None`` is the continuous-time ELBO, an integer T the T-step one.
    The denoiser is evaluated at the masked positions only, over their supports;
    each position takes its record's time. ``masked_min`` (a draw of the mask at
    t_min) decodes the reconstruction term with the model, else it is uniform.
    """
    spec = spec_of(denoiser, spec)
    valid, mods = batch.valid, batch.modality_ids
    masked = masked & valid
    x0 = torch.where(valid, batch.tokens, 0)
    x_t = torch.where(masked, batch.mask_id, batch.tokens)
    groups = support_logits(denoiser, x_t, batch, t, masked, spec)
    dtype = torch.promote_types(t.dtype, torch.float32)
    for g in groups:
        dtype = torch.promote_types(dtype, g.logits.dtype)
    t_min = schedules.t_min
    records = batch.record_ids()
    t = t.to(dtype)[records]  # (B, L): each position's record's time
    s = (t - (1.0 - t_min) / steps).clamp(min=t_min) if steps is not None else None

    at = schedules.at(x0, mods)  # each position's schedule, gathered once
    ce, extra = _masked_terms(groups, spec, schedules, x0[masked], t[masked], None if s is None else s[masked], steps, dtype, impl)
    if steps is None:
        weight = (1.0 - t_min) * at.rate(t)
    else:  # r = (alpha_s - alpha_t) / (1 - alpha_t) = 1 - exp(log(1 - alpha_s) - log(1 - alpha_t))
        weight = -steps * torch.expm1(at.log_mask_prob(s) - at.log_mask_prob(t))
    diff_masked = weight[masked] * ce + extra
    diff = torch.zeros(x0.numel(), dtype=dtype, device=x0.device).index_copy(0, masked.reshape(-1).nonzero().squeeze(-1), diff_masked)
    log_k = torch.log(support_sizes(spec, x0.device)[batch.support_ids].to(dtype))
    if masked_min is None:  # uniform p: E_q[1{masked} log K] = (1 - alpha_{t_min}[x0]) log K
        recon = at.mask_prob(torch.full_like(t, t_min)) * log_k
    else:
        recon = reconstruction_nats(denoiser, batch, t_min, masked_min, spec, impl).to(dtype)
    prior = at.alpha(torch.ones_like(t)) * log_k
    return torch.where(valid, diff.view(x0.shape) + recon + prior, 0.0)


def reconstruction_nats(denoiser: AnyDenoiser, batch: Batch, t_min: float, masked_min: Tensor, spec: VocabSpec,
                        impl: str = "auto") -> Tensor:
    """-log p(x0 | z_{t_min}) per position (B, L), p the model's factorised prediction at t_min.

    Unmasked positions of z_{t_min} are carried over (log p = 0); a masked one costs
    -log mu[x0], mu evaluated at the masked positions only. Its mean over
    z_{t_min} ~ q(. | x0) is the reconstruction term E_q[-log p(x0 | z_{t_min})].
    """
    masked_min = masked_min & batch.valid
    x0 = torch.where(batch.valid, batch.tokens, 0)
    z = torch.where(masked_min, batch.mask_id, batch.tokens)
    t = torch.full((batch.num_records,), t_min, device=x0.device)
    groups = support_logits(denoiser, z, batch, t, masked_min, spec)
    dtype = torch.float32
    for g in groups:
        dtype = torch.promote_types(dtype, g.logits.dtype)
    target = x0[masked_min]
    ce = torch.zeros(target.shape, dtype=dtype, device=x0.device)
    for g in groups:
        ce_g, _ = kernels.support_ce(g.logits, target[g.rows] - g.start, impl=impl)
        ce = ce.index_copy(0, g.rows, ce_g.to(dtype))
    return torch.zeros(x0.shape, dtype=dtype, device=x0.device).masked_scatter(masked_min, ce)


def _masked_terms(
    groups: list[SupportGroup],
    spec: VocabSpec,
    schedules: ModalitySchedules,
    x0: Tensor,
    t: Tensor,
    s: Tensor | None,
    steps: int | None,
    dtype: torch.dtype,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """Per masked position (M,): -log mu[x0], and GenMD4's extra term (0 for MD4 schedules).

    continuous: (1 - t_min) sum_i c_i (mu_i - x0_i)       = (1 - t_min) (E_mu[w] - w_x0) / t
    T-step:     T (1 - r_x0) log((1 - r_x0) / (1 - sum_i r_i mu_i)),  1 - sum_i r_i mu_i = E_mu[(s/t)^w]
    """
    M = x0.shape[0]
    ce = torch.zeros(M, dtype=dtype, device=x0.device)
    extra = torch.zeros(M, dtype=dtype, device=x0.device)
    for g in groups:
        target = x0[g.rows] - g.start
        sched = schedules.for_modality(spec.modality_id(spec.supports[g.support].modality))
        if sched is None or not sched.state_dependent:
            ce_g, _ = kernels.support_ce(g.logits, target, impl=impl)
            ce = ce.index_copy(0, g.rows, ce_g.to(dtype))
            continue
        w = _support_w(sched, g)
        tg = t[g.rows]
        if steps is None:
            ce_g, mean_w = kernels.support_ce(g.logits, target, w, impl=impl)
            extra_g = (1.0 - schedules.t_min) * (mean_w.to(dtype) - w[target].to(dtype)) / tg
        else:
            log_ratio = torch.log(s[g.rows] / tg)  # log(s / t)
            ce_g, stay_model = kernels.support_ce(g.logits, target, w, log_ratio, impl=impl)
            log_stay = w[target].to(dtype) * log_ratio  # log(1 - r_x0) = w_x0 log(s / t)
            extra_g = steps * torch.exp(log_stay) * (log_stay - torch.log(stay_model.to(dtype)))
        ce = ce.index_copy(0, g.rows, ce_g.to(dtype))
        extra = extra.index_copy(0, g.rows, extra_g.to(dtype))
    return ce, extra


def _support_w(sched: Schedule, g: SupportGroup) -> Tensor:
    """GenMD4's w over the values of one support (the only state-dependent schedule)."""
    w = getattr(sched, "w", None)
    if w is None:
        raise TypeError(f"state-dependent schedule {type(sched).__name__} has no per-value w")
    return w[g.start : g.start + g.size]


def _mask_prob(batch: Batch, schedules: ModalitySchedules, t: Tensor) -> Tensor:
    """1 - alpha_t[x0] at every position (B, L), each with its record's t (records,)."""
    x0 = torch.where(batch.valid, batch.tokens, 0)
    return schedules.at(x0, batch.modality_ids).mask_prob(t[batch.record_ids()])


def draw_mask(batch: Batch, schedules: ModalitySchedules, t: Tensor, generator=None) -> Tensor:
    """Forward process q(x_t | x0): mask each valid position with prob 1 - alpha_t[x0], t one per record."""
    p_mask = _mask_prob(batch, schedules, t)
    u = torch.rand(batch.shape, generator=generator, device=batch.tokens.device, dtype=p_mask.dtype)
    return batch.valid & (u < p_mask)


def mask_log_prob(batch: Batch, schedules: ModalitySchedules, t: Tensor, masked: Tensor) -> Tensor:
    """log q(x_t | x0) of a mask pattern per record (records,), differentiable in GenMD4's w (for REINFORCE)."""
    p_mask = _mask_prob(batch, schedules, t)
    masked = masked & batch.valid
    # each branch sees a safe input: the branch not taken must not send NaN into w's gradient (p_mask = 1 at t = 1)
    log_q = torch.where(masked, torch.log(torch.where(masked, p_mask, 1.0)), torch.log1p(-torch.where(masked, 0.0, p_mask)))
    return batch.per_record_sum(torch.where(batch.valid, log_q, 0.0))


def elbo(
    denoiser: AnyDenoiser,
    batch: Batch,
    schedules: ModalitySchedules,
    *,
    steps: int | None = None,
    draws: int = 1,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    spec: VocabSpec | None = None,
    impl: str = "auto",
    decode: str = "uniform",
) -> ELBOResult:
    """Monte Carlo negative ELBO of a batch, with the RLOO surrogate for GenMD4's w.

    With a state-dependent schedule present and ``draws >= 2``, the loss's
    gradient adds sum_k (l_k - mean_{j != k} l_j) grad log q(x_t^k) / K, the
    leave-one-out REINFORCE term for the dependence of the mask draw on w.
    Its value is left unchanged, so ``loss`` is always the ELBO estimate.
    ``spec`` (default ``denoiser.spec``) gives each field's support; ``impl``
    picks the cross-entropy kernel (see :mod:`maskdiff.core.kernels`). ``decode``
    ("uniform" or "model") is how tokens still masked at t_min are decoded
    (module docstring); "model" costs one more network call.
    """
    if decode not in DECODES:
        raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODES)}")
    schedules.check_covers(batch.modality_ids, batch.valid)
    if t is None:
        t = antithetic_times(batch.num_records, schedules.t_min, generator, batch.tokens.device)
        if steps is not None:  # snap to the T-step grid t_i = t_min + (1 - t_min) i / T, i = 1..T
            i = torch.ceil((t - schedules.t_min) / (1.0 - schedules.t_min) * steps).clamp(1, steps)
            t = schedules.t_min + (1.0 - schedules.t_min) * i / steps
    rep = batch.repeat(draws) if draws > 1 else batch
    masked = draw_mask(rep, schedules, t.repeat(draws), generator)
    masked_min = draw_mask(rep, schedules, torch.full_like(t, schedules.t_min).repeat(draws), generator) if decode == "model" else None
    return elbo_of_masks(denoiser, batch, schedules, t, masked, draws=draws, steps=steps, spec=spec, impl=impl, masked_min=masked_min)


def elbo_of_masks(
    denoiser: AnyDenoiser,
    batch: Batch,
    schedules: ModalitySchedules,
    t: Tensor,
    masked: Tensor,
    *,
    draws: int = 1,
    steps: int | None = None,
    spec: VocabSpec | None = None,
    impl: str = "auto",
    masked_min: Tensor | None = None,
) -> ELBOResult:
    """:func:`elbo` for given times t (records,) and masks (draws * B, L), draw-major as ``batch.repeat``;
    ``masked_min`` (same layout) is the mask at t_min when the reconstruction term decodes with the model."""
    rep = batch.repeat(draws) if draws > 1 else batch
    t_rep = t.repeat(draws)  # record r of draw j is record j * N + r of ``rep``
    N = batch.num_records
    nats = position_nats(denoiser, rep, schedules, t_rep, masked, steps, spec, impl, masked_min)
    per_draw = rep.per_record_sum(nats).view(draws, N)
    nelbo = per_draw.mean(0)
    tokens = batch.valid.sum().clamp(min=1)
    loss = nelbo.sum() / tokens
    if schedules.state_dependent and draws >= 2 and torch.is_grad_enabled():
        # RLOO: each record's draws at its one t; the baseline of draw k is the mean of the record's other draws
        log_q = mask_log_prob(rep, schedules, t_rep, masked).view(draws, N)
        if masked_min is not None:  # the draw of z_{t_min} depends on w too
            log_q = log_q + mask_log_prob(rep, schedules, torch.full_like(t_rep, schedules.t_min), masked_min).view(draws, N)
        others = (per_draw.sum(0, keepdim=True) - per_draw) / (draws - 1)
        advantage = (per_draw - others).detach()
        surrogate = (advantage * log_q).mean(0).sum() / tokens
        loss = loss + (surrogate - surrogate.detach())
    return ELBOResult(loss, nelbo.detach(), nats.detach().view(draws, *batch.shape).mean(0), batch)
