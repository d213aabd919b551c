"""Order-free reverse sampling: fill any masked subset of a batch given the rest.

``ancestral`` (and ``genmd4``): from t to s < t a masked position becomes
value i with probability ``r_i * mu_i``, ``r_i = (alpha_s[i] - alpha_t[i]) /
(1 - alpha_t[i])``, and stays masked otherwise. For an MD4 schedule r is the
same for every i; for a GenMD4 schedule it is the state-dependent rate of its
value. ``topk`` (MaskGIT / LLaDA style) unmasks, per row, as many positions as
the schedule expects, choosing the most confident draws (optionally with
Gumbel noise on the confidence, annealed with t).

With MD4 schedules the decision to unmask does not depend on the value nor on
mu (a position unmasks with probability r, and then takes value i with
probability mu_i), so the step at which each position unmasks is drawn up
front from the schedule; the network is then called only at the steps where
something unmasks, only for the rows that unmask something, and its output
is computed only at the positions being filled (over their supports). This
is the same process as stepping through every step, without the calls whose
output is never used.

Positions that are not masked at the start (the given fields) are never
touched. Draws are made in float64 by inverse CDF, so the tails of mu are not
truncated (``kernels.reverse_step``). Classifier-free guidance combines the
conditional prediction with one whose conditioning fields are masked:
``(1 + w) log p(x | c) - w log p(x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import kernels
from .batch import Batch, collate, split
from .outputs import AnyDenoiser, SupportGroup, spec_of, support_logits
from .schedules import ModalitySchedules, Schedule
from .tokens import Record, VocabSpec

GRIDS = ("linear", "cosine")
METHODS = ("ancestral", "genmd4", "topk")
PRECISIONS = ("float32", "bfloat16")


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
    kernel: str = "auto"  # reverse-step implementation: auto | triton | reference (see maskdiff.core.kernels)
    precision: str = "float32"  # float32 | bfloat16 (autocast; draws stay float64); bf16 is for GPUs: 4-6x slower on a CPU

    def check(self, schedules: ModalitySchedules) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}; expected one of {METHODS}")
        if self.method == "genmd4" and not schedules.state_dependent:
            raise ValueError("method 'genmd4' needs a model trained with a genmd4 schedule; use 'ancestral'")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown time grid {self.grid!r}; expected one of {GRIDS}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.guidance < 0 or self.steps < 1:
            raise ValueError(f"need steps >= 1, temperature > 0, 0 < top_p <= 1, guidance >= 0; got {self}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.guidance > 0 and not self.guidance_supports:
            raise ValueError("guidance needs the conditioning fields (guidance_supports)")


@dataclass
class SampleResult:
    tokens: Tensor  # (B, L) global ids, no mask left at filled positions
    network_calls: int  # batched network evaluations (two per step with guidance)
    row_calls: int = 0  # network evaluations summed over rows: per sample, row_calls / B


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


def step_rates(sched: Schedule, t: float, s: float, values: Tensor) -> Tensor:
    """r_i = (alpha_s[i] - alpha_t[i]) / (1 - alpha_t[i]) = 1 - (1 - alpha_s[i]) / (1 - alpha_t[i]), float64 (K,).

    At s = 0 everything unmasks.
    """
    if s <= 0.0:
        return torch.ones(values.shape, dtype=torch.float64, device=values.device)
    tt = torch.tensor([[t]], dtype=torch.float64, device=values.device)
    ss = torch.tensor([[s]], dtype=torch.float64, device=values.device)
    v = values.view(1, -1)
    return (-torch.expm1(sched.log_mask_prob(ss, v) - sched.log_mask_prob(tt, v))).view(-1).to(torch.float64)


def unmask_steps(schedules: ModalitySchedules, times: Tensor, modality_ids: Tensor, fill: Tensor, generator=None) -> Tensor:
    """For MD4 schedules: the step k (t_k -> t_{k+1}) at which each position of ``fill`` unmasks, -1 elsewhere.

    A masked position survives step k with probability 1 - r_k =
    (1 - alpha(t_{k+1})) / (1 - alpha(t_k)), whatever mu; the product telescopes, so
    P(unmasked by t_{k+1}) = 1 - (1 - alpha(t_{k+1})) / (1 - alpha(t_0)), and 1 at the last step.
    """
    u = torch.rand(fill.shape, dtype=torch.float64, generator=generator, device=fill.device)
    out = torch.full(fill.shape, -1, dtype=torch.long, device=fill.device)
    last = len(times) - 2
    zero = torch.zeros(1, 1, dtype=torch.long, device=fill.device)
    for mid, sched in schedules.items():
        sel = fill & (modality_ids == mid)
        if not bool(sel.any()):
            continue
        log_mp = sched.log_mask_prob(times.view(-1, 1).to(fill.device), zero).view(-1).to(torch.float64)
        cdf = -torch.expm1(log_mp[1:] - log_mp[0])
        cdf[-1] = 1.0
        steps = torch.searchsorted(cdf, u[sel].contiguous(), right=True).clamp(max=last)
        out[sel] = steps
    return out


def _take_rows(batch: Batch, rows: Tensor) -> Batch:
    return replace(batch, **{name: getattr(batch, name)[rows] for name in Batch.TENSORS})


class _Predictor:
    """Network outputs at the positions ``where``, computed for the rows that have any (with guidance)."""

    def __init__(self, denoiser: AnyDenoiser, batch: Batch, spec: VocabSpec, opts: SamplerOptions):
        self.denoiser, self.batch, self.spec, self.opts = denoiser, batch, spec, opts
        ids = torch.tensor(opts.guidance_supports, dtype=torch.long, device=batch.tokens.device)
        self.drop = torch.isin(batch.support_ids, ids)
        self.calls = self.row_calls = 0

    def __call__(self, x: Tensor, t: float, where: Tensor) -> list[SupportGroup]:
        """Log-probabilities (or logits) over each support, grouped; rows index ``where``'s positions in row-major order."""
        rows = where.any(-1).nonzero().squeeze(-1)
        every = len(rows) == x.shape[0]
        batch = self.batch if every else _take_rows(self.batch, rows)
        xr, wr = (x, where) if every else (x[rows], where[rows])
        tt = torch.full((len(rows),), t, device=x.device)
        low = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.opts.precision == "bfloat16")
        with low:
            groups = support_logits(self.denoiser, xr, batch.with_tokens(xr), tt, wr, self.spec)
        self.calls += 1
        self.row_calls += len(rows)
        if self.opts.guidance > 0:
            x_u = torch.where(self.drop if every else self.drop[rows], self.batch.mask_id, xr)
            with low:
                uncond = support_logits(self.denoiser, x_u, batch.with_tokens(x_u), tt, wr, self.spec)
            self.calls += 1
            self.row_calls += len(rows)
            groups = [replace(g, logits=guided(torch.log_softmax(g.logits.double(), -1), torch.log_softmax(u.logits.double(), -1), self.opts.guidance))
                      for g, u in zip(groups, uncond)]
        return groups


