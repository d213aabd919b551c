"""The negative ELBO against closed forms: oracle denoisers, enumeration, reductions."""

import math

import numpy as np
import pytest
import torch

from maskdiff.core.elbo import antithetic_times, elbo
from maskdiff.core.modalities import modality_id
from maskdiff.core.schedules import LearnedPoly, ModalitySchedules, make_schedule
from maskdiff.core.tokens import Support
from oracles import IndependentData, PairData, PosteriorOracle, expected_nelbo, expected_reconstruction

TEXT, PROTEIN = modality_id("text"), modality_id("protein")


@pytest.fixture(scope="module")
def data() -> IndependentData:
    """Two modalities in one record, independent positions with known marginals."""
    return IndependentData(
        [Support("text/a", "text", 3), Support("protein/b", "protein", 4)],
        {
            "a": ("text/a", [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]),
            "b": ("protein/b", [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]),
        },
    )


def _uniform3(x_t, batch, t):
    """A denoiser that predicts uniformly over 3 values everywhere."""
    return torch.full((*x_t.shape, 3), -math.log(3), dtype=torch.float64)


def genmd4(num_values: int, w: list[float] | torch.Tensor) -> LearnedPoly:
    sched = LearnedPoly(num_values)
    with torch.no_grad():
        sched.w_raw.copy_(torch.log(torch.expm1(torch.as_tensor(w, dtype=torch.float32))))
    return sched


def mc_gap(data, schedules, state_aware=True, n=20000, seed=0):
    """Monte Carlo (ELBO - exact NLL) per example: mean and standard error."""
    batch = data.batch(n, seed=seed)
    with torch.no_grad():
        res = elbo(PosteriorOracle(data, schedules, state_aware), batch, schedules, generator=torch.Generator().manual_seed(seed))
    gap = res.nelbo - data.nll(batch)
    return float(gap.mean()), float(gap.std() / math.sqrt(n)), res


@pytest.mark.parametrize("text_kind,protein_kind", [("linear", "cosine"), ("poly2", "geometric"), ("cosine", "poly2"), ("geometric", "linear")])
def test_oracle_elbo_equals_exact_nll_md4(data, text_kind, protein_kind):
    schedules = ModalitySchedules({TEXT: make_schedule(text_kind), PROTEIN: make_schedule(protein_kind)})
    mean, se, res = mc_gap(data, schedules)
    print(f"{text_kind}/{protein_kind}: ELBO - NLL = {mean:.4f} ± {se:.4f} nats/record")
    assert abs(mean) < 3 * se
    assert set(res.bits_per_token()) == {"text", "protein"}


def test_oracle_elbo_genmd4_needs_state_aware_posterior(data):
    torch.manual_seed(0)
    w = torch.rand(data.spec.num_clean) * 2.5 + 0.5  # random w in [0.5, 3]
    schedules = ModalitySchedules({TEXT: genmd4(data.spec.num_clean, w), PROTEIN: make_schedule("linear")})
    mean, se, _ = mc_gap(data, schedules, state_aware=True)
    print(f"genmd4 posterior: ELBO - NLL = {mean:.4f} ± {se:.4f}")
    assert abs(mean) < 3 * se
    mean_p, se_p, _ = mc_gap(data, schedules, state_aware=False)
    print(f"genmd4 fed p: ELBO - NLL = {mean_p:.4f} ± {se_p:.4f}")
    assert mean_p > mean + 3 * math.hypot(se, se_p)


