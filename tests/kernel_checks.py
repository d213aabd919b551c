"""Triton kernels against their PyTorch references, in Triton's interpreter on the CPU.

Run as a script by tests/test_kernels.py: TRITON_INTERPRET must be set before
the kernels are defined, and it must not leak into the other tests (the
automatic choice would then run the interpreter everywhere). Prints one JSON
line: check name -> null (passed) or the failure message.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from maskdiff.core.kernels import reference  # noqa: E402
from maskdiff.core.kernels import triton_kernels as tk  # noqa: E402


def _ce_case(n: int, K: int, mode: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, K, generator=g) * 3
    z[0, 1] = -float("inf")  # a value of probability 0 (never the target)
    y = torch.randint(0, K, (n,), generator=g)
    y[0] = 0
    w = torch.rand(K, generator=g) * 5 + 0.01
    a = -torch.rand(n, generator=g) * 2 if mode == "tstep" else None
    g_ce, g_ev = torch.randn(n, generator=g), torch.randn(n, generator=g)
    outs = []
    for mod in (tk, reference):
        zz = z.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        ce, ev = mod.support_ce(zz, y, None if mode == "md4" else ww, a)
        loss = (ce * g_ce).sum() + (0.0 if ev is None else (ev * g_ev).sum())
        loss.backward()
        outs.append((ce, ev, zz.grad, ww.grad))
    (ce1, ev1, gz1, gw1), (ce2, ev2, gz2, gw2) = outs
    torch.testing.assert_close(ce1, ce2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz1, gz2, rtol=1e-5, atol=1e-6)
    if mode == "md4":
        assert ev1 is None and ev2 is None and gw1 is None and gw2 is None
    else:
        torch.testing.assert_close(ev1, ev2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw1, gw2, rtol=1e-4, atol=1e-6)


def _reverse_case(n: int, K: int, with_rate: bool, temperature: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, K, generator=g) * 4
    z[:, 0] = -float("inf")
    u = torch.rand(n, dtype=torch.float64, generator=g)
    rate = torch.rand(K, dtype=torch.float64, generator=g) if with_rate else None
    got = tk.reverse_step(z, u, rate, temperature)
    want = reference.reverse_step(z, u, rate, temperature)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    assert (got != 0).all()  # probability 0 is never drawn
    if with_rate:
        assert ((got >= 0) & (got <= K)).all() and (got == K).any()  # K = stays masked, and some stay
    else:
        assert ((got >= 0) & (got < K)).all()


def _elbo_and_sampler_end_to_end() -> None:
    from test_restricted import make, make_batch

    from maskdiff.core.elbo import elbo
    from maskdiff.core.sampler import sample

    model, schedules = make(time_conditioning=True)
    batch = make_batch(n=3)
    for steps in (None, 4):
        results = []
        for impl in ("triton", "reference"):
            model.zero_grad()
            schedules.zero_grad()
            res = elbo(model, batch, schedules, steps=steps, draws=2, generator=torch.Generator().manual_seed(0), impl=impl)
            res.loss.backward()
            results.append((res.nelbo, [p.grad.clone() for p in schedules.parameters()]))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
    masked = batch.with_tokens(torch.where(batch.valid, batch.mask_id, batch.tokens))
    a = sample(model, masked, schedules, steps=3, generator=torch.Generator().manual_seed(1), kernel="triton")
    b = sample(model, masked, schedules, steps=3, generator=torch.Generator().manual_seed(1), kernel="reference")
    assert torch.equal(a.tokens, b.tokens)


CHECKS = {
    "support_ce md4": lambda: _ce_case(4, 13, "md4"),
    "support_ce genmd4 continuous": lambda: _ce_case(4, 13, "continuous"),
    "support_ce genmd4 T-step": lambda: _ce_case(4, 13, "tstep"),
    "support_ce support wider than a block": lambda: _ce_case(2, 1500, "tstep"),
    "reverse_step with rates": lambda: _reverse_case(24, 11, True, 1.0),
    "reverse_step plain draw, temperature": lambda: _reverse_case(24, 11, False, 0.7),
    "reverse_step support wider than a block": lambda: _reverse_case(3, 1500, True, 1.3),
    "elbo and sampler end to end": _elbo_and_sampler_end_to_end,
}


def main() -> None:
    results = {}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = None
        except Exception:  # report every check, not only the first failure
            results[name] = traceback.format_exc(limit=3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