def _draw(g: SupportGroup, opts: SamplerOptions, rate: Tensor | None, generator) -> Tensor:
    """Local ids (n,) drawn for one group; with ``rate``, K marks 'stays masked'."""
    u = torch.rand(g.rows.shape, dtype=torch.float64, generator=generator, device=g.logits.device)
    if opts.top_p < 1.0:
        logp = shape_distribution(torch.log_softmax(g.logits.double(), -1), opts.temperature, opts.top_p)
        return kernels.reverse_step(logp, u, rate, 1.0, impl=opts.kernel)
    return kernels.reverse_step(g.logits, u, rate, opts.temperature, impl=opts.kernel)


def _mu(g: SupportGroup, opts: SamplerOptions) -> Tensor:
    return shape_distribution(torch.log_softmax(g.logits.double(), -1), opts.temperature, opts.top_p).exp()


@torch.inference_mode()
def sample(
    denoiser: AnyDenoiser,
    batch: Batch,
    schedules: ModalitySchedules,
    opts: SamplerOptions | None = None,
    generator: torch.Generator | None = None,
    *,
    spec: VocabSpec | None = None,
    **overrides,
) -> SampleResult:
    """Fill every position of ``batch.tokens`` that holds the mask id (``overrides`` set options).

    ``spec`` (default ``denoiser.spec``) gives each field's support. Every
    modality in the batch needs a schedule: one without would never unmask.
    """
    if batch.packed:
        raise ValueError("sample: the batch is packed; sampling takes one record per row (maskdiff.core.batch.collate)")
    opts = replace(opts or SamplerOptions(), **overrides)
    opts.check(schedules)
    schedules.check_covers(batch.modality_ids, ~batch.pad)
    predict = _Predictor(denoiser, batch, spec_of(denoiser, spec), opts)
    times = time_grid(opts.steps, opts.grid)
    if opts.method == "ancestral" and not schedules.state_dependent:
        x = _sample_by_unmask_steps(predict, batch, schedules, times, opts, generator)
    else:
        x = _sample_stepwise(predict, batch, schedules, times, opts, generator)
    return SampleResult(x, predict.calls, predict.row_calls)


