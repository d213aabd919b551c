"""Measuring imputation on held-back truth: hide observed cells, fill them, score the guesses.

Used by the quality benchmark and the demo; the baselines a user would
otherwise reach for (column mode / mean) live here too.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from maskdiff.adapters.tabular import as_number
from maskdiff.data.tables import Table


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
    """A copy of ``table`` with ``cells`` emptied (values, and the raw text of a CSV table)."""
    values = [list(row) for row in table.values]
    raw = [(list(cells_), end) for cells_, end in table.raw]
    for r, c in cells:
        values[r][c] = None
        if raw:
            raw[r + 1][0][c] = ""
    arrow = table.arrow
    if arrow is not None:  # the Arrow columns too, so a Parquet copy is written with the cells null
        cols = [arrow.column(i).to_pylist() for i in range(arrow.num_columns)]
        for r, c in cells:
            cols[c][r] = None
        arrow = pa.Table.from_arrays([pa.array(v, type=arrow.schema.field(i).type) for i, v in enumerate(cols)], schema=arrow.schema)
    return Table(list(table.columns), values, table.kind, raw=raw, arrow=arrow)


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
            rmse = float(np.sqrt(np.mean(err**2)))
            out[name] = {"rmse": rmse, "nrmse": rmse / scale, "cells": len(pairs)}
            sq.extend((err / scale) ** 2)
        else:
            ok = sum(str(a).strip() == str(b).strip() for a, b in pairs)
            out[name] = {"accuracy": ok / len(pairs), "cells": len(pairs)}
            hits, total = hits + ok, total + len(pairs)
    out["all"] = {"accuracy": hits / max(total, 1), "categorical_cells": total,
                  "nrmse": float(np.sqrt(np.mean(sq))) if sq else None, "numeric_cells": len(sq)}
    return out


def mode_mean_baseline(train: Table, cells: Sequence[tuple[int, int]], kinds: dict[str, str]) -> dict[tuple[int, int], Any]:
    """Each hidden cell guessed as its column's most frequent value (categorical) or mean (numeric) in ``train``."""
    guess = {c: column_mean_or_mode(train, c, kinds[train.columns[c]]) for c in {c for _, c in cells}}
    return {cell: guess[cell[1]] for cell in cells}


def column_mean_or_mode(table: Table, c: int, kind: str) -> Any:
    """Column ``c``'s mean over its observed finite numbers (numeric), or its most frequent value as text."""
    observed = [row[c] for row in table.values if row[c] is not None]
    if kind == "numeric":
        return float(np.mean([x for v in observed if (x := finite_number(v)) is not None]))
    return Counter(map(str, observed)).most_common(1)[0][0]


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None (a text, a boolean, inf, nan): a number the tabular adapter learns."""
    x = as_number(value)
    return x if x is not None and math.isfinite(x) else None
