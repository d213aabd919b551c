"""Task modules: raw CSV round trip, templates, regions, imputation semantics, evaluation bookkeeping."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from adapter_fixtures import PENGUINS, scratch
from tasks_fixtures import shard_dir, tiny_bundle

from maskdiff.errors import UserError
from maskdiff.tasks.images import keep_mask
from maskdiff.tasks.imputation import impute
from maskdiff.tasks.imputation_quality import hide_cells, with_hidden
from maskdiff.data.tables import read_table, split_csv, write_table
from maskdiff.tasks.templates import protein_template, text_template
from maskdiff.core.tokens import MISSING


@pytest.fixture(scope="module")
def bundle():
    from maskdiff.bundle import load_bundle

    return load_bundle(tiny_bundle())


@pytest.mark.parametrize("text", [
    "a,b\r\n1,2\r\n", 'a,b\n"x, y",2\n"say ""hi""",\n', "a,b\n1,\"multi\nline\"\n3,4", "a\n\n", 'h\n""\n',
])
def test_split_csv_keeps_every_byte(text):
    rows = split_csv(text)
    assert "".join(",".join(cells) + end for cells, end in rows) == text


def test_templates():
    assert protein_template("mkT__LL?", "ACDEFGHIKLMNPQRSTVWYXBZUO").tolist()[3:5] == [MISSING, MISSING]
    with pytest.raises(UserError, match="unknown residue letters 'J'"):
        protein_template("MKJ__", "ACDEFGHIKLMNPQRSTVWY")
    with pytest.raises(UserError, match="more than the 4"):
        protein_template("MKT____", "ACDEFGHIKLMNPQRSTVWY", max_len=4)
    ids = text_template("ab[MASK:3]c[MASK]", lambda s: [ord(ch) for ch in s], span=2)
    assert ids.tolist() == [97, 98, MISSING, MISSING, MISSING, 99, MISSING, MISSING]
    with pytest.raises(UserError, match="no \\[MASK\\]"):
        text_template("nothing to fill", lambda s: [1])


def test_keep_regions():
    assert keep_mask("top", 4, 4)[:2].all() and not keep_mask("top", 4, 4)[2:].any()
    assert keep_mask("right:0.25", 4, 4)[:, 3].all() and keep_mask("right:0.25", 4, 4).sum() == 4
    assert keep_mask("1:3,0:2", 4, 4).sum() == 4
    for bad in ("middle", "top:2", "0:9,0:1"):
        with pytest.raises(UserError):
            keep_mask(bad, 4, 4)


def test_impute_keeps_observed_cells_and_fills_every_missing_one(bundle):
    table = read_table(PENGUINS, ",", ["NA"])
    cells = hide_cells(table, table.columns, 0.3, np.random.default_rng(0))
    masked = with_hidden(table, cells)
    missing = {(r, c) for r, row in enumerate(masked.values) for c, v in enumerate(row) if v is None}
    imp = impute(bundle, masked, draws=2)
    assert set(imp.cells) == missing and all(set(d) == missing for d in imp.draws)
    assert all(v is not None and str(v) != "" for d in imp.draws for v in d.values())
    out = scratch("impute-lib") / "filled.csv"
    write_table(masked, imp.draws[0], out)
    original, filled = masked.raw, split_csv(out.read_text())
    assert len(filled) == len(original)
    for r, ((cells_in, end_in), (cells_out, end_out)) in enumerate(zip(original, filled)):
        assert end_in == end_out
        for c, (a, b) in enumerate(zip(cells_in, cells_out)):
            if r == 0 or (r - 1, c) not in missing:
                assert a == b, (r, c)
            else:
                assert b != ""


def test_impute_parquet_keeps_schema_and_values(bundle):
    table = read_table(PENGUINS, ",", ["NA"])
    arrow = pa.table({"species": [r[0] for r in table.values[:40]], "bill_length_mm": [None if r[2] is None else float(r[2]) for r in table.values[:40]],
                      "year": pa.array([int(r[7]) for r in table.values[:40]], pa.int64())})
    arrow = arrow.set_column(0, "species", pa.array([None if i % 5 == 0 else v for i, v in enumerate(arrow.column(0).to_pylist())]))
    arrow = arrow.set_column(2, "year", pa.array([None if i % 7 == 0 else v for i, v in enumerate(arrow.column(2).to_pylist())], pa.int64()))
    path = scratch("impute-pq") / "t.parquet"
    pq.write_table(arrow, path)
    t = read_table(path)
    imp = impute(bundle, t, seed=1)
    write_table(t, imp.draws[0], path.with_name("out.parquet"))
    back = pq.read_table(path.with_name("out.parquet"))
    assert back.schema == arrow.schema and all(c.null_count == 0 for c in back.columns)
    for name in arrow.column_names:
        for a, b in zip(arrow.column(name).to_pylist(), back.column(name).to_pylist()):
            assert a is None or a == b


def test_unknown_columns_are_an_error(bundle):
    table = read_table(PENGUINS, ",", ["NA"])
    table.columns[1] = "islands"
    with pytest.raises(UserError, match="'islands' are not columns the model knows"):
        impute(bundle, table)
    imp = impute(bundle, table, passthrough=["islands"])
    assert all(c != 1 for _, c in imp.cells)


def test_evaluation_bookkeeping(bundle):
    from maskdiff.tasks.evaluation import evaluate_records, shard_records, summarise, unigram_bits

    by_mod, splits = shard_records(bundle, [shard_dir("pixels"), shard_dir("tabular")])
    assert set(splits.values()) == {"heldout"} and set(by_mod) == {"pixels", "tabular"}
    tally = evaluate_records(bundle, by_mod["pixels"], repeats=3, batch_size=8)
    s = summarise(tally, bundle.spec, len(by_mod["pixels"]))["pixels"]
    assert s["tokens"] == sum(f["tokens"] for f in s["fields"].values())
    assert s["fields"]["pixels/value"]["tokens"] == 64 * len(by_mod["pixels"]) and np.isfinite(s["stderr_over_records"]) and s["stderr_over_records"] > 0
    assert s["bits_per_dim"] == s["fields"]["pixels/value"]["bits_per_token"]
    uni = unigram_bits(by_mod["tabular"], by_mod["tabular"], bundle.spec)
    assert 0 < uni["tabular"] < 8
