"""Imputation: best guesses computed as documented, draws, consistency, and the one-command fit path."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from adapter_fixtures import scratch
from tasks_fixtures import run_tool

from maskdiff.adapters.tabular import TabularAdapter
from maskdiff.tasks.imputation import impute
from maskdiff.data.tables import Table, read_table
from maskdiff.core.tokens import VocabSpec


def toy_bundle(distribution):
    """A bundle whose 'denoiser' returns ``distribution(x_t, spec)``: column x numeric (4 bins of 0..99), column c categorical."""
    adapter = TabularAdapter(bins=4, max_categories=2, numeric="x")  # x counts up with the rows: learned, not row numbers; c keeps a and b; 'rare' goes to the other bucket
    adapter.fit([{"x": float(v), "c": "ab"[v % 2] if v < 98 else "rare"} for v in range(100)])
    spec = VocabSpec(adapter.supports())

    class Oracle(torch.nn.Module):
        time_conditioned = False

        def forward(self, x_t, batch, t=None):
            return distribution(x_t, spec).log().expand(x_t.shape[0], -1, -1)

    return SimpleNamespace(adapters={"tabular": adapter}, spec=spec, denoiser=Oracle())


def probs(spec, x=None, c=None):
    """(1, 2, V) probabilities: column x over its 4 bins, column c over (a, b, other)."""
    p = torch.full((1, 2, spec.num_clean), 1e-12, dtype=torch.float64)
    for j, (name, dist) in enumerate((("x", x), ("c", c))):
        r = spec.id_range(f"tabular/col:{name}")
        p[0, j, r.start : r.stop] = torch.tensor(dist if dist is not None else [1.0 / len(r)] * len(r), dtype=torch.float64)
    return p


def test_numeric_best_guess_is_the_posterior_mean_over_bin_means_and_other_is_never_written():
    bin_p, c_p = [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.5]  # 'other' is the most probable category here
    bundle = toy_bundle(lambda x_t, spec: probs(spec, bin_p, c_p))
    adapter = bundle.adapters["tabular"]
    means = [np.mean(np.arange(100)[np.arange(100) // 25 == b]) for b in range(4)]  # quantile bins of 0..99
    assert np.allclose(adapter.columns["x"].means, means)
    table = Table(["x", "c"], [[None, None], [5.0, "a"]], "frame")
    imp = impute(bundle, table)
    assert imp.draws[0][(0, 0)] == pytest.approx(sum(p * m for p, m in zip(bin_p, means)))
    assert imp.draws[0][(0, 1)] == "a"  # the best real category, not the 'other' bucket
    assert (1, 0) not in imp.draws[0] and (1, 1) not in imp.draws[0]  # observed cells untouched
    draws = impute(bundle, Table(["x", "c"], [[3.0, None]] * 400, "frame"), draws=1, seed=1).draws[0]
    share = np.mean([v == "a" for v in draws.values()])
    assert set(draws.values()) == {"a", "b"} and abs(share - 0.3 / 0.5) < 0.08  # drawn from p renormalised without 'other'


def test_a_row_the_model_cannot_read_is_left_as_it_is_and_reported():
    bundle = toy_bundle(lambda x_t, spec: probs(spec, [0.0, 0.0, 0.0, 1.0], [0.9, 0.1, 0.0]))
    table = Table(["x", "c"], [[None, "a"], ["inf", None], ["heavy", None], [5.0, None]], "frame")
    imp = impute(bundle, table)
    assert [r for r, _ in imp.refused] == [1, 2] and "not a finite number" in imp.refused[0][1] and "not a number" in imp.refused[1][1]
    assert set(imp.draws[0]) == set(imp.cells) == {(0, 0), (3, 1)}  # the readable rows are filled, the others untouched


def test_cells_missing_together_are_filled_most_confident_first_and_conditioned_on_it():
    def dist(x_t, spec):
        r = spec.id_range("tabular/col:x")
        x_known = bool((x_t[0, 0] != spec.mask_id).item()) if x_t.shape[0] else False
        top_bin = x_known and int(x_t[0, 0]) - r.start == 3
        # x is sure to be in the top bin; c depends on x: a when x is unknown, b once x is known to be high
        return probs(spec, [0.01, 0.01, 0.03, 0.95], [0.05, 0.9, 0.05] if top_bin else [0.6, 0.35, 0.05])

    bundle = toy_bundle(dist)
    imp = impute(bundle, Table(["x", "c"], [[None, None]], "frame"))
    assert imp.draws[0][(0, 1)] == "b"  # predicted after x was committed, not from the marginal (which says a)
    assert imp.confidence[(0, 0)] == pytest.approx(0.95) and imp.confidence[(0, 1)] == pytest.approx(0.9 / 0.95)
    assert imp.network_calls == 2


def synthetic_table(path, rows: int = 240, seed: int = 0):
    """Column b is a function of column a, n is 10 x a's index plus noise, z is unrelated noise."""
    rng = np.random.default_rng(seed)
    letters, image = "pqrs", dict(zip("pqrs", "wxyz"))
    a = rng.integers(0, 4, rows)
    n = a * 10.0 + rng.normal(0, 1, rows)
    lines = ["a,b,n,z"] + [f"{letters[i]},{image[letters[i]]},{v:.3f},{rng.normal():.3f}" for i, v in zip(a, n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_fit_and_impute_in_one_command_learns_a_dependency(capsys):
    tmp = scratch("fit-impute")
    truth = read_table(synthetic_table(tmp / "truth.csv"))
    hide = np.random.default_rng(1).random((truth.num_rows, 2)) < 0.25
    lines = (tmp / "truth.csv").read_text().splitlines()
    masked = [lines[0] + ",id"]  # an identifier column: passed through, and its set-aside cells are no trouble
    for r, line in enumerate(lines[1:]):
        cells = line.split(",")
        cells[1] = "" if hide[r, 0] else cells[1]
        cells[2] = "" if hide[r, 1] else cells[2]
        cells[3] = "inf" if r == 5 else cells[3]  # a row the model cannot read: left as it is, and reported
        masked.append(",".join(cells + [f"id-{r:04d}"]))
    (tmp / "in.csv").write_text("\n".join(masked) + "\n")
    code, out, err = run_tool(capsys, "impute", "--input", tmp / "in.csv", "--output", tmp / "out.csv", "--minutes", 1,
                              "--run-dir", tmp / "run", "--no-progress")
    assert code == 0, err
    assert "column 'id' is passed through" in err and "1 row(s) the model cannot read are left as they are (data row 6: column 'z'" in err
    assert (tmp / "out.csv").read_text().splitlines()[6] == masked[6]
    assert f"--model {tmp / 'run' / 'model' / 'bundle'}" in err and (tmp / "run" / "model" / "config.yaml").is_file()
    # the set-aside cells scored the run's checkpoints; the bundle holds the best one's weights, and the checkpoints are gone
    selected = json.loads((tmp / "run" / "model" / "bundle" / "bundle.json").read_text())["selected_step"]
    assert selected["scores"][str(selected["step"])] == min(selected["scores"].values())
    assert not (tmp / "run" / "model" / "checkpoints").exists()
    filled = read_table(tmp / "out.csv")
    b_hits = [filled.values[r][1] == truth.values[r][1] for r in range(truth.num_rows) if hide[r, 0] and r != 5]
    n_err = [float(filled.values[r][2]) - float(truth.values[r][2]) for r in range(truth.num_rows) if hide[r, 1] and r != 5]
    n_sd = np.std([float(v[2]) for v in truth.values])
    assert np.mean(b_hits) > 0.9  # the marginal (mode) gets about a quarter
    assert math.sqrt(np.mean(np.square(n_err))) / n_sd < 0.5  # the column mean gets 1.0
    for r, line in enumerate(masked[1:]):  # observed cells are written back byte for byte
        assert all(x == y for x, y in zip(line.split(","), (tmp / "out.csv").read_text().splitlines()[r + 1].split(",")) if x)
    # the fitted model is reused with --model, and draws give K tables and the uncertainty file
    code, out, err = run_tool(capsys, "impute", "--model", tmp / "run" / "model" / "bundle", "--input", tmp / "in.csv",
                              "--output", tmp / "d.csv", "--draws", 2, "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in tmp.glob("d-*")) == ["d-1.csv", "d-2.csv", "d-uncertainty.csv"]


def test_fit_path_refuses_bad_tables_with_one_line(capsys):
    tmp = scratch("fit-bad")
    (tmp / "small.csv").write_text("a,b\n" + "".join(f"{i},{i % 3 or ''}\n" for i in range(10)))
    code, _, err = run_tool(capsys, "impute", "--input", tmp / "small.csv", "--output", tmp / "o.csv", "--run-dir", tmp / "r1")
    assert code == 2 and "at least 30 are needed" in err and len(err.strip().splitlines()) == 1 and not (tmp / "o.csv").exists()
    (tmp / "full.csv").write_text("a,b\n1,2\n3,4\n")
    code, out, err = run_tool(capsys, "impute", "--input", tmp / "full.csv", "--output", tmp / "f.csv")
    assert code == 0 and "no cell is missing" in out and (tmp / "f.csv").read_bytes() == (tmp / "full.csv").read_bytes()
    (tmp / "latin1.csv").write_bytes("a,b\ncaf\xe9,\n".encode("latin-1"))
    code, _, err = run_tool(capsys, "impute", "--input", tmp / "latin1.csv", "--output", tmp / "l.csv")
    assert code == 2 and "not a UTF-8 CSV" in err
    (tmp / "ragged.csv").write_text("a,b\n1,\n1,2,3\n")
    code, _, err = run_tool(capsys, "impute", "--input", tmp / "ragged.csv", "--output", tmp / "g.csv")
    assert code == 2 and "line 3 has 3 cells" in err
    (tmp / "semicolons.csv").write_text("a;b\n1,5;\n2,5;3\n")  # a spreadsheet's CSV in a locale with decimal commas
    code, _, err = run_tool(capsys, "impute", "--input", tmp / "semicolons.csv", "--output", tmp / "s.csv")
    assert code == 2 and "pass --delimiter ';'" in err and len(err.strip().splitlines()) == 1 and not (tmp / "s.csv").exists()
    code, _, err = run_tool(capsys, "impute", "--input", tmp / "semicolons.csv", "--output", tmp / "s.csv", "--delimiter", ";")
    assert "--delimiter" not in err and "at least 30 are needed" in err  # two columns now; too few rows to learn from


def test_free_text_dates_and_empty_columns_are_passed_through():
    rows = [{"name": f"person {i}", "day": f"2024-01-{i % 28 + 1:02d}", "empty": None, "kind": "xy"[i % 2], "n": str(i % 7),
             "comma": "12" if i == 0 else f"{i // 10},{i % 10}" if i < 200 else f"{i // 100},{i % 100:03d}"} for i in range(300)]
    adapter = TabularAdapter()
    adapter.fit(rows)
    assert list(adapter.columns) == ["kind", "n"]
    assert set(adapter.passthrough) == {"name", "day", "empty", "comma"} and "free text" in adapter.passthrough["name"]
    assert "commas" not in adapter.passthrough["name"]  # numbers written 2,5 or 1,234 are named as such, with the way out
    assert adapter.passthrough["comma"].endswith("they read as numbers written with commas ('0,1': a decimal comma or a thousands "
                                                 "separator): write them plainly (0.665, 1234) to learn them as numbers")
    assert adapter.passthrough["day"] == "dates"
    again = TabularAdapter.from_state(adapter.state())
    assert again.passthrough == adapter.passthrough and list(again.columns) == ["kind", "n"]
    with pytest.raises(Exception, match="not a finite number"):
        adapter.encode({"kind": "x", "n": "inf"})


@pytest.mark.slow
def test_scikit_learn_imputer_in_a_pipeline():
    pd = pytest.importorskip("pandas")
    pipeline = pytest.importorskip("sklearn.pipeline")
    from sklearn.base import clone

    from maskdiff.tasks.imputer import MaskdiffImputer

    tmp = scratch("sk-imputer")
    truth = pd.read_csv(synthetic_table(tmp / "t.csv", rows=200, seed=2))
    frame = truth.copy()
    hide = np.random.default_rng(3).random(len(frame)) < 0.25
    frame.loc[hide, "b"] = None
    frame.loc[~hide & (np.arange(len(frame)) % 5 == 0), "n"] = np.nan
    imputer = MaskdiffImputer(minutes=0.5, seed=1)
    assert clone(imputer).get_params() == imputer.get_params()
    filled = pipeline.make_pipeline(imputer).fit_transform(frame)
    assert isinstance(filled, pd.DataFrame) and not filled.isna().any().any()
    assert (filled.loc[hide, "b"] == truth.loc[hide, "b"]).mean() > 0.8
    observed = frame.notna()
    assert filled.where(observed).equals(frame.where(observed))  # observed cells unchanged
    arr = frame[["n", "z"]].to_numpy()
    out = imputer.transform(frame)  # the fitted model is reused
    assert out.shape == frame.shape and imputer.n_features_in_ == 4
    with pytest.raises(ValueError, match="columns"):
        imputer.transform(arr)


def test_a_row_of_100k_columns_is_refused_before_fitting(capsys):
    tmp = scratch("wide")
    (tmp / "wide.csv").write_text(",".join(f"c{i}" for i in range(100_000)) + "\n" + ",".join("1" for _ in range(100_000)) + "\n")
    code, out, err = run_tool(capsys, "impute", "--input", tmp / "wide.csv", "--output", tmp / "o.csv", "--run-dir", tmp / "run")
    assert code == 0 and "no cell is missing" in out  # nothing to fill: copied as it is
    (tmp / "wide.csv").write_text(",".join(f"c{i}" for i in range(100_000)) + "\n" + ",".join("" for _ in range(100_000)) + "\n")
    code, _, err = run_tool(capsys, "impute", "--input", tmp / "wide.csv", "--output", tmp / "p.csv", "--run-dir", tmp / "run")
    assert code == 2 and "at most 4096 are supported" in err and not (tmp / "p.csv").exists()
    assert not (tmp / "run").exists()  # a failed fit leaves no run directory behind


# --- held-out calibration ----------------------------------------------------------------------


def test_validation_cells_take_a_tenth_of_each_column_within_bounds():
    from maskdiff.tasks.imputation_calibration import validation_cells

    rows = [[str(i), str(i) if i % 2 else None, str(i) if i < 40 else None] for i in range(1000)]
    table = Table(["full", "half", "few"], rows, "frame")
    cells = validation_cells(table, ["full", "half", "few"], np.random.default_rng(0))
    per = {c: [r for r, cc in cells if cc == c] for c in range(3)}
    assert len(per[0]) == 100 and len(per[1]) == 50 and len(per[2]) == 10  # 10%; 10% of 500; at most a quarter of 40
    assert all(rows[r][c] is not None for r, c in cells) and len(set(cells)) == len(cells)
    big = Table(["x"], [[str(i)] for i in range(30_000)], "frame")
    assert len(validation_cells(big, ["x"], np.random.default_rng(0))) == 1000  # not 3,000: the rest is training data


def test_validation_cells_leave_the_text_cells_of_a_number_column_in_place():
    """Were "unknown" set aside, the fit would learn ages as numbers and the user's table would have a cell it cannot read."""
    from maskdiff.tasks.imputation_calibration import validation_cells

    rows = [[str(20 + i % 50) if i != 7 else "unknown", "yes" if i % 3 else "no"] for i in range(60)]
    table = Table(["age", "smokes"], rows, "frame")
    for seed in range(50):
        cells = validation_cells(table, ["age", "smokes"], np.random.default_rng(seed))
        assert (7, 0) not in cells
        assert len([1 for _, c in cells if c == 0]) == 14 and len([1 for _, c in cells if c == 1]) == 15  # a quarter of 59 numbers, of 60
    rows[7][0] = "27"  # an all-number column: every cell may be set aside
    assert any((7, 0) in validation_cells(table, ["age"], np.random.default_rng(seed)) for seed in range(50))


def test_a_number_column_learned_as_categories_because_of_a_few_texts_gets_a_hint():
    from maskdiff.tasks.table_fit import number_columns_learned_as_categories

    rows = [{"age": "unknown" if i % 20 == 0 else str(20 + i % 50), "smokes": "yes" if i % 3 else "no",
             "code": "x" if i % 2 else str(i)} for i in range(200)]  # code: half numbers, a real categorical column
    adapter = TabularAdapter()
    adapter.fit(rows)
    table = Table(["age", "smokes", "code"], [[r["age"], r["smokes"], r["code"]] for r in rows], "frame")
    hints = number_columns_learned_as_categories(table, adapter, [])
    assert len(hints) == 1 and "'age'" in hints[0] and "10 of its 200 cells" in hints[0] and "'unknown'" in hints[0]
    assert number_columns_learned_as_categories(table, adapter, ["age"]) == []  # asked for by --categorical: no hint


def test_calibration_shrinks_an_overconfident_guess_to_the_least_squares_weight_and_falls_back_to_the_mode():
    from maskdiff.tasks.imputation_calibration import calibrated, fit_calibration, from_info, to_json

    rng = np.random.default_rng(0)
    y = rng.normal(5.0, 2.0, 200)
    truth = Table(["x", "k"], [[float(v), "ab"[i % 5 == 0]] for i, v in enumerate(y)], "frame")  # mode a
    mu = float(np.mean(y))  # the mean of every observed cell, as the user's mean imputer takes it
    cells = [(r, 0) for r in range(200)] + [(r, 1) for r in range(200)]
    noise = rng.normal(0, 1, 200)
    guesses = {(r, 0): mu + 2.0 * (y[r] - mu + noise[r]) for r in range(200)}  # twice too far from the mean
    guesses |= {(r, 1): "b" if r % 2 else "a" for r in range(200)}  # right on 50%; the mode a is right on 80%
    cal = fit_calibration(truth, cells, guesses, {"x": "numeric", "k": "categorical"})
    d = np.array([guesses[(r, 0)] - mu for r in range(200)])
    expected = float(d @ (y - mu) / (d @ d))  # least squares, computed here from its definition
    assert cal["x"].mean == pytest.approx(mu) and 0.3 < expected < 0.6 and cal["x"].shrink == pytest.approx(expected, abs=1e-6)
    fixed = calibrated(guesses, truth.columns, from_info({"imputation_calibration": to_json(cal)}), {r: {} for r in range(200)})
    err = lambda g: np.sqrt(np.mean([(g[(r, 0)] - y[r]) ** 2 for r in range(200)]))  # noqa: E731
    assert err(fixed) < err(guesses) and err(fixed) <= cal["x"].baseline + 1e-9
    assert cal["k"].mode == "a" and all(fixed[(r, 1)] == "a" for r in range(200))
    # a guess that is better than the mean is kept as it is
    good = {(r, 0): float(y[r]) for r in range(200)} | {(r, 1): truth.values[r][1] for r in range(200)}
    cal = fit_calibration(truth, cells, good, {"x": "numeric", "k": "categorical"})
    assert cal["x"].shrink == 1.0 and cal["k"].mode is None


def test_calibration_takes_the_regressions_guess_where_it_is_right_and_stores_it_in_the_bundle():
    """y = 2 x1 - x2 (+3 where k is b): the model's guesses are noise, the regression on the completed rows is exact."""
    from maskdiff.tasks.imputation_calibration import calibrated, fit_calibration, from_info, to_json

    rng = np.random.default_rng(0)
    n = 300
    x1, x2, k = rng.normal(0, 1, n), rng.normal(5, 2, n), rng.choice(["a", "b"], n)
    y = 2 * x1 - x2 + 3 * (k == "b")
    truth = Table(["x1", "x2", "k", "y"], [[float(a), float(b), str(c), float(d)] for a, b, c, d in zip(x1, x2, k, y)], "frame")
    held = [(r, 3) for r in range(0, n, 5)]  # validation cells of y
    guesses = {cell: float(np.mean(y) + rng.normal(0, 1)) for cell in held}
    completed = {r: {"x1": x1[r], "x2": x2[r], "k": k[r], "y": guesses.get((r, 3), y[r])} for r in range(n)}
    kinds = {"x1": "numeric", "x2": "numeric", "k": "categorical", "y": "numeric"}
    cal = fit_calibration(truth, held, guesses, kinds, completed)["y"]
    assert cal.linear > 0.99 and cal.shrink < 0.01 and cal.linear_model is not None and sorted(cal.linear_model.features.levels["k"]) == ["a", "b"]
    assert cal.linear_score < 1e-3 and cal.describe("y").endswith("mean 2.8 on 60 cells -> regression") and ", regression 0.000" in cal.describe("y")
    stored = from_info(json.loads(json.dumps({"imputation_calibration": to_json({"y": cal})})))  # as bundle.json holds it
    new = [{"x1": 0.5, "x2": 4.0, "k": "b", "y": None}, {"x1": -1.0, "x2": 7.0, "k": "a", "y": None}]
    fixed = calibrated({(0, 3): 0.0, (1, 3): 0.0}, truth.columns, stored, dict(enumerate(new)))
    assert fixed[(0, 3)] == pytest.approx(2 * 0.5 - 4.0 + 3, abs=0.05) and fixed[(1, 3)] == pytest.approx(-2.0 - 7.0, abs=0.05)
    # where the column depends on nothing, the regression gets no weight that the validation cells do not earn
    noise = rng.normal(0, 1, n)
    truth = Table(["x1", "y"], [[float(a), float(b)] for a, b in zip(x1, noise)], "frame")
    completed = {r: {"x1": x1[r], "y": 0.0} for r in range(n)}
    held = [(r, 1) for r, _ in held]
    cal = fit_calibration(truth, held, {cell: 0.0 for cell in held}, {"x1": "numeric", "y": "numeric"}, completed)["y"]
    assert cal.linear < 0.3 and (cal.linear_model is None or cal.linear_model.penalty >= 100)


def test_ridge_penalty_is_chosen_by_the_exact_leave_one_out_error():
    """The closed-form leave-one-out residual e_i / (1 - H_ii) against refitting without each row."""
    from maskdiff.tasks.row_regression import PENALTIES, fit_row_regression

    rng = np.random.default_rng(1)
    n = 15
    X = rng.normal(0, 1, (n, 3))
    y = X @ np.array([1.0, -0.5, 0.0]) + rng.normal(0, 1.5, n)
    rows = [{"a": a, "b": b, "c": c} for a, b, c in X]
    reg = fit_row_regression(rows, y, {"a": "numeric", "b": "numeric", "c": "numeric"}, kernel=False)
    Z = (X - X.mean(0)) / X.std(0)

    def refit_error(lam: float) -> float:  # intercept free, penalty on the weights only
        errors = []
        for i in range(n):
            keep = np.arange(n) != i
            A = np.column_stack([np.ones(n - 1), Z[keep]])
            w = np.linalg.solve(A.T @ A + np.diag([0.0, lam, lam, lam]), A.T @ y[keep])
            errors.append(y[i] - np.concatenate([[1.0], Z[i]]) @ w)
        return float(np.mean(np.square(errors)))

    assert reg.penalty == min(PENALTIES, key=refit_error)
    A = np.column_stack([np.ones(n), Z])  # and the weights are the ridge solution at that penalty
    w = np.linalg.solve(A.T @ A + np.diag([0.0] + [reg.penalty] * 3), A.T @ y)
    assert np.allclose(reg.predict(rows), A @ w)


def test_a_nonlinear_column_gets_the_kernel_with_the_least_leave_one_out_error():
    """y = sin(2a): the regression takes an RBF part, its leave-one-out error is that of refitting without each
    row (sum kernel z.z'/p + exp(-gamma |z - z'|^2) on the centres, Nystroem features), and it is the least of
    the candidates; a linear column keeps the linear model."""
    from maskdiff.tasks import row_regression as rr

    rng = np.random.default_rng(5)
    n = 60
    X = rng.normal(0, 1, (n, 2))
    y = np.sin(2 * X[:, 0]) + rng.normal(0, 0.1, n)
    rows = [{"a": a, "b": b} for a, b in X]
    predictors = {"a": "numeric", "b": "numeric"}
    reg = rr.fit_row_regression(rows, y, predictors)
    assert reg.centres and reg.gamma * 2 in rr.KERNEL_WIDTHS
    linear = rr.fit_row_regression(rows, y, predictors, kernel=False)
    assert np.sqrt(np.mean((reg.predict(rows) - y) ** 2)) < 0.5 * np.sqrt(np.mean((linear.predict(rows) - y) ** 2))
    Z = (X - X.mean(0)) / X.std(0)
    C = np.asarray(reg.centres)

    def refit_error(gamma: float | None, lam: float) -> float:  # the same design, intercept free, fitted without row i
        if gamma is None:
            F = Z
        else:
            K = np.exp(-gamma * ((C[:, None] - C[None]) ** 2).sum(-1))
            w, V = np.linalg.eigh(K)
            keep = w > rr.NYSTROEM_CUTOFF * w.max()
            F = np.column_stack([Z / np.sqrt(2), np.exp(-gamma * ((Z[:, None] - C[None]) ** 2).sum(-1)) @ (V[:, keep] / np.sqrt(w[keep]))])
        errors = []
        for i in range(n):
            keep_rows = np.arange(n) != i
            A = np.column_stack([np.ones(n - 1), F[keep_rows]])
            coef = np.linalg.solve(A.T @ A + lam * np.diag([0.0] + [1.0] * F.shape[1]), A.T @ y[keep_rows])
            errors.append(y[i] - np.concatenate([[1.0], F[i]]) @ coef)
        return float(np.mean(np.square(errors)))

    chosen = refit_error(reg.gamma, reg.penalty)
    assert chosen == pytest.approx(min(refit_error(width / 2, lam) for width in rr.KERNEL_WIDTHS for lam in rr.PENALTIES), rel=1e-6)
    assert chosen < min(refit_error(None, lam) for lam in rr.PENALTIES)
    straight = rr.fit_row_regression(rows, 3 * X[:, 1] + rng.normal(0, 0.1, n), predictors)
    assert not straight.centres


def test_a_regression_survives_an_svd_that_does_not_converge(monkeypatch):
    """LAPACK's SVD can fail on an ill-conditioned design; the fit then takes the eigenvectors of Z'Z, same answer."""
    from maskdiff.tasks import row_regression as rr

    rng = np.random.default_rng(6)
    X = rng.normal(0, 1, (80, 3))
    y = np.sin(2 * X[:, 0]) + X[:, 1] + rng.normal(0, 0.1, 80)
    rows = [{"a": a, "b": b, "c": c} for a, b, c in X]
    predictors = {"a": "numeric", "b": "numeric", "c": "numeric"}
    expected = rr.fit_row_regression(rows, y, predictors)

    def failing(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(rr.np.linalg, "svd", failing)
    got = rr.fit_row_regression(rows, y, predictors)
    assert (got.gamma, got.penalty) == (expected.gamma, expected.penalty)
    assert np.allclose(got.predict(rows), expected.predict(rows), atol=1e-6)
    # and where nothing converges the column is calibrated without its regression, rather than the fit failing
    from maskdiff.tasks.imputation_calibration import fit_calibration

    monkeypatch.setattr(rr.np.linalg, "eigh", failing)
    truth = Table(["a", "b", "c", "y"], [[a, b, c, t] for (a, b, c), t in zip(X, y)], "frame")
    held = [(r, 3) for r in range(0, 80, 4)]
    completed = {r: {"a": X[r, 0], "b": X[r, 1], "c": X[r, 2], "y": 0.0} for r in range(80)}
    cal = fit_calibration(truth, held, {cell: 0.0 for cell in held}, dict.fromkeys(truth.columns, "numeric"), completed)["y"]
    assert cal.linear_model is None and cal.linear_score is None and cal.cells == 20


def test_the_classifier_is_the_minimum_of_the_penalised_log_loss_it_states():
    """At the optimum of mean log-loss + |W|^2 / (2n) (scikit-learn's C = 1) the gradient vanishes: checked in NumPy."""
    from maskdiff.tasks.row_regression import fit_row_classifier

    rng = np.random.default_rng(4)
    n = 150
    rows = [{"u": float(a), "v": float(b), "k": str(c)} for a, b, c in zip(rng.normal(0, 1, n), rng.normal(3, 2, n), rng.choice(["p", "q"], n))]
    labels = [("x", "y", "z")[int(r["u"] > 0.5) + int(r["v"] > 3)] if rng.random() < 0.8 else "x" for r in rows]
    clf = fit_row_classifier(rows, labels, {"u": "numeric", "v": "numeric", "k": "categorical"})
    assert clf is not None and clf.classes == ["x", "y", "z"]
    Z = clf.features(rows)
    W, b = np.array(clf.weights), np.array(clf.bias)
    P = np.array([[p[c] for c in clf.classes] for p in clf.probabilities(rows)])
    assert np.allclose(P, np.exp(Z @ W + b) / np.exp(Z @ W + b).sum(1, keepdims=True))
    Y = np.eye(3)[[clf.classes.index(v) for v in labels]]
    assert np.abs(Z.T @ (P - Y) / n + W / n).max() < 1e-4 and np.abs((P - Y).mean(0)).max() < 1e-4
    assert np.abs(W).max() > 0.1  # not the trivial answer
    assert fit_row_classifier(rows, ["x"] * n, {"u": "numeric"}) is None  # one class: nothing to learn


def test_a_wide_row_shares_the_features_and_a_very_wide_one_gets_no_regression():
    from maskdiff.tasks.row_regression import MAX_FEATURES, fit_row_regression

    rows = [{f"k{j}": str(i % 50) for j in range(30)} | {"x": float(i)} for i in range(100)]
    reg = fit_row_regression(rows, [float(i) for i in range(100)], {"x": "numeric"} | {f"k{j}": "categorical" for j in range(30)})
    assert reg is not None and len(reg.features.center) <= MAX_FEATURES
    assert all(len(v) == (MAX_FEATURES - 1) // 30 for v in reg.features.levels.values())
    wide = {f"x{j}": "numeric" for j in range(MAX_FEATURES + 1)}
    assert fit_row_regression([{c: 1.0 for c in wide}] * 5, [1.0] * 5, wide) is None


def test_a_categorical_guess_mixes_in_the_classifier_where_it_gives_the_validation_cells_more_likelihood():
    """k is "b" exactly where x > 0: the model's distributions are wrong half the time, the classifier is not."""
    from maskdiff.tasks.imputation_calibration import calibrated, fit_calibration, from_info, to_json

    rng = np.random.default_rng(3)
    n = 400
    x = rng.normal(0, 1, n)
    k = np.where(x > 0, "b", "a")
    truth = Table(["x", "k"], [[float(a), str(b)] for a, b in zip(x, k)], "frame")
    held = [(r, 1) for r in range(0, n, 4)]
    wrong = {cell: rng.random() < 0.5 for cell in held}
    dists = {cell: ({"a": 0.3, "b": 0.7} if (k[cell[0]] == "a") == wrong[cell] else {"a": 0.7, "b": 0.3}) for cell in held}
    guesses = {cell: max(d, key=d.get) for cell, d in dists.items()}
    completed = {r: {"x": x[r], "k": guesses.get((r, 1), k[r])} for r in range(n)}
    kinds = {"x": "numeric", "k": "categorical"}
    cal = fit_calibration(truth, held, guesses, kinds, completed, dists)["k"]
    assert 0.35 < cal.model < 0.65 and cal.linear_score > 0.9 and cal.linear >= 0.5 and cal.mode is None
    stored = from_info(json.loads(json.dumps({"imputation_calibration": to_json({"k": cal})})))
    rows = {0: {"x": 2.0, "k": "a"}, 1: {"x": -2.0, "k": "b"}}
    fixed = calibrated({(0, 1): "a", (1, 1): "b"}, truth.columns, stored, rows, {(0, 1): {"a": 0.7, "b": 0.3}, (1, 1): {"a": 0.3, "b": 0.7}})
    assert fixed == {(0, 1): "b", (1, 1): "a"}
    # a model that is right keeps its guesses: the classifier's share stays 0 when it adds no likelihood
    right = {cell: ({"a": 0.999, "b": 0.001} if k[cell[0]] == "a" else {"a": 0.001, "b": 0.999}) for cell in held}
    cal = fit_calibration(truth, held, {cell: k[cell[0]] for cell in held}, kinds, completed, right)["k"]
    assert cal.model == 1.0 and cal.linear <= 0.1 and cal.prior <= 0.1 and cal.mode is None
    # a column that depends on nothing: the frequencies take over (here all of it, so the guess is the mode)
    noise = np.where(rng.random(n) < 0.8, "a", "b")
    truth = Table(["x", "k"], [[float(a), str(b)] for a, b in zip(x, noise)], "frame")
    flat = {cell: {"a": 0.2, "b": 0.8} for cell in held}  # confidently wrong
    cal = fit_calibration(truth, held, {cell: "b" for cell in held}, kinds, completed, flat)["k"]
    assert cal.mode == "a" and calibrated({(0, 1): "b"}, truth.columns, {"k": cal}, rows, {(0, 1): {"a": 0.2, "b": 0.8}}) == {(0, 1): "a"}


def test_the_blend_is_the_least_squares_point_of_the_triangle():
    from maskdiff.tasks.imputation_calibration import _blend

    rng = np.random.default_rng(2)
    G, L = rng.normal(0, 1, 50), rng.normal(0, 1, 50)
    assert _blend(0.5 * G + 0.3 * L, G, L) == pytest.approx((0.5, 0.3))  # inside: found exactly
    assert _blend(L, G, L) == pytest.approx((0.0, 1.0)) and _blend(-G, G, L) == pytest.approx((0.0, 0.0), abs=0.2)
    for _ in range(20):  # never worse than a brute-force search of the triangle
        t = rng.normal(0, 1) * G + rng.normal(0, 1) * L + rng.normal(0, 1, 50)
        a, b = _blend(t, G, L)
        grid = [(u, v) for u in np.linspace(0, 1, 41) for v in np.linspace(0, 1, 41) if u + v <= 1 + 1e-12]
        assert a >= 0 and b >= 0 and a + b <= 1 + 1e-12
        assert np.sum((t - a * G - b * L) ** 2) <= min(np.sum((t - u * G - v * L) ** 2) for u, v in grid) + 1e-9


def test_best_guesses_apply_the_bundles_calibration_and_draws_do_not():
    from maskdiff.tasks.imputation_calibration import ColumnCalibration, to_json
    from maskdiff.tasks.row_regression import fit_row_regression

    bundle = toy_bundle(lambda x_t, spec: probs(spec, [0.0, 0.0, 0.0, 1.0], [0.9, 0.1, 0.0]))
    means = bundle.adapters["tabular"].columns["x"].means
    bundle.info = {"imputation_calibration": to_json({"x": ColumnCalibration("numeric", 50, 1.0, 1.0, shrink=0.25, mean=10.0),
                                                      "c": ColumnCalibration("categorical", 50, 0.5, 0.6, mode="b")})}
    table = Table(["x", "c"], [[None, None]], "frame")
    best = impute(bundle, table).draws[0]
    assert best[(0, 0)] == pytest.approx(10.0 + 0.25 * (means[3] - 10.0)) and best[(0, 1)] == "b"
    # a regression reads the row as the model completed it: c = a (its guess, not the corrected b)
    regression = fit_row_regression([{"c": "a"}, {"c": "b"}] * 20, [30.0, 70.0] * 20, {"c": "categorical"})
    bundle.info["imputation_calibration"]["x"] = to_json({"x": ColumnCalibration("numeric", 50, 1.0, 1.0, shrink=0.25, mean=10.0, linear=0.5,
                                                                                 linear_model=regression)})["x"]
    at_a = float(regression.predict([{"c": "a"}])[0])
    assert at_a == pytest.approx(30.0, abs=0.5)
    assert impute(bundle, table).draws[0][(0, 0)] == pytest.approx(10.0 + 0.25 * (means[3] - 10.0) + 0.5 * (at_a - 10.0))
    raw = impute(bundle, table, calibrate=False).draws[0]
    assert raw[(0, 0)] == pytest.approx(means[3]) and raw[(0, 1)] == "a"
    drawn = impute(bundle, table, draws=1, seed=0).draws[0]
    assert means[2] < float(drawn[(0, 0)]) <= 99 and drawn[(0, 1)] in "ab"


def test_an_ensemble_imputes_from_the_mixture_of_its_members_conditionals():
    first = toy_bundle(lambda x_t, spec: probs(spec, [0.7, 0.1, 0.1, 0.1], [0.2, 0.8, 0.0]))
    second = toy_bundle(lambda x_t, spec: probs(spec, [0.1, 0.2, 0.2, 0.5], [0.6, 0.4, 0.0]))
    first.denoisers = [first.denoiser, second.denoiser]
    means = first.adapters["tabular"].columns["x"].means
    best = impute(first, Table(["x", "c"], [[None, 1.0], [2.0, None]], "frame")).draws[0]
    assert best[(0, 0)] == pytest.approx(sum(p * m for p, m in zip([0.4, 0.15, 0.15, 0.3], means)))  # 45.75, not 27 or 64
    assert best[(1, 1)] == "b"  # mixture (0.4, 0.6): b, though the second member alone says a


def test_a_row_number_column_is_passed_through_and_its_holes_get_their_row_numbers():
    from maskdiff.adapters.tabular import row_number_offset
    from maskdiff.tasks.imputation import row_number_cells

    assert row_number_offset([None if i % 4 == 0 else i + 1 for i in range(40)]) == 1  # pandas' or R's index, with holes
    assert row_number_offset([str(i) for i in range(40)]) == 0  # quoted in the CSV
    assert row_number_offset([i + 1 for i in range(9)]) is None  # too few to tell from a coincidence
    assert row_number_offset([(i * 7) % 40 for i in range(40)]) is None  # distinct, but not in row order
    assert row_number_offset([i + 0.5 for i in range(40)]) is None and row_number_offset([True] * 40) is None
    rows = [{"": None if i % 5 == 0 else i + 1, "kind": "xy"[i % 2], "n": float(i % 7)} for i in range(60)]
    adapter = TabularAdapter()
    adapter.fit(rows)
    assert list(adapter.columns) == ["kind", "n"] and adapter.passthrough[""].startswith("row numbers")
    forced = TabularAdapter(numeric="idx")  # naming it --numeric learns it
    forced.fit([{"idx": i + 1, "n": float(i % 7)} for i in range(60)])
    assert "idx" in forced.columns
    table = Table(["", "kind", "n"], [[r[""], r["kind"], r["n"]] for r in rows], "frame")
    assert row_number_cells(table, adapter) == {(i, 0): i + 1 for i in range(0, 60, 5)}
    table.values[1][0] = 7  # no longer counts up with the rows: left as it is
    assert row_number_cells(table, adapter) == {}


def test_the_calibration_reads_every_row_with_a_set_aside_cell_and_a_sample_of_the_rest_up_to_its_cap():
    from maskdiff.tasks.imputation_calibration import REGRESSION_ROWS
    from maskdiff.tasks.table_fit import regression_rows

    held = {3, 50, 20_000}
    rows = regression_rows(30_000, held, seed=0)
    assert len(rows) == REGRESSION_ROWS and held <= set(rows) and rows == sorted(set(rows))
    assert rows == regression_rows(30_000, held, seed=0)  # the same sample for the same seed
    assert regression_rows(200, {1, 2}, seed=0) == list(range(200))  # a small table: every row
