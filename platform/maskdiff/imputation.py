"""Conditional tabular imputation: fill every missing cell given the observed cells of its row.

A CSV file is kept as raw text: every observed cell (and the header, the
quoting, the line endings) is written back byte for byte; only missing cells
(empty, or one of the model's ``na_values``) are replaced. A Parquet file
keeps its schema; filled values are cast to their column's type.

Every column of the input must be a column the model was trained on (others
are an error unless passed through unchanged with ``passthrough``); model
columns absent from the input are treated as missing for conditioning and
not written. ``draws`` > 1 gives that many completed tables (multiple
imputation) and a per-cell summary of how much the draws agree.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from maskdiff.adapters import Reject

from .cli import UserError, atomic_path
from .generation import fill
from .sampler import SamplerOptions
from .tokens import MISSING, Record

PARQUET_MAGIC = b"PAR1"


# --- raw CSV ------------------------------------------------------------------------------------


def split_csv(text: str, delimiter: str = ",") -> list[tuple[list[str], str]]:
    """Rows of raw cell texts (quotes kept) and each row's line terminator ('' for a last line without one)."""
    rows: list[tuple[list[str], str]] = []
    cells: list[str] = []
    start, i, n, quoted = 0, 0, len(text), False
    while i < n:
        c = text[i]
        if quoted:
            if c == '"':
                if i + 1 < n and text[i + 1] == '"':
                    i += 1
                else:
                    quoted = False
        elif c == '"':
            quoted = True
        elif c == delimiter:
            cells.append(text[start:i])
            start = i + 1
        elif c in "\r\n":
            end = "\r\n" if text.startswith("\r\n", i) else c
            cells.append(text[start:i])
            rows.append((cells, end))
            cells, i = [], i + len(end)
            start = i
            continue
        i += 1
    if start < n or cells:
        cells.append(text[start:n])
        rows.append((cells, ""))
    return rows


def unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        return raw[1:-1].replace('""', '"')
    return raw


def quote(value: str, delimiter: str = ",") -> str:
    """A cell as CSV text, quoted only when it must be."""
    if any(ch in value for ch in (delimiter, '"', "\r", "\n")) or value != value.strip():
        return '"' + value.replace('"', '""') + '"'
    return value


@dataclass
class Table:
    """An input table: column names, cell values (None = missing) and how to write it back."""

    columns: list[str]
    values: list[list[Any]]  # rows of cell values as the adapter reads them (None = missing)
    kind: str  # csv | parquet
    raw: list[tuple[list[str], str]] = field(default_factory=list)  # csv: header row first, raw cell texts
    arrow: pa.Table | None = None

    @property
    def num_rows(self) -> int:
        return len(self.values)


def read_table(path: str | Path, delimiter: str = ",", na_values: Sequence[str] = ()) -> Table:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == PARQUET_MAGIC:
        try:
            arrow = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: unreadable Parquet file ({e})") from None
        values = [[None if _is_nan(v) else v for v in row.values()] for row in arrow.to_pylist()]
        return Table(list(arrow.column_names), values, "parquet", arrow=arrow)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 CSV file or a Parquet file") from None
    raw = split_csv(text, delimiter)
    if not raw or not any(c.strip() for c in raw[0][0]):
        raise UserError(f"{path}: empty CSV file (no header)")
    header = [unquote(c) for c in raw[0][0]]
    header[0] = header[0].lstrip("\ufeff")
    if raw[-1][0] == [""] and raw[-1][1] == "":
        raw.pop()
    missing = {""} | set(na_values)
    values = []
    for line, (cells, _) in enumerate(raw[1:], start=2):
        if len(cells) != len(header):
            raise UserError(f"{path}: line {line} has {len(cells)} cells, the header has {len(header)}")
        values.append([None if (v := unquote(c)) in missing else v for c in cells])
    if not values:
        raise UserError(f"{path}: holds a header but no data rows")
    return Table(header, values, "csv", raw=raw)


