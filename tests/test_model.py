"""The denoiser: outputs restricted to each field's support, padding-blind, bidirectional."""


import pytest
import torch

from maskdiff.core.batch import collate
from maskdiff.core.model import Denoiser, DenoiserConfig
from maskdiff.core.tokens import Field, Record, Support, VocabSpec

SPEC = VocabSpec([Support("text/bpe", "text", 20), Support("tabular/col:x", "tabular", 5)])
CFG = DenoiserConfig(dim=32, depth=2, heads=2)


def records():
    return [
        Record([Field("text", "text/bpe", [1, 2, 3, 4, 5, 6]), Field("col:x", "tabular/col:x", [2])]),
        Record([Field("text", "text/bpe", [7, 8])]),
    ]


def test_output_is_a_distribution_over_the_fields_support_only():
    torch.manual_seed(0)
    model = Denoiser(SPEC, CFG)
    batch = collate(records(), SPEC)
    x_t = batch.tokens.clone()
    x_t[0, :3] = SPEC.mask_id
    logp = model(x_t, batch, None)
    assert logp.shape == (2, 7, SPEC.num_clean)
    text, tab = SPEC.id_range("text/bpe"), SPEC.id_range("tabular/col:x")
    torch.testing.assert_close(logp[0, :6, text.start : text.stop].exp().sum(-1), torch.ones(6))
    assert torch.isinf(logp[0, :6, tab.start :]).all()
    torch.testing.assert_close(logp[0, 6, tab.start : tab.stop].exp().sum(), torch.tensor(1.0))
    assert torch.isinf(logp[0, 6, : tab.start]).all()


def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    model = Denoiser(SPEC, CFG).eval()
    recs = records()
    alone = collate([recs[1]], SPEC)
    padded = collate(recs, SPEC)
    a = model(alone.tokens, alone, None)[0, :2]
    b = model(padded.tokens, padded, None)[1, :2]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_is_bidirectional():
    torch.manual_seed(0)
    model = Denoiser(SPEC, CFG).eval()
    batch = collate(records()[:1], SPEC)
    x1 = batch.tokens.clone()
    x2 = x1.clone()
    x2[0, 6] = SPEC.mask_id  # change the last position only
    assert not torch.allclose(model(x1, batch, None)[0, 0], model(x2, batch, None)[0, 0])


def test_time_conditioning_starts_neutral_and_then_uses_t():
    torch.manual_seed(0)
    model = Denoiser(SPEC, DenoiserConfig(dim=32, depth=2, heads=2, time_conditioning=True))
    batch = collate(records(), SPEC)
    t1, t2 = torch.full((2,), 0.1), torch.full((2,), 0.9)
    torch.testing.assert_close(model(batch.tokens, batch, t1), model(batch.tokens, batch, t2))  # adaLN zero-init
    with torch.no_grad():
        for block in model.blocks:
            block.ada.weight.normal_(std=0.1)
    assert not torch.allclose(model(batch.tokens, batch, t1), model(batch.tokens, batch, t2))


def test_bad_width():
    with pytest.raises(ValueError, match="heads"):
        Denoiser(SPEC, DenoiserConfig(dim=30, heads=4))


def test_a_time_conditioned_denoiser_refuses_to_run_without_t():
    model = Denoiser(SPEC, DenoiserConfig(dim=32, depth=1, heads=2, time_conditioning=True))
    batch = collate(records(), SPEC)
    with pytest.raises(ValueError, match="time-conditioned"):
        model(batch.tokens, batch, None)
    with pytest.raises(ValueError, match="time-conditioned"):
        model.support_logits(batch.tokens, batch, None, batch.valid)


def test_support_logits_are_the_dense_output_at_the_asked_positions():
    torch.manual_seed(0)
    model = Denoiser(SPEC, CFG).eval()
    batch = collate(records(), SPEC)
    where = torch.tensor([[True, False, True, False, False, False, True], [False, True, False, False, False, False, False]])
    dense = model(batch.tokens, batch, None)[where]  # (4, num_clean)
    groups = model.support_logits(batch.tokens, batch, None, where)
    assert sorted(g.support for g in groups) == [0, 1] and sum(len(g.rows) for g in groups) == 4
    for g in groups:
        r = SPEC.id_range(SPEC.supports[g.support].name)
        assert g.logits.shape == (len(g.rows), len(r))
        torch.testing.assert_close(torch.log_softmax(g.logits, -1), dense[g.rows, r.start : r.stop], rtol=1e-5, atol=1e-5)


