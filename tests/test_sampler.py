"""Reverse sampling against the exact distribution of the sampler's output; given positions never move.

The joint tests use two dependent positions with an exact oracle denoiser
(its output depends on x_t and, for GenMD4, on t). Their expected output is
the sampler's own T-step distribution, computed by dynamic programming
(``oracles.exact_sample_distribution``): positions that unmask in the same
step are drawn independently, so this distribution depends on the unmasking
rates, and on the sampler passing the current tokens to the network. The
chi-square over the K x K joint outcomes rejects a wrong-rate and a
stale-context mutant.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

import maskdiff.core.sampler as sampler_module
from maskdiff.core.kernels import reference
from maskdiff.core.modalities import modality_id
from maskdiff.core.sampler import sample, time_grid
from maskdiff.core.schedules import LearnedPoly, ModalitySchedules, make_schedule
from maskdiff.core.tokens import Support
from oracles import IndependentData, PairData, PairOracle, PosteriorOracle, exact_sample_distribution

TEXT, PROTEIN = modality_id("text"), modality_id("protein")
N = 40_000  # rows per joint test
JOINT = np.array([[0.30, 0.02, 0.01], [0.03, 0.25, 0.04], [0.01, 0.03, 0.31]])  # dependent; marginals all distinct (no topk ties)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic of counts against probs (cells with probability > 0)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "an outcome of probability 0 was drawn"
    expected = probs[support] * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


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


def genmd4_w(w: list[float]) -> LearnedPoly:
    sched = LearnedPoly(len(w))
    with torch.no_grad():
        sched.w_raw.copy_(torch.log(torch.expm1(torch.tensor(w))))
    return sched


SCHEDULES = {
    "md4": lambda V: ModalitySchedules({TEXT: make_schedule("linear"), PROTEIN: make_schedule("cosine")}),
    "genmd4": lambda V: ModalitySchedules({TEXT: learned(V), PROTEIN: make_schedule("poly2")}),
}

# name: (schedule, steps, grid, start (None = masked), sampler options)
JOINT_CASES = {
    "md4 ancestral": ("linear", 6, "linear", (None, None), {}),
    "md4 ancestral, cosine, one position given": ("cosine", 5, "cosine", (2, None), {}),
    "genmd4 ancestral": ("genmd4", 5, "linear", (None, None), {}),
    "genmd4 method": ("genmd4", 5, "cosine", (None, None), {"method": "genmd4"}),
    "topk md4": ("linear", 4, "linear", (None, None), {"method": "topk"}),
    "topk genmd4": ("genmd4", 4, "cosine", (None, None), {"method": "topk"}),
}


def run_joint(case: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, exact probabilities) over the K x K outcomes of one sampler on the dependent pair."""
    kind, steps, grid, start, opts = JOINT_CASES[case]
    pair = PairData(JOINT)
    sched = genmd4_w([0.4, 1.0, 3.0]) if kind == "genmd4" else make_schedule(kind)
    schedules = ModalitySchedules({TEXT: sched})
    x = torch.full((N, 2), pair.spec.mask_id)
    for n, v in enumerate(start):
        if v is not None:
            x[:, n] = v
    batch = _rows_like(pair, x)
    res = sample(PairOracle(pair, schedules), batch, schedules, steps=steps, grid=grid, generator=torch.Generator().manual_seed(seed), **opts)
    counts = torch.bincount(res.tokens[:, 0] * pair.K + res.tokens[:, 1], minlength=pair.K**2).double()
    exact = exact_sample_distribution(pair, schedules, time_grid(steps, grid).tolist(), start, opts.get("method", "ancestral"))
    return counts, exact.reshape(-1)


def _rows_like(pair: PairData, x: torch.Tensor):
    """A batch of the pair's layout holding the tokens x."""
    one = pair.all
    return replace(one, **{k: getattr(one, k)[:1].expand(x.shape[0], -1).clone() for k in one.TENSORS}).with_tokens(x)


@pytest.mark.parametrize("case", list(JOINT_CASES))
def test_joint_distribution_matches_the_exact_sampler_distribution(case):
    counts, exact = run_joint(case)
    p = chi2_pvalue(counts, exact)
    print(case, "p =", p)
    assert p > 1e-3, (case, counts.tolist(), (exact * N).tolist())


