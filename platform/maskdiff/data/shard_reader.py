"""Reading shard directories: :func:`load_manifest` and the streaming :class:`ShardSet`.

Shards are streamed (local files and URLs alike, see :mod:`maskdiff.data.shard_source`):
a reader holds one record at a time plus its shuffle buffer, never a whole
shard. Each shard's sha256 and size are computed while it streams and checked
when it ends; a shard that is corrupt, truncated, missing or unreachable stops
the iteration with one line naming it (:class:`ChecksumError` /
:class:`ShardError`) — or, with ``bad_shards="skip"``, the rest of that shard
is skipped, counted and reported, and reading goes on. Records already read
from a shard whose checksum fails at its end have been handed out (each record
is still checked on its own: its tar member, header and id ranges).
"""

from __future__ import annotations

import json
import os
import random
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from maskdiff.adapters import Adapter, InputError, adapter_class, adapter_from_state
from maskdiff.core import modalities
from maskdiff.core.tokens import MISSING, Record, VocabMismatchError, VocabSpec, source_key

from .shard_format import FORMAT, MANIFEST, READABLE_VERSIONS, ChecksumError, ShardError, decode_sample
from .shard_source import HashingStream, MissingFile, ShardLocation

BAD_SHARD_POLICIES = ("stop", "skip")


def _location(directory: str | Path | ShardLocation) -> ShardLocation:
    return directory if isinstance(directory, ShardLocation) else ShardLocation(directory)


def load_manifest(directory: str | Path | ShardLocation) -> dict[str, Any]:
    """The manifest of a shard directory (local or URL), checked for format and consistent counts."""
    loc = _location(directory)
    path = loc.url(MANIFEST)
    try:
        raw = loc.read_bytes(MANIFEST)
    except MissingFile as e:
        detail = "" if loc.is_local else f"; {e.detail}"
        raise ShardError(f"{loc}: no {MANIFEST} (not a shard directory, or its writing did not finish{detail})") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: not a {FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))}")
    _check_manifest(path, loc, m)
    if m["records_in"] != m["records_written"] + m["records_rejected"]:
        raise ShardError(f"{path}: counts do not reconcile: records_in {m['records_in']} != written {m['records_written']} + rejected {m['records_rejected']}")
    if sum(s["records"] for s in m["shards"]) != m["samples_written"]:
        raise ShardError(f"{path}: shard record counts do not add up to samples_written {m['samples_written']}")
    return m


def _check_manifest(path: str, loc: ShardLocation, m: dict[str, Any]) -> None:
    """Every key readers use is there with the right type; shard files are plain names inside the directory."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ShardError(f"{path}: key '{key}' {what}")

    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    need(isinstance(m.get("modality"), str) and modalities.is_known(m["modality"]), "modality", f"must be one of {', '.join(modalities.names())}")
    for key in ("records_in", "records_written", "records_rejected", "samples_written"):
        need(count(m.get(key)), key, "is missing or not a count")
    adapter = m.get("adapter")
    need(isinstance(adapter, dict) and isinstance(adapter.get("state"), dict) and isinstance(adapter.get("fingerprint"), str),
         "adapter", "is missing its state or fingerprint")
    vocab = m.get("vocab")
    need(isinstance(vocab, dict) and isinstance(vocab.get("supports"), list), "vocab", "is missing its supports")
    shards = m.get("shards")
    need(isinstance(shards, list), "shards", "is missing or not a list")
    for i, entry in enumerate(shards):
        where = f"shards[{i}]"
        need(isinstance(entry, dict) and count(entry.get("records")) and isinstance(entry.get("sha256"), str), where, "needs file, records and sha256")
        name = entry.get("file")
        need(isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name, f"{where}.file",
             f"must be a file name inside {loc}, got {name!r}")


def _vocab_of(path: str, m: dict[str, Any]) -> VocabSpec:
    try:
        return VocabSpec.from_dict(m["vocab"])
    except VocabMismatchError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: key 'vocab' is not a vocabulary spec ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def _check_record(url: str, rec: Record, sizes: dict[str, int]) -> None:
    """Each field's support is in the directory's vocabulary and its ids within that support (or missing)."""
    for f in rec.fields:
        size = sizes.get(f.support)
        if size is None:
            raise ShardError(f"{url}: record {rec.meta.get('id')!r}: support {f.support!r} is not in the manifest's vocabulary")
        if f.tokens.size and (int(f.tokens.min()) < MISSING or int(f.tokens.max()) >= size):
            raise ShardError(f"{url}: record {rec.meta.get('id')!r}: field {f.name!r} holds ids outside 0..{size - 1}")


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SkippedShard:
    """A bad shard passed over with ``bad_shards="skip"``: what went wrong, and this reader's records lost to it."""

    shard: str
    reason: str
    skipped: int
    read: int


