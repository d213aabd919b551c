"""tools/shard.py as a user meets it: --help, the protein quick start, bad inputs, user errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from adapter_fixtures import PENGUINS, PRJEB85, ROOT, first_fasta_records, load_shard_cli, mnist_png_folder, mnist_arrays, scratch
from PIL import Image

from maskdiff.data.shards import MANIFEST, REJECTS, ShardSet, load_manifest

SCRIPT = str(ROOT / "tools" / "shard.py")


@pytest.fixture(scope="module")
def cli():
    module = load_shard_cli()
    previous = signal.getsignal(signal.SIGTERM)
    yield module
    signal.signal(signal.SIGTERM, previous)


def _run(cli, capsys, *args):
    code = cli.main([str(a) for a in args] + ["--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _rejects(out_dir):
    return [json.loads(line) for line in (out_dir / REJECTS).read_text().splitlines()]


def test_help_is_useful():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for needle in ("examples:", "--modality protein", "--input", "--output", "--shard-size", "--max-len", "--overwrite",
                   "--length-policy", "--vocab-size", "--resize", "--bins", "--state-from", "rejects.jsonl", "exit status"):
        assert needle in proc.stdout, needle


def test_protein_quick_start_as_a_subprocess():
    root = scratch("cli-protein")
    fasta = first_fasta_records(PRJEB85, 200, root / "X.fasta")
    proc = subprocess.run([sys.executable, SCRIPT, "--modality", "protein", "--input", str(fasta), "--output", str(root / "DIR")],
                          capture_output=True, text=True, timeout=120, env={"CI": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "200 records in, 200 written, 0 rejected" in proc.stdout and proc.stderr == ""
    m = load_manifest(root / "DIR")
    assert m["modality"] == "protein" and [s["file"] for s in m["shards"]] == ["protein-000000.tar"]
    assert m["adapter"]["state"]["options"]["max_len"] == 1024 and m["vocab"]["supports"][0]["name"] == "protein/residue"
    assert len(list(ShardSet(root / "DIR"))) == 200
    again = subprocess.run([sys.executable, SCRIPT, "--modality", "protein", "--input", str(fasta), "--output", str(root / "DIR")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [f"error: {root / 'DIR'}: already holds shards (manifest.json, protein-000000.tar); pass --overwrite to replace them"]


def test_user_errors_exit_2_with_one_line(cli, capsys):
    root = scratch("cli-errors")
    (root / "empty.fasta").write_bytes(b"")
    (root / "file").write_text("x")
    (root / "notes.fasta").write_text("just words\n")
    cases = [
        (["--modality", "protein", "--input", root / "nope.fasta", "--output", root / "o1"], "nope.fasta: no such file or directory"),
        (["--modality", "protein", "--input", root / "empty.fasta", "--output", root / "o2"], "empty.fasta: file is empty"),
        (["--modality", "protein", "--input", root / "notes.fasta", "--output", root / "o3"], "notes.fasta: not valid FASTA"),
        (["--modality", "protein", "--input", PRJEB85, "--output", root / "file" / "sub"], "cannot create the output folder"),
        (["--modality", "tabular", "--input", PENGUINS, "--output", root / "o4", "--max-len", "5"], "--max-len does not apply to tabular"),
        (["--modality", "text", "--input", PENGUINS, "--output", root / "o5", "--vocab-size", "10"], "--vocab-size 10: too small"),
    ]
    for args, message in cases:
        code, out, err = _run(cli, capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, (args, err)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--modality", "protein", "--input", str(PRJEB85), "--output", str(root / "o6"), "--bins", "3"])
    assert exc.value.code == 2 and "--bins is a tabular option" in capsys.readouterr().err
    assert not any((root / f"o{i}").exists() and any((root / f"o{i}").glob("*.tar")) for i in range(1, 7))


def test_bad_protein_inputs_reconcile(cli, capsys):
    root = scratch("cli-bad-protein")
    good = first_fasta_records(PRJEB85, 20, root / "good.faa").read_text()
    truncated = good[: good.rindex(">") + 30]  # cut inside the last header: that record has no sequence
    (root / "mixed.faa").write_text(truncated + "\n>illegal\nMKVJOU1\n>inner\nMK*VL\n")
    code, out, _ = _run(cli, capsys, "--modality", "protein", "--input", root / "mixed.faa", "--output", root / "out", "--max-len", "300", "--length-policy", "reject")
    m = load_manifest(root / "out")
    rejects = _rejects(root / "out")
    assert code == 0 and m["records_in"] == 22 and m["records_in"] == m["records_written"] + m["records_rejected"]
    assert len(rejects) == m["records_rejected"] and f"refused records and reasons in {root / 'out'}/{REJECTS}" in out
    reasons = [r["reason"] for r in rejects]
    assert any("empty sequence" in r for r in reasons) and any("'1J'" in r for r in reasons) and any("inside the sequence" in r for r in reasons)
    assert m["records_written"] >= 10 and sum("exceeds --max-len 300" in r for r in reasons) == m["records_rejected"] - 3 > 0
    assert all(r["id"].startswith(str(root / "mixed.faa") + "#") for r in rejects)


def test_bad_images_and_text_reconcile(cli, capsys):
    root = scratch("cli-bad-pixels")
    folder = mnist_png_folder(root / "digits", n=20)
    images, labels = mnist_arrays(20)
    Image.fromarray(images[0].astype(np.uint16) * 257).save(folder / "3" / "deep16.png")
    (folder / "3" / "corrupt.png").write_bytes((folder / "7" / "0000.png").read_bytes()[:60])
    code, out, _ = _run(cli, capsys, "--modality", "pixels", "--input", folder, "--output", root / "out")
    m = load_manifest(root / "out")
    assert code == 0 and (m["records_in"], m["records_written"], m["records_rejected"]) == (22, 20, 2)
    assert sorted(r["id"].rsplit("/", 1)[1] for r in _rejects(root / "out")) == ["corrupt.png", "deep16.png"]
    assert m["adapter"]["describe"]["labels"] == len(set(labels.tolist()))
    text = root / "texts"
    text.mkdir()
    (text / "a.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    (text / "b.txt").write_bytes(b"\xff\xfe broken")
    (text / "c.txt").write_bytes(b"")
    code, out, _ = _run(cli, capsys, "--modality", "text", "--input", text, "--output", root / "text-out", "--vocab-size", "300", "--max-len", "64")
    m = load_manifest(root / "text-out")
    assert code == 0 and (m["records_in"], m["records_written"], m["records_rejected"]) == (3, 1, 2)
    assert m["samples_written"] > 1 and "as" in out and "windows" in out
    assert (root / "text-out" / "text-bpe.model").is_file() and m["adapter"]["state"]["fitted"]["model_file"] == "text-bpe.model"


def test_nothing_encodable_is_an_error_but_rejects_are_kept(cli, capsys):
    root = scratch("cli-none")
    (root / "all-bad.fasta").write_text(">a\nJJJ\n>b\n123\n")
    code, _, err = _run(cli, capsys, "--modality", "protein", "--input", root / "all-bad.fasta", "--output", root / "out")
    assert code == 2 and "no record could be encoded (2 rejected" in err
    assert not (root / "out" / MANIFEST).exists() and len(_rejects(root / "out")) == 2
