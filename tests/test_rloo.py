"""The GenMD4 gradient in w: RLOO over K draws is unbiased, plain autodiff is not.

Tiny case: 2 positions, 3 values, a fixed denoiser that looks at the other
position. The exact gradient of the expected negative ELBO at a fixed t comes
from enumerating all four mask patterns.
"""

import numpy as np
import pytest
import torch

from maskdiff.core.batch import collate
from maskdiff.core.elbo import elbo, position_nats
from maskdiff.core.modalities import modality_id
from maskdiff.core.schedules import LearnedPoly, ModalitySchedules
from maskdiff.core.tokens import Field, Record
from oracles import PairData

TEXT = modality_id("text")


def setup(t_value: float):
    pair = PairData(np.random.default_rng(4).dirichlet(np.ones(9)).reshape(3, 3))
    sched = LearnedPoly(3)
    with torch.no_grad():
        sched.w_raw.copy_(torch.tensor([-0.5, 0.3, 1.2]))
    schedules = ModalitySchedules({TEXT: sched})
    record = Record([Field("x", "text/v", [2, 0])])
    return pair, sched, schedules, record, torch.tensor([t_value], dtype=torch.float64)


def exact_grad(pair, sched, schedules, record, t):
    batch = collate([record], pair.spec)
    sched.zero_grad()
    p_mask = schedules.at(batch.tokens, batch.modality_ids).mask_prob(t)
    total = 0.0
    for pattern in ([0, 0], [0, 1], [1, 0], [1, 1]):
        masked = torch.tensor([pattern], dtype=torch.bool)
        q = torch.where(masked, p_mask, 1 - p_mask).prod()
        total = total + q * position_nats(pair.posterior, batch, schedules, t, masked, spec=pair.spec).sum()
    total.backward()
    return sched.w_raw.grad.clone()


def mc_grads(pair, sched, schedules, record, t, draws, chunks=40, per_chunk=1000, seed=0):
    batch = collate([record] * per_chunk, pair.spec)
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(chunks):
        sched.zero_grad()
        res = elbo(pair.posterior, batch, schedules, draws=draws, t=t.expand(per_chunk), generator=gen, spec=pair.spec)
        (res.loss * int(batch.valid.sum()) / per_chunk).backward()  # gradient of the mean negative ELBO
        grads.append(sched.w_raw.grad.clone())
    g = torch.stack(grads)
    return g.mean(0), g.std(0) / chunks**0.5


@pytest.mark.parametrize("t_value", [0.25, 0.7])
def test_rloo_gradient_matches_enumeration(t_value):
    pair, sched, schedules, record, t = setup(t_value)
    exact = exact_grad(pair, sched, schedules, record, t)
    rloo, se = mc_grads(pair, sched, schedules, record, t, draws=4)
    plain, se_plain = mc_grads(pair, sched, schedules, record, t, draws=1)
    print(f"t={t_value} exact {exact.numpy()} rloo {rloo.numpy()} ± {se.numpy()} plain {plain.numpy()} ± {se_plain.numpy()}")
    # values 2 and 0 are the data: their w get gradient; value 1 only through the denoiser's mu
    assert torch.all((rloo - exact).abs() < 4 * se + 1e-6)
    assert torch.any((plain - exact).abs() > 6 * se_plain)


def test_loss_value_is_the_elbo_not_the_surrogate():
    pair, sched, schedules, record, t = setup(0.5)
    batch = collate([record] * 64, pair.spec)
    res = elbo(pair.posterior, batch, schedules, draws=3, t=t.expand(64), generator=torch.Generator().manual_seed(0), spec=pair.spec)
    assert float(res.loss.detach()) == pytest.approx(float(res.nelbo.sum() / batch.valid.sum()), rel=1e-6)
