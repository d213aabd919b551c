"""Held-out calibration of the best guess, so that it is never worse than the column mean or mode.

A model learned from a few hundred rows can be less sure than it thinks: on a
column that hardly depends on the others its posterior mean is noisier than
the column mean. The fit therefore sets aside some observed cells before
training (:func:`validation_cells`: a tenth of each learned column, at least
20, at most a quarter or 1,000), lets the trained model fill them from the rest of
their rows, and per column compares its guesses with the truth
(:func:`fit_calibration`):

* numeric: the guess g is combined with the column mean mu and the column's
  regression guess l (a ridge regression on the row's other cells, completed
  by the model where missing, linear or with an RBF kernel, whichever has the
  least leave-one-out error; see :mod:`maskdiff.tasks.row_regression`):
  ``mu + a * (g - mu) + b * (l - mu)``, with ``a, b >= 0`` and ``a + b <= 1``
  the least-squares choice on the validation cells. The corners of that
  triangle are the mean (0, 0), the model (1, 0) and the regression (0, 1),
  so on those cells the result is at least as good as each of them. Without
  a regression (too few rows) ``b = 0`` and ``a`` is the shrinkage
  ``sum((g - mu)(y - mu)) / sum((g - mu)^2)`` clipped to [0, 1];
* categorical: the guess is the most probable category of the mixture
  ``w_m * p_model + w_l * p_linear + w_f * f`` of the model's distribution,
  that of a multinomial logistic regression on the row's other cells, and the
  column's frequencies f, with weights (tenths, summing to one) that give
  the validation cells the highest likelihood. ``w_f = 1`` guesses the mode.
  Likelihood rather than accuracy chooses: on a few dozen cells a mode that
  was right once more would otherwise replace a model that is right far
  more often on the rest of the table (cars' Origin: 0.594 against the
  mode's 0.625 on 32 validation cells, 0.700 against 0.611 on the hidden
  ones).

The mean and mode are those of all the user's observed cells (the validation
cells included), so ``a = b = 0`` is exactly what the user's own mean imputer
would write. A stricter rule that keeps the model only when it beats the mean
by more than the noise of the validation cells (a leave-one-out test) was
tried and dropped: on a 178-row table, with 20 cells a column, it fell back
to the mean on columns where the shrunk guess was 7-14% better on held-out
cells.

The calibration is stored in the bundle (``bundle.json``, key
:data:`BUNDLE_KEY`) and applied to best guesses only; draws (multiple
imputation) stay what the model samples.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from maskdiff.adapters.tabular import cell_text

from .imputation_quality import column_mean_or_mode, finite_number
from .row_regression import RowClassifier, RowRegression, fit_row_classifier, fit_row_regression, from_json
from maskdiff.data.tables import Table

BUNDLE_KEY = "imputation_calibration"
FRACTION, MIN_CELLS, MAX_FRACTION = 0.1, 20, 0.25  # validation cells per learned column
MAX_CELLS = 1000  # enough to judge a column by; in a large table the rest are worth more as training data
MIN_TO_CALIBRATE = 10  # fewer validation cells than this: the column keeps the model's guess
MIN_TO_REGRESS = 20  # rows with the column observed that its row model needs (else none)
REGRESSION_ROWS = 5000  # rows of the fit table the regressions learn from (a sample of a larger table)

Cell = tuple[int, int]
Row = Mapping[str, Any]  # learned column -> value: observed, or the model's guess


@dataclass(frozen=True)
class ColumnCalibration:
    """How one column's best guess is corrected, and the validation figures that chose it."""

    kind: str  # numeric | categorical
    cells: int  # validation cells
    model: float  # validation RMSE (numeric) or accuracy (categorical) of the model's guesses
    baseline: float  # the same for the column mean / mode
    shrink: float = 1.0  # numeric: weight a of the model's guess
    mean: float = 0.0
    mode: str | None = None  # categorical: set when the mode replaces the guess
    linear: float = 0.0  # numeric: weight b of the regression's guess; categorical: the classifier's share of the distribution
    linear_model: RowRegression | RowClassifier | None = None
    linear_score: float | None = None  # the validation RMSE / accuracy of the row model's guesses alone
    prior: float = 0.0  # categorical: the share of the column's frequencies in the distribution
    frequencies: dict[str, float] | None = None  # categorical: of the observed values (the most frequent MAX_FREQUENCIES)

    def apply(self, values: Sequence[Any], rows: Sequence[Row], distributions: Sequence[Mapping[str, float] | None]) -> list[Any]:
        """The corrected guesses for ``values``, the model's guesses in ``rows`` (their completed rows); a
        categorical guess was chosen from its entry of ``distributions``."""
        if self.kind != "numeric":
            if self.mode is not None:
                return [self.mode] * len(values)
            if not self.linear and not self.prior:
                return list(values)
            classifier = self.linear_model if isinstance(self.linear_model, RowClassifier) and self.linear else None
            linear = classifier.probabilities(rows) if classifier is not None else [{}] * len(values)
            return [_argmax(_mixture((1 - self.linear - self.prior, d or {cell_text(v): 1.0}), (self.linear, q), (self.prior, self.frequencies or {})))
                    for v, d, q in zip(values, distributions, linear)]
        out = self.mean + self.shrink * (np.asarray(values, dtype=np.float64) - self.mean)
        if self.linear and isinstance(self.linear_model, RowRegression) and len(rows):
            out += self.linear * (self.linear_model.predict(rows) - self.mean)
        return [float(v) for v in out]

    def describe(self, column: str) -> str:
        what = "RMSE" if self.kind == "numeric" else "accuracy"
        base = "mean" if self.kind == "numeric" else "mode"
        row_model = "regression" if self.kind == "numeric" else "linear"  # the ridge (linear or kernel), the logistic
        if self.kind == "numeric":
            parts = [(self.shrink, "model"), (self.linear, row_model), (1 - self.shrink - self.linear, "mean")]
        else:
            parts = ([(1.0, "mode")] if self.mode is not None else
                     [(1 - self.linear - self.prior, "model"), (self.linear, "linear"), (self.prior, "frequencies")])
        used = [(w, name) for w, name in parts if w > 5e-3]
        use = " + ".join(f"{w:.2f} x {name}" for w, name in used) if len(used) > 1 else (used[0][1] if used else base)
        linear = "" if self.linear_score is None else f", {row_model} {self.linear_score:.4g}"
        return f"{column}: validation {what} model {self.model:.4g}{linear}, {base} {self.baseline:.4g} on {self.cells} cells -> {use}"


