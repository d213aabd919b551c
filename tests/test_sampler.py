"""Reverse sampling with exact denoisers reproduces the data; given positions never move."""

import pytest
import torch

from maskdiff.sampler import categorical, sample, time_grid
from maskdiff.schedules import LearnedPoly, ModalitySchedules, make_schedule
from maskdiff.tokens import MODALITIES, Support
from oracles import IndependentData, PosteriorOracle

TEXT, PROTEIN = MODALITIES.index("text"), MODALITIES.index("protein")
# chi-square 99.9% quantiles by degrees of freedom
CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47}


@pytest.fixture(scope="module")
def data():
    return IndependentData(
        [Support("text/a", "text", 3), Support("protein/b", "protein", 4)],
        {"a": ("text/a", [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]), "b": ("protein/b", [[0.1, 0.2, 0.3, 0.4], [0.05, 0.05, 0.2, 0.7]])},
    )


def learned(num_values: int, seed: int = 0) -> LearnedPoly:
    sched = LearnedPoly(num_values)
    with torch.no_grad():
        sched.w_raw.copy_(torch.randn(num_values, generator=torch.Generator().manual_seed(seed)) * 1.5)
    return sched


SCHEDULES = {
    "md4": lambda V: ModalitySchedules({TEXT: make_schedule("linear"), PROTEIN: make_schedule("cosine")}),
    "genmd4": lambda V: ModalitySchedules({TEXT: learned(V), PROTEIN: make_schedule("poly2")}),
}


@pytest.mark.parametrize("kind", ["md4", "genmd4"])
@pytest.mark.parametrize("grid", ["linear", "cosine"])
def test_oracle_sampler_reproduces_marginals_with_clamped_fields(data, kind, grid):
    schedules = SCHEDULES[kind](data.spec.num_clean)
    batch = data.batch(6000, seed=1)
    known = batch.tokens.clone()
    x = known.clone()
    fill = [0, 2, 3]  # position 1 (a field value) stays given
    x[:, fill] = batch.mask_id
    res = sample(PosteriorOracle(data, schedules), batch.with_tokens(x), schedules, steps=12, grid=grid, generator=torch.Generator().manual_seed(2))
    assert torch.equal(res.tokens[:, 1], known[:, 1])
    assert (res.tokens != batch.mask_id).all()
    for pos in fill:
        p = data.p[pos]
        support = p > 0
        counts = torch.bincount(res.tokens[:, pos], minlength=p.numel()).double()
        assert counts[~support].sum() == 0  # never outside the field's support
        expected = p[support] * len(res.tokens)
        chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_999[int(support.sum()) - 1], (pos, counts[support].tolist(), expected.tolist())


def test_state_dependent_step_matters(data):
    """Fed p instead of the GenMD4 posterior, the GenMD4 step gets the marginals wrong."""
    schedules = ModalitySchedules({TEXT: learned(data.spec.num_clean, seed=3), PROTEIN: make_schedule("linear")})
    batch = data.batch(6000, seed=1)
    x = batch.tokens.clone()
    x[:, 0] = batch.mask_id
    res = sample(PosteriorOracle(data, schedules, state_aware=False), batch.with_tokens(x), schedules, steps=12, generator=torch.Generator().manual_seed(2))
    p = data.p[0][:3]
    counts = torch.bincount(res.tokens[:, 0], minlength=3).double()[:3]
    chi2 = float(((counts - p * 6000) ** 2 / (p * 6000)).sum())
    assert chi2 > 3 * CHI2_999[2]


def test_caching_gives_identical_samples_with_fewer_calls(data):
    schedules = SCHEDULES["md4"](data.spec.num_clean)
    batch = data.batch(8, seed=5)
    x = torch.full_like(batch.tokens, batch.mask_id)
    cached_oracle = PosteriorOracle(data, schedules, state_aware=False)
    fresh_oracle = PosteriorOracle(data, schedules, state_aware=False)
    fresh_oracle.time_conditioned = True  # forces a network call at every step
    a = sample(cached_oracle, batch.with_tokens(x), schedules, steps=200, generator=torch.Generator().manual_seed(0))
    b = sample(fresh_oracle, batch.with_tokens(x), schedules, steps=200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)
    assert a.network_calls < b.network_calls
    assert a.network_calls <= 8 * 4 + 1  # at most one call per step on which a token changed (+ the first)