def test_the_exact_sampler_distribution_is_not_the_data(case="md4 ancestral"):
    """Same-step unmasking draws the pair independently: the mutants below change how often that happens."""
    _, exact = run_joint(case)
    assert (exact - torch.tensor(JOINT).reshape(-1)).abs().max() > 0.02


def test_wrong_rate_mutant_is_rejected(monkeypatch):
    """Unmasking with r = alpha_s - alpha_t (not divided by 1 - alpha_t), in both sampler paths."""

    def unnormalised(sched, t, s, values):
        if s <= 0:
            return torch.ones(values.shape, dtype=torch.float64)
        tt, ss = (torch.tensor([[v]], dtype=torch.float64) for v in (t, s))
        return (sched.mask_prob(tt, values.view(1, -1)) - sched.mask_prob(ss, values.view(1, -1))).view(-1).double()

    def steps_from(rates):
        def unmask_steps(schedules, times, modality_ids, fill, generator=None):
            (_, sched), = schedules.items()
            grid = times.tolist()
            r = torch.stack([rates(sched, t, s, torch.zeros(1, dtype=torch.long))[0] for t, s in zip(grid[:-1], grid[1:])])
            survive = torch.cat((torch.ones(1, dtype=torch.float64), torch.cumprod(1 - r, 0)[:-1]))
            cdf = (survive * r).cumsum(0)
            u = torch.rand(fill.shape, dtype=torch.float64, generator=generator)
            return torch.where(fill, torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=len(grid) - 2), -1)
        return unmask_steps

    monkeypatch.setattr(sampler_module, "unmask_steps", steps_from(unnormalised))
    assert chi2_pvalue(*run_joint("md4 ancestral")) < 1e-6
    monkeypatch.setattr(sampler_module, "step_rates", unnormalised)
    assert chi2_pvalue(*run_joint("genmd4 ancestral")) < 1e-6


@pytest.mark.parametrize("case", ["md4 ancestral", "genmd4 ancestral", "topk md4"])
def test_stale_context_mutant_is_rejected(monkeypatch, case):
    """The network is shown the tokens as they were at the start, not the current ones."""
    original = sampler_module._Predictor.__call__

    def stale(self, x, t, where):
        return original(self, self.batch.tokens, t, where)

    monkeypatch.setattr(sampler_module._Predictor, "__call__", stale)
    assert chi2_pvalue(*run_joint(case)) < 1e-6


def test_md4_sampler_calls_the_network_only_where_something_unmasks(data):
    """200 steps, 4 positions per row: at most 4 row evaluations per row (a stepwise sampler needs up to 200)."""
    schedules = SCHEDULES["md4"](data.spec.num_clean)
    batch = data.batch(8, seed=5)
    x = torch.full_like(batch.tokens, batch.mask_id)
    oracle = PosteriorOracle(data, schedules)
    res = sample(oracle, batch.with_tokens(x), schedules, steps=200, generator=torch.Generator().manual_seed(0))
    assert res.row_calls <= 8 * 4
    assert res.network_calls == oracle.calls <= 8 * 4
    assert (res.tokens != batch.mask_id).all()


def test_sample_refuses_a_modality_without_schedule(data):
    schedules = ModalitySchedules({TEXT: make_schedule("linear")})  # protein fields have none
    batch = data.batch(2)
    with pytest.raises(ValueError, match="no schedule for modality"):
        sample(PosteriorOracle(data, schedules), batch.with_tokens(torch.full_like(batch.tokens, batch.mask_id)), schedules)


