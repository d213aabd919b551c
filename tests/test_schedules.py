"""Schedules: analytic derivatives, end points, stable masking probabilities, one interface."""

import math

import pytest
import torch

from maskdiff.schedules import KINDS, LearnedPoly, ModalitySchedules, make_schedule

ALL = ["linear", "cosine", "poly2", "poly3.5", "geometric", "genmd4"]


def build(kind):
    sched = make_schedule(kind, num_values=5)
    if kind == "genmd4":
        with torch.no_grad():
            sched.w_raw.copy_(torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0]))
    return sched


@pytest.mark.parametrize("kind", ALL)
def test_derivative_and_rate_are_analytic(kind):
    sched = build(kind)
    values = torch.arange(5).view(1, 5)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64).view(-1, 1).requires_grad_(True)
    alpha = sched.alpha(t, values)
    (numeric,) = torch.autograd.grad(alpha.sum(), t, create_graph=False)
    # each column depends on t alone, so the gradient of the sum is the sum of the derivatives
    torch.testing.assert_close(sched.dalpha(t, values).sum(-1, keepdim=True), numeric, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(sched.mask_prob(t, values), 1 - alpha, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(sched.rate(t, values), -sched.dalpha(t, values) / (1 - alpha), rtol=1e-6, atol=0)
        assert (sched.rate(t, values) > 0).all()
        assert (alpha[1:] <= alpha[:-1]).all()  # decreasing in t


@pytest.mark.parametrize("kind", ALL)
def test_end_points(kind):
    sched = build(kind)
    v = torch.arange(5)
    with torch.no_grad():
        assert torch.all(sched.alpha(torch.tensor([[0.0]], dtype=torch.float64), v) > 1 - 1e-4)
        assert torch.all(sched.alpha(torch.tensor([[1.0]], dtype=torch.float64), v) < 1e-8)
        tiny = torch.tensor([[1e-7]], dtype=torch.float64)
        assert torch.all(sched.mask_prob(tiny, v) > 0)  # no cancellation to 0 near t = 0


def test_value_free_schedules_ignore_values_and_genmd4_does_not():
    t = torch.tensor([[0.3]])
    for kind in ["linear", "cosine", "poly2", "geometric"]:
        a = make_schedule(kind).alpha(t, torch.arange(4))
        assert a.shape == (1, 4) and torch.all(a == a[0, 0])
    g = build("genmd4")
    assert len(set(g.alpha(t, torch.arange(5)).flatten().tolist())) == 5


def test_genmd4_init_is_linear_and_w_equal_k_is_poly_k():
    g = LearnedPoly(3)
    t = torch.linspace(0.05, 0.95, 7).view(-1, 1)
    torch.testing.assert_close(g.alpha(t, torch.arange(3)), make_schedule("linear").alpha(t, torch.arange(3)))
    with torch.no_grad():
        g.w_raw.fill_(math.log(math.expm1(2.0)))
    torch.testing.assert_close(g.alpha(t, torch.arange(3)), make_schedule("poly2").alpha(t, torch.arange(3)))
    torch.testing.assert_close(g.rate(t, torch.arange(3)), make_schedule("poly2").rate(t, torch.arange(3)))


def test_per_position_uses_each_modalitys_schedule():
    schedules = ModalitySchedules({0: make_schedule("linear"), 3: make_schedule("poly2")})
    mods = torch.tensor([[0, 3, 3, 1]])
    a = schedules.per_position("alpha", torch.tensor([0.5]), torch.zeros(1, 4, dtype=torch.long), mods)
    assert a[0, :3].tolist() == [0.5, 0.75, 0.75]
    assert math.isnan(a[0, 3])  # a modality with no schedule cannot slip into a loss
    with pytest.raises(ValueError, match="no schedule for modality"):
        schedules.check_covers(mods, torch.ones(1, 4, dtype=torch.bool))


def test_make_schedule_errors():
    assert set(KINDS) == {"linear", "cosine", "polyK", "geometric", "genmd4"}
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="vocabulary size"):
        make_schedule("genmd4")