def test_seeded_runs_reproduce(data):
    schedules = SCHEDULES["genmd4"](data.spec.num_clean)
    batch = data.batch(16, seed=5)
    x = torch.full_like(batch.tokens, batch.mask_id)
    runs = [sample(PosteriorOracle(data, schedules), batch.with_tokens(x), schedules, steps=10, generator=torch.Generator().manual_seed(s)).tokens for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_time_grids():
    for kind in ("linear", "cosine"):
        g = time_grid(10, kind)
        assert g[0] == 1 and g[-1] == 0 and (g[1:] < g[:-1]).all()
    assert time_grid(4, "cosine")[1] > time_grid(4, "linear")[1]  # finer steps near t = 1
    with pytest.raises(ValueError):
        time_grid(10, "quadratic")


def test_categorical_draws_follow_the_weights():
    w = torch.tensor([0.0, 5.0, 1e-3, 2.0, 0.0, 3.0], dtype=torch.float64)
    draws = categorical(w.expand(400_000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[0] == 0 and counts[4] == 0  # zero weight is never drawn, at either end or inside
    expected = w / w.sum() * 400_000
    nz = w > 0
    chi2 = float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())
    assert chi2 < CHI2_999[3]
    assert counts[2] > 0  # the small weight (expected ~40) is drawn


@pytest.mark.parametrize("opts", [dict(method="topk"), dict(method="topk", confidence_noise=1.0), dict(temperature=0.7, top_p=0.9), dict(method="genmd4")])
def test_every_sampler_keeps_known_positions_and_fills_the_rest(data, opts):
    schedules = SCHEDULES["genmd4"](data.spec.num_clean)
    batch = data.batch(64, seed=9)
    known = batch.tokens.clone()
    x = known.clone()
    holes = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    x[holes] = batch.mask_id
    res = sample(PosteriorOracle(data, schedules), batch.with_tokens(x), schedules, steps=8, generator=torch.Generator().manual_seed(0), **opts)
    assert torch.equal(res.tokens[~holes], known[~holes])
    assert (res.tokens != batch.mask_id).all()
    for pos in range(x.shape[1]):
        assert (data.p[pos][res.tokens[:, pos]] > 0).all()  # inside each field's support


def test_genmd4_method_needs_a_state_dependent_schedule(data):
    schedules = SCHEDULES["md4"](data.spec.num_clean)
    batch = data.batch(2)
    with pytest.raises(ValueError, match="genmd4"):
        sample(PosteriorOracle(data, schedules), batch, schedules, method="genmd4")
    with pytest.raises(ValueError, match="guidance"):
        sample(PosteriorOracle(data, schedules), batch, schedules, guidance=2.0)


def test_temperature_and_top_p():
    from maskdiff.sampler import shape_distribution

    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]], dtype=torch.float64))
    nucleus = shape_distribution(logp, 1.0, 0.7).exp()
    torch.testing.assert_close(nucleus, torch.tensor([[0.625, 0.375, 0, 0, 0]], dtype=torch.float64))
    cold = shape_distribution(logp, 0.1, 1.0).exp()
    assert cold[0, 0] > 0.99 and cold[0, 4] == 0
    assert shape_distribution(logp, 1.0, 1e-9).exp()[0, 0] == 1.0  # the top value always stays


def test_guidance_sharpens_towards_the_condition():
    from maskdiff.sampler import guided

    cond = torch.log(torch.tensor([[0.6, 0.4, 0.0]], dtype=torch.float64))
    uncond = torch.log(torch.tensor([[0.4, 0.6, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(guided(cond, uncond, 0.0), cond)
    g = guided(cond, uncond, 2.0).exp()
    assert g[0, 0] > 0.6 and g[0, 2] == 0 and torch.isclose(g.sum(), torch.tensor(1.0, dtype=torch.float64))
    # p_w ∝ p(x|c)^(1+w) / p(x)^w
    expected = torch.tensor([0.6**3 / 0.4**2, 0.4**3 / 0.6**2], dtype=torch.float64)
    torch.testing.assert_close(g[0, :2], expected / expected.sum())


def test_complete_fills_missing_values_of_records(data):
    from maskdiff.sampler import complete
    from maskdiff.tokens import MISSING

    schedules = SCHEDULES["md4"](data.spec.num_clean)
    records = data.sample(5, seed=2)
    records[0].fields[0].tokens[1] = MISSING
    records[3].fields[1].tokens[:] = MISSING
    filled, res = complete(PosteriorOracle(data, schedules, state_aware=False), records, data.spec, schedules, steps=5, generator=torch.Generator().manual_seed(0))
    for before, after in zip(records, filled):
        for fb, fa in zip(before.fields, after.fields):
            given = fb.tokens != MISSING
            assert (fa.tokens[given] == fb.tokens[given]).all() and (fa.tokens != MISSING).all()
    assert res.network_calls >= 1