def _is_nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def write_table(table: Table, filled: dict[tuple[int, int], Any], path: str | Path, delimiter: str = ",") -> Path:
    """``table`` with ``filled[(row, col)]`` in place of those cells, in the input's format."""
    with atomic_path(path) as tmp:
        if table.kind == "csv":
            out = io.StringIO()
            for r, (cells, end) in enumerate(table.raw):
                cells = list(cells)
                if r > 0:
                    for c in range(len(cells)):
                        if (r - 1, c) in filled:
                            cells[c] = quote(format_value(filled[(r - 1, c)]), delimiter)
                out.write(delimiter.join(cells) + end)
            tmp.write_bytes(out.getvalue().encode("utf-8"))
        else:
            assert table.arrow is not None
            cols = []
            for c, name in enumerate(table.columns):
                col = table.arrow.column(c)
                if any(key[1] == c for key in filled):
                    vals = col.to_pylist()
                    for (r, cc), v in filled.items():
                        if cc == c:
                            vals[r] = cast(v, col.type, name)
                    col = pa.array(vals, type=col.type)
                cols.append(col)
            pq.write_table(pa.Table.from_arrays(cols, schema=table.arrow.schema), tmp)
    return Path(path)


def format_value(v: Any) -> str:
    return f"{v:.10g}" if isinstance(v, float) else str(v)


def cast(v: Any, type_: pa.DataType, column: str) -> Any:
    """A decoded value as a Python value of an Arrow column type."""
    try:
        if pa.types.is_integer(type_):
            return int(round(float(v)))
        if pa.types.is_floating(type_):
            return float(v)
        if pa.types.is_boolean(type_):
            return str(v).strip().lower() in ("true", "1", "yes")
        if pa.types.is_string(type_) or pa.types.is_large_string(type_):
            return str(v)
        return pa.scalar(str(v)).cast(type_).as_py()
    except (ValueError, TypeError, pa.ArrowException):
        raise UserError(f"column {column!r}: filled value {v!r} cannot be stored as {type_}") from None


# --- imputation ---------------------------------------------------------------------------------


@dataclass
class Imputation:
    """K completed tables as cell -> value maps, plus bookkeeping."""

    table: Table
    cells: list[tuple[int, int]]  # (row, column index) of every filled cell
    draws: list[dict[tuple[int, int], Any]]  # per draw: cell -> decoded value
    kinds: dict[str, str]  # column -> numeric | categorical
    network_calls: int


def check_columns(table: Table, adapter, passthrough: Sequence[str] = ()) -> list[str]:
    """Model columns present in the input; unknown input columns are a :class:`UserError`."""
    known = list(adapter.columns)
    unknown = [c for c in table.columns if c not in known and c not in passthrough]
    if unknown:
        raise UserError(f"input column(s) {', '.join(map(repr, unknown))} are not columns the model knows "
                        f"({', '.join(known)}); pass --passthrough to copy them unchanged")
    dupes = sorted({c for c in table.columns if table.columns.count(c) > 1})
    if dupes:
        raise UserError(f"duplicate column name(s) {dupes}")
    return [c for c in table.columns if c in known]


def row_records(table: Table, adapter, used: Sequence[str]) -> list[Record]:
    index = {c: i for i, c in enumerate(table.columns)}
    records = []
    for r, row in enumerate(table.values):
        raw = {c: (row[index[c]] if c in index else None) for c in adapter.columns}
        try:
            rec = adapter.encode(raw)
        except Reject as e:
            raise UserError(f"data row {r + 1}: {e}") from None
        rec.meta["row"] = r
        records.append(rec)
    return records