def test_state_dependent_step_matters(data):
    """Fed p instead of the GenMD4 posterior, the GenMD4 step gets the marginals wrong."""
    schedules = ModalitySchedules({TEXT: learned(data.spec.num_clean, seed=3), PROTEIN: make_schedule("linear")})
    batch = data.batch(6000, seed=1)
    x = batch.tokens.clone()
    x[:, 0] = batch.mask_id
    res = sample(PosteriorOracle(data, schedules, state_aware=False), batch.with_tokens(x), schedules, steps=12, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(res.tokens[:, 0], minlength=3).double()[:3]
    assert chi2_pvalue(counts, data.p[0][:3]) < 1e-6


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


def test_reverse_step_draws_follow_the_weights():
    """Reference reverse step: value i with probability r_i mu_i, K (stays masked) with the rest; tails kept."""
    mu = torch.tensor([0.0, 0.5, 1e-4, 0.2, 0.0, 0.2999], dtype=torch.float64)
    rate = torch.tensor([1.0, 0.5, 1.0, 0.25, 1.0, 1.0], dtype=torch.float64)
    n = 400_000
    logits = mu.log().expand(n, -1)
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = reference.reverse_step(logits, u, rate)
    weights = rate * mu
    probs = torch.cat((weights, 1 - weights.sum().unsqueeze(0)))
    counts = torch.bincount(draws, minlength=7).double()
    assert chi2_pvalue(counts, probs) > 1e-3
    assert counts[2] > 0  # the small weight (expected ~40) is drawn
    plain = reference.reverse_step(logits, u)  # no rate: a plain draw from mu, never 'stays'
    assert chi2_pvalue(torch.bincount(plain, minlength=6).double(), mu) > 1e-3


@pytest.mark.parametrize("kind", ["md4", "genmd4"])
@pytest.mark.parametrize("opts", [dict(), dict(method="topk"), dict(method="topk", confidence_noise=1.0), dict(temperature=0.7, top_p=0.9),
                                  dict(guidance=1.5, guidance_supports=(0,))])
def test_every_sampler_keeps_known_positions_and_fills_the_rest(data, kind, opts):
    schedules = SCHEDULES[kind](data.spec.num_clean)
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
    with pytest.raises(ValueError, match="precision"):
        sample(PosteriorOracle(data, schedules), batch, schedules, precision="float16")


def test_temperature_and_top_p():
    from maskdiff.core.sampler import shape_distribution

    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]], dtype=torch.float64))
    nucleus = shape_distribution(logp, 1.0, 0.7).exp()
    torch.testing.assert_close(nucleus, torch.tensor([[0.625, 0.375, 0, 0, 0]], dtype=torch.float64))
    cold = shape_distribution(logp, 0.1, 1.0).exp()
    assert cold[0, 0] > 0.99 and cold[0, 4] == 0
    assert shape_distribution(logp, 1.0, 1e-9).exp()[0, 0] == 1.0  # the top value always stays


def test_guidance_sharpens_towards_the_condition():
    from maskdiff.core.sampler import guided

    cond = torch.log(torch.tensor([[0.6, 0.4, 0.0]], dtype=torch.float64))
    uncond = torch.log(torch.tensor([[0.4, 0.6, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(guided(cond, uncond, 0.0), cond)
    g = guided(cond, uncond, 2.0).exp()
    assert g[0, 0] > 0.6 and g[0, 2] == 0 and torch.isclose(g.sum(), torch.tensor(1.0, dtype=torch.float64))
    # p_w ∝ p(x|c)^(1+w) / p(x)^w
    expected = torch.tensor([0.6**3 / 0.4**2, 0.4**3 / 0.6**2], dtype=torch.float64)
    torch.testing.assert_close(g[0, :2], expected / expected.sum())


def test_complete_fills_missing_values_of_records(data):
    from maskdiff.core.sampler import complete
    from maskdiff.core.tokens import MISSING

    schedules = SCHEDULES["md4"](data.spec.num_clean)
    records = data.sample(5, seed=2)
    records[0].fields[0].tokens[1] = MISSING
    records[3].fields[1].tokens[:] = MISSING
    filled, res = complete(PosteriorOracle(data, schedules, state_aware=False), records, data.spec, schedules, steps=5, generator=torch.Generator().manual_seed(0))
    for before, after in zip(records, filled):
        for fb, fa in zip(before.fields, after.fields):
            given = fb.tokens != MISSING
            assert (fa.tokens[given] == fb.tokens[given]).all() and (fa.tokens != MISSING).all()
    assert res.row_calls <= 3  # only rows 0 and 3 have missing values, 3 of them in all
