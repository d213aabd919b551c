"""Packing: several records per row of a micro-batch, so short records do not pay for padding.

Without packing a micro-batch is records x its longest record, and every
shorter record is padded to that length. With packing (``data.pack``) a
micro-batch is a list of *rows*, each holding one or more records laid end to
end (:func:`maskdiff.core.batch.collate_rows`):

* rows are as long as the batch's longest record, and a batch holds
  ``batch_tokens // row length`` rows, so it keeps the token budget and the
  attention span of the unpacked batch (attention costs grow with the row
  length, so rows are not made longer than the longest record);
* records are placed best-fit decreasing: the pool (``bucket`` micro-batches'
  worth of records) is sorted longest first; each record goes into the row
  whose free room fits it most tightly, or starts a new row if the batch has
  rows left and the record fills at least :data:`NEW_ROW_FILL` of one (a far
  shorter record would pay the long rows' attention span and, in a
  time-conditioned model, per-token modulation); when the next record fits
  nowhere, the batch's gaps are topped up with the shortest records left,
  then it closes;
* every record of the pool lands in exactly one row of one batch;
* a batch that is not full (the pool's last few images, a handful of short
  proteins) would be a small step: while more than one batch of the pool is
  not full, the loader draws another micro-batch's worth of records into the
  pool and packs it again (:func:`pack_pool`, at most :data:`EXTRA_BUDGETS`
  times; then the unfilled batches' records are packed together), so
  micro-batches are full and nearly free of padding. The pool
  stays a function of the stream's position at its start, so a resumed run
  draws it again exactly (:class:`maskdiff.data.loader.BatchStream`).

The model makes a packed row equivalent to separate rows (block-diagonal
attention, positions restarting per record) and the ELBO draws time and mask
per record, so per-record nats do not depend on the packing.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Sequence, Sized, TypeVar

T = TypeVar("T")
S = TypeVar("S", bound=Sized)

NEW_ROW_FILL = 0.75  # a record starts a new row only if it fills this share of it (see pack_indices)
EXTRA_BUDGETS = 8  # micro-batch budgets a pool may grow by while more than one batch is not full (see pack_pool)


def pack_indices(lengths: Sequence[int], tokens: int, records: int | None = None, new_row_fill: float = NEW_ROW_FILL) -> list[list[list[int]]]:
    """Micro-batches of rows of record indices (best-fit decreasing, see the module docstring).

    Each batch has at most ``tokens // longest`` rows (at least one) of
    ``longest`` tokens, ``longest`` being its first (longest) record, and
    at most ``records`` records when that limit is set. A record starts a
    new row only if it fills at least ``new_row_fill`` of it; a shorter one
    only fills a gap, else it waits for a batch of narrower rows.
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
            elif len(rows) < max_rows and n >= new_row_fill * width:
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


def pack(items: Sequence[T], lengths: Sequence[int], tokens: int, records: int | None = None,
         new_row_fill: float = NEW_ROW_FILL) -> list[list[list[T]]]:
    """:func:`pack_indices` applied to ``items`` (records, with their token ``lengths``)."""
    return [[[items[i] for i in row] for row in batch] for batch in pack_indices(lengths, tokens, records, new_row_fill)]


def is_full(rows: Sequence[Sequence[Sized]], tokens: int, records: int | None = None) -> bool:
    """Whether a packed batch has all its rows (``tokens // longest``) or all its ``records``."""
    longest = max(len(x) for row in rows for x in row)
    return len(rows) >= max(1, tokens // longest) or (records is not None and sum(map(len, rows)) >= records)


def pack_pool(items: Sequence[S], tokens: int, records: int | None = None, final: bool = False) -> list[list[list[S]]] | None:
    """Micro-batches of a pool of sized items (``len`` = tokens), or None while more than one batch is not full
    (:func:`is_full`) and the pool is not ``final``: the caller then draws more records into the pool. In a
    final pool the records of the unfilled batches are packed together once more, any record starting a row."""
    batches = pack(items, [len(x) for x in items], tokens, records)
    unfilled = [rows for rows in batches if not is_full(rows, tokens, records)]
    if len(unfilled) <= 1:
        return batches
    if not final:
        return None
    rest = [x for rows in unfilled for row in rows for x in row]
    return [rows for rows in batches if is_full(rows, tokens, records)] + pack(rest, [len(x) for x in rest], tokens, records, 0.0)


__all__ = ["EXTRA_BUDGETS", "NEW_ROW_FILL", "is_full", "pack", "pack_indices", "pack_pool"]
