"""The tools as a user meets them: --help, outputs, reproducibility, and one-line errors with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from adapter_fixtures import PENGUINS, ROOT, scratch
from tasks_fixtures import load_tool, run_tool, shard_dir, tampered_bundle, tiny_bundle

TOOLS = ("shard", "train", "sample", "impute", "protein", "text", "evaluate", "demo", "bench_quality")
FAST = ("--steps", "4", "--no-progress")


@pytest.fixture(scope="module")
def model():
    return tiny_bundle()


@pytest.mark.parametrize("name", TOOLS)
def test_help_has_examples(name, capsys):
    with pytest.raises(SystemExit) as exc:
        load_tool(name).main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"tools/{name}.py" in out


ERROR_CASES = {
    "sample": ["--num", "2", "--output", "{tmp}/g.png"],
    "impute": ["--input", str(PENGUINS), "--output", "{tmp}/f.csv"],
    "protein": ["--num", "2", "--length", "5", "--output", "{tmp}/p.fasta"],
    "text": ["--prompt", "hi", "--length", "3"],
    "evaluate": ["--shards", "{shards}"],
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
@pytest.mark.parametrize("which", ["missing", "tampered"])
def test_missing_or_mismatched_bundle_is_one_line_and_status_2(name, which, capsys):
    tmp = scratch(f"err-{name}-{which}")
    bundle = tmp / "nope" if which == "missing" else tampered_bundle()
    args = [a.format(tmp=tmp, shards=shard_dir("tabular")) for a in ERROR_CASES[name]]
    code, out, err = run_tool(capsys, name, "--model", bundle, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert ("no such bundle" in err) if which == "missing" else ("vocab.json" in err)
    assert not list(tmp.glob("*.*"))


def test_error_exit_as_a_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "impute.py"), "--model", "/nonexistent/bundle", "--input", str(PENGUINS),
                           "--output", "/tmp/never.csv"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: /nonexistent/bundle")


def test_sample_grid_arrays_seed_and_inpainting(model, capsys):
    tmp = scratch("sample")
    code, out, err = run_tool(capsys, "sample", "--model", model, "--num", 6, "--label", "1", "7", "--output", tmp / "a.png", *FAST)
    assert code == 0, err
    assert (tmp / "a.png").read_bytes()[:4] == b"\x89PNG" and "network evaluations" in out
    a = np.load(tmp / "a.npz")
    assert a["images"].shape == (6, 8, 8, 1) and a["images"].dtype == np.uint8 and a["labels"].tolist() == ["1"] * 3 + ["7"] * 3
    run_tool(capsys, "sample", "--model", model, "--num", 6, "--label", "1", "7", "--output", tmp / "b.png", *FAST)
    assert np.array_equal(a["images"], np.load(tmp / "b.npz")["images"])
    code, _, err = run_tool(capsys, "sample", "--model", model, "--num", 6, "--output", tmp / "a.png", *FAST)
    assert code == 2 and "already exists; pass --overwrite" in err
    from PIL import Image

    Image.fromarray(a["images"][0, :, :, 0]).save(tmp / "in.png")
    code, _, err = run_tool(capsys, "sample", "--model", model, "--input", tmp / "in.png", "--keep", "left", "--num", 3,
                            "--method", "topk", "--output", tmp / "inp.png", *FAST)
    assert code == 0, err
    filled = np.load(tmp / "inp.npz")["images"]
    assert (filled[:, :, :4] == a["images"][0, :, :4]).all()
    code, _, err = run_tool(capsys, "sample", "--model", model, "--label", "cat", "--output", tmp / "c.png", *FAST)
    assert code == 2 and "'cat' is not a value the model was trained with" in err


def test_impute_tool_files_and_errors(model, capsys):
    tmp = scratch("impute-cli")
    lines = PENGUINS.read_text().splitlines(keepends=True)
    masked = "".join([lines[0]] + [line.replace(",male,", ",,", 1) for line in lines[1:60]])
    (tmp / "in.csv").write_text(masked)
    code, out, err = run_tool(capsys, "impute", "--model", model, "--input", tmp / "in.csv", "--output", tmp / "out.csv", "--draws", 3, "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in tmp.iterdir()) == ["in.csv", "out-1.csv", "out-2.csv", "out-3.csv", "out-uncertainty.csv"]
    for k in (1, 2, 3):
        filled = (tmp / f"out-{k}.csv").read_text().splitlines()
        for a, b in zip(masked.splitlines(), filled):
            ca, cb = a.split(","), b.split(",")
            assert all(x == y for x, y in zip(ca, cb) if x != "" and x != "NA") and all(y not in ("", "NA") for y in cb)
    summary = (tmp / "out-uncertainty.csv").read_text().splitlines()
    assert summary[0].startswith("row,column,kind,draws,mode,agreement") and len(summary) > 1
    (tmp / "bad.csv").write_text("species,wingspan\nAdelie,3\n")
    code, _, err = run_tool(capsys, "impute", "--model", model, "--input", tmp / "bad.csv", "--output", tmp / "x.csv", "--no-progress")
    assert code == 2 and "'wingspan' are not columns the model knows" in err and not (tmp / "x.csv").exists()
    code, _, err = run_tool(capsys, "impute", "--model", model, "--input", tmp / "in.csv", "--output", tmp / "x.parquet", "--no-progress")
    assert code == 2 and "output must be too" in err


def test_protein_tool(model, capsys):
    tmp = scratch("protein-cli")
    code, out, err = run_tool(capsys, "protein", "--model", model, "--template", "MKT____LLV", "--num", 3, "--condition", "PE=1",
                              "--output", tmp / "t.fasta", *FAST)
    assert code == 0, err
    from Bio import SeqIO

    recs = list(SeqIO.parse(tmp / "t.fasta", "fasta"))
    assert len(recs) == 3 and all(str(r.seq)[:3] == "MKT" and str(r.seq)[7:] == "LLV" and len(r.seq) == 10 for r in recs)
    assert all("PE=1" in r.description for r in recs)
    code, _, err = run_tool(capsys, "protein", "--model", model, "--num", 4, "--lengths-from", shard_dir("protein"), "--output", tmp / "l.fasta", *FAST)
    assert code == 0, err
    assert all(1 <= len(r.seq) <= 40 for r in SeqIO.parse(tmp / "l.fasta", "fasta"))
    code, _, err = run_tool(capsys, "protein", "--model", model, "--num", 2, "--output", tmp / "n.fasta", *FAST)  # the bundle's own shards
    assert code == 0 and all(1 <= len(r.seq) <= 40 for r in SeqIO.parse(tmp / "n.fasta", "fasta"))
    code, _, err = run_tool(capsys, "protein", "--model", model, "--num", 2, "--lengths-from", tmp, "--output", tmp / "e.fasta", *FAST)
    assert code == 2 and err.startswith("error: ")
    code, _, err = run_tool(capsys, "protein", "--model", model, "--length", 5, "--condition", "OS=human", "--output", tmp / "c.fasta", *FAST)
    assert code == 2 and "no conditioning field OS" in err


def test_text_tool(model, capsys):
    tmp = scratch("text-cli")
    code, out, err = run_tool(capsys, "text", "--model", model, "--template", "ROMEO:\\nI [MASK:3] the night", "--num", 2, *FAST)
    assert code == 0, err
    samples = out.split("--- sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("ROMEO:\nI ") and s.rstrip("\n").endswith(" the night") for s in samples)
    code, out, err = run_tool(capsys, "text", "--model", model, "--prompt", "KING", "--length", 5, "--output", tmp / "t.txt", *FAST)
    assert code == 0 and (tmp / "t.txt").read_text().startswith("--- sample 1 ---\nKING")
    code, _, err = run_tool(capsys, "text", "--model", model, "--template", "no holes", *FAST)
    assert code == 2 and "no [MASK]" in err


def test_evaluate_tool(model, capsys):
    tmp = scratch("evaluate-cli")
    code, out, err = run_tool(capsys, "evaluate", "--model", model, "--shards", shard_dir("protein"), shard_dir("pixels"), "--repeats", 2,
                              "--output", tmp / "e.json")
    assert code == 0, err
    report = json.loads((tmp / "e.json").read_text())
    assert set(report["modalities"]) == {"protein", "pixels"} and set(report["splits"].values()) == {"heldout"}
    assert "bits_per_dim" in report["modalities"]["pixels"] and report["modalities"]["protein"]["stderr_over_records"] >= 0
    other = scratch("evaluate-other") / "tab"
    from maskdiff.data.shards import write_shards

    write_shards("tabular", [PENGUINS], other, bins=4, progress=False)
    code, _, err = run_tool(capsys, "evaluate", "--model", model, "--shards", other)
    assert code == 2 and "another vocabulary" in err


# --- one line, status 2, nothing written: numbers, devices, outputs, free text -----------------

BAD_OPTIONS = [
    ("sample", ["--temperature", "nan"], "--temperature nan: must be a finite number"),
    ("sample", ["--temperature", "inf"], "--temperature inf: must be a finite number"),
    ("sample", ["--guidance", "nan"], "--guidance nan: must be a finite number"),
    ("sample", ["--top-p", "1.5"], "--top-p 1.5: must be at most 1"),
    ("sample", ["--nrow", "-1"], "--nrow -1: must be >= 1"),
    ("sample", ["--device", "banana"], "--device banana: not a torch device"),
    ("sample", ["--num", "100000", "--batch-size", "100000000"], "--batch-size 100000000: a batch of 100000 records"),
    ("sample", ["--num", "10000000000"], "--num 10000000000: 10,000,000,000 records"),
    ("text", ["--num", "10000000000"], "--num 10000000000"),
    ("text", ["--temperature", "-1"], "--temperature -1.0: must be > 0"),
    ("protein", ["--guidance", "inf"], "--guidance inf: must be a finite number"),
    ("protein", ["--prefix", "x\n>evil"], "--prefix"),
    ("protein", ["--lengths-from", "{pixels}"], "holds pixels shards, not protein"),
    ("evaluate", ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    ("evaluate", ["--repeats", "0"], "--repeats 0: must be >= 1"),
    ("evaluate", ["--device", "cuda:7"], "--device cuda:7"),
]
BASE = {
    "sample": ["--num", "2", "--output", "{tmp}/g.png", *FAST],
    "text": ["--prompt", "hi", "--length", "3", "--output", "{tmp}/t.txt", *FAST],
    "protein": ["--num", "2", "--output", "{tmp}/p.fasta", *FAST],
    "evaluate": ["--shards", "{protein}", "--output", "{tmp}/e.json"],
}


@pytest.mark.parametrize("name, extra, message", BAD_OPTIONS, ids=[f"{n}{' '.join(e)}" for n, e, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_and_write_nothing(model, capsys, name, extra, message):
    tmp = scratch(f"bad-{name}")
    fill = {"tmp": tmp, "pixels": shard_dir("pixels"), "protein": shard_dir("protein")}
    args = [a.format(**fill) for a in BASE[name] + extra]
    if name == "protein" and "--lengths-from" not in extra:
        args += ["--length", "5"]
    code, _, err = run_tool(capsys, name, "--model", model, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err
    assert not list(tmp.iterdir())


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_output_that_cannot_be_created(model, capsys, where):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    tmp = scratch(f"out-{where}")
    if where == "under-a-file":
        (tmp / "file").write_text("x")
        out = tmp / "file" / "g.png"
    else:
        ro = tmp / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "g.png"
    try:
        code, _, err = run_tool(capsys, "sample", "--model", model, "--num", 2, "--output", out, *FAST)
    finally:
        (tmp / "ro").exists() and (tmp / "ro").chmod(0o755)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot be created" in err, err


def test_evaluate_single_record_writes_strict_json(model, capsys):
    tmp = scratch("evaluate-one")
    code, out, err = run_tool(capsys, "evaluate", "--model", model, "--shards", shard_dir("protein"), "--limit", 1, "--output", tmp / "e.json")
    assert code == 0, err
    report = json.loads((tmp / "e.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert report["modalities"]["protein"]["stderr_over_records"] is None and "±" not in out  # one record: no error bar


def test_protein_headers_stay_one_record_each(model, capsys):
    tmp = scratch("protein-prefix")
    code, _, err = run_tool(capsys, "protein", "--model", model, "--num", 3, "--length", 6, "--prefix", "designed_v2", "--output", tmp / "p.fasta", *FAST)
    assert code == 0, err
    headers = [line for line in (tmp / "p.fasta").read_text().splitlines() if line.startswith(">")]
    assert [h.split()[0] for h in headers] == [">designed_v2-1", ">designed_v2-2", ">designed_v2-3"]


def test_read_only_parent_is_refused_up_front(monkeypatch, tmp_path):
    from maskdiff import cli

    monkeypatch.setattr(cli.os, "access", lambda *a, **k: False)
    with pytest.raises(cli.UserError, match="is not writable"):
        cli.check_outputs([tmp_path / "new" / "x.png"], overwrite=False)


def test_errors_from_dataloader_workers_are_one_line():
    from torch._utils import ExceptionWrapper

    from maskdiff.cli import one_line
    from maskdiff.data.shards import ShardError

    try:
        raise ShardError("d/tab-000000.tar: record 'x': field 'a' holds ids outside 0..4")
    except ShardError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ShardError) as exc:
        wrapped.reraise()
    assert "\n" in str(exc.value)
    assert one_line(str(exc.value)) == "d/tab-000000.tar: record 'x': field 'a' holds ids outside 0..4"


def test_the_digit_judges_of_the_quality_benchmark_tell_two_kinds_of_image_apart():
    """The classifiers tools/bench_quality.py scores samples with: a bar across an 8x8 image or down it."""
    bq = load_tool("bench_quality")
    rng = np.random.default_rng(0)

    def bars(n: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.random((n, 8, 8)) * 0.3
        labels = np.array(["across", "down"])[rng.integers(0, 2, n)]
        at = rng.integers(1, 7, n)
        for i, (label, k) in enumerate(zip(labels, at)):
            if label == "across":
                images[i, k, :] = 1.0
            else:
                images[i, :, k] = 1.0
        return images.reshape(n, -1), labels

    X, y = bars(300)
    Xt, yt = bars(100)
    for judge in (bq.cnn_judge(X, y, (8, 8, 1), seed=0, epochs=4), bq.logistic_judge(X, y, seed=0)):
        pred, conf = judge(Xt)
        assert (pred == yt).mean() > 0.95 and conf.shape == (100,) and ((conf >= 0.5) & (conf <= 1)).all()
    flipped = bq.cnn_judge(X, np.where(y == "across", "down", "across"), (8, 8, 1), seed=0, epochs=4)
    assert (flipped(Xt)[0] == yt).mean() < 0.05  # it learns the labels it is given, not a fixed answer


def test_the_table_benchmarks_markdown_ends_with_the_overall_figures_best_in_bold():
    bq = load_tool("bench_quality")
    scores = {"model": {"x": {"nrmse": 0.5}, "y": {"nrmse": 0.9}, "z": {"nrmse": 0.7}, "k": {"accuracy": 0.8},
                        "all": {"nrmse": 0.72, "numeric_cells": 30, "accuracy": 0.8, "categorical_cells": 10}},
              "mean": {"x": {"nrmse": 1.0}, "y": {"nrmse": 1.0}, "z": {"nrmse": 0.6}, "k": {"accuracy": 0.6},
                       "all": {"nrmse": 0.87, "numeric_cells": 30, "accuracy": 0.6, "categorical_cells": 10}}}
    text = bq.tables_markdown([{"table": "t.csv", "rows": 40, "hidden_cells": 40, "fit_seconds": 9.0, "impute_seconds": 0.1, "results": scores}])
    assert "| z | RMSE/std | 0.700 | **0.600** |" in text
    assert "| *all numeric* | RMSE/std | **0.720** | 0.870 |" in text and "| *all categorical* | accuracy | **0.800** | 0.600 |" in text
    assert "| *median numeric column* | RMSE/std | **0.700** | 1.000 |" in text  # medians of (0.5, 0.9, 0.7) and (1, 1, 0.6)
