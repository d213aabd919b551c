"""Packing: several records per row give the same per-record ELBO as one record per row.

The same records, times and masks go through an unpacked batch (one record
per row) and a packed one (several per row, segment ids); per-record nats,
losses and gradients must agree for time-free and time-conditioned models,
MD4 and GenMD4 (with its RLOO term), and no record may see another.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskdiff.core.batch import Batch, collate, collate_rows, drop_fields
from maskdiff.core.elbo import elbo, elbo_of_masks, position_nats
from maskdiff.core.modalities import modality_id
from maskdiff.core.model import Denoiser, DenoiserConfig
from maskdiff.core.packing import NEW_ROW_FILL, is_full, pack_indices, pack_pool
from maskdiff.core.schedules import LearnedPoly, ModalitySchedules, make_schedule
from maskdiff.core.tokens import Field, Record, Support, VocabSpec

TEXT, TABULAR = modality_id("text"), modality_id("tabular")
SPEC = VocabSpec([Support("text/bpe", "text", 20), Support("tabular/col:x", "tabular", 5), Support("tabular/col:y", "tabular", 3)])


def make_records() -> list[Record]:
    rng = np.random.default_rng(0)

    def text(n: int) -> Field:
        return Field("text", "text/bpe", rng.integers(0, 20, n))

    def row() -> list[Field]:
        return [Field("col:x", "tabular/col:x", [rng.integers(0, 5)]), Field("col:y", "tabular/col:y", [rng.integers(0, 3)])]

    return [Record([text(9)]), Record(row()), Record([text(4), *row()]), Record([text(12)]), Record(row()), Record([text(3)])]


LAYOUT = [[0, 1, 2], [3], [4, 5]]  # rows of record indices, in record order


@pytest.fixture(scope="module")
def batches() -> tuple[Batch, Batch]:
    recs = make_records()
    packed = collate_rows([[recs[i] for i in row] for row in LAYOUT], SPEC)
    return collate(recs, SPEC), packed


def record_positions_of(batch: Batch, r: int) -> torch.Tensor:
    """(B, L): the positions of record r (not padding)."""
    return (batch.record_ids() == r) & ~batch.pad


def to_layout(values: torch.Tensor, src: Batch, dst: Batch) -> torch.Tensor:
    """Move per-position values (B, L) of ``src`` to the same records' positions in ``dst``."""
    out = torch.zeros(dst.shape, dtype=values.dtype)
    for r in range(src.num_records):
        out[record_positions_of(dst, r)] = values[record_positions_of(src, r)]
    return out


