"""Triton kernels: support-restricted cross-entropy (forward and backward) and the reverse step.

One program per row (position); rows loop over their support in chunks of
``BLOCK`` values, so nothing of the size of the vocabulary is materialised
beyond the logits themselves. The maths and the argument conventions are
those of :mod:`maskdiff.core.kernels.reference`. On a CPU these run only under
``TRITON_INTERPRET=1`` set before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_MAX = 1024


def _block(k: int) -> int:
    return min(_BLOCK_MAX, triton.next_power_of_2(max(k, 16)))


@triton.jit
def _ce_fwd(logits, target, w, a, ce, ev, lse, K, stride, HAS_W: tl.constexpr, HAS_A: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits + row * stride
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(base + idx, mask=idx < K, other=float("-inf")))
    mx = tl.max(m, 0)
    s = tl.zeros([BLOCK], tl.float32)
    sv = tl.zeros([BLOCK], tl.float32)
    if HAS_A:
        a_row = tl.load(a + row)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        e = tl.exp(tl.load(base + idx, mask=idx < K, other=float("-inf")) - mx)
        s += e
        if HAS_W:
            v = tl.load(w + idx, mask=idx < K, other=0.0)
            if HAS_A:
                v = tl.exp(a_row * v)
            sv += e * v
    total = tl.sum(s, 0)
    log_z = mx + tl.log(total)
    y = tl.load(target + row)
    tl.store(ce + row, log_z - tl.load(base + y))
    tl.store(lse + row, log_z)
    if HAS_W:
        tl.store(ev + row, tl.sum(sv, 0) / total)


@triton.jit
def _ce_bwd(logits, target, w, a, lse, ev, g_ce, g_ev, g_logits, g_w, K, stride,
            HAS_W: tl.constexpr, HAS_A: tl.constexpr, NEED_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits + row * stride
    log_z = tl.load(lse + row)
    y = tl.load(target + row)
    gc = tl.load(g_ce + row)
    if HAS_W:
        ge = tl.load(g_ev + row)
        mean_v = tl.load(ev + row)
    if HAS_A:
        a_row = tl.load(a + row)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inside = idx < K
        mu = tl.exp(tl.load(base + idx, mask=inside, other=float("-inf")) - log_z)
        grad = gc * (mu - tl.where(idx == y, 1.0, 0.0))  # d(-log mu_y)/dz = mu - onehot(y)
        if HAS_W:
            wv = tl.load(w + idx, mask=inside, other=0.0)
            v = wv
            if HAS_A:
                v = tl.exp(a_row * wv)
            grad += ge * mu * (v - mean_v)  # d(sum mu v)/dz_j = mu_j (v_j - sum mu v)
            if NEED_W:
                dv = mu
                if HAS_A:
                    dv = mu * a_row * v
                tl.atomic_add(g_w + idx, ge * dv, mask=inside)
        tl.store(g_logits + row * stride + idx, grad, mask=inside)


class _SupportCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, w: Tensor, a: Tensor, has_w: bool, has_a: bool):
        n, K = logits.shape
        ce = torch.empty(n, dtype=torch.float32, device=logits.device)
        ev = torch.zeros(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        if n:
            _ce_fwd[(n,)](logits, target, w, a, ce, ev, lse, K, logits.stride(0), HAS_W=has_w, HAS_A=has_a, BLOCK=_block(K))
        ctx.save_for_backward(logits, target, w, a, lse, ev)
        ctx.flags = (has_w, has_a)
        return ce, ev

    @staticmethod
    def backward(ctx, g_ce: Tensor | None, g_ev: Tensor | None):
        logits, target, w, a, lse, ev = ctx.saved_tensors
        has_w, has_a = ctx.flags
        n, K = logits.shape
        g_ce = torch.zeros_like(lse) if g_ce is None else g_ce.float().contiguous()
        g_ev = torch.zeros_like(lse) if g_ev is None else g_ev.float().contiguous()
        need_w = has_w and ctx.needs_input_grad[2]
        g_logits = torch.empty_like(logits)
        g_w = torch.zeros(K, dtype=torch.float32, device=logits.device) if need_w else torch.zeros(1, device=logits.device)
        if n:
            _ce_bwd[(n,)](logits, target, w, a, lse, ev, g_ce, g_ev, g_logits, g_w, K, logits.stride(0),
                          HAS_W=has_w, HAS_A=has_a, NEED_W=need_w, BLOCK=_block(K))
        return g_logits, None, (g_w if need_w else None), None, None, None


def support_ce(logits: Tensor, target: Tensor, w: Tensor | None = None, a: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Triton version of :func:`maskdiff.core.kernels.reference.support_ce`."""
    logits = logits.float().contiguous()
    dummy = logits.new_zeros(1)
    w_in = dummy if w is None else w.float().contiguous()
    a_in = dummy if a is None else a.float().contiguous()
    ce, ev = _SupportCE.apply(logits, target.contiguous(), w_in, a_in, w is not None, a is not None)
    return ce, (ev if w is not None else None)


@triton.jit
def _reverse(logits, u, rate, out, K, stride, inv_temp, HAS_RATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits + row * stride
    m = tl.full([BLOCK], float("-inf"), tl.float64)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        z = tl.load(base + idx, mask=idx < K, other=float("-inf")).to(tl.float64) * inv_temp
        m = tl.maximum(m, z)
    mx = tl.max(m, 0)
    s = tl.zeros([BLOCK], tl.float64)
    sr = tl.zeros([BLOCK], tl.float64)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        e = tl.exp(tl.load(base + idx, mask=idx < K, other=float("-inf")).to(tl.float64) * inv_temp - mx)
        s += e
        if HAS_RATE:
            sr += e * tl.load(rate + idx, mask=idx < K, other=0.0)
    z_sum = tl.sum(s, 0)
    if HAS_RATE:
        unmask = tl.sum(sr, 0) / z_sum
        total = unmask + tl.maximum(1.0 - unmask, 0.0)  # weights plus the stay-masked mass
    else:
        total = tl.sum(s, 0) / z_sum
    target = tl.load(u + row) * total
    carry = tl.zeros([], tl.float64)
    count = tl.zeros([], tl.int64)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inside = idx < K
        wts = tl.exp(tl.load(base + idx, mask=inside, other=float("-inf")).to(tl.float64) * inv_temp - mx) / z_sum
        if HAS_RATE:
            wts = wts * tl.load(rate + idx, mask=inside, other=0.0)
        cdf = tl.cumsum(wts, 0) + carry
        count += tl.sum(tl.where(inside & (cdf <= target), 1, 0).to(tl.int64), 0)  # searchsorted(right=True)
        carry += tl.sum(wts, 0)
    last = K if HAS_RATE else K - 1
    tl.store(out + row, tl.minimum(count, last))


def reverse_step(logits: Tensor, u: Tensor, rate: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Triton version of :func:`maskdiff.core.kernels.reference.reverse_step`."""
    logits = logits.contiguous()
    n, K = logits.shape
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    rate_in = logits.new_zeros(1, dtype=torch.float64) if rate is None else rate.double().contiguous()
    if n:
        _reverse[(n,)](logits, u.double().contiguous(), rate_in, out, K, logits.stride(0), 1.0 / temperature,
                       HAS_RATE=rate is not None, BLOCK=_block(K))
    return out
