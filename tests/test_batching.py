"""Batches measured in tokens: every micro-batch within its budget, every record once per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from training_support import TINY, tiny_shard_root

from maskdiff.data.loader import BatchLimits
from maskdiff.core.tokens import Field, Record


def records(lengths):
    return [Record([Field("text", "text/bpe", np.zeros(n, dtype=np.int64))], {"id": str(i)}) for i, n in enumerate(lengths)]


def test_split_keeps_order_and_budget():
    recs = records(np.random.default_rng(0).integers(1, 60, 500))
    for limits in (BatchLimits(tokens=128), BatchLimits(tokens=128, records=5), BatchLimits(tokens=None, records=7)):
        chunks = limits.split(recs)
        assert [r.meta["id"] for c in chunks for r in c] == [r.meta["id"] for r in recs]  # each record once, in order
        for c in chunks:
            padded = len(c) * max(len(r) for r in c)
            assert limits.tokens is None or padded <= limits.tokens
            assert limits.records is None or len(c) <= limits.records
        nxt = [(c, n) for c, n in zip(chunks, chunks[1:])]
        if limits.tokens is not None and limits.records is None:  # a batch ends only when the next record would not fit
            assert all((len(c) + 1) * max(len(r) for r in c + [n[0]]) > limits.tokens for c, n in nxt)
    (big,) = BatchLimits(tokens=10).split(records([50]))
    assert len(big) == 1  # a record over the budget is a batch of its own
    with pytest.raises(ValueError):
        BatchLimits(tokens=None, records=None)


def test_mixed_batches_keep_the_budget_and_read_each_record_once_per_epoch(tmp_path_factory):
    from maskdiff.config import load_config, to_run_config
    from maskdiff.data.loader import open_sources, train_dataset
    from maskdiff.data.shards import ShardSet
    from maskdiff.data.split import training_records

    shards = tiny_shard_root(tmp_path_factory)
    rc = to_run_config(load_config(TINY, [f"data.shard_root={shards}", "data.sources.text.weight=0", "data.batch_tokens=100",
                                          "data.bucket=3", "data.pack=false"]))
    sets, spec = open_sources(rc, 0, 1, shuffle_buffer=rc.data.shuffle_buffer, seed=rc.seed, repeat=True)
    ds = train_dataset(rc, sets, spec, 0)
    ds.collate = lambda recs: recs  # look at the records themselves
    train = list(training_records(ShardSet(sets["tabular"].dirs), rc.data.heldout))
    seen, it = [], iter(ds)
    slack = 24  # records of the last bucket of an epoch may be reordered with the next epoch's first
    while len(seen) < len(train) + slack:
        batch = next(it)
        assert len(batch) * max(len(r) for r in batch) <= 100
        seen += [r.meta["id"] for r in batch]
    head = seen[: len(train) - slack]
    assert len(set(head)) == len(head)  # no row twice within an epoch
    assert set(seen) >= {r.meta["id"] for r in train}  # every training row within the epoch