def _mixture(*parts: tuple[float, Mapping[str, float]]) -> dict[str, float]:
    """``sum_i w_i p_i`` of (weight, distribution over categories) pairs."""
    out: dict[str, float] = {}
    for w, p in parts:
        if w:
            for k, v in p.items():
                out[k] = out.get(k, 0.0) + w * v
    return out


def _argmax(p: Mapping[str, float]) -> str:
    return max(sorted(p), key=lambda k: p[k])


def validation_cells(table: Table, columns: Sequence[str], rng: np.random.Generator) -> list[Cell]:
    """Per column, observed cells to set aside: FRACTION of them, at least MIN_CELLS, at most MAX_FRACTION
    and MAX_CELLS.

    Setting cells aside must not change what the model learns a column as: in a
    column of numbers with a few other cells (``"unknown"`` among ages, which
    the adapter learns as categorical; ``inf``, whose row it refuses), only the
    finite numbers are set aside; were the others all set aside, the column
    would be learned as numeric and the user's other cells could neither be
    scored nor filled."""
    chosen: list[Cell] = []
    position = {name: c for c, name in enumerate(table.columns)}  # (a list's index() per column is quadratic in wide tables)
    for name in columns:
        c = position[name]
        observed = [r for r, row in enumerate(table.values) if row[c] is not None]
        numbers = [r for r in observed if finite_number(table.values[r][c]) is not None]
        candidates = numbers if 0 < len(numbers) < len(observed) else observed
        n = min(max(math.ceil(FRACTION * len(observed)), MIN_CELLS), int(MAX_FRACTION * len(candidates)), MAX_CELLS)
        if n > 0:
            chosen.extend((int(r), c) for r in rng.choice(candidates, size=n, replace=False))
    return sorted(chosen)


