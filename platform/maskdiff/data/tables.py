"""User tables in and out: CSV kept byte for byte, Parquet with its schema.

A CSV file is kept as raw text: every observed cell (and the header, the
quoting, the line endings) is written back byte for byte; only the cells being
filled (empty, or one of the given ``na_values``) are replaced. A Parquet file
keeps its schema; filled values are cast to their column's type. An in-memory
table (from a data frame or an array) has no file to write back to.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from maskdiff.adapters.base import delimiter_hint
from maskdiff.errors import UserError
from maskdiff.files import atomic_path

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
    kind: str  # csv | parquet | frame (in memory: nothing to write back to)
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
        return from_arrow(arrow, "parquet")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 CSV file or a Parquet file") from None
    raw = split_csv(text, delimiter)
    if not raw or not any(c.strip() for c in raw[0][0]):
        raise UserError(f"{path}: empty CSV file (no header)")
    header = [unquote(c) for c in raw[0][0]]
    header[0] = header[0].lstrip("\ufeff")
    if hint := delimiter_hint(header, delimiter):
        raise UserError(f"{path}: {hint}")
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


def from_arrow(arrow: pa.Table, kind: str = "frame") -> Table:
    """A table of Arrow columns; nulls and float NaNs are missing."""
    names = list(arrow.column_names)
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise UserError(f"duplicate column name(s) {dupes}")
    columns = [arrow.column(i).to_pylist() for i in range(arrow.num_columns)]
    values = [[None if _is_nan(col[r]) else col[r] for col in columns] for r in range(arrow.num_rows)]
    return Table(names, values, kind, arrow=arrow)


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
            if table.kind != "parquet" or table.arrow is None:
                raise ValueError(f"a {table.kind} table has no file format to write")
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
