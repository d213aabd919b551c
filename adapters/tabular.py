"""Tabular: CSV or Parquet rows through pyarrow, one field per column.

Each column becomes a field ``col:<name>`` of shape ``(1,)`` with its own
support ``tabular/<dataset>/col:<name>``, ``<dataset>`` being the name of the
shard set the columns were fitted for (``tools/shard.py --name``, or the shard
directory's name when a run configuration builds it), so tables that share a
column name train together; without a data set name (and in shard sets made
before there was one) the support is ``tabular/col:<name>``. A null or empty cell (and any of ``na_values``,
by default ``NA,N/A,?,NaN,null,NULL``) is *missing*: local id MISSING (-1),
not a token.

Column types are inferred — *numeric* when every non-missing cell parses as a
number, else *categorical* — and can be overridden with ``categorical``,
``numeric`` and ``drop`` (comma-separated column names).

Some columns are not learned but *passed through* (kept in the table, never a
field of the record), each with its reason in :attr:`TabularAdapter.passthrough`:
columns named in ``passthrough``; free text and identifiers (categorical
columns with more than ``free_text`` distinct values, most of them seen once:
names, titles, comments); dates (every observed cell an ISO date or time);
row numbers (whole numbers, each the row's position plus one constant, at
least ``MIN_ROW_NUMBERS`` of them: the index column pandas and R write by
default); and columns with no observed value at all. Imputation leaves their
cells as they are, except the missing cells of row numbers, which it fills
with their row's number (:func:`row_number_offset`).

* Categorical columns get one token per category seen when fitting (at most
  ``max_categories``, the most frequent; other values — beyond the cap or
  unseen when fitting — share an *other* bucket, or with ``unseen=reject``
  reject the row).
  Categories are kept as the exact cell text and decode to it.
* Numeric columns are cut into at most ``bins`` quantile (equal-frequency)
  bins fitted on the data (default: about the square root of the column's
  observed cells, between 16 and 64): edges are data values, bin i is
  ``[edge_i, edge_i+1)``, the last one closed; a value holding more than its
  share of the rows (the zeros of a mostly-zero column) gets a bin of its own
  and the other bins split the rest evenly. A column with no more distinct values than ``bins`` gets one bin per
  value and decodes exactly. Each bin keeps the mean of its fitted values (the
  point estimate of imputation averages them). Decoding gives a value inside the bin:
  ``numeric_decode=median`` (default) the median of the fitted values in the
  bin, ``uniform`` a uniform draw inside it (seeded by ``seed``); columns whose
  values are all integers decode to integers. Values outside the fitted range
  (only possible with a state fitted on other data) go to the end bins.
  Infinite numbers (``inf``, ``1e400``) reject their row.

Rows with the wrong number of cells (ragged CSV rows) are rejected with their
line number. Records' ``meta["id"]`` is ``<file>#<row>`` (0-based data row
among the parsed rows).
"""

from __future__ import annotations

import codecs
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from maskdiff.core.tokens import MISSING, Field, Record, Support, number_line

from .base import Adapter, CategoryVocab, InputError, Option, RawItem, Reject, Rejected, delimiter_hint, expand_inputs, open_binary, options_from

DEFAULT_NA = "NA,N/A,?,NaN,null,NULL"
NEWLINE = b"\n"
MAX_COLUMNS = 4096


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


