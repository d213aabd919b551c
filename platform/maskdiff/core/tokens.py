"""The shared token space: supports, fields, records and the vocabulary spec.

Every adapter owns one or more *supports*: named local vocabularies (the 256
pixel intensities, the residues, the categories of one table column, ...).
A :class:`VocabSpec` lays the supports of a run out in one global id space,
one contiguous range each, followed by the special ids ``mask`` and ``pad``.
The network predicts only clean ids (``[0, num_clean)``); ``mask_id`` and
``pad_id`` are inputs only.

A *record* is an ordered list of named *fields*; each field holds local ids
of one support, in the field's own shape (``(L,)``, ``(H, W, C)``, ``(1,)``).
A local id of :data:`MISSING` marks a missing value (an empty table cell): it
is not a token to learn, it is masked at sampling time.

Support names are ``<source>/<local>``. A *source* is a modality, or
``<modality>/<data set>`` for supports fitted on one data set (a table's
columns, a FASTA file's header fields): :func:`source_key`. So two tables that
share a column name keep apart (``tabular/adult/col:sex``,
``tabular/penguins/col:sex``), while supports that every data set of a
modality shares (residues, pixel intensities, text pieces) are named by the
modality alone. The data set is the shard set's name, as its manifest records
it (``tools/shard.py --name``, or the directory's name when a run configuration
builds it; the default name, the modality, adds none), kept in the adapter's
state. Supports written before data sets were named have no data set part
(``tabular/col:sex``); they are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import modalities

MISSING = -1  # local id of a missing value


def source_key(modality: str, dataset: str | None = None) -> str:
    """The prefix of a source's support names: the modality, or ``<modality>/<dataset>``."""
    return f"{modality}/{dataset}" if dataset else modality


def number_line(values: Iterable[float]) -> tuple[float, ...]:
    """``values`` standardised (mean 0, spread 1; all 0 when they do not spread): the ``coords`` of a support."""
    v = np.asarray(list(values), dtype=np.float64)
    spread = float(v.std())
    return tuple(((v - v.mean()) / spread).tolist()) if spread > 0 else (0.0,) * v.size


class VocabMismatchError(ValueError):
    """A saved vocabulary spec does not describe the token space in use."""


@dataclass(frozen=True)
class Support:
    """A named local vocabulary of ``size`` clean values of one modality."""

    name: str
    modality: str
    size: int
    # where each value lies on a number line, standardised (a numeric column's bins: each bin's
    # mean; pixel intensities), or None; the model embeds it beside the token, so that neighbouring
    # values start out alike. Metadata: the id layout (and the fingerprint) ignore it.
    coords: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not modalities.is_known(self.modality):
            raise ValueError(f"support {self.name!r}: unknown modality {self.modality!r}; known: {modalities.names()}")
        if self.size < 1:
            raise ValueError(f"support {self.name!r}: size must be >= 1, got {self.size}")
        if self.coords is not None:
            coords = tuple(float(c) for c in self.coords)
            if len(coords) != self.size or not all(math.isfinite(c) for c in coords):
                raise ValueError(f"support {self.name!r}: coords must be {self.size} finite numbers")
            object.__setattr__(self, "coords", coords)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "modality": self.modality, "size": self.size}
        if self.coords is not None:
            d["coords"] = list(self.coords)
        return d


@dataclass
class Field:
    """One named field of a record: local ids of ``support`` in their own shape."""

    name: str
    support: str
    tokens: np.ndarray

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tokens.shape)


@dataclass
class Record:
    """An ordered set of fields plus free-form metadata (id, source, crop, ...)."""

    fields: list[Field]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"record has no field {name!r}; fields: {[f.name for f in self.fields]}")

    def __len__(self) -> int:
        """Number of token positions."""
        return sum(f.tokens.size for f in self.fields)


