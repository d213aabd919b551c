"""Token shards: :func:`write_shards` builds them, :class:`ShardSet` streams them.

A shard directory holds

* ``<name>-000000.tar`` ... — webdataset tar shards; one sample per stored
  record: ``<key>.tokens.npy`` (all fields' local ids, concatenated, int16 or
  int32) and ``<key>.json`` (``fields``: ``[name, support, shape]`` each, and
  the record's ``meta``, which always has ``id``, the input record's id);
* ``manifest.json`` — format, modality, the adapter state (large binary state
  as a file next to it, e.g. ``text-bpe.model``), the vocabulary spec, the
  counts ``records_in == records_written + records_rejected`` (input records)
  and ``samples_written`` (stored records; more than ``records_written`` only
  when text documents are cut into windows), and the shard list with each
  shard's record count, size and sha256;
* ``rejects.jsonl`` — one ``{"id", "reason"}`` line per refused input record.

Writing is atomic: everything is built in a hidden staging folder inside the
output directory and moved into place when complete, the manifest last, so a
killed run leaves no complete-looking shard and no manifest describing
missing shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from maskdiff.adapters import Adapter, InputError, Reject, Rejected, adapter_class, adapter_from_state
from maskdiff.tokens import MISSING, MODALITIES, Field, Record, VocabMismatchError, VocabSpec

from .files import sha256_file

FORMAT, VERSION = "maskdiff-shards", 1
MANIFEST, REJECTS = "manifest.json", "rejects.jsonl"
STAGING_PREFIX = ".staging-"
DEFAULT_SHARD_SIZE = 10_000


class ShardError(InputError):
    """A fatal, user-facing problem with a shard directory; the message names it."""


class ChecksumError(ShardError):
    """A shard's bytes do not match the sha256 in its manifest."""


def progress_enabled(progress: bool | None = None) -> bool:
    """Progress bars: on for a terminal, off when not a TTY or when ``CI`` is set."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def _reading(adapter: Adapter, inputs: Sequence[str | Path], show: bool, **kw: Any) -> Iterator[Any]:
    """The adapter's raw items (behind a progress bar); on any exit the bar and the reader are closed,
    so no reader thread (e.g. Arrow's CSV read-ahead) outlives the run and aborts the interpreter at exit."""
    items = adapter.read(inputs)
    bar = _bar(items, show, **kw)
    try:
        yield bar
    finally:
        if bar is not items:
            bar.close()
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _bar(iterable: Any, enabled: bool, **kw: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    width = shutil.get_terminal_size((100, 20)).columns or 100  # some pseudo-terminals report 0 columns
    return tqdm(iterable, disable=False, ncols=min(width, 120), **kw)


# --- writing ---------------------------------------------------------------------------------


def write_shards(
    modality: str,
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    name: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_len: int | None = None,
    overwrite: bool = False,
    state_from: str | Path | None = None,
    progress: bool | None = None,
    **adapter_options: Any,
) -> dict[str, Any]:
    """Encode the raw records of ``inputs`` into shards under ``output``; return the manifest.

    ``adapter_options`` go to the modality's adapter (see ``adapters``);
    ``max_len`` is the text window / protein length limit. With ``state_from``
    (a shard directory of the same modality) its fitted adapter is reused, so
    the two directories share one vocabulary. Raises :class:`InputError` /
    :class:`ShardError` for user errors (missing or empty input, output
    already holding shards without ``overwrite``, nothing encodable).
    """
    out = Path(output)
    name = name or modality
    if shard_size < 1:
        raise ShardError(f"--shard-size {shard_size}: must be at least 1")
    if "/" in name or name.startswith("."):
        raise ShardError(f"--name {name!r}: must be a plain file name prefix")
    adapter = _make_adapter(modality, max_len, state_from, adapter_options)
    created = not out.exists()
    _check_output(out, overwrite)
    try:
        return _write(adapter, modality, inputs, out, name, shard_size, overwrite, progress_enabled(progress))
    except BaseException:
        if created and not [p for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX)]:
            shutil.rmtree(out, ignore_errors=True)  # a failed run leaves no empty output folder behind
        raise


def _write(adapter: Adapter, modality: str, inputs: Sequence[str | Path], out: Path, name: str, shard_size: int, overwrite: bool,
           show: bool) -> dict[str, Any]:
    """Fit, encode into a staging folder, then move into place (replacing a data set: swap the whole directory)."""
    replacing = overwrite and (out / MANIFEST).exists()
    if adapter.needs_fit:
        with _reading(adapter, inputs, show, desc=f"fit {modality}", unit=" rec") as items:
            adapter.fit(raw for item in items if not isinstance(item, Rejected) for raw in [item[1]])
    spec = VocabSpec(adapter.supports())
    dtype = np.int16 if max(s.size for s in spec.supports) <= np.iinfo(np.int16).max else np.int32
    tag = f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage = out.parent / f".{out.name}{tag}" if replacing else out / tag
    try:
        stage.mkdir()
    except OSError as e:
        raise ShardError(f"{stage.parent}: cannot write there ({e.strerror or e})") from None
    try:
        counts, shards = _encode_all(adapter, inputs, stage, name, shard_size, dtype, show)
        if counts["records_written"] == 0:
            if replacing:
                raise ShardError(f"{inputs[0]}: no record could be encoded ({counts['records_rejected']} rejected, e.g. "
                                 f"{_first_reject(stage)}); the shards already in {out} are kept")
            _move_into_place(stage, out, [REJECTS], False)
            raise ShardError(f"{inputs[0]}: no record could be encoded ({counts['records_rejected']} rejected; reasons in {out / REJECTS})")
        state = adapter.state(stage)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "modality": modality,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": [str(p) for p in inputs],
            "adapter": {"state": state, "fingerprint": adapter.fingerprint(), "describe": adapter.describe()},
            "vocab": spec.to_dict(),
            "token_dtype": np.dtype(dtype).name,
            **counts,
            "rejects": REJECTS,
            "shards": shards,
        }
        if replacing:
            _write_manifest(stage, manifest)
            _swap(stage, out)
            return manifest
        files = [s["file"] for s in shards] + [REJECTS] + [p.name for p in stage.iterdir() if p.name not in {s["file"] for s in shards} | {REJECTS}]
        _move_into_place(stage, out, files, overwrite)
        _write_manifest(out, manifest)
        return manifest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / f"{STAGING_PREFIX}{MANIFEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, directory / MANIFEST)
    _fsync_dir(directory)


