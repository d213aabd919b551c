"""Conditional tabular imputation: fill every missing cell given the observed cells of its row.

A row is one record (one token per learned column); its missing cells are
masked positions. The masked-diffusion denoiser gives, in one network call,
the distribution of every masked cell given the observed ones. Cells are
committed one at a time, each round re-predicting the cells still missing
given everything committed so far, so the cells missing together in a row
are filled consistently:

* **best guess** (the default): each round commits the cell the model is
  most sure of (highest top probability). A categorical cell takes its most
  probable category; a numeric cell the mean of the model's distribution
  over the column's bins, ``sum_b p_b * mean_b`` with ``mean_b`` the mean of
  the fitted values in bin b (the point estimate that minimises squared
  error); the most probable bin is what later rounds condition on.
* **draws** (multiple imputation): each round commits a cell chosen
  uniformly at random, its value drawn from the model's distribution (with
  ``temperature``). For a time-free MD4 model this is exactly the reverse
  process: an absorbing diffusion unmasks positions in a uniformly random
  order, each from the denoiser's conditional.

The *other* bucket of a categorical column (values beyond its category cap)
is never written into a cell: it is excluded before choosing. Observed cells
are never changed; passed-through columns are left as they are, except a
column of row numbers, whose missing cells get their row's number
(:func:`row_number_cells`).

A model that learned several tables (each its own data set, see
:mod:`maskdiff.core.tokens`) fills a table with the columns of the one it names
(``dataset``), or else of the one whose columns the input holds most of.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from maskdiff.adapters import CategoryVocab, Reject
from maskdiff.adapters.tabular import row_number_offset

from maskdiff.core.batch import Batch, collate
from maskdiff.bundle import adapter_of
from maskdiff.errors import UserError
from maskdiff.files import atomic_path
from .imputation_calibration import calibrated, from_info
from maskdiff.core.outputs import SupportGroup, support_logits
from maskdiff.data.tables import Table
from maskdiff.core.tokens import MISSING, Record

Cell = tuple[int, int]  # (row, column index in the table)


@dataclass
class Imputation:
    """Completed tables as cell -> value maps (one for the best guess, K for K draws), plus bookkeeping."""

    table: Table
    cells: list[Cell]  # every filled cell
    draws: list[dict[Cell, Any]]
    kinds: dict[str, str]  # column -> numeric | categorical
    confidence: dict[Cell, float]  # best guess: the model's probability of the chosen category / bin
    distributions: dict[Cell, dict[str, float]]  # best guess, categorical cells: the model's probability of each category
    network_calls: int
    refused: list[tuple[int, str]] = field(default_factory=list)  # (row, reason): rows the model cannot read, left as they are


def check_columns(table: Table, adapter, passthrough: Sequence[str] = ()) -> list[str]:
    """Learned columns present in the input; unknown input columns are a :class:`UserError`."""
    known = list(adapter.columns)
    passed = set(passthrough) | set(getattr(adapter, "passthrough", {}))
    unknown = [c for c in table.columns if c not in known and c not in passed]
    if unknown:
        raise UserError(f"input column(s) {', '.join(map(repr, unknown))} are not columns the model knows "
                        f"({', '.join(known)}); pass --passthrough to copy them unchanged")
    dupes = sorted({c for c in table.columns if table.columns.count(c) > 1})
    if dupes:
        raise UserError(f"duplicate column name(s) {dupes}")
    return [c for c in table.columns if c in known]


def row_records(table: Table, adapter) -> tuple[list[Record], list[tuple[int, str]]]:
    """One record per row the adapter reads, and (row, reason) for each row it refuses (an infinite
    number, a text in a column learned as numbers): those are left as they are, as the fit left them."""
    index = {c: i for i, c in enumerate(table.columns)}
    records, refused = [], []
    for r, row in enumerate(table.values):
        raw = {c: (row[index[c]] if c in index else None) for c in adapter.columns}
        try:
            rec = adapter.encode(raw)
        except Reject as e:
            refused.append((r, str(e)))
            continue
        rec.meta["row"] = r
        records.append(rec)
    return records, refused


def row_number_cells(table: Table, adapter) -> dict[Cell, int]:
    """The missing cells of the columns the adapter passed through as row numbers, each its row's
    number, when the observed cells of ``table`` still count up with the rows (else none)."""
    out: dict[Cell, int] = {}
    for name in adapter.row_number_columns():
        if name not in table.columns:
            continue
        c = table.columns.index(name)
        offset = row_number_offset([row[c] for row in table.values])
        if offset is not None:
            out.update({(r, c): r + offset for r, row in enumerate(table.values) if row[c] is None})
    return out


def tables_of(bundle) -> list:
    """The bundle's tabular adapters, one per table it learned."""
    return [a for a in bundle.adapters.values() if a.modality == "tabular"]