def test_expected_elbo_terms_in_closed_form():
    """Exact expectation (no Monte Carlo): each end term of the bound is accounted for.

    For an MD4 schedule and the oracle p, E[-ELBO] = H + (1 - alpha_{t_min} + alpha_1)(log K - H)
    exactly; a large t_min makes the reconstruction term visible.
    """
    p = [0.6, 0.3, 0.1]
    data = IndependentData([Support("text/a", "text", 3)], {"a": ("text/a", [p])})
    from maskdiff.core.batch import collate
    from maskdiff.core.tokens import Field, Record

    batch = collate([Record([Field("a", "text/a", [v])]) for v in range(3)], data.spec)
    prob = torch.tensor(p, dtype=torch.float64)
    H = float(-(prob * prob.log()).sum())
    for kind, t_min in [("linear", 0.05), ("cosine", 0.2), ("geometric", 1e-4)]:
        sched = make_schedule(kind)
        schedules = ModalitySchedules({TEXT: sched}, t_min=t_min)
        got = float(expected_nelbo(PosteriorOracle(data, schedules), batch, prob, schedules))
        a0 = float(sched.f(torch.tensor(t_min, dtype=torch.float64)))
        a1 = float(sched.f(torch.tensor(1.0, dtype=torch.float64)))
        want = H + (1 - a0 + a1) * (math.log(3) - H)
        assert got == pytest.approx(want, rel=2e-4), kind
    # GenMD4 (p=(.6,.3,.1), w=(.5,1,3)): the posterior attains the entropy, p itself does not. With mu = p,
    # 1 - alpha_t = t^w and c = w/t the integral is closed: sum_x0 p_x0 [-log p_x0 + (sum_i p_i w_i) / w_x0 - 1]
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    schedules = ModalitySchedules({TEXT: genmd4(3, w.tolist())}, t_min=1e-9)
    with torch.no_grad():
        exact = float(expected_nelbo(PosteriorOracle(data, schedules, True), batch, prob, schedules, n_t=4000))
        with_p = float(expected_nelbo(PosteriorOracle(data, schedules, False), batch, prob, schedules, n_t=4000))
    assert exact == pytest.approx(H, abs=2e-3)  # 0.8979
    assert with_p == pytest.approx(H + float((prob * w).sum() * (prob / w).sum()) - 1, abs=3e-3)  # 1.2779


def test_model_decoding_at_t_min_in_closed_form():
    """Reconstruction decoded by the exact posterior on a dependent pair, by hand (linear: 1 - alpha_{t_min} = m).

    One position masked: -log P(x_i | x_j); both: the factorised marginals. The bound with it is
    NLL + m^2 I(X1; X2) (only both-masked loses the dependence); uniform decoding costs 2 m log K instead.
    """
    rng = np.random.default_rng(2)
    pair = PairData(rng.dirichlet(np.ones(9)).reshape(3, 3))
    m = 0.3
    schedules = ModalitySchedules({TEXT: make_schedule("linear")}, t_min=m)
    J = pair.joint.numpy()
    p1, p2 = J.sum(1, keepdims=True), J.sum(0, keepdims=True)
    one = -np.log(J / p2) - np.log(J / p1)  # first masked given the second, and the other way
    both = -np.log(p1) - np.log(p2)
    want = float((J * (m * (1 - m) * one + m * m * both)).sum())
    with torch.no_grad():
        got = float(expected_reconstruction(pair.posterior, pair.all, pair.prob, schedules, spec=pair.spec))
        got_uniform = float(expected_reconstruction(_uniform3, pair.all, pair.prob, schedules, spec=pair.spec))
        with_uniform = float(expected_nelbo(pair.posterior, pair.all, pair.prob, schedules, n_t=400, spec=pair.spec))
    assert got == pytest.approx(want, rel=1e-9)
    assert got_uniform == pytest.approx(2 * m * math.log(3), rel=1e-9)  # uniform decoding is the uniform oracle's
    mutual_info = float((J * np.log(J / (p1 * p2))).sum())
    with_model = with_uniform - 2 * m * math.log(3) + got
    assert with_model == pytest.approx(pair.nll() + m * m * mutual_info, abs=2e-3)
    assert pair.nll() < with_model < with_uniform  # still a bound, and a tighter one


def test_model_decoding_monte_carlo_matches_its_expectation():
    rng = np.random.default_rng(3)
    pair = PairData(rng.dirichlet(np.ones(9)).reshape(3, 3))
    schedules = ModalitySchedules({TEXT: make_schedule("cosine")}, t_min=0.2)
    batch = _pair_batch(pair, 20000, seed=1)
    with torch.no_grad():
        res = elbo(pair.posterior, batch, schedules, decode="model", generator=torch.Generator().manual_seed(4), spec=pair.spec)
        want = expected_nelbo(pair.posterior, pair.all, pair.prob, schedules, n_t=400, spec=pair.spec)
        want = want - expected_reconstruction(_uniform3, pair.all, pair.prob, schedules, spec=pair.spec)
        want = float(want + expected_reconstruction(pair.posterior, pair.all, pair.prob, schedules, spec=pair.spec))
    se = float(res.nelbo.std() / math.sqrt(res.nelbo.numel()))
    assert abs(float(res.nelbo.mean()) - want) < 4 * se
    with pytest.raises(ValueError, match="decode"):
        elbo(pair.posterior, batch, schedules, decode="exact", spec=pair.spec)