def impute(bundle, table: Table, opts: SamplerOptions, generator: torch.Generator, *, draws: int = 1, passthrough: Sequence[str] = (),
           batch_size: int = 256, device: str = "cpu", progress: bool = False, numeric_decode: str = "median",
           seed: int = 0) -> Imputation:
    """Fill every missing cell of the model's columns in ``table``, ``draws`` times."""
    if draws < 1:
        raise UserError(f"--draws {draws}: must be >= 1")
    adapter = bundle.adapters.get("tabular")
    if adapter is None:
        raise UserError(f"the model was not trained on tabular data; its modalities are {', '.join(sorted(bundle.adapters))}")
    used = check_columns(table, adapter, passthrough)
    col_index = {c: table.columns.index(c) for c in used}
    records = row_records(table, adapter, used)
    todo = [rec for rec in records if any(rec[f"col:{c}"].tokens[0] == MISSING for c in used)]
    cells = [(rec.meta["row"], col_index[c]) for rec in todo for c in used if rec[f"col:{c}"].tokens[0] == MISSING]
    kinds = {c: adapter.kind(c) for c in used}
    rng = np.random.default_rng(seed) if numeric_decode == "uniform" else None
    filled = fill(bundle, todo * draws, opts, generator, batch_size=batch_size, device=device, progress=progress) if todo else None
    results: list[dict[tuple[int, int], Any]] = []
    for k in range(draws):
        out: dict[tuple[int, int], Any] = {}
        for rec in (filled.records[k * len(todo) : (k + 1) * len(todo)] if filled else []):
            r = rec.meta["row"]
            for c in used:
                if (r, col_index[c]) in out or table.values[r][col_index[c]] is not None:
                    continue
                local = int(rec[f"col:{c}"].tokens[0])
                col = adapter.columns[c]
                out[(r, col_index[c])] = col.decode(local, rng) if kinds[c] == "numeric" else col.decode(local)
        results.append(out)
    return Imputation(table, cells, results, kinds, filled.network_calls if filled else 0)


def uncertainty(imp: Imputation) -> list[dict[str, Any]]:
    """Per filled cell: the draws' consensus (mode / mean), agreement, spread."""
    rows = []
    for cell in imp.cells:
        r, c = cell
        name = imp.table.columns[c]
        values = [d[cell] for d in imp.draws]
        entry: dict[str, Any] = {"row": r + 1, "column": name, "kind": imp.kinds[name], "draws": len(values)}
        counts = Counter(map(str, values))
        mode, n = counts.most_common(1)[0]
        entry.update(mode=mode, agreement=round(n / len(values), 4), distinct=len(counts))
        if imp.kinds[name] == "numeric":
            x = np.array(values, dtype=np.float64)
            entry.update(mean=float(x.mean()), std=float(x.std(ddof=1)) if x.size > 1 else 0.0, min=float(x.min()), max=float(x.max()))
        rows.append(entry)
    return rows


SUMMARY_FIELDS = ("row", "column", "kind", "draws", "mode", "agreement", "distinct", "mean", "std", "min", "max")


def write_summary(rows: list[dict[str, Any]], path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, SUMMARY_FIELDS)
            w.writeheader()
            for row in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return Path(path)


# --- scoring against held-back truth ------------------------------------------------------------