def test_numeric_coordinates_are_embedded_in_and_out_and_kept_by_the_spec(tmp_path):
    coords = (-1.5, -0.5, 0.0, 0.5, 1.5)
    spec = VocabSpec([Support("text/bpe", "text", 20), Support("tabular/col:x", "tabular", 5, coords)])
    assert spec.fingerprint() == SPEC.fingerprint()  # metadata: the id layout is the same
    spec.save(tmp_path / "vocab.json")
    assert VocabSpec.load(tmp_path / "vocab.json").supports[1].coords == coords
    with pytest.raises(ValueError, match="coords must be 5 finite numbers"):
        Support("tabular/col:x", "tabular", 5, (0.0, 1.0))
    assert Denoiser(SPEC, CFG).coord_in is None  # no coordinates, no extra parameters
    torch.manual_seed(0)
    model = Denoiser(spec, CFG).eval()
    batch = collate([Record([Field("text", "text/bpe", [1, 2, 3, 4, 5, 6]), Field("col:x", "tabular/col:x", [0])])] + records()[1:], spec)
    # the same tokens under other coordinates give other outputs: the coordinates are used, in and out
    moved = Denoiser(VocabSpec([spec.supports[0], Support("tabular/col:x", "tabular", 5, tuple(-c for c in coords))]), CFG).eval()
    moved.load_state_dict(model.state_dict())
    x = SPEC.id_range("tabular/col:x")
    out, out_moved = model(batch.tokens, batch, None), moved(batch.tokens, batch, None)
    assert not torch.allclose(out[0, 6, x.start : x.stop], out_moved[0, 6, x.start : x.stop])
    assert not torch.allclose(model.hidden(batch.tokens, batch)[0, 0], moved.hidden(batch.tokens, batch)[0, 0])  # via the input x
    where = torch.zeros_like(batch.pad)
    where[0, 6] = True
    (g,) = model.support_logits(batch.tokens, batch, None, where)
    torch.testing.assert_close(torch.log_softmax(g.logits, -1)[0], out[0, 6, x.start : x.stop], rtol=1e-5, atol=1e-5)


def test_a_condition_field_modulates_every_block_of_its_record():
    """With attention cut (no position sees another), the text of record 0 still follows its col:x token,
    which reaches it through adaLN only; record 1 has no condition and gets zero."""
    torch.manual_seed(0)
    model = Denoiser(SPEC, DenoiserConfig(dim=32, depth=2, heads=2, condition_fields=("tabular/col:x",))).eval()
    plain = Denoiser(SPEC, CFG).eval()
    with torch.no_grad():
        for m in (model, plain):
            for block in m.blocks:
                block.attn.out.weight.zero_()
                if block.ada is not None:  # zero-initialised: the condition is ignored at the start
                    assert not block.ada.weight.any()
                    block.ada.weight.normal_(std=0.2)
    batch = collate(records(), SPEC)
    with torch.no_grad():
        cond = model.condition_embedding(batch.tokens, batch, torch.float32)
        label = batch.tokens[0, 6]
        torch.testing.assert_close(cond[0], model.condition_norm(model.token_emb.weight[label]))
        torch.testing.assert_close(cond[1], torch.zeros(32))
        other = batch.tokens.clone()
        other[0, 6] = label + 1
        dropped = batch.tokens.clone()
        dropped[0, 6] = SPEC.mask_id  # a dropped condition: the unconditional model's embedding
        torch.testing.assert_close(model.condition_embedding(dropped, batch, torch.float32)[0], model.condition_norm(model.token_emb.weight[SPEC.mask_id]))
        for m, follows in ((model, True), (plain, False)):
            a, b = m(batch.tokens, batch, None), m(other, batch, None)
            assert (not torch.allclose(a[0, :6], b[0, :6])) is follows
            torch.testing.assert_close(a[1], b[1])  # another record never sees it
    with pytest.raises(ValueError, match="not supports"):
        Denoiser(SPEC, DenoiserConfig(dim=32, depth=2, heads=2, condition_fields=("tabular/col:nope",)))
