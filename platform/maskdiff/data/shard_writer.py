"""Writing shard directories: :func:`write_shards` (what ``tools/shard.py`` runs).

Everything is built in a hidden staging folder inside the output directory and
moved into place when complete, the manifest last, so a killed run leaves no
complete-looking shard and no manifest describing missing shards; replacing a
data set (``overwrite``) swaps whole directories.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import webdataset as wds

from maskdiff.adapters import Adapter, Rejected, adapter_class, adapter_from_state
from maskdiff.core.tokens import VocabSpec

from maskdiff.files import sha256_file
from maskdiff.progress import progress_enabled
from .shard_encoding import encoded
from .shard_format import FORMAT, MANIFEST, RECORD_MEMBER, REJECTS, VERSION, ShardError
from .shard_reader import _side_files, load_manifest

STAGING_PREFIX = ".staging-"
DEFAULT_SHARD_SIZE = 10_000


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
    workers: int = 1,
    **adapter_options: Any,
) -> dict[str, Any]:
    """Encode the raw records of ``inputs`` into shards under ``output``; return the manifest.

    ``adapter_options`` go to the modality's adapter (see ``adapters``);
    ``max_len`` is the text window / protein length limit. ``name`` (the shard
    file prefix, default the modality) is also the data set name under which
    a table's columns and a FASTA file's header fields are named
    (``tabular/<name>/col:age``; the default name adds none). With ``state_from``
    (a shard directory of the same modality) its fitted adapter is reused, data
    set name included, so the two directories share one vocabulary. ``workers > 1`` encodes in that
    many processes (same bytes as one; see :mod:`maskdiff.data.shard_encoding`). Raises :class:`InputError` /
    :class:`ShardError` for user errors (missing or empty input, output
    already holding shards without ``overwrite``, nothing encodable).
    """
    out = Path(output)
    name = name or modality
    if workers < 1:
        raise ShardError(f"--workers {workers}: must be at least 1")
    if shard_size < 1:
        raise ShardError(f"--shard-size {shard_size}: must be at least 1")
    if "/" in name or name.startswith("."):
        raise ShardError(f"--name {name!r}: must be a plain file name prefix")
    adapter = _make_adapter(modality, max_len, state_from, adapter_options, None if name == modality else name)
    created = not out.exists()
    _check_output(out, overwrite)
    try:
        return _write(adapter, modality, inputs, out, name, shard_size, overwrite, progress_enabled(progress), workers)
    except BaseException:
        if created and not [p for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX)]:
            shutil.rmtree(out, ignore_errors=True)  # a failed run leaves no empty output folder behind
        raise


def _write(adapter: Adapter, modality: str, inputs: Sequence[str | Path], out: Path, name: str, shard_size: int, overwrite: bool,
           show: bool, workers: int) -> dict[str, Any]:
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
        counts, shards = _encode_all(adapter, inputs, stage, name, shard_size, dtype, show, workers)
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


def _make_adapter(modality: str, max_len: int | None, state_from: str | Path | None, options: dict[str, Any], dataset: str | None) -> Adapter:
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
    if cls.namespaced and dataset:
        options["dataset"] = dataset
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


def _encode_all(adapter: Adapter, inputs: Sequence[str | Path], stage: Path, name: str, shard_size: int, dtype: Any, show: bool,
                workers: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
    counts = {"records_in": 0, "records_written": 0, "records_rejected": 0, "samples_written": 0}
    shards: list[dict[str, Any]] = []
    writer: _ShardFile | None = None
    with open(stage / REJECTS, "w", encoding="utf-8") as rejects, _reading(adapter, inputs, show, desc=f"shard {adapter.modality}", unit=" rec") as items:
        for rid, result in encoded(adapter, items, dtype, workers):
            counts["records_in"] += 1
            if isinstance(result, str):
                counts["records_rejected"] += 1
                rejects.write(json.dumps({"id": rid, "reason": result}) + "\n")
                continue
            counts["records_written"] += 1
            for payload in result:
                if writer is None:
                    writer = _ShardFile(stage / f"{name}-{len(shards):06d}.tar")
                writer.write(f"{counts['samples_written']:010d}", {RECORD_MEMBER: payload})
                counts["samples_written"] += 1
                if writer.count >= shard_size:
                    shards.append(writer.close())
                    writer = None
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

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self._tar.write({"__key__": key, **members})
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
    files = [s["file"] for s in m.get("shards", [])] + [m.get("rejects", REJECTS)] + _side_files(m)
    return [f for f in files if f and "/" not in f]


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


__all__ = ["DEFAULT_SHARD_SIZE", "STAGING_PREFIX", "write_shards"]
