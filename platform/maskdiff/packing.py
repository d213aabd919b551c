"""Packing: several records per row of a micro-batch, so short records do not pay for padding.

Without packing a micro-batch is records x its longest record, and every
shorter record is padded to that length. With packing (``data.pack``) a
micro-batch is a list of *rows*, each holding one or more records laid end to
end (:func:`maskdiff.batch.collate_rows`):

* rows are as long as the batch's longest record, and a batch holds
  ``batch_tokens // row length`` rows, so it keeps the token budget and the
  attention span of the unpacked batch (attention cost grows with the row
  length, so rows are not made longer than the longest record);
* records are placed best-fit decreasing: the pool (``bucket`` micro-batches'
  worth of records) is sorted longest first; each record goes into the row
  whose free room fits it most tightly, or opens a new row while the batch
  has fewer than its rows; when the next longest record fits nowhere, the
  batch's gaps are topped up with the shortest records left, then it closes;
* every record of the pool lands in exactly one row of one batch, so the
  loader still reads each record once per epoch;
* a pool's last batch, made of what was left, is usually far from full (a
  few table rows): :class:`Packer` holds its records back and packs them
  first with the next pool, so micro-batches stay close to the budget (a
  held record is delayed by one pool, not dropped).

The model makes a packed row equivalent to separate rows (block-diagonal
attention, positions restarting per record) and the ELBO draws time and mask
per record, so per-record nats do not depend on the packing.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Generic, Sequence, Sized, TypeVar

T = TypeVar("T")
S = TypeVar("S", bound=Sized)


def pack_indices(lengths: Sequence[int], tokens: int, records: int | None = None) -> list[list[list[int]]]:
    """Micro-batches of rows of record indices (best-fit decreasing, see the module docstring).

    Each batch has at most ``tokens // longest`` rows (at least one) of
    ``longest`` tokens, ``longest`` being its first (longest) record, and
    at most ``records`` records when that limit is set.
    """
    if tokens < 1 or (records is not None and records < 1):
        raise ValueError(f"packing needs a token budget >= 1 and a record limit >= 1 or None, got {tokens}, {records}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    head, tail = 0, len(order)  # unplaced: order[head:tail], longest first
    batches: list[list[list[int]]] = []
    while head < tail:
        width = lengths[order[head]]
        rows: list[list[int]] = []
        rooms: list[tuple[int, int]] = []  # (free tokens, row), sorted; full rows are dropped
        max_rows = max(1, tokens // width)
        placed = [0]

        def place(i: int) -> bool:
            n = lengths[i]
            k = bisect_left(rooms, (n, -1))  # the tightest room that fits
            if k < len(rooms):
                room, r = rooms.pop(k)
            elif len(rows) < max_rows:
                room, r = width, len(rows)
                rows.append([])
            else:
                return False
            rows[r].append(i)
            placed[0] += 1
            if room > n:
                insort(rooms, (room - n, r))
            return True

        def open_slots() -> bool:
            return records is None or placed[0] < records

        while head < tail and open_slots() and place(order[head]):
            head += 1
        while head < tail and open_slots() and place(order[tail - 1]):  # top up the gaps with the shortest
            tail -= 1
        batches.append(rows)
    return batches


def pack(items: Sequence[T], lengths: Sequence[int], tokens: int, records: int | None = None) -> list[list[list[T]]]:
    """:func:`pack_indices` applied to ``items`` (records, with their token ``lengths``)."""
    return [[[items[i] for i in row] for row in batch] for batch in pack_indices(lengths, tokens, records)]


class Packer(Generic[S]):
    """Packs successive pools of records, holding back each pool's last batch while it is not full.

    A batch is full when it has all its rows (``tokens // longest``) or its
    ``records``; only the last batch of a pool can fall short (the others
    closed because the next record fitted nowhere).
    """

    def __init__(self, tokens: int | None, records: int | None = None):
        if tokens is None:
            raise ValueError("packing needs a token budget (data.batch_tokens)")
        self.tokens, self.records = tokens, records
        self.held: list[S] = []

    def __call__(self, items: Sequence[S]) -> list[list[list[S]]]:
        """Micro-batches of rows of the held items and ``items`` (sized: ``len`` is the token count)."""
        pool = [*self.held, *items]
        batches = pack(pool, [len(x) for x in pool], self.tokens, self.records)
        self.held = []
        if len(batches) > 1 and not self._full(batches[-1]):
            self.held = [x for row in batches.pop() for x in row]
        return batches

    def _full(self, rows: list[list[S]]) -> bool:
        longest = max(len(x) for row in rows for x in row)
        return len(rows) >= max(1, self.tokens // longest) or (self.records is not None and sum(map(len, rows)) >= self.records)


__all__ = ["Packer", "pack", "pack_indices"]