def table_adapter(bundle, columns: Sequence[str] | None = None, dataset: str | None = None):
    """The tabular adapter to fill a table with ``columns``: that of ``dataset``, the only one, or the
    one that learned most of the columns (a :class:`UserError` when that does not decide)."""
    tables = tables_of(bundle)
    if dataset is not None or len(tables) < 2:
        return adapter_of(bundle.adapters, "tabular", dataset)
    known = {a.key: len(set(a.columns) & set(columns or ())) for a in tables}
    best = [a for a in tables if known[a.key] == max(known.values())]
    if len(best) > 1 or not known[best[0].key]:
        names = ", ".join(repr(a.options.get("dataset") or a.modality) for a in tables)
        raise UserError(f"the model learned several tables ({names}) and the input's columns do not tell which this is: name one with --dataset")
    return best[0]


class ColumnHeads:
    """Where each learned column's values live in the id space, and what they decode to."""

    def __init__(self, bundle, columns: Sequence[str], adapter):
        spec = bundle.spec
        self.columns = list(columns)
        self.support_ids = [spec.support_id(adapter.column_support(c)) for c in columns]
        self.column_of = {sid: j for j, sid in enumerate(self.support_ids)}
        self.starts = [spec.id_range(adapter.column_support(c)).start for c in columns]
        self.vocabs = [adapter.columns[c] for c in columns]
        self.numeric = [adapter.kind(c) == "numeric" for c in columns]
        # per column: log-weight 0 on usable values, -inf on the other bucket (never written)
        self.allowed = []
        for vocab in self.vocabs:
            mask = torch.zeros(vocab.size, dtype=torch.float64)
            if isinstance(vocab, CategoryVocab):
                mask[vocab.other_id] = -math.inf
            self.allowed.append(mask)
        self.bin_means = [torch.as_tensor(v.means, dtype=torch.float64) if num else None for v, num in zip(self.vocabs, self.numeric)]

    def probs(self, j: int, logits: Tensor, temperature: float = 1.0) -> Tensor:
        """(n, size_j) distribution of column j's values from its support's logits, without the other bucket."""
        return torch.softmax(logits.double() / temperature + self.allowed[j].to(logits.device), dim=-1)


def _conditionals(bundle, batch: Batch, masked: Tensor) -> list[SupportGroup]:
    """Logits at the masked cells only, grouped by column; a time-conditioned model gets
    t = the row's masked fraction (the mask probability of the linear schedule).

    An ensemble's conditional is the mixture of its members': the log of the mean
    of their probabilities.
    """
    t = (masked.sum(-1) / (~batch.pad).sum(-1).clamp(min=1)).float().clamp(1e-3, 1.0)
    per_member = [support_logits(d, batch.tokens, batch, t if getattr(d, "time_conditioned", False) else None, masked, bundle.spec)
                  for d in getattr(bundle, "denoisers", [bundle.denoiser])]
    if len(per_member) == 1:
        return per_member[0]
    mixed = []
    for groups in zip(*per_member):
        logp = torch.stack([torch.log_softmax(g.logits.double(), -1) for g in groups])
        mixed.append(replace(groups[0], logits=torch.logsumexp(logp, 0) - math.log(len(groups))))
    return mixed


def _take(batch: Batch, rows: Tensor) -> Batch:
    return replace(batch, **{name: getattr(batch, name)[rows] for name in Batch.TENSORS})


