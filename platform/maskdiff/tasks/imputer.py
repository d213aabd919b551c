"""A scikit-learn-compatible imputer: the fit-and-impute path of ``tools/impute.py`` from Python.

>>> from maskdiff.tasks.imputer import MaskdiffImputer
>>> imputer = MaskdiffImputer(minutes=3)
>>> filled = imputer.fit_transform(frame)        # a pandas DataFrame (or a NumPy array, NaN = missing)
>>> more = imputer.transform(other_frame)         # the same columns, filled with the fitted model

``fit`` learns a model from the observed cells (:func:`maskdiff.tasks.table_fit.fit_table`);
``transform`` fills every missing cell with the best guess of
:func:`maskdiff.tasks.imputation.impute` and returns the same type it was given
(a copy; observed cells unchanged). It follows scikit-learn's estimator
conventions (``get_params`` / ``set_params``, fitted attributes ending in
``_``), so it works inside a ``Pipeline`` and with ``clone``; scikit-learn
itself is not required. Passed-through columns (free text, dates, empty
columns) come back as they were; a column of row numbers with its holes
filled when it still counts up with the rows.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

try:  # scikit-learn's mixins add tags and fit_transform when it is installed
    from sklearn.base import BaseEstimator as _Base
    from sklearn.base import TransformerMixin as _Mixin

    _BASES: tuple[type, ...] = (_Mixin, _Base)
except ImportError:  # pragma: no cover - exercised where scikit-learn is absent
    _BASES = (object,)


class MaskdiffImputer(*_BASES):  # type: ignore[misc]
    """Fill missing cells with a masked-diffusion model of the table (see the module docstring)."""

    def __init__(self, minutes: float = 8.0, run_dir: str | None = None, categorical: str | None = None, seed: int = 0,
                 device: str = "cpu", verbose: bool = False):
        self.minutes = minutes
        self.run_dir = run_dir
        self.categorical = categorical
        self.seed = seed
        self.device = device
        self.verbose = verbose

    # --- scikit-learn estimator protocol --------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in inspect.signature(MaskdiffImputer.__init__).parameters if name != "self"}

    def set_params(self, **params: Any) -> MaskdiffImputer:
        known = self.get_params()
        for key, value in params.items():
            if key not in known:
                raise ValueError(f"MaskdiffImputer has no parameter {key!r}; parameters: {', '.join(known)}")
            setattr(self, key, value)
        return self

    def fit(self, X: Any, y: Any = None) -> MaskdiffImputer:
        from maskdiff.bundle import open_bundle
        from .table_fit import fit_table

        arrow = _to_arrow(X)
        self.feature_names_in_ = np.array(arrow.column_names, dtype=object)
        self.n_features_in_ = arrow.num_columns
        scratch = Path(tempfile.mkdtemp(prefix="maskdiff-imputer-"))
        try:
            source = scratch / "table.parquet"
            pq.write_table(arrow, source)
            run_dir = Path(self.run_dir) if self.run_dir else scratch / "run"
            options = {"categorical": self.categorical} if self.categorical else {}
            log = print if self.verbose else (lambda _msg: None)
            bundle_path, self.plan_ = fit_table(source, run_dir, minutes=self.minutes, adapter_options=options, seed=self.seed,
                                                overwrite=True, log=log)
            self.bundle_ = open_bundle(bundle_path, "tabular", self.device)
            self.bundle_path_ = bundle_path if self.run_dir else None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return self

    def transform(self, X: Any) -> Any:
        from .imputation import impute
        from maskdiff.data.tables import from_arrow

        if not hasattr(self, "bundle_"):
            raise ValueError("this MaskdiffImputer is not fitted yet; call fit first")
        arrow = _to_arrow(X)
        if list(arrow.column_names) != list(self.feature_names_in_):
            raise ValueError(f"transform got columns {arrow.column_names}, fit saw {list(self.feature_names_in_)}")
        table = from_arrow(arrow)
        if not any(v is None for row in table.values for v in row):
            return _copy(X)
        imp = impute(self.bundle_, table, seed=self.seed, device=self.device)
        if imp.refused:  # their missing cells would stay NaN
            r, why = imp.refused[0]
            raise ValueError(f"{len(imp.refused)} row(s) cannot be read by the model, e.g. row {r}: {why}")
        return _filled(X, imp.draws[0])

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> Any:
        return self.fit(X, y).transform(X)


def _to_arrow(X: Any) -> pa.Table:
    """A pandas DataFrame or a 2-D array as an Arrow table (array columns named x0, x1, ...)."""
    if hasattr(X, "columns") and hasattr(X, "iloc"):  # pandas, without importing it
        frame = X.copy()
        frame.columns = [str(c) for c in frame.columns]
        return pa.Table.from_pandas(frame, preserve_index=False)
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D table (rows x columns), got an array of shape {arr.shape}")
    if arr.dtype.kind in "fiub":
        return pa.table({f"x{j}": pa.array(arr[:, j].astype(np.float64), from_pandas=True) for j in range(arr.shape[1])})
    return pa.table({f"x{j}": pa.array([None if _missing(v) else v for v in arr[:, j]]) for j in range(arr.shape[1])})


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _copy(X: Any) -> Any:
    if hasattr(X, "iloc"):
        return X.copy()
    arr = np.asarray(X)
    return arr.astype(np.float64) if arr.dtype.kind in "iub" else arr.copy()


def _filled(X: Any, values: dict[tuple[int, int], Any]) -> Any:
    out = _copy(X)
    if hasattr(out, "iloc"):
        for (r, c), v in values.items():
            col = out.columns[c]
            if out[col].dtype.kind in "iu":  # an integer column holding missing values became float in pandas
                out[col] = out[col].astype("float64")
            out.iloc[r, c] = v
        return out
    for (r, c), v in values.items():
        out[r, c] = v
    return out


__all__ = ["MaskdiffImputer"]
