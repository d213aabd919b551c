"""Regressions of one column on the other cells of its row: the row-model part of a best guess.

With a few hundred rows a masked-diffusion model learns a near-linear relation
between numbers slowly (it sees each column through a few dozen bins), where a
linear regression learns it from the same rows at once. The fit therefore also
learns, per column, a model of it on the row's other learned columns,
completed by the model where they are missing: a ridge regression for a
numeric column (:class:`RowRegression`), a multinomial logistic regression
for a categorical one (:class:`RowClassifier`); the held-out calibration
(:mod:`maskdiff.tasks.imputation_calibration`) decides how much of it enters
the best guess.

Features: each numeric column as it is, each categorical column as indicators
of its ``MAX_LEVELS`` most frequent values (fewer when that would make more
than ``MAX_FEATURES``); all standardised. The ridge penalty is
the one of ``PENALTIES`` with the least leave-one-out error, which ridge gives
in closed form: with the hat matrix ``H = Z (Z'Z + lam I)^-1 Z'`` (plus ``1/n``
for the unpenalised intercept) the leave-one-out residual of row i is
``e_i / (1 - H_ii)`` (Allen's PRESS identity), and in the SVD ``Z = U S V'``,
``H = U diag(s^2 / (s^2 + lam)) U'``.

A number can depend on the others nonlinearly (Boston's distances and tax
rates come in blocks, a car's displacement rises in steps with its
cylinders), so the regression may also be a kernel ridge regression with the
sum kernel ``z.z' / p + exp(-gamma |z - z'|^2)`` over the p standardised
features. The RBF part is approximated on ``KERNEL_CENTRES`` rows drawn from
the fit rows (Nystroem: features ``K(z, C) K(C, C)^-1/2``), so the same
closed-form leave-one-out error chooses among the linear model and the
kernels of ``KERNEL_WIDTHS`` (gamma = width / p: the squared distance of two
rows is about 2p), each at its best penalty. The kernel part of a prediction
is ``sum_c alpha_c exp(-gamma |z - c|^2)`` over the centres c.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from maskdiff.adapters.tabular import cell_text

from .imputation_quality import finite_number

PENALTIES = tuple(10.0**k for k in range(-2, 5))  # on standardised features
MAX_LEVELS = 20  # indicators per categorical predictor: its most frequent values
MAX_FEATURES = 256  # a wider row shares these among its categorical columns; more numeric columns than this: no regression
KERNEL_WIDTHS = (0.25, 0.5, 1.0, 2.0, 4.0)  # gamma * p of the RBF kernels tried
KERNEL_CENTRES = 200  # fit rows the RBF kernel is centred on (fewer when that would store more than KERNEL_FLOATS)
KERNEL_FLOATS = 25_600  # centres x features kept in the bundle per column
NYSTROEM_CUTOFF = 1e-6  # eigenvalues of K(C, C) below this share of the largest are dropped (their features are noise, and ill-conditioned)

Row = Mapping[str, Any]  # a completed row: learned column -> value


@dataclass(frozen=True)
class RowFeatures:
    """The standardised features of a row's other columns: numbers, and indicators of the frequent categories."""

    numeric: list[str]  # predictors taken as numbers
    levels: dict[str, list[str]]  # categorical predictor -> the values that have an indicator
    center: list[float]
    scale: list[float]

    @classmethod
    def fit(cls, rows: Sequence[Row], predictors: Mapping[str, str]) -> tuple[RowFeatures, np.ndarray] | None:
        """Features of ``predictors`` (column -> numeric | categorical) centred and scaled on ``rows``, and
        ``rows`` standardised by them; None when there are more than MAX_FEATURES numeric ones."""
        numeric = [name for name, kind in predictors.items() if kind == "numeric"]
        categorical = [name for name, kind in predictors.items() if kind != "numeric"]
        if len(numeric) > MAX_FEATURES:
            return None
        per_column = min(MAX_LEVELS, (MAX_FEATURES - len(numeric)) // max(1, len(categorical)))
        levels = {name: [v for v, _ in Counter(cell_text(row.get(name)) for row in rows if row.get(name) is not None).most_common(per_column)]
                  for name in categorical}
        levels = {name: values for name, values in levels.items() if values}
        X = np.array([_raw(row, numeric, levels) for row in rows], dtype=np.float64).reshape(len(rows), -1)
        seen = (~np.isnan(X)).sum(0)
        center = np.where(seen > 0, np.nansum(X, 0) / np.maximum(seen, 1), 0.0)
        X = np.where(np.isnan(X), center, X)
        scale = X.std(0)
        scale[scale == 0] = 1.0
        return cls(numeric, levels, center.tolist(), scale.tolist()), (X - center) / scale

    def __call__(self, rows: Sequence[Row]) -> np.ndarray:
        """(rows, features), standardised; a number that is not there (not finite) sits at its column's center (0)."""
        X = np.array([_raw(row, self.numeric, self.levels) for row in rows], dtype=np.float64).reshape(len(rows), -1)
        center = np.asarray(self.center)
        return (np.where(np.isnan(X), center, X) - center) / np.asarray(self.scale)


def _raw(row: Row, numeric: Sequence[str], levels: Mapping[str, Sequence[str]]) -> list[float]:
    x = [v if (v := finite_number(row.get(name))) is not None else np.nan for name in numeric]
    for name, values in levels.items():
        text = None if row.get(name) is None else cell_text(row[name])
        x.extend(float(text == level) for level in values)
    return x


@dataclass(frozen=True)
class RowRegression:
    """``y = intercept + z @ weights + sum_c alpha_c exp(-gamma |z - c|^2)`` with ``z = features(row)``: a numeric
    column from the rest of its row (no kernel part when ``centres`` is empty)."""

    features: RowFeatures
    weights: list[float]
    intercept: float
    penalty: float
    centres: list[list[float]] = field(default_factory=list)  # standardised fit rows
    gamma: float = 0.0
    alpha: list[float] = field(default_factory=list)

    def predict(self, rows: Sequence[Row]) -> np.ndarray:
        Z = self.features(rows)
        y = self.intercept + Z @ np.asarray(self.weights)
        if self.centres:
            y += _rbf(Z, np.asarray(self.centres), self.gamma) @ np.asarray(self.alpha)
        return y


@dataclass(frozen=True)
class RowClassifier:
    """``p(class | row) = softmax(features(row) @ weights + bias)``: a categorical column from the rest of its row."""

    features: RowFeatures
    classes: list[str]
    weights: list[list[float]]  # (features, classes)
    bias: list[float]

    def probabilities(self, rows: Sequence[Row]) -> list[dict[str, float]]:
        logits = self.features(rows) @ np.asarray(self.weights).reshape(-1, len(self.classes)) + np.asarray(self.bias)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return [dict(zip(self.classes, row)) for row in p.tolist()]


def fit_row_regression(rows: Sequence[Row], y: Sequence[float], predictors: Mapping[str, str], kernel: bool = True) -> RowRegression | None:
    """Ridge regression of ``y`` on the ``predictors`` (column -> numeric | categorical) of ``rows``, linear or
    (``kernel``) with an RBF part, whichever has the least leave-one-out error; None when there are too many
    predictors (see :meth:`RowFeatures.fit`)."""
    fitted = RowFeatures.fit(rows, predictors)
    if fitted is None:
        return None
    features, Z = fitted
    t = np.asarray(y, dtype=np.float64)
    intercept = float(t.mean())
    loo, weights, penalty = _ridge(Z, t - intercept)
    best = RowRegression(features, weights.tolist(), intercept, penalty)
    n, p = Z.shape
    m = min(n, KERNEL_CENTRES, KERNEL_FLOATS // max(p, 1))
    if not kernel or p == 0 or m < 2:
        return best
    C = Z[np.random.default_rng(0).choice(n, m, replace=False)]
    between, to_centres = _squared_distances(C, C), _squared_distances(Z, C)  # the same for every width
    for width in KERNEL_WIDTHS:  # the sum kernel's features [z / sqrt(p), K(z, C) T] with T = K(C, C)^-1/2
        gamma = width / p
        eigenvalues, V = np.linalg.eigh(np.exp(-gamma * between))
        keep = eigenvalues > NYSTROEM_CUTOFF * eigenvalues.max()
        T = V[:, keep] / np.sqrt(eigenvalues[keep])
        Phi = np.exp(-gamma * to_centres) @ T
        centre = Phi.mean(0)  # centred like Z, so that the intercept is the mean of y and PRESS stays exact
        error, w, lam = _ridge(np.concatenate([Z / math.sqrt(p), Phi - centre], 1), t - intercept)
        if error < loo:
            loo = error
            best = RowRegression(features, (w[:p] / math.sqrt(p)).tolist(), intercept - float(centre @ w[p:]), lam, C.tolist(), gamma,
                                 (T @ w[p:]).tolist())
    return best


def fit_row_classifier(rows: Sequence[Row], labels: Sequence[Any], predictors: Mapping[str, str]) -> RowClassifier | None:
    """Multinomial logistic regression of ``labels`` on the ``predictors`` of ``rows`` (penalty ``|W|^2 / 2``
    on the summed log-loss, scikit-learn's default C = 1); None with fewer than two classes or too many predictors."""
    fitted = RowFeatures.fit(rows, predictors)
    classes = sorted({cell_text(v) for v in labels})
    if fitted is None or len(classes) < 2:
        return None
    features, Z = fitted
    index = {c: i for i, c in enumerate(classes)}
    X = torch.as_tensor(Z, dtype=torch.float64)
    t = torch.tensor([index[cell_text(v)] for v in labels])
    W = torch.zeros(X.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, t) + (W**2).sum() / (2 * len(t))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return RowClassifier(features, classes, W.detach().tolist(), b.detach().tolist())


def _svd(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD of Z; where LAPACK's divide and conquer does not converge (it can on ill-conditioned
    matrices), from the eigenvectors of ``Z'Z`` instead, without the directions it cannot resolve."""
    try:
        return np.linalg.svd(Z, full_matrices=False)
    except np.linalg.LinAlgError:
        eigenvalues, V = np.linalg.eigh(Z.T @ Z)
        keep = eigenvalues > 1e-12 * max(eigenvalues.max(), 1e-300)
        s = np.sqrt(eigenvalues[keep])
        return Z @ V[:, keep] / s, s, V[:, keep].T


def _squared_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``|a - b|^2`` for every row a of A and b of B."""
    return np.maximum((A**2).sum(1)[:, None] + (B**2).sum(1)[None, :] - 2.0 * A @ B.T, 0.0)


def _rbf(A: np.ndarray, B: np.ndarray, gamma: float) -> np.ndarray:
    """``exp(-gamma |a - b|^2)`` for every row a of A and b of B."""
    return np.exp(-gamma * _squared_distances(A, B))


def _ridge(Z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Leave-one-out mean squared error, weights and penalty of the ridge fit of centred ``y`` on the centred columns
    ``Z`` with the least leave-one-out error."""
    n, p = Z.shape
    if n < 3 or p == 0:
        return math.inf, np.zeros(p), 0.0
    U, s, Vt = _svd(Z)
    Uy = U.T @ y
    best: tuple[float, float] | None = None
    for lam in PENALTIES:
        d = s**2 / (s**2 + lam)
        fitted = U @ (d * Uy)
        leverage = (U**2) @ d + 1.0 / n
        loo = float(np.mean(((y - fitted) / np.maximum(1.0 - leverage, 1e-9)) ** 2))
        if best is None or loo < best[0]:
            best = (loo, lam)
    loo, lam = best  # type: ignore[misc]
    return loo, Vt.T @ (s / (s**2 + lam) * Uy), lam


def from_json(entry: Mapping[str, Any] | None) -> RowRegression | RowClassifier | None:
    """A regression or classifier as ``dataclasses.asdict`` wrote it (``bundle.json``)."""
    if entry is None:
        return None
    kind = RowClassifier if "classes" in entry else RowRegression
    return kind(**(dict(entry) | {"features": RowFeatures(**entry["features"])}))


__all__ = ["KERNEL_CENTRES", "KERNEL_WIDTHS", "MAX_FEATURES", "MAX_LEVELS", "PENALTIES", "RowClassifier", "RowFeatures", "RowRegression", "fit_row_classifier",
           "fit_row_regression", "from_json"]