@torch.inference_mode()
def fill_rows(bundle, records: Sequence[Record], columns: Sequence[str], *, best: bool, generator: torch.Generator | None = None,
              temperature: float = 1.0, batch_size: int = 512, device: str = "cpu", progress: bool = False,
              rng: np.random.Generator | None = None, adapter=None
              ) -> tuple[list[dict[str, Any]], list[dict[str, float]], list[dict[str, dict[str, float]]], int]:
    """Per record: column -> filled value, column -> confidence and (categorical) column -> the distribution
    it was chosen from (best guess); and the network calls.

    Every learned column of ``adapter`` (default: the bundle's only tabular one) must be a field
    of the records in ``columns`` order (as :func:`row_records` makes them).
    """
    heads = ColumnHeads(bundle, columns, adapter or adapter_of(bundle.adapters, "tabular"))
    values: list[dict[str, Any]] = [{} for _ in records]
    confidence: list[dict[str, float]] = [{} for _ in records]
    distributions: list[dict[str, dict[str, float]]] = [{} for _ in records]
    calls = 0
    bar = tqdm(total=len(records), desc="imputing", unit="row", disable=not progress, leave=False)
    for start in range(0, len(records), batch_size):
        chunk = list(records[start : start + batch_size])
        batch = collate(chunk, bundle.spec).to(device)
        masked = batch.tokens == bundle.spec.mask_id
        active = masked.any(-1).nonzero().squeeze(-1)
        while active.numel():
            groups = _conditionals(bundle, _take(batch, active), masked[active])
            calls += 1
            for row, j, token, conf, value, dist in _pick_cells(heads, groups, masked[active], best, generator, temperature):
                b = int(active[row])
                col = heads.columns[j]
                if value is None:  # a draw: decode the drawn token as the adapter does
                    vocab = heads.vocabs[j]
                    value = vocab.decode(token, rng) if heads.numeric[j] else vocab.decode(token)
                values[start + b][col] = value
                if best:
                    confidence[start + b][col] = conf
                if dist is not None:
                    distributions[start + b][col] = dict(zip(heads.vocabs[j].categories, dist))
                batch.tokens[b, j] = heads.starts[j] + token
                masked[b, j] = False
            active = masked.any(-1).nonzero().squeeze(-1)
        bar.update(len(chunk))
    bar.close()
    return values, confidence, distributions, calls


def _pick_cells(heads: ColumnHeads, groups: Sequence[SupportGroup], masked: Tensor, best: bool, generator: torch.Generator | None,
                temperature: float) -> list[tuple[int, int, int, float, Any, list[float] | None]]:
    """One cell per row to commit: (row, column, local token, confidence, value or None, and for a best guess
    of a categorical cell the probabilities of its categories)."""
    n, L = masked.shape
    row_of = masked.nonzero()[:, 0]  # the row of each masked cell, in the order the groups index
    top = torch.full((n, L), -1.0, dtype=torch.float64, device=masked.device)
    dists: dict[int, tuple[Tensor, Tensor]] = {}  # column -> (rows, their distributions)
    for g in groups:
        j = heads.column_of[g.support]
        rows = row_of[g.rows]
        p = heads.probs(j, g.logits, 1.0 if best else temperature)
        top[rows, j] = p.max(-1).values
        dists[j] = (rows, p)
    if best:  # the cell the model is surest of
        chosen = top.argmax(-1)
    else:  # uniformly among the row's masked cells
        u = torch.rand((n, L), generator=generator, device=masked.device, dtype=torch.float64)
        chosen = torch.where(masked, u, -1.0).argmax(-1)
    out = []
    for j, (rows, p) in dists.items():
        pick = chosen[rows] == j
        rows, p = rows[pick], p[pick]
        if not rows.numel():
            continue
        if best:
            tokens = p.argmax(-1)
            if heads.numeric[j]:  # posterior mean over bins, each bin at the mean of its fitted values; not
                # rounded in integer columns (the least-squares guess; a Parquet integer column rounds on writing)
                vals: list[Any] = [float(m) for m in (p @ heads.bin_means[j].to(p.device)).tolist()]  # type: ignore[union-attr]
            else:
                vals = [heads.vocabs[j].decode(int(t)) for t in tokens]
        else:
            tokens = torch.multinomial(p, 1, generator=generator).squeeze(-1)  # float64 probabilities
            vals = [None] * len(rows)
        conf = p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
        dists_j = p[:, :-1].tolist() if best and not heads.numeric[j] else [None] * len(vals)  # without the other bucket (last)
        out.extend((int(r), j, int(t), c, v, d) for r, t, c, v, d in zip(rows.tolist(), tokens.tolist(), conf, vals, dists_j))
    return out