def _first_reject(stage: Path) -> str:
    try:
        with open(stage / REJECTS, encoding="utf-8") as f:
            first = json.loads(f.readline())
        return f"{first['id']}: {first['reason']}"
    except (OSError, ValueError, KeyError):
        return "see the input"


def _swap(stage: Path, out: Path) -> None:
    """Put the complete new data set in ``stage`` at ``out``, keeping what else ``out`` holds.

    Files the old manifest does not list are copied over first; then the two
    directories are exchanged in one ``renameat2(RENAME_EXCHANGE)``, so a
    complete data set is at ``out`` at every instant (where the kernel cannot
    exchange, two renames leave a moment with ``out`` absent and both sets on
    disk). ``stage`` then holds the old set and is removed by the caller.
    """
    ours = set(_listed_files(out / MANIFEST)) | {MANIFEST}
    for p in out.iterdir():
        if p.name in ours or p.suffix == ".tar" or STAGING_PREFIX in p.name or (stage / p.name).exists():
            continue
        shutil.copytree(p, stage / p.name, symlinks=True) if p.is_dir() and not p.is_symlink() else shutil.copy2(p, stage / p.name, follow_symlinks=False)
    _fsync_dir(stage)
    if not _exchange(stage, out):
        old = out.parent / f".{out.name}{STAGING_PREFIX}{os.getpid()}-old"
        os.replace(out, old)
        os.replace(stage, out)
        os.replace(old, stage)
    _fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where that is not available."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _make_adapter(modality: str, max_len: int | None, state_from: str | Path | None, options: dict[str, Any]) -> Adapter:
    cls = adapter_class(modality)
    if state_from is not None:
        given = [k for k, v in options.items() if v is not None] + (["max_len"] if max_len is not None else [])
        if given:
            raise ShardError(f"--state-from {state_from}: reuses that directory's adapter options; drop {', '.join('--' + k.replace('_', '-') for k in given)}")
        manifest = load_manifest(state_from)
        if manifest["modality"] != modality:
            raise ShardError(f"--state-from {state_from}: holds {manifest['modality']} shards, not {modality}")
        return adapter_from_state(manifest["adapter"]["state"], Path(state_from))
    options = {k: v for k, v in options.items() if v is not None}
    if max_len is not None:
        if "max_len" not in cls.__init__.__code__.co_varnames:
            raise ShardError(f"--max-len does not apply to {modality}")
        options["max_len"] = max_len
    known = {o.key for o in cls.options_spec} | {"max_len"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ShardError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in unknown)} do not apply to {modality}")
    return cls(**options)


