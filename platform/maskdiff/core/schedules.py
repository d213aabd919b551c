"""Masking schedules alpha_t: the probability that a token is still unmasked at t.

One interface covers MD4 and GenMD4. A schedule maps times ``t`` and token
values to ``alpha_t[value]``; an MD4 schedule ignores the value (it is the
special case of a state-dependent schedule with one rate for every value),
GenMD4's learnable polynomial ``alpha_t[i] = 1 - t^{w_i}`` does not.

Time runs over ``[t_min, 1]``. Instead of shifting alpha into
``[eps, 1 - eps]``, the ELBO (see :mod:`maskdiff.core.elbo`) accounts for both
ends exactly: a reconstruction term at ``t_min`` (tokens still masked there
are decoded uniformly) and a prior term at ``t = 1`` (tokens not yet masked
there, ``alpha_1 = exp(-b_max)`` for the geometric schedule, 0 otherwise).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

T_MIN = 1e-4


class Schedule(nn.Module):
    """alpha_t[value], its time derivative and the ELBO weight alpha'/(1 - alpha).

    ``t`` and ``values`` broadcast against each other: ``t`` of shape (B, 1)
    with values (B, L) gives per-position rates, values ``arange(V)`` gives
    the whole vector over the vocabulary.
    """

    kind: str = ""
    state_dependent: bool = False

    def alpha(self, t: Tensor, values: Tensor) -> Tensor:
        raise NotImplementedError

    def dalpha(self, t: Tensor, values: Tensor) -> Tensor:
        raise NotImplementedError

    def mask_prob(self, t: Tensor, values: Tensor) -> Tensor:
        """``1 - alpha_t``, computed without cancellation where alpha_t is close to 1."""
        return 1.0 - self.alpha(t, values)

    def rate(self, t: Tensor, values: Tensor) -> Tensor:
        """``-alpha'_t / (1 - alpha_t) >= 0``: the weight of a masked token's loss at t.

        Subclasses give it in closed form: the quotient underflows to 0/0 in
        float32 where ``1 - alpha_t`` does (``t^K`` near t_min for large K).
        """
        return -self.dalpha(t, values) / self.mask_prob(t, values)

    def log_mask_prob(self, t: Tensor, values: Tensor) -> Tensor:
        """``log(1 - alpha_t)``, finite wherever ``1 - alpha_t`` would underflow."""
        return torch.log(self.mask_prob(t, values))


def _like(per_time: Tensor, values: Tensor) -> Tensor:
    """A function of t alone, broadcast against the values' shape (a view, no copy)."""
    return torch.broadcast_tensors(per_time, values)[0]


class ValueFreeSchedule(Schedule):
    """An MD4 schedule: alpha depends on t only, through ``f`` and ``df``."""

    def f(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor, values: Tensor) -> Tensor:
        return _like(self.f(t), values)

    def dalpha(self, t: Tensor, values: Tensor) -> Tensor:
        return _like(self.df(t), values)

    def mask_prob(self, t: Tensor, values: Tensor) -> Tensor:
        return _like(self.one_minus_f(t), values)

    def rate(self, t: Tensor, values: Tensor) -> Tensor:
        return _like(self.rate_t(t), values)

    def log_mask_prob(self, t: Tensor, values: Tensor) -> Tensor:
        return _like(self.log_one_minus_f(t), values)

    def one_minus_f(self, t: Tensor) -> Tensor:
        return 1.0 - self.f(t)

    def rate_t(self, t: Tensor) -> Tensor:
        return -self.df(t) / self.one_minus_f(t)

    def log_one_minus_f(self, t: Tensor) -> Tensor:
        return torch.log(self.one_minus_f(t))