class VocabSpec:
    """Global id layout: one contiguous range per support, then ``mask``, ``pad``."""

    SPECIAL = ("mask", "pad")

    def __init__(self, supports: Iterable[Support]):
        self.supports: list[Support] = list(supports)
        names = [s.name for s in self.supports]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate support names: {sorted(dupes)}")
        self.index: dict[str, int] = {s.name: i for i, s in enumerate(self.supports)}
        self.offsets: list[int] = []
        offset = 0
        for s in self.supports:
            self.offsets.append(offset)
            offset += s.size
        self.num_clean: int = offset
        self.mask_id: int = offset
        self.pad_id: int = offset + 1
        self.vocab_size: int = offset + len(self.SPECIAL)
        self.modalities: list[str] = sorted({s.modality for s in self.supports}, key=modalities.modality_id)

    # --- lookup ---------------------------------------------------------------
    def support(self, name: str) -> Support:
        return self.supports[self.support_id(name)]

    def support_id(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise KeyError(f"support {name!r} is not in the vocabulary spec; known: {list(self.index)}") from None

    def id_range(self, name: str) -> range:
        i = self.support_id(name)
        return range(self.offsets[i], self.offsets[i] + self.supports[i].size)

    def named(self, name: str) -> list[str]:
        """The supports ``name`` stands for: the support itself, or, for ``<modality>/<local>``, that
        support of every data set (``<modality>/<data set>/<local>``); empty when none."""
        if name in self.index:
            return [name]
        modality, _, local = name.partition("/")
        return [s.name for s in self.supports if s.modality == modality and s.name.startswith(f"{modality}/")
                and s.name[len(modality) + 1:].partition("/")[2] == local]

    def named_ids(self, names: Sequence[str]) -> list[int]:
        """Support ids of every support the names stand for (:meth:`named`), in order."""
        return [self.support_id(s) for name in names for s in self.named(name)]

    def modality_id(self, modality: str) -> int:
        return modalities.modality_id(modality)

    @property
    def modality_rows(self) -> int:
        """Rows of the modality embedding of a model over this spec."""
        return modalities.embedding_rows(self.modalities)

    def to_global(self, name: str, local: np.ndarray) -> np.ndarray:
        """Local ids of support ``name`` to global ids; MISSING maps to ``mask_id``."""
        local = np.asarray(local, dtype=np.int64)
        size = self.support(name).size
        bad = (local != MISSING) & ((local < 0) | (local >= size))
        if bad.any():
            raise ValueError(f"support {name!r}: local ids out of range [0, {size}): {np.unique(local[bad])[:5]}")
        return np.where(local == MISSING, self.mask_id, local + self.offsets[self.support_id(name)])

    def to_local(self, name: str, global_ids: np.ndarray) -> np.ndarray:
        """Global ids back to local ids of ``name``; ``mask_id`` maps to MISSING."""
        g = np.asarray(global_ids, dtype=np.int64)
        r = self.id_range(name)
        bad = (g != self.mask_id) & ((g < r.start) | (g >= r.stop))
        if bad.any():
            raise ValueError(f"support {name!r}: global ids outside its range {r}: {np.unique(g[bad])[:5]}")
        return np.where(g == self.mask_id, MISSING, g - r.start)

    # --- persistence ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "supports": [s.to_dict() for s in self.supports],
            "mask_id": self.mask_id,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabSpec:
        spec = cls(Support(**s) for s in d["supports"])
        derived = {"mask_id": spec.mask_id, "pad_id": spec.pad_id, "vocab_size": spec.vocab_size, "fingerprint": spec.fingerprint()}
        for key, value in derived.items():
            if key in d and d[key] != value:
                raise VocabMismatchError(f"vocabulary spec is inconsistent: stored {key}={d[key]!r}, its supports give {value!r}")
        return spec

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, expect: VocabSpec | None = None) -> VocabSpec:
        """Load a spec; with ``expect``, refuse one that differs from it."""
        spec = cls.from_dict(json.loads(Path(path).read_text()))
        if expect is not None:
            expect.check_same(spec, where=str(path))
        return spec

    def fingerprint(self) -> str:
        payload = json.dumps([[s.name, s.modality, s.size] for s in self.supports])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def check_same(self, other: VocabSpec, where: str = "vocabulary spec") -> None:
        """Raise :class:`VocabMismatchError` naming the first difference."""
        if self.fingerprint() == other.fingerprint():
            return
        mine = {s.name: s for s in self.supports}
        theirs = {s.name: s for s in other.supports}
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
                raise VocabMismatchError(f"{where}: support {name!r} differs: expected {mine.get(name)}, found {theirs.get(name)}")
        raise VocabMismatchError(f"{where}: supports are in a different order, so global ids would shift")

    def merged(self, other: VocabSpec) -> VocabSpec:
        """A spec holding this one's supports followed by ``other``'s new ones."""
        extra = []
        for s in other.supports:
            if s.name in self.index:
                if self.support(s.name) != s:
                    raise VocabMismatchError(f"support {s.name!r} differs: {self.support(s.name)} vs {s}")
            else:
                extra.append(s)
        return VocabSpec(self.supports + extra)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VocabSpec) and self.fingerprint() == other.fingerprint()

    def __repr__(self) -> str:
        return f"VocabSpec({len(self.supports)} supports, num_clean={self.num_clean}, mask_id={self.mask_id}, pad_id={self.pad_id})"
