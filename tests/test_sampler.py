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