class NumericBins:
    """Quantile bins of one numeric column (see the module docstring)."""

    def __init__(self, edges: Sequence[float], medians: Sequence[float], integer: bool, discrete: bool, means: Sequence[float] | None = None) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.medians = np.asarray(medians, dtype=np.float64)
        self.means = self.medians if means is None else np.asarray(means, dtype=np.float64)
        self.integer, self.discrete = integer, discrete

    @classmethod
    def fit(cls, values: np.ndarray, bins: int) -> NumericBins:
        values = np.sort(values[np.isfinite(values)])
        integer = bool(values.size) and bool(np.all(values == np.floor(values)))
        uniq, counts = np.unique(values, return_counts=True)
        if uniq.size == 0:
            return cls([0.0, 0.0], [0.0], integer, True)
        if uniq.size <= bins:
            return cls(np.append(uniq, uniq[-1]), uniq, integer, True)
        # Equal-frequency bins, greedily: close a bin once it holds its share of
        # what is left, so a heavy value (a column of mostly zeros) takes one
        # bin and the remaining bins still split the rest evenly.
        starts, remaining, left, acc = [0], values.size, bins, 0
        for j, c in enumerate(counts[:-1]):
            acc += c
            if left > 1 and acc * left >= remaining:
                starts.append(j + 1)
                remaining, left, acc = remaining - acc, left - 1, 0
        edges = np.append(uniq[starts], uniq[-1])
        idx = np.searchsorted(edges[1:-1], values, side="right")
        medians = np.array([np.median(values[idx == i]) for i in range(edges.size - 1)])
        means = np.array([values[idx == i].mean() for i in range(edges.size - 1)])
        if integer:
            medians = np.floor(medians)
        return cls(edges, medians, integer, False, means)

    @property
    def size(self) -> int:
        return self.edges.size - 1

    def coordinates(self) -> tuple[float, ...]:
        """Each bin's mean on a standardised number line (the spread of the bin means; 0 when one bin)."""
        return number_line(self.means)

    def encode(self, x: float) -> int:
        return int(np.searchsorted(self.edges[1:-1], x, side="right"))

    def bounds(self, i: int) -> tuple[float, float]:
        return float(self.edges[i]), float(self.edges[i + 1])

    def decode(self, i: int, rng: np.random.Generator | None = None) -> float | int:
        if rng is None or self.discrete:
            v = float(self.medians[i])
        else:
            lo, hi = self.bounds(i)
            last = i == self.size - 1
            if self.integer:
                v = float(rng.integers(math.ceil(lo), int(hi) + (1 if last else 0))) if hi > lo else lo
            else:
                v = float(rng.uniform(lo, hi)) if hi > lo else lo
        return int(v) if self.integer else v

    def to_dict(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "medians": self.medians.tolist(), "means": self.means.tolist(), "integer": self.integer,
                "discrete": self.discrete}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NumericBins:
        return cls(d["edges"], d["medians"], d["integer"], d["discrete"], d.get("means"))


