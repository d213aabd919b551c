"""The held-out split: which records are kept out of training, for evaluation.

A record is held out when a stable hash of its key (its id and text window)
falls below ``data.heldout``, so the split is the same in every run, process,
DataLoader worker and epoch, and in every tool that looks at a model's
held-out data afterwards. :func:`heldout_records` is the one way to take the
held-out records of a shard set; :func:`training_records` gives the rest.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

from maskdiff.core.tokens import Record


def record_key(record: Record) -> str:
    """What the split hashes: the input record's id and, for text, the window within it."""
    return f"{record.meta.get('id', '')}#{record.meta.get('window', 0)}"


def is_heldout(record: Record, fraction: float) -> bool:
    """Whether a record belongs to the held-out split (a stable hash of its key)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(record_key(record).encode(), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction


def heldout_records(records: Iterable[Record], fraction: float) -> Iterator[Record]:
    """The held-out records of ``records`` (e.g. a :class:`~maskdiff.data.shards.ShardSet`), in their order."""
    return (r for r in records if is_heldout(r, fraction))


def training_records(records: Iterable[Record], fraction: float) -> Iterator[Record]:
    """The records of ``records`` that are not held out, in their order."""
    return (r for r in records if not is_heldout(r, fraction))


__all__ = ["heldout_records", "is_heldout", "record_key", "training_records"]
