"""The shard format: names, errors and the bytes of one stored record.

Version 2 stores a record as one tar member ``<key>.rec``: its header (compact
JSON: ``fields`` as ``[name, support, shape]``, ``meta``, ``dtype``), a
newline, then the concatenated local token ids of all fields as raw
little-endian integers. Version 1 used two members per record
(``<key>.tokens.npy`` and ``<key>.json``), each padded to 512 bytes behind its
own 512-byte tar header; readers still accept it.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from maskdiff.adapters import InputError
from maskdiff.core.tokens import Field, Record

FORMAT, VERSION = "maskdiff-shards", 2
READABLE_VERSIONS = (1, 2)
MANIFEST, REJECTS = "manifest.json", "rejects.jsonl"
RECORD_MEMBER = "rec"  # the tar member suffix of a version-2 record


class ShardError(InputError):
    """A fatal, user-facing problem with a shard directory; the message names it."""


class ChecksumError(ShardError):
    """A shard's bytes do not match the sha256 in its manifest."""


def encode_record(rec: Record, dtype: Any) -> bytes:
    """The payload of a record's single tar member (see the module docstring)."""
    tokens = np.concatenate([f.tokens.reshape(-1) for f in rec.fields]).astype(np.dtype(dtype).newbyteorder("<"))
    header = {"fields": [[f.name, f.support, list(f.shape)] for f in rec.fields], "meta": rec.meta, "dtype": np.dtype(dtype).name}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + tokens.tobytes()


def legacy_members(rec: Record, dtype: Any) -> dict[str, bytes]:
    """A record as the two tar members of version 1 (for compatibility tests and the size benchmark)."""
    buf = io.BytesIO()
    np.save(buf, np.concatenate([f.tokens.reshape(-1) for f in rec.fields]).astype(dtype), allow_pickle=False)
    header = {"fields": [[f.name, f.support, list(f.shape)] for f in rec.fields], "meta": rec.meta}
    return {"tokens.npy": buf.getvalue(), "json": json.dumps(header, separators=(",", ":")).encode()}


def decode_sample(sample: dict[str, Any]) -> Record:
    """A webdataset sample of either layout (``rec``, or ``tokens.npy`` + ``json``) to a :class:`Record`."""
    if RECORD_MEMBER in sample:
        head, _, body = sample[RECORD_MEMBER].partition(b"\n")
        header = json.loads(head)
        flat = np.frombuffer(body, dtype=np.dtype(header["dtype"]).newbyteorder("<")).astype(np.int64)
    else:
        header = json.loads(sample["json"])
        flat = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False).astype(np.int64)
    fields, at = [], 0
    for fname, support, shape in header["fields"]:
        n = int(np.prod(shape, dtype=np.int64))
        fields.append(Field(fname, support, flat[at:at + n].reshape(shape)))
        at += n
    return Record(fields, header["meta"])


__all__ = ["FORMAT", "MANIFEST", "READABLE_VERSIONS", "REJECTS", "VERSION", "ChecksumError", "ShardError",
           "decode_sample", "encode_record", "legacy_members"]