def fit_calibration(truth: Table, cells: Sequence[Cell], guesses: Mapping[Cell, Any], kinds: Mapping[str, str],
                    completed: Mapping[int, Row] | None = None,
                    distributions: Mapping[Cell, Mapping[str, float]] | None = None) -> dict[str, ColumnCalibration]:
    """Per learned column with enough validation ``cells``: the correction of the model's ``guesses``.

    ``truth`` holds every observed cell of the user's table, the validation
    cells included: the column mean and mode come from it, as they would for
    the user's own mean/mode imputer. ``completed`` holds rows of the fit
    table (validation cells hidden) completed by the model, the rows of the
    validation cells among them: each column's row model learns from those
    where the column is observed, and is judged on the validation cells.
    ``distributions`` holds the model's distribution at each categorical
    validation cell (a cell without one counts the model's guess as sure).
    Without ``completed`` there are no row models.
    """
    by_column: dict[int, list[Cell]] = {}
    for cell in cells:
        if cell in guesses:
            by_column.setdefault(cell[1], []).append(cell)
    held = set(cells)
    completed = completed or {}
    out: dict[str, ColumnCalibration] = {}
    for c, col_cells in by_column.items():
        name = truth.columns[c]
        if len(col_cells) < MIN_TO_CALIBRATE or name not in kinds:
            continue
        y = [truth.values[r][c] for r, _ in col_cells]
        g = [guesses[cell] for cell in col_cells]
        base = column_mean_or_mode(truth, c, kinds[name])
        rows = [completed[r] for r, _ in col_cells] if all(r in completed for r, _ in col_cells) else []
        if kinds[name] == "numeric":
            regression = _row_model(truth, c, completed, held, kinds) if rows else None
            linear = None if regression is None else regression.predict(rows)
            out[name] = _numeric(np.array(y, dtype=np.float64), np.array(g, dtype=np.float64), base, linear, regression)
        else:
            classifier = _row_model(truth, c, completed, held, kinds) if rows else None
            dists = [(distributions or {}).get(cell) or {cell_text(v): 1.0} for cell, v in zip(col_cells, g)]
            linear_p = None if classifier is None else classifier.probabilities(rows)
            out[name] = _categorical([cell_text(v) for v in y], [cell_text(v) for v in g], base, column_frequencies(truth, c), dists, linear_p,
                                     classifier)
    return out


def _row_model(truth: Table, c: int, completed: Mapping[int, Row], held: set[Cell],
               kinds: Mapping[str, str]) -> RowRegression | RowClassifier | None:
    """Column ``c``'s regression (numeric) or classifier (categorical) on the other learned columns, from the
    completed rows where it is observed."""
    name = truth.columns[c]
    numeric = kinds[name] == "numeric"
    rows = [r for r in sorted(completed) if (r, c) not in held and truth.values[r][c] is not None
            and (not numeric or finite_number(truth.values[r][c]) is not None)]
    if len(rows) < MIN_TO_REGRESS:
        return None
    predictors = {k: kind for k, kind in kinds.items() if k != name}
    try:
        if numeric:
            return fit_row_regression([completed[r] for r in rows], [finite_number(truth.values[r][c]) for r in rows], predictors)  # type: ignore[misc]
        return fit_row_classifier([completed[r] for r in rows], [truth.values[r][c] for r in rows], predictors)
    except np.linalg.LinAlgError:  # a numerical failure costs the column its row model, not the fit its calibration
        return None


def _numeric(y: np.ndarray, g: np.ndarray, mu: float, linear: np.ndarray | None = None,
             regression: RowRegression | None = None) -> ColumnCalibration:
    a, b = _blend(y - mu, g - mu, np.zeros_like(y) if linear is None else linear - mu)
    rmse = lambda pred: float(np.sqrt(np.mean((pred - y) ** 2)))  # noqa: E731
    kept = regression is not None and b > 0
    return ColumnCalibration("numeric", len(y), rmse(g), rmse(np.full_like(y, mu)), shrink=round(a, 6), mean=mu,
                             linear=round(b, 6) if kept else 0.0, linear_model=regression if kept else None,
                             linear_score=None if linear is None else rmse(linear))


def _blend(t: np.ndarray, G: np.ndarray, L: np.ndarray) -> tuple[float, float]:
    """The least-squares (a, b) of ``t ~ a G + b L`` over the triangle a, b >= 0, a + b <= 1.

    The least of a convex quadratic over a triangle is its unconstrained least
    when that lies inside, else the least over one of the edges, each a clipped
    one-dimensional least squares; the candidates are compared by their error."""
    def along(u: np.ndarray, v: np.ndarray) -> float:  # argmin over x in [0, 1] of |v - x u|^2
        uu = float(u @ u)
        return 0.0 if uu == 0 else min(1.0, max(0.0, float(u @ v) / uu))

    x = along(G - L, t - L)
    candidates = [(along(G, t), 0.0), (0.0, along(L, t)), (x, 1.0 - x)]
    A = np.stack([G, L], 1)
    if np.linalg.matrix_rank(A) == 2:
        a, b = np.linalg.lstsq(A, t, rcond=None)[0]
        if a >= 0 and b >= 0 and a + b <= 1:
            candidates.append((float(a), float(b)))
    return min(candidates, key=lambda ab: float(np.sum((t - ab[0] * G - ab[1] * L) ** 2)))


