"""The held-out split: a fixed rule on record keys, and one way to take held-out records that every caller uses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from training_support import TINY, tiny_shard_root

from maskdiff.data.split import heldout_records, is_heldout, record_key, training_records
from maskdiff.core.tokens import Record

KEYS = [(f"row{i}", window) for i in range(30) for window in range(2)]
# the split of KEYS at data.heldout=0.1, as it has been since the first trained models: changing it would
# mix earlier held-out records into the training data of a resumed run and into their evaluation
HELD_OUT_AT_0_1 = ["row1#0", "row2#1", "row4#0", "row5#0", "row5#1", "row7#0", "row7#1", "row9#0", "row10#1", "row14#0", "row17#0"]


def keyed(name: str, window: int | None = None) -> Record:
    return Record([], {"id": name} if window is None else {"id": name, "window": window})


def test_the_split_of_fixed_keys_does_not_change() -> None:
    records = [keyed(name, window) for name, window in KEYS]
    assert [record_key(r) for r in heldout_records(records, 0.1)] == HELD_OUT_AT_0_1
    assert [record_key(r) for r in training_records(records, 0.1)] == [record_key(r) for r in records if record_key(r) not in HELD_OUT_AT_0_1]
    assert record_key(keyed("row1")) == "row1#0" and is_heldout(keyed("row1"), 0.1)  # no window: window 0
    assert not any(is_heldout(r, 0.0) for r in records) and all(is_heldout(r, 0.999999) for r in records)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from maskdiff.config import load_config, to_run_config
    from maskdiff.data.loader import open_sources

    root = tiny_shard_root(tmp_path_factory)
    rc = to_run_config(load_config(TINY, [f"data.shard_root={root}"]))
    sets, spec = open_sources(rc, 0, 1)
    adapters = {key: a for s in sets.values() for key, a in s.adapters.items()}
    bundle = SimpleNamespace(config=rc, spec=spec, adapters=adapters, modalities=list(rc.modalities))  # what the callers read of one
    return SimpleNamespace(rc=rc, sets=sets, spec=spec, bundle=bundle)


def keys_of(records) -> list[str]:
    return [record_key(r) for r in records]


def test_every_caller_takes_the_same_heldout_records(tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from maskdiff.data import loader
    from maskdiff.tasks.evaluation import shard_records
    from maskdiff.tasks.generation import training_and_heldout
    from maskdiff.data.shards import ShardSet

    rc = tiny.rc
    expected = {m: keys_of(heldout_records(ShardSet(tiny.sets[m].dirs), rc.data.heldout)) for m in rc.modalities}
    assert all(expected.values())

    for m in rc.modalities:
        train, held = training_and_heldout(tiny.bundle, m)
        assert keys_of(held) == expected[m]
        assert not set(keys_of(train)) & set(expected[m])

    dirs = [d for m in rc.modalities for d in tiny.sets[m].dirs]
    by_mod, used = shard_records(tiny.bundle, dirs, split="auto")
    assert set(used.values()) == {"heldout"}
    assert {m: keys_of(r) for m, r in by_mod.items()} == expected

    monkeypatch.setattr(loader, "collate_rows", lambda rows, spec: rows)  # the trainer's evaluation batches as records
    batches = loader.heldout_batches(rc, tiny.spec, 0, 1, count=10**6)
    assert {m: keys_of(r for rows in bs for row in rows for r in row) for m, bs in batches.items()} == expected


def test_the_training_stream_holds_no_heldout_record(tiny: SimpleNamespace) -> None:
    from maskdiff.data.loader import open_sources, train_dataset
    from maskdiff.data.shards import ShardSet

    rc = tiny.rc
    sets, spec = open_sources(rc, 0, 1, repeat=True)
    ds = train_dataset(rc, sets, spec, 0)
    ds.collate = lambda rows: rows  # packed: rows of records
    it = iter(ds)
    seen = {record_key(r) for _ in range(40) for row in next(it) for r in row}
    held = {k for m in rc.modalities for k in keys_of(heldout_records(ShardSet(sets[m].dirs), rc.data.heldout))}
    assert seen and not seen & held
