"""Training data: shard directories of several modalities mixed into padded batches.

* :func:`ensure_shards` builds the configured shard directories that do not
  exist yet from their raw inputs (``data.build``), through
  :func:`maskdiff.data.shards.write_shards` like ``tools/shard.py``, each named after
  its directory: a table's columns and a FASTA file's header fields are named
  under it (``tabular/adult/col:sex``), so several tables of one modality
  train together even when they share column names.
* :func:`open_sources` opens one :class:`~maskdiff.data.shards.ShardSet` per
  modality and merges their vocabularies into the run's spec (modalities in
  canonical order, so the layout does not depend on the order of the config).
* :class:`MixedBatches` draws each record's modality by the mixing weights,
  streams records split over ranks and DataLoader workers (each record once
  per epoch of its modality; every modality cycles through its own epochs),
  sorts ``bucket`` micro-batches' worth of records by length to cut padding,
  cuts them into micro-batches by a token budget (:class:`BatchLimits`) and
  collates them into right-padded :class:`~maskdiff.core.batch.Batch` objects
  (the denoiser's attention ignores padding keys), so records of different
  lengths and modalities share a batch: many table rows, few images. With
  ``data.pack`` the sorted records are packed several to a row instead
  (:mod:`maskdiff.core.packing`), for training and held-out batches alike.
* Held-out records (:mod:`maskdiff.data.split`) never reach the training stream;
  :func:`heldout_batches` cuts a fixed set of them into evaluation batches.
* The stream is a deterministic function of (seed, rank, worker count) and
  its position is plain data (:meth:`BatchStream.position`: per worker stream,
  the mixing RNG state, each modality's shard / window / record position and the
  micro-batches given out of the current bucket), so a resumed run seeks to it:
  it reads at most one shard head and one bucket, however long the run was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from maskdiff.core.batch import Batch, collate_rows
from maskdiff.config import ConfigError, RunConfig
from maskdiff.adapters import InputError

from maskdiff.core.packing import EXTRA_BUDGETS, pack, pack_pool
from .shards import MANIFEST, ShardError, ShardSet, load_manifest, write_shards
from maskdiff.core import modalities
from .split import heldout_records, training_records
from maskdiff.core.tokens import Record, VocabMismatchError, VocabSpec


def ensure_shards(rc: RunConfig, log: Callable[[str], None] = print) -> list[Path]:
    """Build every configured shard directory that has no manifest yet; return the built ones."""
    built = []
    for mod in rc.modalities:
        for name in rc.data.sources[mod].dirs:
            d = rc.data.shard_source(name)
            if not isinstance(d, Path) or (d / MANIFEST).is_file():  # a URL is read as it is, never built
                continue
            recipe = rc.data.build.get(name)
            if recipe is None:
                raise ConfigError(f"config key 'data.sources.{mod}.dirs': shard directory {d} does not exist and data.build has no recipe for {name!r}")
            if recipe.modality != mod:
                raise ConfigError(f"config key 'data.build.{name}.modality': builds {recipe.modality} shards, but {name!r} is listed under data.sources.{mod}")
            log(f"building {mod} shards in {d} from {', '.join(recipe.inputs)} (first use)")
            try:
                write_shards(mod, list(recipe.inputs), d, progress=False, **{"name": d.name, **recipe.options})
            except (InputError, ValueError, TypeError) as e:
                raise ConfigError(f"config key 'data.build.{name}': {e}") from None
            built.append(d)
    return built


def open_sources(rc: RunConfig, rank: int, world_size: int, **kw) -> tuple[dict[str, ShardSet], VocabSpec]:
    """One ShardSet per modality with a positive weight, and the merged vocabulary spec."""
    sets: dict[str, ShardSet] = {}
    for mod in rc.modalities:
        key = f"data.sources.{mod}.dirs"
        dirs = [rc.data.shard_source(name) for name in rc.data.sources[mod].dirs]
        for d in dirs:
            try:
                found = load_manifest(d)["modality"]
            except ShardError as e:
                raise ConfigError(f"config key '{key}': {e}") from None
            if found != mod:
                raise ConfigError(f"config key '{key}': {d} holds {found} shards, not {mod}")
        try:
            sets[mod] = ShardSet(dirs, rank=rank, world_size=world_size, bad_shards=rc.data.bad_shards, **kw)
        except (ShardError, VocabMismatchError) as e:
            raise ConfigError(f"config key '{key}': {e}") from None
    spec: VocabSpec | None = None
    for mod in modalities.names():
        if mod in sets:
            spec = sets[mod].spec if spec is None else spec.merged(sets[mod].spec)
    assert spec is not None
    return sets, spec


@dataclass(frozen=True)
class BatchLimits:
    """A micro-batch grows until its padded size (records x longest) would pass ``tokens``
    or it holds ``records`` records; either limit may be None (off). A record longer than
    ``tokens`` makes a batch of its own."""

    tokens: int | None = 4096
    records: int | None = None

    def __post_init__(self) -> None:
        if self.tokens is None and self.records is None:
            raise ValueError("batch limits: set a token budget, a record count, or both")

    @classmethod
    def of(cls, rc: RunConfig) -> BatchLimits:
        return cls(rc.data.batch_tokens, rc.data.batch_size)

    def full(self, count: int, tokens: int, buckets: int = 1) -> bool:
        """Whether ``count`` records of ``tokens`` tokens in all fill ``buckets`` micro-batches."""
        return ((self.records is not None and count >= self.records * buckets)
                or (self.tokens is not None and tokens >= self.tokens * buckets))

    def split(self, records: Sequence[Record]) -> list[list[Record]]:
        """Consecutive runs of ``records`` (in order), each within the limits."""
        chunks: list[list[Record]] = []
        chunk: list[Record] = []
        longest = 0
        for rec in records:
            n = len(rec)
            grown = (len(chunk) + 1) * max(longest, n)
            if chunk and ((self.records is not None and len(chunk) >= self.records) or (self.tokens is not None and grown > self.tokens)):
                chunks.append(chunk)
                chunk, longest = [], 0
            chunk.append(rec)
            longest = max(longest, n)
        if chunk:
            chunks.append(chunk)
        return chunks

    def pack(self, records: Sequence[Record]) -> list[list[list[Record]]]:
        """Micro-batches of rows, several records to a row, each batch within the limits (:mod:`maskdiff.core.packing`)."""
        if self.tokens is None:
            raise ValueError("packing needs a token budget (data.batch_tokens)")
        return pack(records, [len(r) for r in records], self.tokens, self.records)


class MixedBatches(IterableDataset):
    """Endless padded micro-batches of records mixed over modalities (see the module docstring).

    ``start``: a data position saved by :meth:`BatchStream.position` to continue from (None: the beginning).
    """

    def __init__(self, sets: Mapping[str, ShardSet], weights: Mapping[str, float], spec: VocabSpec, *, limits: BatchLimits,
                 bucket: int = 1, max_len: int | None = None, heldout: float = 0.0, seed: int = 0, rank: int = 0,
                 start: dict[str, Any] | None = None, pack: bool = False):
        super().__init__()
        self.mods = [m for m in modalities.names() if m in sets and weights.get(m, 0) > 0]
        if not self.mods:
            raise ValueError("no modality with a positive mixing weight")
        total = sum(weights[m] for m in self.mods)
        self.sets, self.probs = sets, np.array([weights[m] / total for m in self.mods])
        self.spec, self.limits, self.bucket, self.max_len = spec, limits, bucket, max_len
        self.heldout, self.seed, self.rank, self.start = heldout, seed, rank, start
        self.annotated = False  # set by BatchStream: yield (batch, position, skipped records) triples
        self.pack = pack
        if not all(sets[m].repeat for m in self.mods):
            raise ValueError("MixedBatches needs endless sources (ShardSet(..., repeat=True))")

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        k = (wid + (self.start["next"] if self.start else 0)) % nw  # the stream this worker continues (see BatchStream)
        state = self.start["streams"][k] if self.start else None
        for batch, position, skipped in self._stream(k, nw, state):
            yield (batch, position, skipped) if self.annotated else batch

    def _stream(self, k: int, nw: int, state: dict[str, Any] | None) -> Iterator[tuple[Batch, dict[str, Any], int]]:
        """Stream ``k`` of ``nw`` of this rank, each batch with the position after it and the records of bad
        shards this stream has skipped so far (``data.bad_shards=skip``).

        The position is the state at the start of the current bucket (mixing RNG, records and tokens seen
        per modality, each modality's :class:`~maskdiff.data.shards.ShardStream` position) and the number of
        the bucket's micro-batches already given out: resuming draws that one bucket again and skips them.
        """
        rng = np.random.default_rng([self.seed, self.rank, k, nw])
        seen = {m: [0, 0] for m in self.mods}  # records and tokens drawn per modality
        starts: dict[str, Any] = {m: None for m in self.mods}
        skip = 0
        if state is not None:
            rng.bit_generator.state = state["rng"]
            seen, starts, skip = state["seen"], state["streams"], state["yielded"]
        streams = {}
        for m in self.mods:
            rank, world = self.sets[m].ranks()
            streams[m] = self.sets[m].stream(rank * nw + k, world * nw, starts[m])
        records_of = {m: training_records(streams[m], self.heldout) for m in self.mods}

        def skipped() -> int:  # bad-shard records this stream's readers passed over so far
            return sum(s.skipped_records for s in streams.values())

        while True:
            at_start = {"rng": rng.bit_generator.state, "seen": {m: list(v) for m, v in seen.items()},
                        "streams": {m: dict(streams[m].position) for m in self.mods}}
            records: list[Record] = []
            tokens, budgets, chunks = 0, self.bucket, None
            while chunks is None:  # packing: the pool grows while more than one of its batches is not full
                while not self.limits.full(len(records), tokens, budgets):
                    m = self.mods[rng.choice(len(self.mods), p=self._pick_probs(seen))]
                    rec = next(records_of[m])
                    records.append(rec)
                    tokens += len(rec)
                    seen[m][0] += 1
                    seen[m][1] += len(rec)
                if self.bucket > 1:
                    records.sort(key=len)
                chunks = self._cut(records, final=budgets >= self.bucket + EXTRA_BUDGETS)
                budgets += 1
            for i, j in enumerate(rng.permutation(len(chunks))):
                if i >= skip:
                    yield self.collate(chunks[j]), {**at_start, "yielded": i + 1}, skipped()
            skip = 0

    def _cut(self, records: list[Record], final: bool) -> list[list[Record]] | list[list[list[Record]]] | None:
        """Micro-batches of the pool: records (:meth:`BatchLimits.split`), or rows of records when packing
        (None: draw more, see :func:`maskdiff.core.packing.pack_pool`)."""
        if not self.pack:
            return self.limits.split(records)
        assert self.limits.tokens is not None, "packing needs a token budget (data.batch_tokens)"
        return pack_pool(records, self.limits.tokens, self.limits.records, final)

    def _pick_probs(self, seen: Mapping[str, list[int]]) -> np.ndarray:
        """Modality of the next record. With a token budget the mixing weights are shares of tokens:
        pick m with prob ∝ weight_m / (mean record length of m so far), so short table rows are not
        crowded out by long images; with a record limit only, they are shares of records."""
        if self.limits.tokens is None:
            return self.probs
        known = [s[1] / s[0] for s in seen.values() if s[0]]
        default = float(np.mean(known)) if known else 1.0
        inv = np.array([1.0 / (seen[m][1] / seen[m][0] if seen[m][0] else default) for m in self.mods])
        p = self.probs * inv
        return p / p.sum()

    def collate(self, chunk: list[Record] | list[list[Record]]) -> Batch:
        """A micro-batch of records, or of rows of records when packing."""
        rows: list[list[Record]] = chunk if self.pack else [[r] for r in chunk]  # type: ignore[assignment, list-item]
        if self.max_len is not None:
            for rec in (r for row in rows for r in row):
                if len(rec) > self.max_len:
                    raise ValueError(f"a {rec.meta.get('modality')} record ({rec.meta.get('id')}) has {len(rec)} tokens, more than data.max_len={self.max_len}")
        return collate_rows(rows, self.spec)


class PositionMismatch(ConfigError):
    """A saved data position was made with another number of processes or DataLoader workers."""


class BatchStream:
    """The dataset's batches, produced in ``workers`` DataLoader processes (0 = in this one), and the position
    to resume them from (:meth:`position`, plain JSON-able data).

    A DataLoader takes batches from its workers in turn, starting with worker 0.
    The position holds each worker stream's state after its last batch taken
    here, and which stream comes next; resuming, DataLoader worker ``w`` continues
    stream ``(w + next) % workers``, so the turn order goes on unbroken.
    :attr:`skipped_records` sums the bad-shard records skipped by every stream (worker); the position
    keeps it, so a resumed run goes on counting from there.
    """

    def __init__(self, dataset: MixedBatches, workers: int) -> None:
        start, world = dataset.start, _world(dataset)
        if start is not None and (start["world"], start["workers"]) != (world, workers):
            raise PositionMismatch(
                f"the data position was saved by {start['world']} process(es) with data.workers={start['workers']}; this run has "
                f"{world} with data.workers={workers}. Resume with the same (e.g. torchrun --nproc_per_node {start['world']} "
                f"tools/train.py --resume RUN data.workers={start['workers']}); each process and worker continues its own "
                f"share of the data, which another split would not match")
        self.world, self.workers = world, workers
        self.next = start["next"] if start else 0
        self.streams: list[dict[str, Any] | None] = list(start["streams"]) if start else [None] * max(workers, 1)
        # bad-shard records skipped per stream, as of its last batch taken (from the beginning of the data)
        self.skipped: list[int] = list(start.get("skipped", [0] * len(self.streams))) if start else [0] * len(self.streams)
        dataset.annotated = True
        self._it = iter(dataset) if workers == 0 else iter(DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4))

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        batch, position, skipped = next(self._it)
        self.streams[self.next], self.skipped[self.next] = position, skipped
        self.next = (self.next + 1) % len(self.streams)
        return batch

    @property
    def skipped_records(self) -> int:
        """Records of bad shards this rank's streams passed over, up to the batches taken (from the beginning of the data)."""
        return sum(self.skipped)

    def position(self) -> dict[str, Any]:
        return {"world": self.world, "workers": self.workers, "next": self.next, "streams": list(self.streams),
                "skipped": list(self.skipped)}


def _world(dataset: MixedBatches) -> int:
    return next(iter(dataset.sets.values())).ranks()[1]


def batches(dataset: MixedBatches, workers: int) -> BatchStream:
    """:class:`BatchStream` of ``dataset`` in ``workers`` DataLoader processes."""
    return BatchStream(dataset, workers)


def heldout_batches(rc: RunConfig, spec: VocabSpec, rank: int, world_size: int, count: int) -> dict[str, list[Batch]]:
    """Up to ``count`` held-out micro-batches per modality for this rank (a fixed set)."""
    out: dict[str, list[Batch]] = {}
    if rc.data.heldout <= 0:
        return out
    limits = BatchLimits.of(rc)
    for mod in rc.modalities:
        records: list[Record] = []
        tokens = 0
        dirs = [rc.data.shard_source(name) for name in rc.data.sources[mod].dirs]
        for rec in heldout_records(ShardSet(dirs, rank=rank, world_size=world_size, bad_shards=rc.data.bad_shards), rc.data.heldout):
            records.append(rec)
            tokens += len(rec)
            if limits.full(len(records), tokens, count):
                break
        chunks = limits.pack(records) if rc.data.pack else [[[r] for r in chunk] for chunk in limits.split(records)]
        out[mod] = [collate_rows(rows, spec) for rows in chunks[:count]]
    return out


def train_dataset(rc: RunConfig, sets: Mapping[str, ShardSet], spec: VocabSpec, rank: int, start: dict[str, Any] | None = None) -> MixedBatches:
    d = rc.data
    return MixedBatches(sets, {m: d.sources[m].weight for m in rc.modalities}, spec, limits=BatchLimits.of(rc), bucket=d.bucket,
                        max_len=d.max_len, heldout=d.heldout, seed=rc.seed, rank=rank, start=start, pack=d.pack)


__all__ = [
    "BatchLimits", "BatchStream", "MixedBatches", "PositionMismatch", "batches", "ensure_shards", "heldout_batches", "open_sources",
    "train_dataset",
]