@dataclass(frozen=True)
class LostSlots:
    """A stream's slots ``first .. first + skip.skipped - 1`` of ``epoch`` that a bad shard took."""

    epoch: int
    first: int
    skip: SkippedShard


class ShardSet(IterableDataset):
    """Stream :class:`Record` objects from one or several shard directories (local folders or URLs).

    * ``spec``: the merged :class:`VocabSpec` of all directories (in order);
      ``adapters``: the fitted adapter per source (:attr:`Adapter.key`: the
      modality, or ``<modality>/<data set>`` for a named table or FASTA set);
      ``manifests``: per directory.
    * Directories of one source must share the adapter state (shard the
      second with ``--state-from`` the first); else :class:`VocabMismatchError`.
      Sources of one modality may differ (two tables): their own supports are
      named apart, the shared ones (residues) must agree.
    * Iteration splits the work over distributed ranks and DataLoader workers:
      whole shards when there are at least as many shards as consumers, else
      every consumer reads all shards and keeps every n-th record. Either way
      each record comes out exactly once per pass. Every shard's sha256 is
      computed while it streams and checked at its end (see the module docstring;
      ``bad_shards``: ``"stop"`` or ``"skip"``, skipped shards are reported
      through ``report`` and listed in ``skipped``, in this process).
    * ``shuffle_buffer > 0`` shuffles shard order, and records within windows of
      that many, with ``seed`` + the epoch (:meth:`set_epoch`); ``repeat`` loops
      forever. :meth:`stream` gives one consumer's records with a restartable
      position (:class:`ShardStream`).
    * Records carry ``meta["modality"]`` and ``meta["source"]``; ``decoded=True`` yields
      ``(record, raw)`` pairs decoded with the saved adapter.
    """

    def __init__(self, dirs: str | Path | Sequence[str | Path], *, shuffle_buffer: int = 0, seed: int = 0, decoded: bool = False,
                 verify: bool = True, repeat: bool = False, rank: int | None = None, world_size: int | None = None,
                 bad_shards: str = "stop", report: Callable[[str], None] = _stderr) -> None:
        super().__init__()
        given = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
        if not given:
            raise ShardError("no shard directory given")
        if bad_shards not in BAD_SHARD_POLICIES:
            raise ShardError(f"bad_shards={bad_shards!r}: must be one of {', '.join(BAD_SHARD_POLICIES)}")
        self.locations = [_location(d) for d in given]
        self.dirs: list[Path | str] = [loc.path if loc.path is not None else loc.where for loc in self.locations]
        self.manifests = [load_manifest(loc) for loc in self.locations]
        self.adapters: dict[str, Adapter] = {}
        self.sizes: list[dict[str, int]] = []
        fingerprints: dict[str, tuple[str, ShardLocation]] = {}
        spec: VocabSpec | None = None
        self.keys: list[str] = []  # the source of each directory
        for loc, m in zip(self.locations, self.manifests):
            mod, fp, key = m["modality"], m["adapter"]["fingerprint"], _key_of(loc, m)
            if key in fingerprints and fingerprints[key][0] != fp:
                first = fingerprints[key][1]
                other = " (the same data set) or with its own --name (another data set)" if adapter_class(mod).namespaced else ""
                raise VocabMismatchError(f"{loc}: its {mod} adapter state differs from that of {first}; shard it with --state-from {first}{other}")
            own = _vocab_of(loc.url(MANIFEST), m)
            self.sizes.append({sup.name: sup.size for sup in own.supports})
            self.keys.append(key)
            if key not in self.adapters:
                fingerprints[key] = (fp, loc)
                self.adapters[key] = _adapter_of(loc, m)
                VocabSpec(self.adapters[key].supports()).check_same(own, where=loc.url(MANIFEST))
            try:
                spec = own if spec is None else spec.merged(own)
            except VocabMismatchError as e:
                raise VocabMismatchError(f"{loc}: {e}; shard it with --state-from a directory of the same data set, or with its own --name") from None
        assert spec is not None
        self.spec: VocabSpec = spec
        self.shards = [(i, m["modality"], s) for i, m in enumerate(self.manifests) for s in m["shards"]]
        self.shuffle_buffer, self.seed, self.decoded = shuffle_buffer, seed, decoded
        self.verify, self.repeat, self.rank, self.world_size = verify, repeat, rank, world_size
        self.bad_shards, self.report = bad_shards, report
        self.skipped: list[SkippedShard] = []
        self.epoch = 0

    @property
    def num_records(self) -> int:
        """Stored records (samples) over all directories, i.e. one pass over all consumers."""
        return sum(m["samples_written"] for m in self.manifests)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def decode(self, record: Record) -> Any:
        """The raw value of a record, through its source's saved adapter."""
        return self.adapters[record.meta["source"]].decode(record)

    def ranks(self) -> tuple[int, int]:
        """This process's rank and the number of ranks (given, or from torch.distributed / the environment)."""
        return _dist_info(self.rank, self.world_size)

    def consumer(self) -> tuple[int, int]:
        """This reader's consumer index and the number of consumers (ranks x DataLoader workers)."""
        rank, world = self.ranks()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def stream(self, consumer: int, consumers: int, position: dict[str, int] | None = None) -> ShardStream:
        """The records of one consumer from ``position`` (see :class:`ShardStream`; None: the start of :attr:`epoch`)."""
        return ShardStream(self, consumer, consumers, position)

    def __iter__(self) -> Iterator[Any]:
        for rec in self.stream(*self.consumer()):
            yield (rec, self.decode(rec)) if self.decoded else rec

    @property
    def window(self) -> int:
        """Records shuffled together, and so held at once: the shuffle buffer (1 without shuffling)."""
        return max(self.shuffle_buffer, 1)

    def _slots(self, consumer: int, consumers: int, epoch: int, first: int,
               lost: list[LostSlots] | None = None) -> Iterator[tuple[int, Record]]:
        """``(slot, record)`` of one consumer in one epoch, from slot ``first`` on: slot k is the consumer's k-th record.

        The epoch's shard order is shuffled with (seed, epoch); a consumer owns every n-th shard, or, with fewer
        shards than consumers, every n-th record. Starting at a slot skips whole shards unread and the head of one
        shard undecoded, so it costs at most one shard's bytes, whatever the slot. The slots of bad shards
        passed over are appended to ``lost`` (the calling stream's own list).
        """
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            random.Random(hash((self.seed, epoch))).shuffle(shards)
        by_shard = len(shards) >= consumers
        mine = shards[consumer::consumers] if by_shard else shards
        start = first if by_shard else first * consumers + consumer  # index over the records of `mine`
        base = 0
        for i, modality, entry in mine:
            n = entry["records"]
            if base + n <= start:
                base += n
                continue
            lo = max(0, start - base)
            keep = (lambda k: k >= lo) if by_shard else (lambda k, b=base: k >= lo and (b + k) % consumers == consumer)
            read = lo
            try:
                for k, rec in self._read_shard(i, modality, entry, keep):
                    read = k + 1
                    yield (base + k if by_shard else (base + k) // consumers), rec
            except ShardError as e:
                if self.bad_shards != "skip":
                    raise
                # this reader's unread records of the shard: all of them, or its every n-th; their slots are consecutive
                j = base + read if by_shard else base + read + (consumer - base - read) % consumers
                count = len(range(j, base + n, 1 if by_shard else consumers))
                skip = self._skip(entry, e, count, read)
                if lost is not None and count:
                    lost.append(LostSlots(epoch, j if by_shard else j // consumers, skip))
            base += n

    def _skip(self, entry: dict[str, Any], err: ShardError, skipped: int, read: int) -> SkippedShard:
        """Record and report this reader's ``skipped`` records lost to a bad shard."""
        skip = SkippedShard(entry["file"], str(err), skipped, read)
        self.skipped.append(skip)
        self.report(f"warning: bad shard skipped: {err}; {skipped} record(s) of it skipped here, {read} read before the problem showed")
        return skip

    def _read_shard(self, i: int, modality: str, entry: dict[str, Any], keep: Callable[[int], bool]) -> Iterator[tuple[int, Record]]:
        """``(index in the shard, record)`` for the indices ``keep`` accepts; the others are streamed past undecoded."""
        loc = self.locations[i]
        url = loc.url(entry["file"])
        try:
            stream = loc.open(entry["file"])
        except MissingFile as e:
            raise ShardError(f"{url}: shard listed in {loc.url(MANIFEST)} is missing ({e.detail})") from None
        count = 0
        try:
            try:
                members = ({**m, "__url__": url} for m in wds.tariterators.tar_file_iterator(stream))
                for sample in wds.tariterators.group_by_keys(members):
                    count += 1
                    if not keep(count - 1):
                        continue
                    rec = decode_sample(sample)
                    _check_record(url, rec, self.sizes[i])
                    rec.meta["modality"], rec.meta["source"] = modality, self.keys[i]
                    yield count - 1, rec
            except ShardError:
                if stream.failure:  # the tar reader may have rewritten the message
                    raise ShardError(stream.failure) from None
                self._finish(stream, entry, url)  # a corrupt shard says so rather than what it broke
                raise
            except (tarfile.TarError, KeyError, ValueError, TypeError, AttributeError, EOFError) as e:
                if stream.failure:
                    raise ShardError(stream.failure) from None
                self._finish(stream, entry, url)
                raise ShardError(f"{url}: unreadable shard ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
            self._finish(stream, entry, url)
        finally:
            stream.close()
        if count != entry["records"]:
            raise ShardError(f"{url}: holds {count} records, its manifest says {entry['records']}")

    def _finish(self, stream: HashingStream, entry: dict[str, Any], url: str) -> None:
        """Read the shard's tail; check its size and sha256 against the manifest."""
        stream.drain()
        if not self.verify:
            return
        expected = entry.get("bytes")
        if isinstance(expected, int) and stream.nbytes != expected:
            raise ShardError(f"{url}: {stream.nbytes} bytes where its manifest says {expected}; the shard is truncated or was changed")
        digest = stream.hexdigest()
        if digest != entry["sha256"]:
            raise ChecksumError(f"{url}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}...; the shard is corrupt or was changed")


def _key_of(loc: ShardLocation, m: dict[str, Any]) -> str:
    """The source a directory's adapter encodes (:attr:`Adapter.key`), read from its saved options."""
    options = m["adapter"]["state"].get("options")
    dataset = options.get("dataset") if isinstance(options, dict) else None
    if dataset is not None and (not isinstance(dataset, str) or not dataset or "/" in dataset):
        raise ShardError(f"{loc.url(MANIFEST)}: the adapter's data set name {dataset!r} is not a plain name")
    return source_key(m["modality"], dataset)


def _adapter_of(loc: ShardLocation, m: dict[str, Any]) -> Adapter:
    state = m["adapter"]["state"]
    where = loc.url(MANIFEST)
    if state.get("modality") != m["modality"]:
        raise ShardError(f"{where}: the adapter state is not that of a {m['modality']} adapter")
    try:
        if loc.path is not None:
            return adapter_from_state(state, loc.path)
        with tempfile.TemporaryDirectory(prefix="maskdiff-adapter-") as tmp:  # a remote directory: fetch its side files first
            for name in _side_files(m):
                (Path(tmp) / name).write_bytes(loc.read_bytes(name))
            return adapter_from_state(state, tmp)
    except InputError:
        raise
    except Exception as e:  # a damaged state fails in each adapter's own way
        raise ShardError(f"{where}: cannot rebuild the {m['modality']} adapter ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _side_files(m: dict[str, Any]) -> list[str]:
    """Files next to the manifest that the adapter state names (e.g. the text adapter's BPE model)."""
    model = m.get("adapter", {}).get("state", {}).get("fitted", {}).get("model_file")
    return [model] if isinstance(model, str) and model and Path(model).name == model else []


def field_lengths(records: Iterable[Record]) -> dict[str, dict[int, int]]:
    """field name -> {length: count} over ``records``, for the fields whose length varies."""
    counts: dict[str, Counter] = {}
    for rec in records:
        for f in rec.fields:
            counts.setdefault(f.name, Counter())[f.tokens.size] += 1
    return {name: dict(sorted(c.items())) for name, c in counts.items() if len(c) > 1}


class ShardStream:
    """One consumer's records of a :class:`ShardSet`, with the position to restart them from.

    A consumer's records of an epoch are cut into windows of :attr:`ShardSet.window`
    slots; each window is read whole and handed out in an order shuffled with
    (seed, epoch, consumer, window). ``position`` — ``{"epoch", "window", "taken",
    "skipped"}``, plain ints — says where the next record comes from, so a stream
    started at a saved position continues exactly where the saved one stopped, after
    reading at most one shard's head and one window, however far into the data it is.

    :attr:`skipped_records` counts the records of bad shards passed over
    (``bad_shards="skip"``), each epoch anew; a window is read before its records are
    handed out, so its bad shards count from then on. ``position["skipped"]`` is
    the count before the window, which a restarted stream reads (and counts) again:
    restarted or not, a stream gives the same counts.
    """

    def __init__(self, shards: ShardSet, consumer: int, consumers: int, position: dict[str, int] | None = None) -> None:
        self.shards, self.consumer, self.consumers = shards, consumer, consumers
        self.position = {"epoch": shards.epoch, "window": 0, "taken": 0, "skipped": 0, **(position or {})}
        self._settled = self.position["skipped"]  # skipped records before the start, and in finished epochs
        self._lost: list[LostSlots] = []  # this epoch's
        self._records = self._run(self.position["epoch"], self.position["window"], self.position["taken"])

    @property
    def skipped_records(self) -> int:
        """Records of bad shards this stream has passed over (its share of them), from the beginning of the data."""
        return self._settled + sum(lost.skip.skipped for lost in self._lost)

    def _skipped_before(self, slot: int) -> int:
        """:attr:`skipped_records` of the slots before ``slot`` of the current epoch."""
        return self._settled + sum(min(lost.skip.skipped, max(0, slot - lost.first)) for lost in self._lost)

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> Record:
        return next(self._records)

    def _run(self, epoch: int, window: int, taken: int) -> Iterator[Record]:
        s, size = self.shards, self.shards.window
        while True:
            given = 0
            for w, recs in _windows(s._slots(self.consumer, self.consumers, epoch, window * size, self._lost), size):
                order = list(range(len(recs)))
                if s.shuffle_buffer > 0:
                    random.Random(hash((s.seed, epoch, self.consumer, w))).shuffle(order)
                before = self._skipped_before(w * size)
                for k in range(taken if w == window else 0, len(order)):
                    self.position = {"epoch": epoch, "window": w, "taken": k + 1, "skipped": before}
                    given += 1
                    yield recs[order[k]]
            if not s.repeat:
                return
            if not given and window == taken == 0:  # a whole epoch gave nothing: repeating it would spin forever
                raise ShardError(self._nothing_to_read(epoch))
            self._settled, self._lost = self.skipped_records, []
            epoch, window, taken = epoch + 1, 0, 0

    def _nothing_to_read(self, epoch: int) -> str:
        s = self.shards
        where = ", ".join(map(str, s.locations))
        bad = sorted({lost.skip.shard for lost in self._lost})
        why = (f"every shard of its share was bad and skipped ({', '.join(bad)})" if bad else
               f"its share is empty ({s.num_records} records over {self.consumers} readers)")
        return f"{where}: reader {self.consumer} of {self.consumers} (ranks x loader workers) read no record in epoch {epoch}: {why}"


def _windows(slots: Iterator[tuple[int, Record]], size: int) -> Iterator[tuple[int, list[Record]]]:
    """Consecutive ``(window index, records)`` groups of ``(slot, record)`` pairs, window = slot // size."""
    current, recs = -1, []
    for slot, rec in slots:
        if slot // size != current:
            if recs:
                yield current, recs
            current, recs = slot // size, []
        recs.append(rec)
    if recs:
        yield current, recs


__all__ = ["BAD_SHARD_POLICIES", "ShardSet", "ShardStream", "SkippedShard", "field_lengths", "load_manifest"]
