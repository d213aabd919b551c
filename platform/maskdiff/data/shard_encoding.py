"""Raw input items to record payloads, in this process or in worker processes.

:func:`encoded` turns the adapter's raw items into, per input record, either
the reason it was refused or the payloads of its stored records (one tar
member each). With ``workers > 1`` the items are read here and encoded by a
pool of processes in chunks, at most a few chunks in flight, so memory stays
flat however large the input; results come back in input order and each item
goes through the same :func:`encode_item`, so the output bytes do not depend
on the number of workers.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Any, Iterable, Iterator, Union

from maskdiff.adapters import Adapter, Reject, Rejected

from .shard_format import encode_record

CHUNK = 64  # input items per task
IN_FLIGHT = 3  # tasks queued per worker

Encoded = tuple[str, Union[str, list[bytes]]]  # (input record id, refusal reason or record payloads)


def encode_item(adapter: Adapter, item: Any, dtype: Any) -> Encoded:
    """One raw item (``(id, raw)`` or :class:`Rejected`) to its refusal reason or its records' payloads."""
    if isinstance(item, Rejected):
        return item.id, item.reason
    rid, raw = item
    try:
        records = adapter.encode_many(raw)
    except Reject as e:
        return rid, str(e)
    out = []
    for rec in records:
        rec.meta["id"] = rid
        out.append(encode_record(rec, dtype))
    return rid, out


def encoded(adapter: Adapter, items: Iterable[Any], dtype: Any, workers: int = 1) -> Iterator[Encoded]:
    """:func:`encode_item` of every item, in order (see the module docstring)."""
    if workers <= 1:
        for item in items:
            yield encode_item(adapter, item, dtype)
        return
    # Forked before the first item is read, so no reader thread (Arrow's read-ahead) is running yet;
    # spawn where fork is not available (the adapter is pickled to the workers).
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(adapter, dtype))
    try:
        pending: deque[Any] = deque()
        for chunk in _chunks(items, CHUNK):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= IN_FLIGHT * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_worker: dict[str, Any] = {}


def _init_worker(adapter: Adapter, dtype: Any) -> None:
    _worker.update(adapter=adapter, dtype=dtype)


def _encode_chunk(chunk: list[Any]) -> list[Encoded]:
    return [encode_item(_worker["adapter"], item, _worker["dtype"]) for item in chunk]


__all__ = ["CHUNK", "Encoded", "encode_item", "encoded"]