def impute(bundle, table: Table, *, draws: int = 0, temperature: float = 1.0, passthrough: Sequence[str] = (), batch_size: int = 512,
           device: str = "cpu", progress: bool = False, seed: int = 0, calibrate: bool = True, dataset: str | None = None) -> Imputation:
    """Fill every missing cell of the model's columns in ``table``: the best guess (``draws=0``) or ``draws`` random draws.

    A best guess is corrected by the bundle's held-out calibration when it has
    one and ``calibrate`` (see :mod:`maskdiff.tasks.imputation_calibration`). A model
    of several tables fills it as the table ``dataset`` (see :func:`table_adapter`).
    """
    if draws < 0:
        raise UserError(f"--draws {draws}: must be >= 0")
    if not math.isfinite(temperature) or temperature <= 0:
        raise UserError(f"--temperature {temperature}: must be a finite number > 0")
    adapter = table_adapter(bundle, table.columns, dataset)
    used = check_columns(table, adapter, passthrough)
    col_index = {c: table.columns.index(c) for c in used}
    records, refused = row_records(table, adapter)
    learned = list(adapter.columns)
    todo = [rec for rec in records if any(rec[f"col:{c}"].tokens[0] == MISSING for c in used)]
    cells = [(rec.meta["row"], col_index[c]) for rec in todo for c in used if rec[f"col:{c}"].tokens[0] == MISSING]
    kinds = {c: adapter.kind(c) for c in used}
    generator = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed) if adapter.options.get("numeric_decode") == "uniform" else None
    results: list[dict[Cell, Any]] = []
    confidence: dict[Cell, float] = {}
    distributions: dict[Cell, dict[str, float]] = {}
    completed: dict[int, dict[str, Any]] = {}  # best guess to calibrate: row -> every learned column, observed or guessed
    calls = 0
    for _ in range(max(draws, 1)):
        vals, conf, dists, n = fill_rows(bundle, todo, learned, best=draws == 0, generator=generator, temperature=temperature,
                                  batch_size=batch_size, device=device, progress=progress, rng=rng, adapter=adapter)
        calls += n
        out: dict[Cell, Any] = {}
        for rec, filled, sure, dist in zip(todo, vals, conf, dists):
            r = rec.meta["row"]
            for c in used:
                if table.values[r][col_index[c]] is None:
                    out[(r, col_index[c])] = filled[c]
                    if c in sure:
                        confidence[(r, col_index[c])] = sure[c]
                    if c in dist:
                        distributions[(r, col_index[c])] = dist[c]
            if draws == 0 and calibrate:
                completed[r] = {c: filled[c] if c in filled else table.values[r][col_index[c]] for c in learned}
        results.append(out)
    if draws == 0 and calibrate:
        results = [calibrated(results[0], table.columns, from_info(getattr(bundle, "info", {})), completed, distributions)]
    numbered = row_number_cells(table, adapter)
    for cell, number in numbered.items():
        cells.append(cell)
        kinds[table.columns[cell[1]]] = "numeric"
        confidence[cell] = 1.0
        for out in results:
            out[cell] = number
    return Imputation(table, cells, results, kinds, confidence, distributions, calls, refused)


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


__all__ = ["Imputation", "SUMMARY_FIELDS", "check_columns", "fill_rows", "impute", "row_records", "table_adapter", "tables_of", "uncertainty",
           "write_summary"]