def hide_cells(table: Table, columns: Sequence[str], fraction: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Observed cells of ``columns`` chosen at random (each with prob ``fraction``), at least one per row."""
    idx = [table.columns.index(c) for c in columns]
    chosen = []
    for r, row in enumerate(table.values):
        observed = [c for c in idx if row[c] is not None]
        pick = [c for c in observed if rng.random() < fraction] or ([int(rng.choice(observed))] if observed else [])
        chosen.extend((r, c) for c in pick)
    return chosen


def with_hidden(table: Table, cells: Sequence[tuple[int, int]]) -> Table:
    """A copy of a CSV ``table`` with ``cells`` emptied (values and raw text)."""
    values = [list(row) for row in table.values]
    raw = [(list(cells_), end) for cells_, end in table.raw]
    for r, c in cells:
        values[r][c] = None
        raw[r + 1][0][c] = ""
    return Table(list(table.columns), values, table.kind, raw=raw)


def score(truth: Table, cells: Sequence[tuple[int, int]], guesses: dict[tuple[int, int], Any], kinds: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per column: accuracy (categorical) or RMSE (numeric) of ``guesses`` at ``cells``; plus the overall figures."""
    per: dict[str, list[tuple[Any, Any]]] = {}
    for cell in cells:
        per.setdefault(truth.columns[cell[1]], []).append((truth.values[cell[0]][cell[1]], guesses[cell]))
    out: dict[str, dict[str, float]] = {}
    hits = total = 0
    sq: list[float] = []
    for name, pairs in per.items():
        if kinds[name] == "numeric":
            err = np.array([float(a) - float(b) for a, b in pairs])
            scale = float(np.std([float(a) for a, _ in pairs])) or 1.0
            out[name] = {"rmse": float(np.sqrt(np.mean(err**2))), "cells": len(pairs)}
            sq.extend((err / scale) ** 2)
        else:
            ok = sum(str(a).strip() == str(b).strip() for a, b in pairs)
            out[name] = {"accuracy": ok / len(pairs), "cells": len(pairs)}
            hits, total = hits + ok, total + len(pairs)
    out["all"] = {"accuracy": hits / max(total, 1), "categorical_cells": total,
                  "nrmse": float(np.sqrt(np.mean(sq))) if sq else float("nan"), "numeric_cells": len(sq)}
    return out


def consensus(draws: Sequence[dict[tuple[int, int], Any]], columns: Sequence[str], kinds: dict[str, str]) -> dict[tuple[int, int], Any]:
    """Point estimate from multiple imputations: per cell, the most frequent draw
    (categorical) or the mean of the draws (numeric). A single draw is a sample of the
    conditional, so its accuracy is below that of the conditional's mode; compare
    point-estimating baselines against this."""
    out: dict[tuple[int, int], Any] = {}
    for cell in draws[0]:
        values = [d[cell] for d in draws]
        if kinds[columns[cell[1]]] == "numeric":
            out[cell] = float(np.mean([float(v) for v in values]))
        else:
            out[cell] = Counter(str(v).strip() for v in values).most_common(1)[0][0]
    return out


def mode_mean_baseline(train: Table, cells: Sequence[tuple[int, int]], kinds: dict[str, str]) -> dict[tuple[int, int], Any]:
    """Each hidden cell guessed as its column's most frequent value (categorical) or mean (numeric) in ``train``."""
    guess: dict[int, Any] = {}
    for c in {c for _, c in cells}:
        name = train.columns[c]
        observed = [row[c] for row in train.values if row[c] is not None]
        if kinds[name] == "numeric":
            guess[c] = float(np.mean([float(v) for v in observed]))
        else:
            guess[c] = Counter(map(str, observed)).most_common(1)[0][0]
    return {cell: guess[cell[1]] for cell in cells}


__all__ = [
    "Imputation", "SUMMARY_FIELDS", "Table", "check_columns", "format_value", "heldout_split", "hide_cells", "impute", "mode_mean_baseline",
    "quote", "read_table", "row_records", "score", "split_csv", "uncertainty", "unquote", "with_hidden", "write_summary", "write_table",
]


def heldout_split(bundle) -> tuple[Table, Table]:
    """(training rows, held-out rows) of the bundle's training table, by the trainer's split; raw text kept."""
    from .generation import heldout_records

    adapter = bundle.adapters["tabular"]
    data = bundle.config.data
    src = Path(data.build[data.sources["tabular"].dirs[0]].inputs[0])
    na = [v.strip() for v in adapter.options["na_values"].split(",") if v.strip()]
    full = read_table(src, adapter.options["delimiter"], na)
    rows = sorted({int(r.meta["id"].rsplit("#", 1)[1]) for r in heldout_records(bundle, "tabular")[1]})
    held = set(rows)
    train = Table(full.columns, [v for i, v in enumerate(full.values) if i not in held], "csv",
                  raw=[full.raw[0]] + [full.raw[i + 1] for i in range(full.num_rows) if i not in held])
    test = Table(full.columns, [full.values[i] for i in rows], "csv", raw=[full.raw[0]] + [full.raw[i + 1] for i in rows])
    return train, test
