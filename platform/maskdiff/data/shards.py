"""Token shards: :func:`write_shards` builds them, :class:`ShardSet` streams them.

A shard directory (a local folder, or a URL: see :mod:`maskdiff.data.shard_source`) holds

* ``<name>-000000.tar`` ... — webdataset tar shards, one sample per stored
  record (its layout: :mod:`maskdiff.data.shard_format`); each record's header has
  the fields (``[name, support, shape]`` each) and the record's ``meta``,
  which always has ``id``, the input record's id;
* ``manifest.json`` — format, modality, the adapter state (large binary state
  as a file next to it, e.g. ``text-bpe.model``), the vocabulary spec, the
  counts ``records_in == records_written + records_rejected`` (input records)
  and ``samples_written`` (stored records; more than ``records_written`` only
  when text documents are cut into windows), and the shard list with each
  shard's record count, size and sha256;
* ``rejects.jsonl`` — one ``{"id", "reason"}`` line per refused input record.

This module gathers the names callers use; the work is done in
:mod:`maskdiff.data.shard_writer` (writing, atomically) and
:mod:`maskdiff.data.shard_reader` (streaming, checking as it goes).
"""

from __future__ import annotations

from maskdiff.files import sha256_file
from .shard_format import FORMAT, MANIFEST, REJECTS, VERSION, ChecksumError, ShardError, decode_sample
from .shard_reader import BAD_SHARD_POLICIES, ShardSet, SkippedShard, field_lengths, load_manifest
from .shard_source import ShardLocation
from maskdiff.progress import progress_enabled
from .shard_writer import DEFAULT_SHARD_SIZE, STAGING_PREFIX, write_shards

__all__ = [
    "BAD_SHARD_POLICIES", "DEFAULT_SHARD_SIZE", "FORMAT", "MANIFEST", "REJECTS", "STAGING_PREFIX", "VERSION", "ChecksumError",
    "ShardError", "ShardLocation", "ShardSet", "SkippedShard", "decode_sample", "field_lengths", "load_manifest",
    "progress_enabled", "sha256_file", "write_shards",
]
