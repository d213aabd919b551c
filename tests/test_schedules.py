"""Schedules: analytic derivatives, end points, stable masking probabilities, one interface."""

import math

import pytest
import torch

from maskdiff.core.schedules import KINDS, T_MIN, LearnedPoly, ModalitySchedules, make_schedule

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


def test_each_position_takes_its_modalitys_schedule_and_its_own_time():
    schedules = ModalitySchedules({0: make_schedule("linear"), 3: make_schedule("poly2")})
    mods = torch.tensor([[0, 3, 3, 1]])
    at = schedules.at(torch.zeros(1, 4, dtype=torch.long), mods)
    a = at.alpha(torch.tensor([0.5]))  # one time for the row
    assert a[0, :3].tolist() == [0.5, 0.75, 0.75]
    assert math.isnan(a[0, 3])  # a modality with no schedule cannot slip into a loss
    t = torch.tensor([[0.5, 0.5, 0.2, 0.9]])  # a time per position (packed records)
    assert at.rate(t)[0, :3].tolist() == pytest.approx([1 / 0.5, 2 / 0.5, 2 / 0.2])  # linear 1/t, poly2 2/t
    assert at.mask_prob(t)[0, :3].tolist() == pytest.approx([0.5, 0.25, 0.04])
    with pytest.raises(ValueError, match="no schedule for modality"):
        schedules.check_covers(mods, torch.ones(1, 4, dtype=torch.bool))


def test_make_schedule_errors():
    assert set(KINDS) == {"linear", "cosine", "polyK", "geometric", "genmd4"}
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="vocabulary size"):
        make_schedule("genmd4")


EXTREME = {
    "linear": lambda: make_schedule("linear"),
    "cosine": lambda: make_schedule("cosine"),
    "poly50": lambda: make_schedule("poly50"),
    "poly0.05": lambda: make_schedule("poly0.05"),
    "geometric": lambda: make_schedule("geometric", b_min=1e-8, b_max=100.0),
    "genmd4": lambda: _learned([0.01, 0.5, 1.0, 10.0, 50.0]),
}


def _learned(w: list[float]) -> LearnedPoly:
    sched = LearnedPoly(len(w))
    with torch.no_grad():
        sched.w_raw.copy_(torch.log(torch.expm1(torch.tensor(w, dtype=torch.float64))))
    return sched


def _float64_twin(sched, kind):
    """The same schedule in float64; for GenMD4 with exactly the (rounded) w of ``sched``."""
    if kind != "genmd4":
        return EXTREME[kind]()
    return _learned(sched.w.detach().double().tolist()).double()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("kind", list(EXTREME))
def test_low_precision_rates_and_mask_probabilities_at_extreme_parameters(kind, dtype, rtol):
    """In float32 and bfloat16, over [t_min, 1]: finite, in range, and close to float64 at the same (rounded) inputs."""
    sched = EXTREME[kind]().to(dtype)
    ref = _float64_twin(sched, kind)
    v = torch.arange(5).view(1, 5)
    t = torch.cat((torch.tensor([T_MIN]), torch.logspace(math.log10(T_MIN), 0, 60))).to(dtype).view(-1, 1)
    t64 = t.double()
    with torch.no_grad():
        mp, rate, lmp = sched.mask_prob(t, v), sched.rate(t, v), sched.log_mask_prob(t, v)
        assert mp.dtype == dtype and rate.dtype == dtype
        assert torch.isfinite(mp).all() and (mp >= 0).all() and (mp <= 1).all()
        assert torch.isfinite(rate).all() and (rate >= 0).all()
        assert torch.isfinite(lmp).all()  # log(1 - alpha) stays finite where 1 - alpha underflows
        tiny = torch.finfo(dtype).tiny
        torch.testing.assert_close(mp.double(), ref.mask_prob(t64, v), rtol=rtol, atol=tiny)
        torch.testing.assert_close(rate.double(), ref.rate(t64, v), rtol=rtol, atol=1e-6)
        torch.testing.assert_close(lmp.double(), ref.log_mask_prob(t64, v), rtol=rtol, atol=1e-3)