SHARES = tuple(k / 10 for k in range(11))  # weights of a categorical mixture, tried on the validation cells
FLOOR = 1e-4  # least probability counted for a validation cell's true category
MAX_FREQUENCIES = 100  # categories whose frequency a calibration keeps (the rest are too rare to be a guess)


def column_frequencies(truth: Table, c: int) -> dict[str, float]:
    """The share of each value among column ``c``'s observed cells (the most frequent MAX_FREQUENCIES)."""
    counts = Counter(cell_text(row[c]) for row in truth.values if row[c] is not None)
    total = sum(counts.values())
    return {k: n / total for k, n in counts.most_common(MAX_FREQUENCIES)}


def _categorical(y: list[str], g: list[str], mode: str, frequencies: Mapping[str, float],
                 model_p: Sequence[Mapping[str, float]] | None = None, linear_p: Sequence[Mapping[str, float]] | None = None,
                 classifier: RowClassifier | None = None) -> ColumnCalibration:
    """The mixture of the model's distribution, the classifier's and the column's frequencies, weights on a grid
    of tenths, that gives the validation cells the highest likelihood (a proper score: accuracy on a few dozen
    cells is too coarse to choose by, and a mode that was right on one cell more would replace a better model).
    Frequencies alone guess the mode."""
    accuracy = lambda guess: sum(a == b for a, b in zip(y, guess)) / len(y)  # noqa: E731
    model_p = model_p if model_p is not None else [{v: 1.0} for v in g]
    linear = linear_p if linear_p is not None else [{}] * len(y)
    at_truth = np.array([[p.get(t, 0.0), q.get(t, 0.0), frequencies.get(t, 0.0)] for t, p, q in zip(y, model_p, linear)])
    grid = [(round(1 - a - b, 6), a, b) for a in (SHARES if linear_p is not None else (0.0,)) for b in SHARES if a + b <= 1 + 1e-9]
    loglik = {w: round(float(np.log(np.maximum(at_truth @ np.array(w), FLOOR)).sum()), 9) for w in grid}
    _, share, prior = max(grid, key=lambda w: (loglik[w], w[0], -w[1]))  # ties: the model, then the classifier
    keep = classifier is not None and share > 0
    return ColumnCalibration("categorical", len(y), accuracy(g), accuracy([mode] * len(y)), mode=mode if prior == 1.0 else None,
                             linear=share if keep else 0.0, linear_model=classifier if keep else None,
                             linear_score=None if linear_p is None else accuracy([_argmax(q) for q in linear_p]),
                             prior=prior if prior < 1.0 else 0.0, frequencies=dict(frequencies) if 0 < prior < 1.0 else None)


def to_json(calibration: Mapping[str, ColumnCalibration]) -> dict[str, dict[str, Any]]:
    return {name: asdict(cal) for name, cal in calibration.items()}


def from_info(info: Mapping[str, Any]) -> dict[str, ColumnCalibration]:
    """The calibration stored in a bundle's ``bundle.json`` (empty when it has none)."""
    known = {f.name for f in fields(ColumnCalibration)}  # older bundles stored an `integer` flag: ignored
    out = {}
    for name, entry in (info.get(BUNDLE_KEY) or {}).items():
        kept = {k: v for k, v in entry.items() if k in known}
        out[name] = ColumnCalibration(**(kept | {"linear_model": from_json(kept.get("linear_model"))}))
    return out


def calibrated(guesses: Mapping[Cell, Any], columns: Sequence[str], calibration: Mapping[str, ColumnCalibration],
               completed: Mapping[int, Row], distributions: Mapping[Cell, Mapping[str, float]] | None = None) -> dict[Cell, Any]:
    """``guesses`` with each column's correction applied (columns without one unchanged); ``completed``
    holds each row of a guess, completed by the model's guesses, and ``distributions`` the model's
    distribution at each categorical guess (the row models read them)."""
    out = dict(guesses)
    by_column: dict[int, list[Cell]] = {}
    for cell in guesses:
        if columns[cell[1]] in calibration:
            by_column.setdefault(cell[1], []).append(cell)
    for c, cells in by_column.items():
        fixed = calibration[columns[c]].apply([guesses[cell] for cell in cells], [completed[r] for r, _ in cells],
                                              [(distributions or {}).get(cell) for cell in cells])
        out.update(zip(cells, fixed))
    return out


__all__ = ["BUNDLE_KEY", "ColumnCalibration", "calibrated", "fit_calibration", "from_info", "to_json", "validation_cells"]
