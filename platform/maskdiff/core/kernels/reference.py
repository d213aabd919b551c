"""Plain PyTorch references of the fused kernels (the fallback without Triton or a GPU)."""

from __future__ import annotations

import torch
from torch import Tensor


def support_ce(logits: Tensor, target: Tensor, w: Tensor | None = None, a: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Cross-entropy over one support and, for GenMD4, an expectation under mu = softmax(logits).

    logits (n, K), target (n,) local ids. Returns ``ce = -log mu[target]`` and
    ``ev = sum_i mu_i v_i`` with ``v = w`` (``a`` None: the continuous-time
    term sum_i c_i mu_i = ev / t) or ``v_i = exp(a_n w_i)`` (``a = log(s/t)``:
    the T-step stay-masked probability sum_i mu_i (s/t)^{w_i}); ``ev`` is None without ``w``.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    ce = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if w is None:
        return ce, None
    w = w.to(dtype).unsqueeze(0)
    v = w if a is None else torch.exp(a.to(dtype).unsqueeze(-1) * w)
    return ce, (logp.exp() * v).sum(-1)


def reverse_step(logits: Tensor, u: Tensor, rate: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """One reverse step at n positions of one support, in float64.

    mu = softmax(logits / temperature). With ``rate`` (K,) a position becomes
    value i with probability ``rate_i mu_i`` and stays masked otherwise
    (returned as K); without it, it takes value i with probability mu_i.
    ``u`` (n,) are uniforms in [0, 1): the draw is by inverse CDF, so the tail
    of mu is not truncated (float32 Gumbel would).
    """
    mu = torch.softmax(logits.double() / temperature, dim=-1)
    if rate is None:
        cdf = mu.cumsum(-1)
        last = mu.shape[-1] - 1
    else:
        weights = mu * rate.double()
        stay = (1.0 - weights.sum(-1, keepdim=True)).clamp(min=0.0)
        cdf = torch.cat((weights, stay), dim=-1).cumsum(-1)
        last = mu.shape[-1]
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=last)