def _check_output(out: Path, overwrite: bool) -> None:
    for old in out.parent.glob(f".{out.name}{STAGING_PREFIX}*-old"):  # a swap killed between its two renames
        if not out.exists() and not _staging_alive(old):
            os.replace(old, out)
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: exists and is not a folder")
    if out.is_dir():
        held = sorted(p.name for p in out.iterdir() if p.name == MANIFEST or p.suffix == ".tar")
        if held and not overwrite:
            raise ShardError(f"{out}: already holds shards ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); pass --overwrite to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ShardError(f"{out}: output folder is not writable")
    for p in [*out.glob(f"{STAGING_PREFIX}*"), *out.parent.glob(f".{out.name}{STAGING_PREFIX}*")]:  # left behind by killed runs
        if not _staging_alive(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _encode_all(adapter: Adapter, inputs: Sequence[str | Path], stage: Path, name: str, shard_size: int, dtype: Any, show: bool) -> tuple[dict[str, int], list[dict[str, Any]]]:
    counts = {"records_in": 0, "records_written": 0, "records_rejected": 0, "samples_written": 0}
    shards: list[dict[str, Any]] = []
    writer: _ShardFile | None = None
    with open(stage / REJECTS, "w", encoding="utf-8") as rejects, _reading(adapter, inputs, show, desc=f"shard {adapter.modality}", unit=" rec") as items:
        for item in items:
            counts["records_in"] += 1
            if isinstance(item, Rejected):
                rid, reason = item.id, item.reason
            else:
                rid, raw = item
                try:
                    records = adapter.encode_many(raw)
                except Reject as e:
                    reason = str(e)
                else:
                    counts["records_written"] += 1
                    for rec in records:
                        if writer is None:
                            writer = _ShardFile(stage / f"{name}-{len(shards):06d}.tar")
                        rec.meta["id"] = rid
                        writer.write(f"{counts['samples_written']:010d}", rec, dtype)
                        counts["samples_written"] += 1
                        if writer.count >= shard_size:
                            shards.append(writer.close())
                            writer = None
                    continue
            counts["records_rejected"] += 1
            rejects.write(json.dumps({"id": rid, "reason": reason}) + "\n")
        if writer is not None:
            shards.append(writer.close())
        rejects.flush()
        os.fsync(rejects.fileno())
    return counts, shards


class _ShardFile:
    """One tar shard being written; ``close()`` syncs it and returns its manifest entry."""

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0
        self._file = open(path, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)  # int: no pax header, reproducible bytes

    def write(self, key: str, rec: Record, dtype: Any) -> None:
        buf = io.BytesIO()
        np.save(buf, np.concatenate([f.tokens.reshape(-1) for f in rec.fields]).astype(dtype), allow_pickle=False)
        header = {"fields": [[f.name, f.support, list(f.shape)] for f in rec.fields], "meta": rec.meta}
        self._tar.write({"__key__": key, "tokens.npy": buf.getvalue(), "json": json.dumps(header, separators=(",", ":")).encode()})
        self.count += 1

    def close(self) -> dict[str, Any]:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"file": self.path.name, "records": self.count, "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}


def _move_into_place(stage: Path, out: Path, files: list[str], overwrite: bool) -> None:
    """Replace the previous run's files (manifest first) and move the new ones in."""
    if overwrite:
        old = out / MANIFEST
        if old.exists():
            listed = _listed_files(old)
            old.unlink()
            for f in listed:
                (out / f).unlink(missing_ok=True)
        for p in out.glob("*.tar"):
            p.unlink()
    for f in files:
        os.replace(stage / f, out / f)
    _fsync_dir(out)


def _listed_files(manifest_path: Path) -> list[str]:
    try:
        m = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return []
    files = [s["file"] for s in m.get("shards", [])] + [m.get("rejects", REJECTS)]
    model = m.get("adapter", {}).get("state", {}).get("fitted", {}).get("model_file")
    return [f for f in files + ([model] if model else []) if f and "/" not in f]


def _staging_alive(p: Path) -> bool:
    try:
        pid = int(p.name.split(STAGING_PREFIX, 1)[1].split("-")[0])
        os.kill(pid, 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- reading ---------------------------------------------------------------------------------


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory, checked for format and consistent counts."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{directory}: no {MANIFEST} (not a shard directory, or its writing did not finish)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ShardError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    _check_manifest(path, m)
    if m["records_in"] != m["records_written"] + m["records_rejected"]:
        raise ShardError(f"{path}: counts do not reconcile: records_in {m['records_in']} != written {m['records_written']} + rejected {m['records_rejected']}")
    if sum(s["records"] for s in m["shards"]) != m["samples_written"]:
        raise ShardError(f"{path}: shard record counts do not add up to samples_written {m['samples_written']}")
    return m


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    """Every key readers use is there with the right type; shard files are plain names inside the directory."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ShardError(f"{path}: key '{key}' {what}")

    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    need(m.get("modality") in MODALITIES, "modality", f"must be one of {', '.join(MODALITIES)}")
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
             f"must be a file name inside {path.parent}, got {name!r}")


def _vocab_of(path: Path, m: dict[str, Any]) -> VocabSpec:
    try:
        return VocabSpec.from_dict(m["vocab"])
    except VocabMismatchError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: key 'vocab' is not a vocabulary spec ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def _check_record(path: Path, rec: Record, sizes: dict[str, int]) -> None:
    """Each field's support is in the directory's vocabulary and its ids within that support (or missing)."""
    for f in rec.fields:
        size = sizes.get(f.support)
        if size is None:
            raise ShardError(f"{path}: record {rec.meta.get('id')!r}: support {f.support!r} is not in the manifest's vocabulary")
        if f.tokens.size and (int(f.tokens.min()) < MISSING or int(f.tokens.max()) >= size):
            raise ShardError(f"{path}: record {rec.meta.get('id')!r}: field {f.name!r} holds ids outside 0..{size - 1}")


def decode_sample(sample: dict[str, Any]) -> Record:
    """A webdataset sample (``tokens.npy`` + ``json`` bytes) to a :class:`Record`."""
    header = json.loads(sample["json"])
    flat = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False).astype(np.int64)
    fields, at = [], 0
    for fname, support, shape in header["fields"]:
        n = int(np.prod(shape, dtype=np.int64))
        fields.append(Field(fname, support, flat[at:at + n].reshape(shape)))
        at += n
    return Record(fields, header["meta"])


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardSet(IterableDataset):
    """Stream :class:`Record` objects from one or several shard directories.

    * ``spec``: the merged :class:`VocabSpec` of all directories (in order);
      ``adapters``: the fitted adapter per modality; ``manifests``: per directory.
    * Directories of one modality must share the adapter state (shard the
      second with ``--state-from`` the first); else :class:`VocabMismatchError`.
    * Iteration splits the work over distributed ranks and DataLoader workers:
      whole shards when there are at least as many shards as consumers, else
      every consumer reads all shards and keeps every n-th record. Either way
      each record comes out exactly once per pass. Every shard's sha256 is
      checked before it is read (:class:`ChecksumError` on mismatch).
    * ``shuffle_buffer > 0`` shuffles shard order and records (buffer of that
      many) with ``seed`` + the epoch (:meth:`set_epoch`); ``repeat`` loops forever.
    * Records carry ``meta["modality"]``; ``decoded=True`` yields
      ``(record, raw)`` pairs decoded with the saved adapter.
    """

    def __init__(self, dirs: str | Path | Sequence[str | Path], *, shuffle_buffer: int = 0, seed: int = 0, decoded: bool = False,
                 verify: bool = True, repeat: bool = False, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.dirs = [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
        if not self.dirs:
            raise ShardError("no shard directory given")
        self.manifests = [load_manifest(d) for d in self.dirs]
        self.adapters: dict[str, Adapter] = {}
        self.sizes: dict[Path, dict[str, int]] = {}
        fingerprints: dict[str, tuple[str, Path]] = {}
        spec: VocabSpec | None = None
        for d, m in zip(self.dirs, self.manifests):
            mod, fp = m["modality"], m["adapter"]["fingerprint"]
            if mod in fingerprints and fingerprints[mod][0] != fp:
                raise VocabMismatchError(f"{d}: its {mod} adapter state differs from that of {fingerprints[mod][1]}; shard it with --state-from {fingerprints[mod][1]}")
            own = _vocab_of(d / MANIFEST, m)
            self.sizes[d] = {sup.name: sup.size for sup in own.supports}
            if mod not in self.adapters:
                fingerprints[mod] = (fp, d)
                self.adapters[mod] = _adapter_of(d, m)
                VocabSpec(self.adapters[mod].supports()).check_same(own, where=f"{d / MANIFEST}")
            spec = own if spec is None else spec.merged(own)
        assert spec is not None
        self.spec: VocabSpec = spec
        self.shards = [(d, m["modality"], s) for d, m in zip(self.dirs, self.manifests) for s in m["shards"]]
        self.shuffle_buffer, self.seed, self.decoded = shuffle_buffer, seed, decoded
        self.verify, self.repeat, self.rank, self.world_size = verify, repeat, rank, world_size
        self.epoch = 0

    @property
    def num_records(self) -> int:
        """Stored records (samples) over all directories, i.e. one pass over all consumers."""
        return sum(m["samples_written"] for m in self.manifests)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def decode(self, record: Record) -> Any:
        """The raw value of a record, through its modality's saved adapter."""
        return self.adapters[record.meta["modality"]].decode(record)

    def __iter__(self) -> Iterator[Any]:
        rank, world = _dist_info(self.rank, self.world_size)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        consumer, consumers = rank * nw + wid, world * nw
        epoch = self.epoch
        while True:
            stream = self._records(consumer, consumers, epoch)
            if self.shuffle_buffer > 0:
                stream = _shuffled(stream, self.shuffle_buffer, random.Random(hash((self.seed, epoch, consumer))))
            for rec in stream:
                yield (rec, self.decode(rec)) if self.decoded else rec
            if not self.repeat:
                return
            epoch += 1

    def _records(self, consumer: int, consumers: int, epoch: int) -> Iterator[Record]:
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            random.Random(hash((self.seed, epoch))).shuffle(shards)
        by_shard = len(shards) >= consumers
        mine = shards[consumer::consumers] if by_shard else shards
        n = 0
        for d, modality, entry in mine:
            for rec in self._read_shard(d, modality, entry):
                if by_shard or n % consumers == consumer:
                    yield rec
                n += 1

    def _read_shard(self, d: Path, modality: str, entry: dict[str, Any]) -> Iterator[Record]:
        path = d / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"{path}: shard listed in {d / MANIFEST} is missing") from None
        if self.verify:
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:
                raise ChecksumError(f"{path}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}...; the shard is corrupt or was changed")
        count = 0
        try:
            members = ({**m, "__url__": str(path)} for m in wds.tariterators.tar_file_iterator(io.BytesIO(data)))
            for sample in wds.tariterators.group_by_keys(members):
                rec = decode_sample(sample)
                _check_record(path, rec, self.sizes[d])
                rec.meta["modality"] = modality
                count += 1
                yield rec
        except (tarfile.TarError, KeyError, ValueError, TypeError, AttributeError, EOFError) as e:
            raise ShardError(f"{path}: unreadable shard ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
        if count != entry["records"]:
            raise ShardError(f"{path}: holds {count} records, its manifest says {entry['records']}")


def _adapter_of(d: Path, m: dict[str, Any]) -> Adapter:
    state = m["adapter"]["state"]
    if state.get("modality") != m["modality"]:
        raise ShardError(f"{d / MANIFEST}: the adapter state is not that of a {m['modality']} adapter")
    try:
        return adapter_from_state(state, d)
    except InputError:
        raise
    except Exception as e:  # a damaged state fails in each adapter's own way
        raise ShardError(f"{d / MANIFEST}: cannot rebuild the {m['modality']} adapter ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def field_lengths(records: Iterable[Record]) -> dict[str, dict[int, int]]:
    """field name -> {length: count} over ``records``, for the fields whose length varies."""
    counts: dict[str, Counter] = {}
    for rec in records:
        for f in rec.fields:
            counts.setdefault(f.name, Counter())[f.tokens.size] += 1
    return {name: dict(sorted(c.items())) for name, c in counts.items() if len(c) > 1}


def _shuffled(stream: Iterator[Record], size: int, rng: random.Random) -> Iterator[Record]:
    buf: list[Record] = []
    for rec in stream:
        if len(buf) < size:
            buf.append(rec)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = rec
    rng.shuffle(buf)
    yield from buf