def per_record(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    return torch.stack([values[record_positions_of(batch, r)].sum() for r in range(batch.num_records)])


def denoiser(time_conditioning: bool, condition_fields: tuple[str, ...] = ()) -> Denoiser:
    torch.manual_seed(0)
    cfg = DenoiserConfig(dim=32, depth=2, heads=2, time_conditioning=time_conditioning, condition_fields=condition_fields)
    model = Denoiser(SPEC, cfg).eval()
    if time_conditioning or condition_fields:  # adaLN starts at zero (t and conditions ignored): make them matter
        with torch.no_grad():
            for block in model.blocks:
                block.ada.weight.normal_(std=0.2)
    return model


def schedules(genmd4: bool) -> ModalitySchedules:
    if not genmd4:
        return ModalitySchedules({TEXT: make_schedule("cosine"), TABULAR: make_schedule("poly2")})
    text = LearnedPoly(SPEC.num_clean)
    with torch.no_grad():
        text.w_raw.copy_(torch.randn(SPEC.num_clean, generator=torch.Generator().manual_seed(1)))
    return ModalitySchedules({TEXT: text, TABULAR: make_schedule("linear")})


TIMES = torch.tensor([0.15, 0.9, 0.4, 0.65, 0.3, 0.8])


def test_layout(batches):
    unpacked, packed = batches
    assert unpacked.segment_ids is None and packed.packed and packed.shape[0] == 3
    assert packed.num_records == unpacked.num_records == 6
    assert packed.segment_ids[2, -1] == 5 and packed.pad[2, -1]  # trailing padding belongs to the row's last record
    for r in range(6):  # each record keeps its tokens, and its positions restart at 0
        torch.testing.assert_close(packed.tokens[record_positions_of(packed, r)], unpacked.tokens[record_positions_of(unpacked, r)])
        n = int(record_positions_of(packed, r).sum())
        assert packed.record_positions[record_positions_of(packed, r)].tolist() == list(range(n))


@pytest.mark.parametrize("time_conditioning, condition_fields", [(False, ()), (True, ()), (False, ("tabular/col:y",)), (True, ("tabular/col:y",))])
def test_outputs_per_record_do_not_depend_on_packing(batches, time_conditioning, condition_fields):
    unpacked, packed = batches
    model = denoiser(time_conditioning, condition_fields)
    t = TIMES if time_conditioning else None
    with torch.no_grad():
        a, b = model(unpacked.tokens, unpacked, t), model(packed.tokens, packed, t)
    for r in range(6):
        torch.testing.assert_close(b[record_positions_of(packed, r)], a[record_positions_of(unpacked, r)], rtol=1e-5, atol=1e-5)


def test_attention_never_crosses_records(batches):
    _, packed = batches
    model = denoiser(True)
    x = packed.tokens.clone()
    y = x.clone()
    y[record_positions_of(packed, 1)] = SPEC.mask_id  # change record 1 only (row 0, between records 0 and 2)
    with torch.no_grad():
        a, b = model(x, packed, TIMES), model(y, packed, TIMES)
    others = ~record_positions_of(packed, 1) & ~packed.pad
    torch.testing.assert_close(a[others], b[others], rtol=0, atol=0)
    assert not torch.allclose(a[record_positions_of(packed, 1)], b[record_positions_of(packed, 1)])


@pytest.mark.parametrize("genmd4,time_conditioning,steps", [(False, False, None), (False, True, None), (True, True, None), (True, True, 10)])
def test_per_record_nats_do_not_depend_on_packing(batches, genmd4, time_conditioning, steps):
    unpacked, packed = batches
    model, sched = denoiser(time_conditioning), schedules(genmd4)
    masked = torch.rand(unpacked.shape, generator=torch.Generator().manual_seed(3)) < 0.6
    with torch.no_grad():
        a = position_nats(model, unpacked, sched, TIMES, masked, steps)
        b = position_nats(model, packed, sched, TIMES, to_layout(masked, unpacked, packed), steps)
    assert float(per_record(a, unpacked).min()) > 0
    torch.testing.assert_close(per_record(b, packed), per_record(a, unpacked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("genmd4", [False, True])
def test_elbo_loss_and_gradients_do_not_depend_on_packing(batches, genmd4):
    """Two draws per record at its own t: nelbo per record, the loss and every gradient (the RLOO term in w
    for GenMD4, whose baseline is the record's other draw) agree between the layouts."""
    unpacked, packed = batches
    model, sched = denoiser(True), schedules(genmd4)
    draws = 2
    masks = torch.rand((draws * unpacked.shape[0], unpacked.shape[1]), generator=torch.Generator().manual_seed(5)) < 0.5
    packed_masks = torch.cat([to_layout(m, unpacked, packed) for m in masks.view(draws, *unpacked.shape)])
    results, grads = [], []
    for batch, m in ((unpacked, masks), (packed, packed_masks)):
        model.zero_grad()
        sched.zero_grad()
        res = elbo_of_masks(model, batch, sched, TIMES, m, draws=draws)
        res.loss.backward()
        results.append(res)
        grads.append([p.grad.clone() for p in [*model.parameters(), *sched.parameters()] if p.grad is not None])
    (a, b), (ga, gb) = results, grads
    torch.testing.assert_close(b.nelbo, a.nelbo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    assert len(ga) == len(gb) and (not genmd4 or float(sched.for_modality(TEXT).w_raw.grad.abs().sum()) > 0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


def test_elbo_draws_one_time_per_record(batches):
    _, packed = batches
    res = elbo(denoiser(True), packed, schedules(True), draws=2, generator=torch.Generator().manual_seed(0))
    assert res.nelbo.shape == (6,) and res.position_nats.shape == packed.shape
    torch.testing.assert_close(per_record(res.position_nats, packed), res.nelbo)


def test_dropped_conditions_are_drawn_per_record():
    recs = [Record([Field("text", "text/bpe", [1, 2]), Field("col:x", "tabular/col:x", [3])]) for _ in range(2)]
    packed = collate_rows([recs], SPEC)  # both records in one row
    cond = packed.support_ids == SPEC.support_id("tabular/col:x")
    outcomes = set()
    for seed in range(40):
        dropped = drop_fields(packed, [SPEC.support_id("tabular/col:x")], 0.5, torch.Generator().manual_seed(seed))
        outcomes.add(tuple((dropped.tokens[cond] == SPEC.mask_id).tolist()))
        assert not dropped.valid[cond].any()
    assert outcomes == {(False, False), (False, True), (True, False), (True, True)}


# --- the packing itself ------------------------------------------------------------------------------


def test_best_fit_packing_keeps_the_budget_and_places_every_record_once():
    rng = np.random.default_rng(0)
    lengths = [197] * 30 + [128] * 40 + list(rng.integers(5, 130, 60)) + [15] * 300
    for tokens, records in ((3072, None), (1000, 7), (100, None)):
        batches = pack_indices(lengths, tokens, records)
        assert any(len(row) > 1 for b in batches for row in b)
        assert sorted(i for b in batches for row in b for i in row) == list(range(len(lengths)))
        used = total = 0
        for rows in batches:
            width = max(lengths[i] for row in rows for i in row)
            assert all(sum(lengths[i] for i in row) <= width for row in rows)
            assert len(rows) * width <= tokens or len(rows) == 1  # a record over the budget is a row of its own
            assert records is None or sum(map(len, rows)) <= records
            assert all(lengths[row[0]] >= NEW_ROW_FILL * width for row in rows)  # shorter records only fill gaps
            used += sum(lengths[i] for row in rows for i in row)
            total += len(rows) * width
        if tokens == 3072:
            assert 1 - used / total < 0.03  # padding


def test_a_pool_asks_for_more_records_while_more_than_one_batch_is_not_full():
    items = [np.zeros(n) for n in [100] * 5 + [40] * 3]  # rows of 100: 2 in a budget of 200; the 40s cannot start one
    assert pack_pool(items, 200) is None  # three batches of 100s, then one of 40s: two are not full
    batches = pack_pool(items, 200, final=True)
    assert batches is not None and sorted(len(x) for b in batches for row in b for x in row) == sorted(len(x) for x in items)
    more = items + [np.zeros(100)] + [np.zeros(40)] * 2
    batches = pack_pool(more, 200)
    assert batches is not None and sum(not is_full(b, 200) for b in batches) <= 1


def test_loader_packs_within_the_budget_and_reads_each_record_once_per_epoch(tmp_path_factory):
    from training_support import TINY, tiny_shard_root

    from maskdiff.config import load_config, to_run_config
    from maskdiff.data.loader import heldout_batches, open_sources, train_dataset
    from maskdiff.data.shards import ShardSet
    from maskdiff.data.split import training_records

    shards = tiny_shard_root(tmp_path_factory)
    rc = to_run_config(load_config(TINY, [f"data.shard_root={shards}", "data.batch_tokens=120", "data.bucket=3", "data.pack=true"]))
    sets, spec = open_sources(rc, 0, 1, shuffle_buffer=rc.data.shuffle_buffer, seed=rc.seed, repeat=True)
    ds = train_dataset(rc, sets, spec, 0)
    collate_packed = ds.collate
    ds.collate = lambda rows: rows  # look at the rows themselves
    train = {m: list(training_records(ShardSet(sets[m].dirs), rc.data.heldout)) for m in ("text", "tabular")}
    seen: dict[str, list[str]] = {"text": [], "tabular": []}
    slack = 40  # the last pool of an epoch mixes with the next
    it, pad, positions = iter(ds), 0, 0
    while len(seen["tabular"]) < len(train["tabular"]) + slack:
        rows = next(it)
        width = max(sum(len(r) for r in row) for row in rows)
        assert len(rows) * width <= 120
        batch = collate_packed(rows)
        pad, positions = pad + int(batch.pad.sum()), positions + batch.pad.numel()
        for row in rows:
            for r in row:
                seen[r.meta["modality"]].append(r.meta["id"] + "#" + str(r.meta.get("window", 0)))
    assert pad / positions < 0.05
    head = seen["tabular"][: len(train["tabular"]) - slack]
    assert len(set(head)) == len(head)  # no table row twice within an epoch
    assert set(seen["tabular"]) >= {r.meta["id"] + "#0" for r in train["tabular"]}
    held = heldout_batches(rc, spec, 0, 1, 2)
    assert all(b.shape[0] * b.shape[1] <= 120 for bs in held.values() for b in bs)


def test_sampling_and_splitting_refuse_a_packed_batch(batches):
    from maskdiff.core.batch import split
    from maskdiff.core.sampler import sample

    _, packed = batches
    with pytest.raises(ValueError, match="packed"):
        sample(denoiser(False), packed, schedules(False), steps=2)
    with pytest.raises(ValueError, match="packed"):
        split(packed, make_records(), SPEC)


def test_a_packed_stream_resumes_at_a_saved_position(tmp_path_factory):
    """Starting at a saved position gives exactly the packed batches that followed it (also with workers)."""
    import json

    from training_support import TINY, tiny_shard_root

    from maskdiff.config import load_config, to_run_config
    from maskdiff.data.loader import batches, open_sources, train_dataset

    shards = tiny_shard_root(tmp_path_factory)
    rc = to_run_config(load_config(TINY, [f"data.shard_root={shards}", "data.pack=true", "data.bucket=2"]))
    sets, spec = open_sources(rc, 0, 1, shuffle_buffer=rc.data.shuffle_buffer, seed=rc.seed, repeat=True)
    for workers in (0, 2):
        full = batches(train_dataset(rc, sets, spec, 0), workers)
        head = [next(full) for _ in range(7)]
        position = json.loads(json.dumps(full.position()))  # as saved in a checkpoint
        head += [next(full) for _ in range(8)]
        tail = batches(train_dataset(rc, sets, spec, 0, start=position), workers)
        for a in head[7:]:
            b = next(tail)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.support_ids, b.support_ids)