def _sample_by_unmask_steps(predict: _Predictor, batch: Batch, schedules: ModalitySchedules, times: Tensor, opts: SamplerOptions, generator) -> Tensor:
    """MD4 ancestral sampling: one network call per step at which something unmasks (see the module docstring)."""
    x = batch.tokens.clone()
    fill = x == batch.mask_id
    steps = unmask_steps(schedules, times, batch.modality_ids, fill, generator)
    todo = torch.unique(steps[fill]).tolist()
    for k in tqdm(todo, desc="sampling", disable=not opts.progress, leave=False):
        now = steps == k
        values = torch.empty(int(now.sum()), dtype=torch.long, device=x.device)
        for g in predict(x, float(times[k]), now):
            values[g.rows] = _draw(g, opts, None, generator) + g.start
        x[now] = values
    return x


def _sample_stepwise(predict: _Predictor, batch: Batch, schedules: ModalitySchedules, times: Tensor, opts: SamplerOptions, generator) -> Tensor:
    """Every step in turn: GenMD4's value-dependent rates, and topk's confidence ordering, need mu at each step."""
    x = batch.tokens.clone()
    spec = predict.spec
    grid = times.tolist()
    for t, s in tqdm(list(zip(grid[:-1], grid[1:])), desc="sampling", disable=not opts.progress, leave=False):
        masked = x == batch.mask_id
        if not bool(masked.any()):
            break
        groups = predict(x, t, masked)
        M = int(masked.sum())
        new = torch.empty(M, dtype=torch.long, device=x.device)
        expected = torch.empty(M, dtype=torch.float64, device=x.device)
        conf = torch.empty(M, dtype=torch.float64, device=x.device)
        for g in groups:
            sched = schedules.for_modality(spec.modality_id(spec.supports[g.support].modality))
            rate = step_rates(sched, t, s, torch.arange(g.start, g.start + g.size, device=x.device))
            if opts.method == "topk":
                mu = _mu(g, opts)
                draw = _draw(g, opts, None, generator)
                new[g.rows] = draw + g.start
                conf[g.rows] = mu.gather(-1, draw.unsqueeze(-1)).squeeze(-1).log()
                expected[g.rows] = (mu * rate).sum(-1)  # probability each position unmasks in this step
            else:
                draw = _draw(g, opts, rate, generator)
                new[g.rows] = torch.where(draw < g.size, draw + g.start, batch.mask_id)
        if opts.method == "topk":
            new = _topk_choice(x, masked, new, conf, expected, t, opts.confidence_noise, batch.mask_id, generator)
        x = x.masked_scatter(masked, new)
    return x


def _topk_choice(x: Tensor, masked: Tensor, draw: Tensor, conf_m: Tensor, expected_m: Tensor, t: float, noise: float, mask_id: int, generator) -> Tensor:
    """Keep the most confident draws: as many per row as the schedule expects (>= 1 keeps progress)."""
    expected = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    expected[masked] = expected_m
    k = torch.round(expected.sum(-1)).long().clamp(min=1)
    conf = torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device)
    conf[masked] = conf_m
    if noise > 0:
        u = torch.rand(conf.shape, dtype=torch.float64, generator=generator, device=x.device).clamp(1e-300, 1.0)
        conf = conf + noise * t * -torch.log(-torch.log(u))
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    chosen = (rank < k.unsqueeze(-1)) & masked
    return torch.where(chosen[masked], draw, mask_id)


@torch.inference_mode()
def complete(
    denoiser: AnyDenoiser,
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
    result = sample(denoiser, batch, schedules, opts, generator, spec=spec, **overrides)
    return split(batch, records, spec, result.tokens), result
