"""The functions behind the README's quality figures: hiding cells, the mode/mean baseline, scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
from adapter_fixtures import scratch

from maskdiff.tasks.imputation_quality import hide_cells, mode_mean_baseline, score, with_hidden
from maskdiff.data.tables import Table, read_table

KINDS = {"x": "numeric", "k": "categorical"}


def test_hide_cells_takes_observed_cells_at_the_fraction_and_at_least_one_per_row():
    rng = np.random.default_rng(0)
    rows = [[float(i) if i % 4 else None, "ab"[i % 2]] for i in range(2000)]
    table = Table(["x", "k"], rows, "frame")
    cells = hide_cells(table, ["x", "k"], 0.2, rng)
    assert len(set(cells)) == len(cells) and all(rows[r][c] is not None for r, c in cells)
    assert {r for r, _ in cells} == set(range(2000))  # every row gives at least one cell
    # rows with two observed cells hide each with prob 0.2, plus one forced when neither was drawn: 0.2 + 0.8^2 / 2 = 0.52
    two = [r for r in range(2000) if r % 4]
    share = sum(1 for r, c in cells if r % 4 and c == 0) / len(two)
    assert share == pytest.approx(0.2 + 0.8**2 / 2, abs=0.04)


def test_with_hidden_empties_the_cells_in_values_and_raw_text_and_nothing_else():
    path = scratch("quality") / "t.csv"
    path.write_text("x,k\n1.5,a\n2,b\n3,a\n")
    table = read_table(path, ",", [])
    hidden = with_hidden(table, [(0, 1), (2, 0)])
    assert hidden.values == [["1.5", None], ["2", "b"], [None, "a"]]  # a CSV's cells stay text
    assert [cells for cells, _ in hidden.raw] == [["x", "k"], ["1.5", ""], ["2", "b"], ["", "a"]]
    assert table.values[0][1] is not None and table.raw[1][0] == ["1.5", "a"]  # the original is untouched


def test_mode_mean_baseline_guesses_each_columns_mean_or_most_frequent_value():
    train = Table(["x", "k"], [[1.0, "a"], [2.0, "b"], [None, "b"], [6.0, None]], "frame")
    cells = [(2, 0), (3, 1), (0, 0)]
    guess = mode_mean_baseline(train, cells, KINDS)
    assert guess == {(2, 0): 3.0, (3, 1): "b", (0, 0): 3.0}


def test_score_gives_rmse_over_the_truths_std_and_accuracy_per_column():
    truth = Table(["x", "k"], [[1.0, "a"], [2.0, "b"], [3.0, "a"], [6.0, " b"]], "frame")
    cells = [(r, c) for r in range(4) for c in range(2)]
    guesses = {(0, 0): 2.0, (1, 0): 2.0, (2, 0): 1.0, (3, 0): 6.0, (0, 1): "a", (1, 1): "a", (2, 1): "a", (3, 1): "b"}
    s = score(truth, cells, guesses, KINDS)
    err = np.array([1.0, 0.0, -2.0, 0.0])
    rmse, std = math.sqrt(np.mean(err**2)), float(np.std([1.0, 2.0, 3.0, 6.0]))
    assert s["x"]["rmse"] == pytest.approx(rmse) and s["x"]["nrmse"] == pytest.approx(rmse / std) and s["x"]["cells"] == 4
    assert s["k"]["accuracy"] == 0.75  # surrounding spaces do not count against a guess
    assert s["all"]["accuracy"] == 0.75 and s["all"]["nrmse"] == pytest.approx(rmse / std) and s["all"]["numeric_cells"] == 4
