"""The adapter interface and the helpers the four modality adapters share.

An adapter turns one modality's raw records into :class:`maskdiff.core.tokens.Record`
objects and back. Its life cycle:

* ``read(paths)`` yields ``(record_id, raw)`` pairs, or :class:`Rejected` for
  input records it cannot even parse (a corrupt image, a ragged CSV row);
* ``fit(raws)`` learns the fitted state (BPE model, categories, bins) — a
  no-op where there is none;
* ``encode(raw)`` gives one :class:`Record` or raises :class:`Reject`;
  ``encode_many(raw)`` gives the stored records of one input record (text cuts
  long documents into windows; everything else stores one record);
* ``decode(record)`` gives the raw value back;
* ``supports()`` names the local vocabularies, ``state()``/``from_state()``
  persist the adapter, ``describe()`` summarises it for the manifest.

Adapters whose supports are fitted on one data set (``namespaced``: table
columns, FASTA header fields) take a ``dataset`` option, the name of the shard
set they were fitted for, and name those supports under it
(:func:`maskdiff.core.tokens.source_key`); the adapter's :attr:`Adapter.key` is that
prefix, and is how a run with several data sets of one modality tells their
adapters apart.

Fatal problems with the user's input (a missing or empty file, a file that is
not of the expected format at all) raise :class:`InputError`, whose message
names the file and the cause.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence, Union

from maskdiff.core.tokens import MISSING, Record, Support, source_key

OTHER = "<other>"  # decoded value of the other/unseen bucket of a category vocabulary


class Reject(ValueError):
    """An input record is refused; ``str(exc)`` is the reason."""


class InputError(Exception):
    """A fatal problem with the input; the message names the file and the cause."""


@dataclass(frozen=True)
class Rejected:
    """An input record refused while reading, with its id and the reason."""

    id: str
    reason: str


RawItem = Union[tuple[str, Any], Rejected]


@dataclass(frozen=True)
class Option:
    """An adapter option: constructor keyword ``key``, exposed on the command line as ``--key-with-dashes``."""

    key: str
    help: str
    type: Any = str
    choices: Sequence[Any] | None = None
    flag: bool = False  # a boolean switch (store_true)
    metavar: str | None = None

    @property
    def cli(self) -> str:
        return "--" + self.key.replace("_", "-")


class Adapter(ABC):
    """Turns raw records of one modality into token records and back."""

    modality: ClassVar[str]
    name: ClassVar[str]
    # how the core treats the modality (maskdiff.core.modalities.Modality; entered by register_adapter)
    default_schedule: ClassVar[str | None] = None
    per_dim_support: ClassVar[str | None] = None
    keeps_lengths: ClassVar[bool] = False
    options_spec: ClassVar[tuple[Option, ...]] = ()
    namespaced: ClassVar[bool] = False  # takes a ``dataset`` option naming its fitted supports

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = options

    @property
    def key(self) -> str:
        """The source this adapter encodes: its modality, or ``<modality>/<dataset>`` (the prefix of its own supports)."""
        return source_key(self.modality, self.options.get("dataset"))

    def support_name(self, local: str) -> str:
        """The name of one of this adapter's data-set supports (a column, a header field)."""
        return f"{self.key}/{local}"

    # --- reading and fitting ----------------------------------------------------
    @abstractmethod
    def read(self, paths: Sequence[str | Path]) -> Iterator[RawItem]:
        """Yield ``(record_id, raw)`` or :class:`Rejected` for every input record."""

    def fit(self, raws: Iterable[Any]) -> None:
        """Learn the fitted state from raw records (no-op for stateless adapters)."""

    @property
    def needs_fit(self) -> bool:
        """True while the adapter has state to fit and has not fitted it."""
        return False

    # --- encoding -----------------------------------------------------------------
    @abstractmethod
    def encode(self, raw: Any) -> Record:
        """One raw record to a :class:`Record`; raise :class:`Reject` to refuse it."""

    def encode_many(self, raw: Any) -> list[Record]:
        """The stored records of one input record (one, except for cut documents)."""
        return [self.encode(raw)]

    @abstractmethod
    def decode(self, record: Record) -> Any:
        """A record back to its raw value."""

    @abstractmethod
    def supports(self) -> list[Support]:
        """The local vocabularies of this adapter's fields, names prefixed by the modality."""

    # --- persistence ----------------------------------------------------------------
    def state(self, root_dir: str | Path | None = None) -> dict[str, Any]:
        """JSON-able state: the options plus the fitted state.

        With ``root_dir``, large binary state is written there as a file and
        referenced by its relative path; without, it is embedded.
        """
        return {"adapter": self.name, "modality": self.modality, "options": dict(self.options), "fitted": self._fitted_state(root_dir)}

    @classmethod
    def from_state(cls, state: dict[str, Any], root_dir: str | Path | None = None) -> Adapter:
        if state.get("modality") != cls.modality:
            raise ValueError(f"adapter state is for modality {state.get('modality')!r}, not {cls.modality!r}")
        adapter = cls(**state.get("options", {}))
        adapter._load_fitted(state.get("fitted") or {}, Path(root_dir) if root_dir is not None else None)
        return adapter

    def _fitted_state(self, root_dir: str | Path | None) -> dict[str, Any]:
        return {}

    def _load_fitted(self, fitted: dict[str, Any], root_dir: Path | None) -> None:
        pass

    def notes(self) -> list[str]:
        """What a user training on shards with this state should know (e.g. they were written by an older version
        that encoded less); printed when a run opens them. Nothing by default."""
        return []

    def fingerprint(self) -> str:
        """A short hash of the supports and fitted state: equal fingerprints encode and decode alike."""
        content = {"supports": [[s.name, s.size] for s in self.supports()], "fitted": self._fitted_state(None)}
        payload = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """A human-readable summary for the manifest."""
        return {
            "adapter": self.name,
            "modality": self.modality,
            "options": dict(self.options),
            "supports": {s.name: s.size for s in self.supports()},
        }


