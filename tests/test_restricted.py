"""Support-restricted outputs give the same ELBO, gradients and samples as the dense path.

The dense path is the denoiser's full output (B, L, num_clean) sliced to each
support; the restricted path computes logits only at the positions needed,
over their own support. Random model, several supports of different sizes in
two modalities, an MD4 and a GenMD4 schedule with random w.
"""

import pytest
import torch

from maskdiff.core.batch import collate
from maskdiff.core.elbo import elbo
from maskdiff.core.modalities import modality_id
from maskdiff.core.model import Denoiser, DenoiserConfig
from maskdiff.core.sampler import sample
from maskdiff.core.schedules import LearnedPoly, ModalitySchedules, make_schedule
from maskdiff.core.tokens import Field, Record, Support, VocabSpec

SPEC = VocabSpec([Support("text/bpe", "text", 40), Support("tabular/col:a", "tabular", 3), Support("tabular/col:b", "tabular", 17)])
TEXT, TAB = modality_id("text"), modality_id("tabular")


class DenseView:
    """The same network seen only through its dense forward (the path the restricted one must reproduce)."""

    def __init__(self, model: Denoiser):
        self.model, self.spec = model, model.spec
        self.time_conditioned = model.time_conditioned

    def __call__(self, x_t, batch, t):
        return self.model(x_t, batch, t)


def make_batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    recs = []
    for i in range(n):
        text = torch.randint(0, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        recs.append(Record([Field("text", "text/bpe", text), Field("col:a", "tabular/col:a", [i % 3]), Field("col:b", "tabular/col:b", [(5 * i) % 17])]))
    return collate(recs, SPEC)


def make(time_conditioning: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = Denoiser(SPEC, DenoiserConfig(dim=32, depth=2, heads=2, time_conditioning=time_conditioning))
    w = LearnedPoly(SPEC.num_clean)
    with torch.no_grad():
        w.w_raw.copy_(torch.randn(SPEC.num_clean) * 1.5)
        if time_conditioning:
            for block in model.blocks:
                block.ada.weight.normal_(std=0.05)
    return model, ModalitySchedules({TEXT: make_schedule("cosine"), TAB: w})


@pytest.mark.parametrize("steps", [None, 5])
def test_elbo_and_gradients_match_the_dense_path(steps):
    model, schedules = make(time_conditioning=True)
    batch = make_batch()
    results, grads = [], []
    for denoiser in (model, DenseView(model)):
        model.zero_grad()
        schedules.zero_grad()
        res = elbo(denoiser, batch, schedules, steps=steps, draws=2, generator=torch.Generator().manual_seed(3))
        res.loss.backward()
        results.append(res)
        grads.append([p.grad.clone() for p in list(model.parameters()) + list(schedules.parameters()) if p.grad is not None])
    restricted, dense = results
    torch.testing.assert_close(restricted.nelbo, dense.nelbo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restricted.position_nats, dense.position_nats, rtol=1e-5, atol=1e-5)
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert grads[0][-1].abs().sum() > 0  # w received gradient


@pytest.mark.parametrize("opts", [dict(), dict(method="topk"), dict(temperature=0.8, top_p=0.9), dict(guidance=1.0, guidance_supports=(1,))])
@pytest.mark.parametrize("genmd4", [False, True])
def test_samples_match_the_dense_path(opts, genmd4):
    model, schedules = make(time_conditioning=genmd4)
    if not genmd4:
        schedules = ModalitySchedules({TEXT: make_schedule("cosine"), TAB: make_schedule("linear")})
    batch = make_batch(seed=1)
    holes = (torch.rand(batch.shape, generator=torch.Generator().manual_seed(2)) < 0.7) & batch.valid
    x = batch.with_tokens(torch.where(holes, SPEC.mask_id, batch.tokens))
    a = sample(model, x, schedules, steps=12, generator=torch.Generator().manual_seed(5), **opts)
    b = sample(DenseView(model), x, schedules, steps=12, generator=torch.Generator().manual_seed(5), **opts)
    assert torch.equal(a.tokens, b.tokens)
    assert (a.tokens[holes] != SPEC.mask_id).all()


def test_elbo_and_sampler_never_build_dense_outputs(monkeypatch):
    """Nothing of size (B, L, num_clean): the dense forward is not on the training, evaluation or sampling path."""
    model, schedules = make(time_conditioning=True)
    batch = make_batch()

    def refuse(*args, **kwargs):
        raise AssertionError("dense forward called")

    monkeypatch.setattr(Denoiser, "forward", refuse)
    elbo(model, batch, schedules, draws=2).loss.backward()
    elbo(model, batch, schedules, steps=4)
    masked = batch.with_tokens(torch.where(batch.valid, SPEC.mask_id, batch.tokens))
    for method in ("ancestral", "topk"):
        sample(model, masked, schedules, steps=4, method=method)


def test_bfloat16_network_still_fills_every_hole_within_its_support():
    model, schedules = make(time_conditioning=False)
    schedules = ModalitySchedules({TEXT: make_schedule("cosine"), TAB: make_schedule("linear")})
    batch = make_batch(seed=3)
    x = batch.with_tokens(torch.where(batch.valid, SPEC.mask_id, batch.tokens))
    out = sample(model, x, schedules, steps=8, precision="bfloat16", generator=torch.Generator().manual_seed(0)).tokens
    for sid, s in enumerate(SPEC.supports):
        r = SPEC.id_range(s.name)
        got = out[batch.valid & (batch.support_ids == sid)]
        assert ((got >= r.start) & (got < r.stop)).all()