class TabularAdapter(Adapter):
    modality = "tabular"
    default_schedule = "linear"
    name = "tabular-quantile"
    namespaced = True
    options_spec = (
        Option("bins", "quantile bins per numeric column (default: about sqrt(observed cells), 16 to 64)", int, metavar="N"),
        Option("categorical", "columns to treat as categorical, comma-separated", str, metavar="COLS"),
        Option("numeric", "columns to treat as numeric, comma-separated (cells that are not numbers reject the row)", str, metavar="COLS"),
        Option("drop", "columns to leave out, comma-separated", str, metavar="COLS"),
        Option("passthrough", "columns to keep in the table but not learn (imputation leaves them as they are), comma-separated", str, metavar="COLS"),
        Option("free_text", "pass through categorical columns with more than N distinct values, most seen once (default 100)", int, metavar="N"),
        Option("na_values", f"cell texts that mean missing, comma-separated; empty cells always do (default {DEFAULT_NA})", str, metavar="LIST"),
        Option("delimiter", "CSV field delimiter (default ,)", str, metavar="CHAR"),
        Option("max_categories", "keep at most N categories per column, the rest share an 'other' bucket (default 1000)", int, metavar="N"),
        Option("unseen", "a value that is not a kept category (unseen when fitting, or beyond the cap): map it to the 'other' bucket or reject the row (default other)", str, ("other", "reject")),
        Option("numeric_decode", "value a numeric bin decodes to: the median of its fitted values, or a uniform draw inside the bin (default median)", str, ("median", "uniform")),
        Option("seed", "random seed for numeric_decode=uniform (default 0)", int, metavar="N"),
    )

    def __init__(self, bins: int | None = None, categorical: str | None = None, numeric: str | None = None, drop: str | None = None,
                 passthrough: str | None = None, free_text: int = 100, na_values: str = DEFAULT_NA, delimiter: str = ",",
                 max_categories: int = 1000, unseen: str = "other", numeric_decode: str = "median", seed: int = 0,
                 dataset: str | None = None) -> None:
        super().__init__(**options_from(locals()))
        if bins is not None and bins < 1:
            raise InputError(f"--bins {bins}: must be at least 1")
        if free_text < 1:
            raise InputError(f"--free-text {free_text}: must be at least 1")
        if len(delimiter) != 1:
            raise InputError(f"--delimiter {delimiter!r}: must be one character")
        overlap = set(_names(categorical)) & set(_names(numeric))
        if overlap:
            raise InputError(f"columns {sorted(overlap)} are named both --categorical and --numeric")
        self.columns: dict[str, CategoryVocab | NumericBins] | None = None
        self.passthrough: dict[str, str] = {}  # column -> why it is not learned
        self._rng = np.random.default_rng(seed) if numeric_decode == "uniform" else None

    # --- reading ------------------------------------------------------------------
    def read(self, paths: Sequence[str | Path]) -> Iterator[RawItem]:
        header: list[str] | None = None
        first: Path | None = None
        for path, _root in expand_inputs(paths, (".csv", ".tsv", ".csv.gz", ".parquet", ".pq")):
            table, ragged = self._read_table(path)
            if header is None:
                header, first = table.column_names, path
            elif table.column_names != header:
                raise InputError(f"{path}: columns {table.column_names} differ from those of {first}: {header}")
            keep = [c for c in header if c not in set(_names(self.options["drop"]))]
            yield from ragged
            for i, row in enumerate(table.select(keep).to_pylist()):
                yield f"{path}#{i}", row

    def _read_table(self, path: Path) -> tuple[pa.Table, list[Rejected]]:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PAR1":
            try:
                table = pq.read_table(path)
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{path}: unreadable Parquet file ({e})") from None
            self._check_columns(path, table.column_names)
            return table, []
        bad: list[tuple[int, int, str]] = []

        def on_invalid(row: Any) -> str:
            bad.append((row.expected_columns, row.actual_columns, row.text))
            return "skip"

        _check_utf8(path)
        parse = pacsv.ParseOptions(delimiter=self.options["delimiter"], invalid_row_handler=on_invalid)
        nulls = [""] + _names(self.options["na_values"])
        try:
            # the streaming reader only tells the header; close it, or its read-ahead thread can abort the interpreter at exit
            with open_binary(path) as f, pacsv.open_csv(f, parse_options=pacsv.ParseOptions(delimiter=self.options["delimiter"],
                                                                                        invalid_row_handler=lambda r: "skip")) as reader:
                names = reader.schema.names
            if hint := delimiter_hint(names, self.options["delimiter"]):
                raise InputError(f"{path}: {hint}")
            self._check_columns(path, names)
            convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, null_values=nulls, strings_can_be_null=True, quoted_strings_can_be_null=True)
            with open_binary(path) as f:
                table = pacsv.read_csv(f, parse_options=parse, convert_options=convert)
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 CSV file (a byte at the start of a header or a row is not UTF-8)") from None
        except (pa.ArrowException, OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable CSV file ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        if table.num_rows == 0 and not bad:
            raise InputError(f"{path}: holds a header but no data rows")
        return table, _ragged_rejects(path, bad)

    @staticmethod
    def _check_columns(path: Path, names: list[str]) -> None:
        if len(names) > MAX_COLUMNS:
            raise InputError(f"{path}: {len(names)} columns; at most {MAX_COLUMNS} are supported (one token per column and row)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"{path}: duplicate column names {dupes}")

    # --- fitting --------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        return self.columns is None

    def fit(self, raws: Iterable[dict[str, Any]]) -> None:
        rows = list(raws)
        if not rows:
            raise InputError("tabular input: no rows to fit the columns on")
        names = list(rows[0])
        for opt in ("categorical", "numeric", "passthrough"):
            unknown = [n for n in _names(self.options[opt]) if n not in names]
            if unknown:
                raise InputError(f"--{opt}: no column(s) {unknown}; columns are {names}")
        forced_cat, forced_num = set(_names(self.options["categorical"])), set(_names(self.options["numeric"]))
        columns: dict[str, CategoryVocab | NumericBins] = {}
        passthrough = {n: "named by --passthrough" for n in _names(self.options["passthrough"])}
        for name in names:
            if name in passthrough:
                continue
            cells = [r[name] for r in rows if r[name] is not None]
            numbers = None if name in forced_cat else _as_numbers(cells, strict=name not in forced_num)
            if not cells:
                passthrough[name] = "no observed value to learn from"
            elif name not in forced_num and (offset := row_number_offset([r[name] for r in rows])) is not None:
                passthrough[name] = f"{ROW_NUMBERS}: each row's position plus {offset}"
            elif numbers is not None:
                columns[name] = NumericBins.fit(numbers, self.options["bins"] or _auto_bins(int(np.isfinite(numbers).sum())))
            elif name not in forced_cat and (why := _not_learnable(cells, self.options["free_text"])):
                passthrough[name] = why
            else:
                columns[name] = CategoryVocab.fit((cell_text(c) for c in cells), self.options["max_categories"], self.options["unseen"])
        if not columns:
            raise InputError(f"tabular input: no column to learn (passed through: {', '.join(f'{n} ({why})' for n, why in passthrough.items())})")
        self.columns, self.passthrough = columns, passthrough

    # --- encoding -------------------------------------------------------------------
    def encode(self, raw: dict[str, Any]) -> Record:
        if self.columns is None:
            raise RuntimeError("tabular adapter is not fitted")
        fields = []
        for name, col in self.columns.items():
            value = raw.get(name)
            if isinstance(col, NumericBins):
                local = MISSING if value is None else _number_token(col, name, value)
            else:
                local = col.encode(None if value is None else cell_text(value), f"column {name!r}: category")
            fields.append(Field(f"col:{name}", self.column_support(name), np.array([local])))
        return Record(fields, {})

    def decode(self, record: Record) -> dict[str, Any]:
        assert self.columns is not None
        out: dict[str, Any] = {}
        for name, col in self.columns.items():
            local = int(record[f"col:{name}"].tokens[0])
            if local == MISSING:
                out[name] = None
            elif isinstance(col, NumericBins):
                out[name] = col.decode(local, self._rng)
            else:
                out[name] = col.decode(local)
        return out

    def supports(self) -> list[Support]:
        if self.columns is None:
            raise RuntimeError("tabular adapter is not fitted")
        return [Support(self.column_support(n), "tabular", c.size, c.coordinates() if isinstance(c, NumericBins) else None)
                for n, c in self.columns.items()]

    def column_support(self, column: str) -> str:
        """The support of a column: ``tabular[/<dataset>]/col:<column>``."""
        return self.support_name(f"col:{column}")

    def kind(self, column: str) -> str:
        """``numeric`` or ``categorical``."""
        assert self.columns is not None
        return "numeric" if isinstance(self.columns[column], NumericBins) else "categorical"

    def row_number_columns(self) -> list[str]:
        """The passed-through columns found to be row numbers when fitting (their holes can be filled exactly)."""
        return [name for name, why in self.passthrough.items() if why.startswith(ROW_NUMBERS)]

    # --- persistence ----------------------------------------------------------------
    def _fitted_state(self, root_dir: str | Path | None) -> dict[str, Any]:
        if self.columns is None:
            return {}
        columns = [{"name": n, "kind": self.kind(n), **c.to_dict()} for n, c in self.columns.items()]
        return {"columns": columns, "passthrough": dict(self.passthrough)} if self.passthrough else {"columns": columns}

    def _load_fitted(self, fitted: dict[str, Any], root_dir: Path | None) -> None:
        if "columns" in fitted:
            self.columns = {c["name"]: NumericBins.from_dict(c) if c["kind"] == "numeric" else CategoryVocab.from_dict(c) for c in fitted["columns"]}
            self.passthrough = dict(fitted.get("passthrough", {}))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["columns"] = {n: ("numeric" if isinstance(c, NumericBins) else "categorical") + f"[{c.size}]" for n, c in (self.columns or {}).items()}
        if self.passthrough:
            d["passthrough"] = dict(self.passthrough)
        return d


# --- helpers ---------------------------------------------------------------------------


def cell_text(value: Any) -> str:
    """A cell as the category it is learned as (texts as they are, dates in ISO form)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def as_number(value: Any) -> float | None:
    """A cell as a float (``inf`` included), or None when it is not read as a number: a text, a boolean."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _as_numbers(cells: list[Any], strict: bool) -> np.ndarray | None:
    """The cells as floats, or None when one is not a number (and ``strict``)."""
    if any(isinstance(c, bool) for c in cells):
        return None
    out = np.empty(len(cells), dtype=np.float64)
    for i, c in enumerate(cells):
        x = as_number(c)
        if x is None and strict:
            return None
        out[i] = np.nan if x is None else x
    return out


def _check_utf8(path: Path) -> None:
    """A CSV file must be UTF-8 (pyarrow would fail deep inside, or drop rows silently); name the first bad line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                line += decoder.decode(block).count("\n")
            except UnicodeDecodeError as e:
                bad_line = line + block[: e.start].count(NEWLINE)
                raise InputError(f"{path}: not a UTF-8 CSV file (line {bad_line} holds bytes that are not UTF-8)") from None
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 CSV file (it ends inside a multi-byte character)") from None


def _auto_bins(observed: int) -> int:
    """About sqrt(n) quantile bins (16 to 64): enough rows per bin to learn its probability."""
    return int(np.clip(round(math.sqrt(max(observed, 1))), 16, 64))


ROW_NUMBERS = "row numbers"  # how a row-number column's reason for being passed through starts
MIN_ROW_NUMBERS = 10  # observed cells it takes to call a column row numbers rather than a coincidence


def row_number_offset(cells: Sequence[Any]) -> int | None:
    """The constant ``k`` when every observed cell (None is missing) is the whole number ``position + k``
    and at least ``MIN_ROW_NUMBERS`` are observed; else None."""
    offset, seen = None, 0
    for i, c in enumerate(cells):
        if c is None:
            continue
        x = as_number(c)
        if x is None or not math.isfinite(x) or x != int(x) or (offset is not None and int(x) - i != offset):
            return None
        offset, seen = int(x) - i, seen + 1
    return offset if seen >= MIN_ROW_NUMBERS else None


ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$")
NUMBER_WITH_COMMAS = re.compile(r"^[+-]?\d+(,\d+)+$")  # 0,665 (a decimal comma) or 1,234,567 (thousands)


def _not_learnable(cells: list[Any], free_text: int) -> str | None:
    """Why a non-numeric column is passed through rather than learned, or None."""
    texts = [cell_text(c).strip() for c in cells]
    if all(ISO_DATE.match(t) for t in texts) or all(hasattr(c, "isoformat") for c in cells):
        return "dates"
    counts = Counter(texts)
    once = sum(1 for n in counts.values() if n == 1)
    if len(counts) > free_text and once > len(counts) / 2:
        why = f"free text or identifiers: {len(counts)} distinct values in {len(texts)} cells, {once} seen once"
        commas = [t for t in texts if NUMBER_WITH_COMMAS.match(t)]
        if commas and all(NUMBER_WITH_COMMAS.match(t) or as_number(t) is not None for t in texts):
            why += (f"; they read as numbers written with commas ({commas[0]!r}: a decimal comma or a thousands separator): "
                    "write them plainly (0.665, 1234) to learn them as numbers")
        return why
    return None


def _number_token(col: NumericBins, name: str, value: Any) -> int:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise Reject(f"column {name!r}: {value!r} is not a number") from None
    if math.isnan(x):
        return MISSING
    if not math.isfinite(x):
        raise Reject(f"column {name!r}: {value!r} is not a finite number")
    return col.encode(x)


def _ragged_rejects(path: Path, bad: list[tuple[int, int, str]]) -> list[Rejected]:
    """Rejects for ragged rows, with their line numbers found in the file."""
    if not bad:
        return []
    wanted = {text for _, _, text in bad}
    lines: dict[str, list[int]] = {}
    with open_binary(path) as f:
        for n, line in enumerate(f, 1):
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text in wanted:
                lines.setdefault(text, []).append(n)
    out = []
    for expected, actual, text in bad:
        found = lines.get(text)
        where = f"{path}:{found.pop(0)}" if found else f"{path}:?"
        out.append(Rejected(where, f"ragged row: {actual} cells, expected {expected} ({text[:60]!r})"))
    return sorted(out, key=lambda r: int(r.id.rsplit(":", 1)[1]) if r.id.rsplit(":", 1)[1].isdigit() else 1 << 62)
