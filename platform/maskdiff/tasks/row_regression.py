"""A ridge regression of one numeric column on the other cells of its row: the linear part of a best guess.

With a few hundred rows a masked-diffusion model learns a near-linear relation
between numbers slowly (it sees each column through a few dozen bins), where a
linear regression learns it from the same rows at once. The fit therefore also
learns, per numeric column, a ridge regression on the row's other learned
columns, completed by the model where they are missing, and the held-out
calibration (:mod:`maskdiff.tasks.imputation_calibration`) decides how much of
it enters the best guess.

Features: each numeric column as it is, each categorical column as indicators
of its ``MAX_LEVELS`` most frequent values (fewer when that would make more
than ``MAX_FEATURES``); all standardised. The penalty is
the one of ``PENALTIES`` with the least leave-one-out error, which ridge gives
in closed form: with the hat matrix ``H = Z (Z'Z + lam I)^-1 Z'`` (plus ``1/n``
for the unpenalised intercept) the leave-one-out residual of row i is
``e_i / (1 - H_ii)`` (Allen's PRESS identity), and in the SVD ``Z = U S V'``,
``H = U diag(s^2 / (s^2 + lam)) U'``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .imputation_quality import finite_number

PENALTIES = tuple(10.0**k for k in range(-2, 5))  # on standardised features
MAX_LEVELS = 20  # indicators per categorical predictor: its most frequent values
MAX_FEATURES = 256  # a wider row shares these among its categorical columns; more numeric columns than this: no regression

Row = Mapping[str, Any]  # a completed row: learned column -> value


@dataclass(frozen=True)
class RowRegression:
    """``y = intercept + sum_k weights_k (x_k - center_k) / scale_k``, x the features of the row's other columns."""

    numeric: list[str]  # predictors taken as numbers
    levels: dict[str, list[str]]  # categorical predictor -> the values that have an indicator
    center: list[float]
    scale: list[float]
    weights: list[float]
    intercept: float
    penalty: float

    def features(self, rows: Sequence[Row]) -> np.ndarray:
        """(rows, features), unstandardised; a number that is not there (not finite) sits at its column's center."""
        X = np.empty((len(rows), len(self.center)))
        for i, row in enumerate(rows):
            X[i] = _features(row, self.numeric, self.levels)
        gaps = np.isnan(X)
        X[gaps] = np.broadcast_to(np.asarray(self.center), X.shape)[gaps]
        return X

    def predict(self, rows: Sequence[Row]) -> np.ndarray:
        Z = (self.features(rows) - np.asarray(self.center)) / np.asarray(self.scale)
        return self.intercept + Z @ np.asarray(self.weights)


def _features(row: Row, numeric: Sequence[str], levels: Mapping[str, Sequence[str]]) -> list[float]:
    x = [v if (v := finite_number(row.get(name))) is not None else np.nan for name in numeric]
    for name, values in levels.items():
        text = None if row.get(name) is None else str(row[name]).strip()
        x.extend(float(text == level) for level in values)
    return x


def fit_row_regression(rows: Sequence[Row], y: Sequence[float], predictors: Mapping[str, str]) -> RowRegression | None:
    """Ridge regression of ``y`` on the ``predictors`` (column -> numeric | categorical) of ``rows``; None
    when there are more than MAX_FEATURES numeric ones."""
    numeric = [name for name, kind in predictors.items() if kind == "numeric"]
    categorical = [name for name, kind in predictors.items() if kind != "numeric"]
    if len(numeric) > MAX_FEATURES:
        return None
    per_column = min(MAX_LEVELS, (MAX_FEATURES - len(numeric)) // max(1, len(categorical)))
    levels = {name: [v for v, _ in Counter(str(row[name]).strip() for row in rows if row.get(name) is not None).most_common(per_column)]
              for name in categorical}
    levels = {name: values for name, values in levels.items() if values}
    X = np.array([_features(row, numeric, levels) for row in rows], dtype=np.float64).reshape(len(rows), -1)
    seen = (~np.isnan(X)).sum(0)
    center = np.where(seen > 0, np.nansum(X, 0) / np.maximum(seen, 1), 0.0)
    X = np.where(np.isnan(X), center, X)
    scale = X.std(0)
    scale[scale == 0] = 1.0
    t = np.asarray(y, dtype=np.float64)
    intercept = float(t.mean())
    weights, penalty = _ridge((X - center) / scale, t - intercept)
    return RowRegression(numeric, levels, center.tolist(), scale.tolist(), weights.tolist(), intercept, penalty)


def _ridge(Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights and penalty of the ridge fit of centred ``y`` on standardised ``Z`` with the least leave-one-out error."""
    n, p = Z.shape
    if n < 3 or p == 0:
        return np.zeros(p), 0.0
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    Uy = U.T @ y
    best: tuple[float, float] | None = None
    for lam in PENALTIES:
        d = s**2 / (s**2 + lam)
        fitted = U @ (d * Uy)
        leverage = (U**2) @ d + 1.0 / n
        loo = float(np.mean(((y - fitted) / np.maximum(1.0 - leverage, 1e-9)) ** 2))
        if best is None or loo < best[0]:
            best = (loo, lam)
    lam = best[1]  # type: ignore[index]
    return Vt.T @ (s / (s**2 + lam) * Uy), lam


def from_json(entry: Mapping[str, Any] | None) -> RowRegression | None:
    return None if entry is None else RowRegression(**entry)


__all__ = ["MAX_FEATURES", "MAX_LEVELS", "PENALTIES", "RowRegression", "fit_row_regression", "from_json"]