# --- category vocabularies -----------------------------------------------------------


def _sort_key(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order first, then everything else in text order."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


@dataclass
class CategoryVocab:
    """Categories of one conditioning field or table column, fitted from data.

    At most ``max_categories`` values are kept (the most frequent; ties broken by
    value), stored in natural order (numbers numerically). Their local ids are
    ``0 .. n-1``; id ``n`` is the *other* bucket. A value that is not a kept
    category (dropped by the cap, or never seen while fitting) goes to the other
    bucket with ``unseen="other"`` and rejects the record with
    ``unseen="reject"``. ``None`` encodes to :data:`MISSING`. The other bucket
    decodes to :data:`OTHER`.
    """

    categories: list[str] = field(default_factory=list)
    unseen: str = "other"

    def __post_init__(self) -> None:
        if self.unseen not in ("other", "reject"):
            raise ValueError(f"unseen policy must be 'other' or 'reject', got {self.unseen!r}")
        self._index = {c: i for i, c in enumerate(self.categories)}

    @classmethod
    def fit(cls, values: Iterable[str | None], max_categories: int, unseen: str = "other") -> CategoryVocab:
        counts = Counter(v for v in values if v is not None)
        kept = sorted(counts, key=lambda v: (-counts[v], _sort_key(v)))[:max_categories]
        return cls(sorted(kept, key=_sort_key), unseen)

    @property
    def other_id(self) -> int:
        return len(self.categories)

    @property
    def size(self) -> int:
        return len(self.categories) + 1

    def encode(self, value: str | None, what: str = "value") -> int:
        if value is None:
            return MISSING
        i = self._index.get(value)
        if i is not None:
            return i
        if self.unseen == "reject":
            raise Reject(f"{what} {value!r} is not one of the {len(self.categories)} categories kept when fitting (unseen=reject)")
        return self.other_id

    def decode(self, local_id: int) -> str | None:
        if local_id == MISSING:
            return None
        if not 0 <= local_id <= self.other_id:
            raise ValueError(f"category id {local_id} outside [0, {self.other_id}]")
        return self.categories[local_id] if local_id < self.other_id else OTHER

    def to_dict(self) -> dict[str, Any]:
        return {"categories": list(self.categories), "unseen": self.unseen}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CategoryVocab:
        return cls(list(d["categories"]), d.get("unseen", "other"))


# --- input files -----------------------------------------------------------------------


def expand_inputs(paths: Sequence[str | Path], suffixes: Sequence[str] | None = None) -> list[tuple[Path, Path | None]]:
    """Expand files, folders (recursively) and glob patterns into files.

    Returns ``(file, root)`` pairs where ``root`` is the folder a file was found
    under (``None`` for files named directly). Files named directly or matched by
    a pattern must exist and be non-empty; files inside folders are kept even
    when empty so that the adapter can report them as rejected records.
    """
    if not paths:
        raise InputError("no input given")
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    out: list[tuple[Path, Path | None]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and (wanted is None or f.name.lower().endswith(wanted)))
            if not found:
                kinds = "/".join(wanted) if wanted else "any"
                raise InputError(f"{p}: folder holds no input files ({kinds})")
            out.extend((f, p) for f in found)
            continue
        if not p.exists() and glob.has_magic(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(f"{raw}: pattern matches no file")
            for m in matches:
                out.append((_check_file(m), None))
            continue
        out.append((_check_file(p), None))
    return out


def _check_file(p: Path) -> Path:
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as e:
        raise InputError(f"{p}: cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise InputError(f"{p}: file is empty")
    return p


# delimiters a CSV file is often written with instead of the one asked for (spreadsheets in many locales write ';')
OTHER_DELIMITERS = {";": "';'", "\t": "$'\\t'", "|": "'|'"}


def delimiter_hint(header: Sequence[str], delimiter: str) -> str | None:
    """For a header read as a single column that holds another common delimiter: what to pass instead, else None."""
    if len(header) != 1:
        return None
    for other, shown in OTHER_DELIMITERS.items():
        if other != delimiter and other in header[0]:
            return (f"the header reads as one column ({header[0][:60]!r}): if its fields are separated by {other!r}, "
                    f"pass --delimiter {shown}")
    return None


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open a file for reading bytes, transparently un-gzipping (by content, not name)."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")  # type: ignore[return-value]


def open_text(path: Path) -> io.TextIOBase:
    """Open a (possibly gzipped) UTF-8 text file, a leading byte-order mark dropped; undecodable bytes raise UnicodeDecodeError."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="")


def options_from(local_vars: dict[str, Any]) -> dict[str, Any]:
    """The constructor keywords from ``locals()`` (minus ``self`` and ``__class__``)."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "__class__")}