class Linear(ValueFreeSchedule):
    kind = "linear"

    def f(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def df(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def one_minus_f(self, t: Tensor) -> Tensor:
        return t

    def rate_t(self, t: Tensor) -> Tensor:
        return 1.0 / t


class Cosine(ValueFreeSchedule):
    kind = "cosine"

    def f(self, t: Tensor) -> Tensor:
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))

    def df(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))

    def one_minus_f(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def rate_t(self, t: Tensor) -> Tensor:
        # (pi/2) sin(pi/2 (1 - t)) / sin(pi/2 t); written with 1 - t so that t = 1 gives exactly 0
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t)) / torch.sin(0.5 * math.pi * t)


class Poly(ValueFreeSchedule):
    """alpha_t = 1 - t^K."""

    def __init__(self, power: float):
        super().__init__()
        if power <= 0:
            raise ValueError(f"poly schedule: power must be > 0, got {power}")
        self.power = float(power)
        self.kind = f"poly{power:g}"

    def f(self, t: Tensor) -> Tensor:
        return 1.0 - t**self.power

    def df(self, t: Tensor) -> Tensor:
        return -self.power * t ** (self.power - 1.0)

    def one_minus_f(self, t: Tensor) -> Tensor:
        return t**self.power

    def rate_t(self, t: Tensor) -> Tensor:
        return self.power / t  # K t^(K-1) / t^K

    def log_one_minus_f(self, t: Tensor) -> Tensor:
        return self.power * torch.log(t)


class Geometric(ValueFreeSchedule):
    """alpha_t = exp(-b_min^(1-t) * b_max^t)."""

    kind = "geometric"

    def __init__(self, b_min: float = 1e-5, b_max: float = 20.0):
        super().__init__()
        self.b_min, self.b_max = float(b_min), float(b_max)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.b_min ** (1.0 - t) * self.b_max**t

    def f(self, t: Tensor) -> Tensor:
        return torch.exp(-self._sigma(t))

    def df(self, t: Tensor) -> Tensor:
        sigma = self._sigma(t)
        return -torch.exp(-sigma) * sigma * math.log(self.b_max / self.b_min)

    def one_minus_f(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self._sigma(t))

    def rate_t(self, t: Tensor) -> Tensor:
        # sigma' e^-sigma / (1 - e^-sigma) = log(b_max / b_min) sigma / (e^sigma - 1): 0, not inf/inf, for large sigma
        sigma = self._sigma(t)
        return math.log(self.b_max / self.b_min) * sigma / torch.expm1(sigma)


class LearnedPoly(Schedule):
    """GenMD4: alpha_t[i] = 1 - t^{w_i}, w = softplus(w_raw) learned per token value.

    ``num_values`` is the size of the global clean vocabulary; only the values
    of the modality that uses this schedule ever receive gradient.
    """

    kind = "genmd4"
    state_dependent = True

    def __init__(self, num_values: int, init: float = 1.0):
        super().__init__()
        raw = math.log(math.expm1(init))  # softplus^-1
        self.w_raw = nn.Parameter(torch.full((num_values,), raw))

    @property
    def w(self) -> Tensor:
        return F.softplus(self.w_raw)

    def alpha(self, t: Tensor, values: Tensor) -> Tensor:
        return 1.0 - t ** self.w[values]

    def dalpha(self, t: Tensor, values: Tensor) -> Tensor:
        w = self.w[values]
        return -w * t ** (w - 1.0)

    def mask_prob(self, t: Tensor, values: Tensor) -> Tensor:
        return t ** self.w[values]

    def rate(self, t: Tensor, values: Tensor) -> Tensor:
        return self.w[values] / t  # w t^(w-1) / t^w, finite where t^w underflows

    def log_mask_prob(self, t: Tensor, values: Tensor) -> Tensor:
        return self.w[values] * torch.log(t)


_POLY = re.compile(r"^poly(\d+(\.\d+)?)$")
KINDS = ("linear", "cosine", "polyK", "geometric", "genmd4")


