"""The shared token space: contiguous ranges, special ids, persistence, refusal of mismatches."""

import json

import numpy as np
import pytest
import torch

from maskdiff.core.batch import collate, split
from maskdiff.core.tokens import MISSING, Field, Record, Support, VocabMismatchError, VocabSpec

SUPPORTS = [Support("pixels/value", "pixels", 256), Support("pixels/label", "pixels", 10), Support("tabular/col:age", "tabular", 64)]


def test_ranges_are_contiguous_and_specials_follow():
    spec = VocabSpec(SUPPORTS)
    assert [spec.id_range(s.name) for s in SUPPORTS] == [range(0, 256), range(256, 266), range(266, 330)]
    assert (spec.num_clean, spec.mask_id, spec.pad_id, spec.vocab_size) == (330, 330, 331, 332)
    assert spec.modalities == ["pixels", "tabular"]


def test_global_local_round_trip_and_missing():
    spec = VocabSpec(SUPPORTS)
    local = np.array([0, 5, MISSING, 63])
    g = spec.to_global("tabular/col:age", local)
    assert g.tolist() == [266, 271, spec.mask_id, 329]
    assert spec.to_local("tabular/col:age", g).tolist() == local.tolist()
    with pytest.raises(ValueError, match="out of range"):
        spec.to_global("pixels/label", np.array([10]))
    with pytest.raises(ValueError, match="outside its range"):
        spec.to_local("pixels/label", np.array([3]))


def test_save_load_and_refuse_mismatch(tmp_path):
    spec = VocabSpec(SUPPORTS)
    path = tmp_path / "vocab.json"
    spec.save(path)
    assert VocabSpec.load(path, expect=spec) == spec
    other = VocabSpec([SUPPORTS[0], Support("pixels/label", "pixels", 11), SUPPORTS[2]])
    with pytest.raises(VocabMismatchError, match="pixels/label"):
        VocabSpec.load(path, expect=other)
    reordered = VocabSpec([SUPPORTS[1], SUPPORTS[0], SUPPORTS[2]])
    with pytest.raises(VocabMismatchError, match="order"):
        VocabSpec.load(path, expect=reordered)
    tampered = json.loads(path.read_text())
    tampered["mask_id"] = 7
    path.write_text(json.dumps(tampered))
    with pytest.raises(VocabMismatchError, match="mask_id"):
        VocabSpec.load(path)


def test_merge_keeps_ids_of_the_first_spec():
    a = VocabSpec(SUPPORTS[:2])
    b = VocabSpec([SUPPORTS[2], SUPPORTS[1]])
    m = a.merged(b)
    assert [s.name for s in m.supports] == [s.name for s in SUPPORTS]
    with pytest.raises(VocabMismatchError):
        a.merged(VocabSpec([Support("pixels/label", "pixels", 12)]))


def test_bad_supports():
    with pytest.raises(ValueError, match="modality"):
        Support("x", "audio", 4)
    with pytest.raises(ValueError, match="duplicate"):
        VocabSpec([SUPPORTS[0], SUPPORTS[0]])


def test_collate_pads_and_split_inverts():
    spec = VocabSpec(SUPPORTS)
    r1 = Record([Field("image", "pixels/value", np.arange(12).reshape(2, 2, 3)), Field("label", "pixels/label", [7])])
    r2 = Record([Field("col:age", "tabular/col:age", [MISSING])])
    batch = collate([r1, r2], spec)
    assert batch.shape == (2, 13)
    assert batch.pad[1].tolist() == [False] + [True] * 12
    assert batch.valid.sum(-1).tolist() == [13, 0]
    assert batch.tokens[1, 0] == spec.mask_id and batch.tokens[0, 12] == 256 + 7
    back = split(batch, [r1, r2], spec)
    assert np.array_equal(back[0]["image"].tokens, r1["image"].tokens) and back[0]["image"].shape == (2, 2, 3)
    assert back[1]["col:age"].tokens.tolist() == [MISSING]
    with pytest.raises(ValueError, match="more than the length"):
        collate([r1], spec, length=5)
    assert torch.equal(batch.repeat(2).tokens[2:], batch.tokens)


def test_condition_fields_are_given_unless_dropped_and_never_in_the_loss():
    from maskdiff.core.batch import drop_fields

    spec = VocabSpec(SUPPORTS)
    recs = [Record([Field("image", "pixels/value", np.arange(4).reshape(2, 2, 1)), Field("label", "pixels/label", [i % 10])]) for i in range(400)]
    batch = collate(recs, spec)
    label = spec.support_id("pixels/label")
    out = drop_fields(batch, [label], 0.25, torch.Generator().manual_seed(0))
    dropped = out.tokens[:, 4] == spec.mask_id
    assert 60 < int(dropped.sum()) < 140  # about a quarter of 400
    assert torch.equal(out.tokens[:, :4], batch.tokens[:, :4])  # other fields untouched
    assert torch.equal(out.tokens[~dropped, 4], batch.tokens[~dropped, 4])  # kept labels stay visible
    assert not out.valid[:, 4].any() and out.valid[:, :4].all()  # given or dropped, a condition is never modelled
    kept = drop_fields(batch, [label], 0.0)
    assert torch.equal(kept.tokens, batch.tokens) and not kept.valid[:, 4].any()
    assert drop_fields(batch, [], 0.5) is batch