def test_genmd4_with_equal_w_is_md4_poly(data):
    batch = data.batch(512, seed=3)
    for K in (1.0, 2.0, 3.0):
        gen = ModalitySchedules({TEXT: genmd4(data.spec.num_clean, [K] * data.spec.num_clean), PROTEIN: make_schedule("cosine")})
        md4 = ModalitySchedules({TEXT: make_schedule(f"poly{K:g}"), PROTEIN: make_schedule("cosine")})
        with torch.no_grad():
            a = elbo(PosteriorOracle(data, gen, False), batch, gen, generator=torch.Generator().manual_seed(7))
            b = elbo(PosteriorOracle(data, md4, False), batch, md4, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(a.nelbo, b.nelbo, rtol=1e-5, atol=1e-5)


def test_discrete_time_elbo_approaches_continuous():
    """Exact expectations on a dependent pair with its exact posterior: coarser grids are looser."""
    rng = np.random.default_rng(0)
    joint = rng.dirichlet(np.ones(9) * 0.3).reshape(3, 3)
    pair = PairData(joint)
    schedules = ModalitySchedules({TEXT: make_schedule("linear")})
    with torch.no_grad():
        cont = float(expected_nelbo(pair.posterior, pair.all, pair.prob, schedules, n_t=400, spec=pair.spec))
        disc = {T: float(expected_nelbo(pair.posterior, pair.all, pair.prob, schedules, steps=T, spec=pair.spec)) for T in (10, 100, 1000)}
    print("continuous", cont, "discrete", disc, "NLL", pair.nll())
    assert disc[10] > disc[100] > disc[1000] > cont - 1e-4
    assert disc[1000] - cont < 0.1 * (disc[10] - cont)
    assert cont == pytest.approx(pair.nll(), abs=2e-3)  # exact posterior: the continuous bound is tight


def test_continuous_elbo_upper_bounds_nll_for_a_wrong_denoiser():
    rng = np.random.default_rng(1)
    pair = PairData(rng.dirichlet(np.ones(9)).reshape(3, 3))
    schedules = ModalitySchedules({TEXT: make_schedule("cosine")})
    with torch.no_grad():
        got = float(expected_nelbo(_uniform3, pair.all, pair.prob, schedules, n_t=200, spec=pair.spec))
    assert got == pytest.approx(2 * math.log(3), rel=1e-3)  # uniform decoding of both positions
    assert got > pair.nll()


def test_antithetic_times_cover_the_interval():
    t = antithetic_times(1000, 1e-4, torch.Generator().manual_seed(0))
    assert t.min() >= 1e-4 and t.max() < 1
    hist = torch.histc(t, bins=10, min=0, max=1)
    assert hist.min() >= 99 and hist.max() <= 101  # one per stratum


def test_missing_and_padding_do_not_count(data):
    from maskdiff.core.batch import collate

    records = data.sample(4, seed=0)
    records[0].fields[1].tokens[1] = -1  # a missing value
    records[1].fields = records[1].fields[:1]  # a shorter record: padded
    batch = collate(records, data.spec)
    schedules = ModalitySchedules({TEXT: make_schedule("linear"), PROTEIN: make_schedule("linear")})
    res = elbo(PosteriorOracle(data, schedules), batch, schedules, generator=torch.Generator().manual_seed(0))
    assert (res.position_nats[~batch.valid] == 0).all()
    assert sum(n for _, n in res.per_modality().values()) == int(batch.valid.sum()) == 5 * 4 - 1 - 3


def test_discrete_time_genmd4_converges_to_continuous():
    """The T-step GenMD4 bound (with its stay-masked KL term) tends to the continuous one."""
    from maskdiff.core.batch import collate
    from maskdiff.core.tokens import Field, Record

    p = [0.6, 0.3, 0.1]
    data = IndependentData([Support("text/a", "text", 3)], {"a": ("text/a", [p])})
    batch = collate([Record([Field("a", "text/a", [v])]) for v in range(3)], data.spec)
    prob = torch.tensor(p, dtype=torch.float64)
    schedules = ModalitySchedules({TEXT: genmd4(3, [0.5, 1.0, 3.0])})
    for aware in (True, False):
        oracle = PosteriorOracle(data, schedules, aware)
        with torch.no_grad():
            cont = float(expected_nelbo(oracle, batch, prob, schedules, n_t=4000))
            gaps = [abs(float(expected_nelbo(oracle, batch, prob, schedules, steps=T)) - cont) for T in (10, 100, 1000)]
        print("aware" if aware else "p", cont, gaps)
        assert gaps[2] < 0.02 * cont
        assert max(gaps) < 1e-6 or gaps[0] > gaps[1] > gaps[2]


def _pair_batch(pair: PairData, n: int, seed: int):
    """n records drawn from the pair's joint distribution."""
    idx = torch.multinomial(pair.prob, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    from dataclasses import replace

    return replace(pair.all, **{k: getattr(pair.all, k)[idx] for k in pair.all.TENSORS})


def test_t_step_elbo_monte_carlo_matches_its_exact_expectation():
    """elbo(steps=T) on its own: times on the T-step grid, GenMD4 with its exact (t-dependent) posterior."""
    from oracles import PairOracle

    pair = PairData(np.random.default_rng(2).dirichlet(np.ones(9) * 0.5).reshape(3, 3))
    schedules = ModalitySchedules({TEXT: genmd4(3, [0.4, 1.0, 3.0])})
    oracle = PairOracle(pair, schedules)
    T, n = 4, 40_000
    with torch.no_grad():
        exact = float(expected_nelbo(oracle, pair.all, pair.prob, schedules, steps=T))
        res = elbo(oracle, _pair_batch(pair, n, seed=0), schedules, steps=T, generator=torch.Generator().manual_seed(1))
    mean, se = float(res.nelbo.mean()), float(res.nelbo.std() / math.sqrt(n))
    print(f"T={T}: Monte Carlo {mean:.4f} ± {se:.4f}, exact {exact:.4f}, NLL {pair.nll():.4f}")
    assert abs(mean - exact) < 4 * se
    assert exact > pair.nll() + 4 * se  # a T-step bound is loose: the comparison is not with the NLL


def test_t_step_genmd4_gradient_is_finite_at_t_equal_one():
    """The T-step grid reaches t = 1, where every token is masked and log(1 - p_mask) = -inf in the branch not taken."""
    pair = PairData(np.random.default_rng(3).dirichlet(np.ones(9)).reshape(3, 3))
    sched = genmd4(3, [0.5, 1.0, 2.0])
    schedules = ModalitySchedules({TEXT: sched})
    batch = _pair_batch(pair, 64, seed=0)
    res = elbo(pair.posterior, batch, schedules, steps=8, draws=2, t=torch.ones(64), generator=torch.Generator().manual_seed(0), spec=pair.spec)
    res.loss.backward()
    assert torch.isfinite(res.loss) and torch.isfinite(sched.w_raw.grad).all()
    assert sched.w_raw.grad.abs().sum() > 0


def test_reconstruction_and_prior_use_the_support_size_from_the_spec():
    """A value of probability 0 (log mu = -inf) is still one of the K values of its field: K = 3, not 2."""
    p = [0.7, 0.3, 0.0]
    data = IndependentData([Support("text/a", "text", 3)], {"a": ("text/a", [p])})
    from maskdiff.core.batch import collate
    from maskdiff.core.tokens import Field, Record

    batch = collate([Record([Field("a", "text/a", [v])]) for v in range(2)], data.spec)
    prob = torch.tensor(p[:2], dtype=torch.float64)
    H = float(-(prob * prob.log()).sum())
    schedules = ModalitySchedules({TEXT: make_schedule("linear")}, t_min=0.1)
    got = float(expected_nelbo(PosteriorOracle(data, schedules), batch, prob, schedules, n_t=400))
    assert got == pytest.approx(H + 0.1 * (math.log(3) - H), rel=1e-3)  # 1 - alpha_{t_min} = 0.1, alpha_1 = 0