def make_schedule(kind: str, num_values: int | None = None, **options: float) -> Schedule:
    """Build a schedule from its config name (``linear|cosine|polyK|geometric|genmd4``)."""
    if kind == "linear":
        return Linear()
    if kind == "cosine":
        return Cosine()
    if kind == "geometric":
        return Geometric(**options)
    if m := _POLY.match(kind):
        return Poly(float(m.group(1)))
    if kind == "genmd4":
        if num_values is None:
            raise ValueError("genmd4 schedule needs the vocabulary size")
        return LearnedPoly(num_values, **options)
    raise ValueError(f"unknown schedule {kind!r}; expected one of {KINDS} (e.g. poly2)")


class ModalitySchedules(nn.Module):
    """Each position takes the schedule of its modality (Batch.modality_ids)."""

    def __init__(self, schedules: dict[int, Schedule], t_min: float = T_MIN):
        super().__init__()
        if not schedules:
            raise ValueError("no schedules given")
        self.by_id = nn.ModuleDict({str(k): v for k, v in schedules.items()})
        self.t_min = t_min

    def for_modality(self, modality_id: int) -> Schedule | None:
        return self.by_id[str(modality_id)] if str(modality_id) in self.by_id else None

    def items(self) -> list[tuple[int, Schedule]]:
        return [(int(k), v) for k, v in self.by_id.items()]

    @property
    def state_dependent(self) -> bool:
        return any(s.state_dependent for s in self.by_id.values())

    def at(self, values: Tensor, modality_ids: Tensor) -> PositionSchedules:
        """The schedules of a batch's positions, grouped by modality once (``values``, ``modality_ids``: (B, L))."""
        return PositionSchedules(self, values, modality_ids)

    def check_covers(self, modality_ids: Tensor, valid: Tensor) -> None:
        present = set(modality_ids[valid].unique().tolist())
        missing = present - {mid for mid, _ in self.items()}
        if missing:
            raise ValueError(f"no schedule for modality ids {sorted(missing)}")


class PositionSchedules:
    """Each position's own modality schedule, evaluated only at that modality's positions.

    Built once per batch (the positions of each modality gathered once), then
    ``alpha``, ``mask_prob``, ``log_mask_prob`` and ``rate`` at times ``t``:
    (B,) or (B, 1) for one time per row, or (B, L) for one per position
    (packed records). Positions of a modality without a schedule get NaN, so
    they cannot pass unnoticed into a loss.
    """

    def __init__(self, schedules: ModalitySchedules, values: Tensor, modality_ids: Tensor):
        self.shape = values.shape
        flat_values, flat_ids = values.reshape(-1), modality_ids.reshape(-1)
        self.groups: list[tuple[Schedule, Tensor, Tensor]] = []
        for mid, sched in schedules.items():
            idx = (flat_ids == mid).nonzero().squeeze(-1)
            if idx.numel():
                self.groups.append((sched, idx, flat_values[idx]))

    def alpha(self, t: Tensor) -> Tensor:
        return self._each(t, lambda s, tt, v: s.alpha(tt, v))

    def mask_prob(self, t: Tensor) -> Tensor:
        return self._each(t, lambda s, tt, v: s.mask_prob(tt, v))

    def log_mask_prob(self, t: Tensor) -> Tensor:
        return self._each(t, lambda s, tt, v: s.log_mask_prob(tt, v))

    def rate(self, t: Tensor) -> Tensor:
        return self._each(t, lambda s, tt, v: s.rate(tt, v))

    def _each(self, t: Tensor, fn: Callable[[Schedule, Tensor, Tensor], Tensor]) -> Tensor:
        t = t if t.dim() == len(self.shape) else t.reshape(-1, 1)
        flat_t = t.expand(self.shape).reshape(-1)
        out = torch.full((flat_t.numel(),), float("nan"), dtype=t.dtype, device=t.device)
        for sched, idx, values in self.groups:
            out = out.index_copy(0, idx, fn(sched, flat_t[idx], values).to(out.dtype))
        return out.view(self.shape)
