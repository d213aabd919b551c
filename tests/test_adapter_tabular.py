"""Tabular adapter: categories exact, numbers inside their bin, missing cells, rejects."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from adapter_fixtures import ADULT, PENGUINS, PENGUINS_RAW, read_all, scratch

from maskdiff.adapters import OTHER, InputError, Reject, Rejected, TabularAdapter, adapter_from_state
from maskdiff.adapters.tabular import NumericBins
from maskdiff.core.tokens import MISSING

NA = {"", "NA", "N/A", "?", "NaN", "null", "NULL"}


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _check_round_trip(adapter, raws, originals):
    assert len(raws) == len(originals)
    for (_, raw), orig in zip(raws, originals):
        rec = adapter.encode(raw)
        back = adapter.decode(rec)
        for name, col in adapter.columns.items():
            token = int(rec[f"col:{name}"].tokens[0])
            cell = orig[name]
            if cell in NA:
                assert token == MISSING and back[name] is None, (name, cell)
            elif isinstance(col, NumericBins):
                lo, hi = col.bounds(token)
                last = token == col.size - 1
                for x in (float(cell), back[name]):  # bin i is [lo, hi), the last one [lo, hi]
                    assert lo <= x and (x < hi or (last and x == hi)), (name, cell, back[name], lo, hi)
            else:
                assert back[name] == cell, (name, cell, back[name])


def test_adult_sample_round_trip():
    adapter, raws, rejects = read_all("tabular", [ADULT])
    originals = _csv_rows(ADULT)
    assert rejects == [] and len(raws) == 3257
    kinds = {n: adapter.kind(n) for n in adapter.columns}
    assert kinds["age"] == kinds["fnlwgt"] == kinds["capital-gain"] == "numeric"
    assert kinds["workclass"] == kinds["native-country"] == kinds["class"] == "categorical"
    assert adapter.columns["fnlwgt"].size == round(3257**0.5)  # default bins: about sqrt(observed cells)
    assert adapter.columns["capital-gain"].size > 20  # the mostly-zero column still gets many bins
    assert [s.name for s in adapter.supports()][0] == "tabular/col:age"
    _check_round_trip(adapter, raws, originals)
    missing = sum(r["workclass"] == "?" for r in originals)
    assert missing > 100 and sum(raw["workclass"] is None for _, raw in raws) == missing


def test_penguins_types_overrides_and_state():
    adapter, raws, _ = read_all("tabular", [PENGUINS], categorical="year", bins=80)
    assert adapter.kind("year") == "categorical" and adapter.kind("body_mass_g") == "numeric"
    assert adapter.columns["year"].categories == ["2007", "2008", "2009"]
    _check_round_trip(adapter, raws, _csv_rows(PENGUINS))
    rec = adapter.encode(raws[3][1])  # the penguin with no measurements
    assert rec["col:bill_length_mm"].tokens[0] == MISSING and rec["col:sex"].tokens[0] == MISSING
    loaded = adapter_from_state(adapter.state())
    assert loaded.fingerprint() == adapter.fingerprint() and loaded.decode(rec) == adapter.decode(rec)
    raw_adapter, raw_rows, _ = read_all("tabular", [PENGUINS_RAW], drop="Comments,Individual ID")
    assert "Comments" not in raw_adapter.columns and "Comments" not in raw_adapter.passthrough  # dropped, not passed through
    assert raw_adapter.passthrough == {"Date Egg": "dates"} and "Date Egg" not in raw_adapter.columns
    originals = _csv_rows(PENGUINS_RAW)
    for o in originals:
        del o["Comments"], o["Individual ID"]
    _check_round_trip(raw_adapter, raw_rows, originals)
    with pytest.raises(InputError, match="no column"):
        read_all("tabular", [PENGUINS], numeric="nosuch")


def test_parquet_input_matches_csv():
    root = scratch("parquet")
    table = pacsv.read_csv(PENGUINS, convert_options=pacsv.ConvertOptions(null_values=["NA"], strings_can_be_null=True))
    pq.write_table(table, root / "penguins.parquet")
    adapter, raws, _ = read_all("tabular", [root / "penguins.parquet"])
    assert len(raws) == 344 and adapter.kind("flipper_length_mm") == "numeric" and adapter.kind("species") == "categorical"
    _check_round_trip(adapter, raws, _csv_rows(PENGUINS))


def test_ragged_rows_rejected_with_line_numbers_and_bad_cells():
    root = scratch("ragged")
    lines = PENGUINS.read_text().splitlines()
    lines[5] += ",extra"
    lines[9] = "Adelie,Torgersen"
    (root / "ragged.csv").write_text("\n".join(lines[:20]) + "\n")
    items = list(TabularAdapter().read([root / "ragged.csv"]))
    rejects = [i for i in items if isinstance(i, Rejected)]
    assert len(items) == 19 and [r.id.rsplit(":", 1)[1] for r in rejects] == ["6", "10"]
    assert "ragged row: 9 cells, expected 8" in rejects[0].reason and "2 cells" in rejects[1].reason
    adapter = TabularAdapter(numeric="body_mass_g")
    adapter.fit([{"body_mass_g": "3750"}, {"body_mass_g": "3800"}])
    with pytest.raises(Reject, match="'heavy' is not a number"):
        adapter.encode({"body_mass_g": "heavy"})
    (root / "header.csv").write_text(lines[0] + "\n")
    with pytest.raises(InputError, match="header but no data rows"):
        list(TabularAdapter().read([root / "header.csv"]))
    (root / "tabs.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(InputError) as refused:
        list(TabularAdapter().read([root / "tabs.tsv"]))
    assert str(refused.value).endswith("tabs.tsv: the header reads as one column ('a\\tb'): if its fields are separated by '\\t', pass --delimiter $'\\t'")
    assert len(list(TabularAdapter(delimiter="\t").read([root / "tabs.tsv"]))) == 1
    (root / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="other.csv: columns"):
        list(TabularAdapter().read([root / "ragged.csv", root / "other.csv"]))


def test_bins_unseen_policy_and_uniform_decoding():
    values = np.r_[np.zeros(900), np.arange(1, 1001, dtype=float) * 7.5]
    bins = NumericBins.fit(values, 64)
    assert bins.size >= 60 and bins.encode(0.0) == 0 and bins.bounds(0) == (0.0, 7.5)
    counts = np.bincount([bins.encode(v) for v in values[900:]], minlength=bins.size)[1:]
    assert counts.max() - counts.min() <= 2  # equal-frequency bins over the non-zero values
    rows = [{"c": f"{v:g}", "k": k} for v, k in zip(values, ["a", "b", "c"] * 700)]
    uni = TabularAdapter(numeric_decode="uniform", seed=1)
    uni.fit(rows)
    draws = set()
    for row in rows[::50]:
        rec = uni.encode(row)
        lo, hi = uni.columns["c"].bounds(int(rec["col:c"].tokens[0]))
        v = uni.decode(rec)["c"]
        draws.add(v)
        assert lo <= v <= hi
    assert len(draws) > 20
    assert uni.decode(uni.encode({"c": "3", "k": "zzz"}))["k"] == OTHER
    strict = TabularAdapter(unseen="reject")
    strict.fit(rows)
    with pytest.raises(Reject, match="column 'k'"):
        strict.encode({"c": "3", "k": "zzz"})
    capped = TabularAdapter(max_categories=2)
    capped.fit(rows)
    assert capped.columns["k"].categories == ["a", "b"] and capped.decode(capped.encode(rows[2]))["k"] == OTHER
