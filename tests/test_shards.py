"""Shard writer and reader: manifests, checksums, exact read-back, workers and ranks, atomicity."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from adapter_fixtures import MNIST_IMAGES, MNIST_LABELS, PENGUINS, ROOT, built, read_all, scratch
from torch.utils.data import DataLoader

from maskdiff.adapters import Rejected, TabularAdapter
from maskdiff.data.shards import MANIFEST, REJECTS, ChecksumError, ShardError, ShardSet, load_manifest, sha256_file, write_shards
from maskdiff.core.tokens import VocabMismatchError, VocabSpec

MODALITIES = ["text", "pixels", "protein", "tabular"]


def _ids(records):
    return [(r.meta["id"], r.meta.get("window", 0)) for r in records]


@pytest.mark.parametrize("modality", MODALITIES)
def test_manifest_counts_and_checksums(modality):
    out, manifest = built(modality)
    assert load_manifest(out) == json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["modality"] == modality and manifest["records_in"] > 0
    assert manifest["records_in"] == manifest["records_written"] + manifest["records_rejected"]
    assert sum(s["records"] for s in manifest["shards"]) == manifest["samples_written"] >= manifest["records_written"]
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == [s["file"] for s in manifest["shards"]] and tars[0] == f"{modality}-000000.tar"
    for s in manifest["shards"]:
        assert sha256_file(out / s["file"]) == s["sha256"] and (out / s["file"]).stat().st_size == s["bytes"]
    assert len((out / REJECTS).read_text().splitlines()) == manifest["records_rejected"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    spec = VocabSpec.from_dict(manifest["vocab"])
    assert spec == ShardSet(out).spec and spec.support_id(f"{modality}/" + {"text": "bpe", "pixels": "value", "protein": "residue", "tabular": "col:species"}[modality]) == 0


def test_read_back_gives_exactly_the_records_written():
    out, manifest = built("protein")
    src = [out.parent / "src-protein" / "prjeb85.faa", out.parent / "src-protein" / "uniprot.fasta"]
    adapter, raws, _ = read_all("protein", src, max_len=300)
    expected = {rid: adapter.encode(raw) for rid, raw in raws}
    got = list(ShardSet(out))
    assert [r.meta["id"] for r in got] == list(expected) and manifest["records_written"] == 300
    for rec in got:
        want = expected[rec.meta["id"]]
        assert [(f.name, f.support, f.shape) for f in rec.fields] == [(f.name, f.support, f.shape) for f in want.fields]
        assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(rec.fields, want.fields))
        assert rec.meta["modality"] == "protein" and rec.meta.get("crop") == want.meta.get("crop")
    decoded = list(ShardSet(out, decoded=True))
    assert [raw["sequence"] for _, raw in decoded] == [adapter.decode(expected[r.meta["id"]])["sequence"] for r, _ in decoded]


def test_text_windows_decode_back_to_the_document():
    out, manifest = built("text")
    shards = ShardSet(out)
    windows = sorted(shards, key=lambda r: r.meta["window"])
    assert len(windows) == manifest["samples_written"] and all(len(r) <= 512 for r in windows)
    assert "".join(shards.decode(r) for r in windows) == (ROOT / "data/text/tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("modality", ["protein", "pixels", "tabular"])
def test_dataloader_two_workers_yields_each_record_once(modality):
    out, manifest = built(modality)
    loader = DataLoader(ShardSet(out), batch_size=None, num_workers=2)
    ids = _ids(loader)
    assert len(ids) == manifest["samples_written"] and len(set(ids)) == len(ids)
    assert set(ids) == set(_ids(ShardSet(out)))


def test_ranks_and_workers_split_without_overlap_even_with_one_shard():
    root = scratch("one-shard")
    write_shards("tabular", [PENGUINS], root / "one", shard_size=10_000, progress=False)
    for d in (root / "one", built("protein")[0]):
        everything = _ids(ShardSet(d))
        seen = []
        for rank in range(2):
            seen += _ids(DataLoader(ShardSet(d, rank=rank, world_size=2), batch_size=None, num_workers=2))
        assert sorted(seen) == sorted(everything) and len(set(seen)) == len(seen)


def test_several_directories_merge_their_vocabularies():
    dirs = [built(m)[0] for m in MODALITIES]
    shards = ShardSet(dirs)
    expected = VocabSpec.from_dict(built("text")[1]["vocab"])
    for m in MODALITIES[1:]:
        expected = expected.merged(VocabSpec.from_dict(built(m)[1]["vocab"]))
    assert shards.spec == expected and set(shards.adapters) == set(MODALITIES)
    counts = collections.Counter(r.meta["modality"] for r in DataLoader(shards, batch_size=None, num_workers=2))
    assert counts == {m: built(m)[1]["samples_written"] for m in MODALITIES}
    for rec in ShardSet(dirs[1:3]):
        raw = shards.decode(rec)
        assert raw is not None
        for f in rec.fields:
            shards.spec.to_global(f.support, f.tokens)  # every token inside its support's range


def test_shuffle_buffer_is_seeded_and_complete():
    out, _ = built("tabular")
    plain = _ids(ShardSet(out))
    a, b = ShardSet(out, shuffle_buffer=50, seed=3), ShardSet(out, shuffle_buffer=50, seed=3)
    first = _ids(a)
    assert sorted(first) == sorted(plain) and first != plain and first == _ids(b)
    a.set_epoch(1)
    assert _ids(a) != first


def test_corrupt_or_missing_shard_is_detected():
    out, manifest = built("tabular")
    copy = scratch("corrupt") / "tabular"
    shutil.copytree(out, copy)
    target = copy / manifest["shards"][1]["file"]
    data = bytearray(target.read_bytes())
    data[700] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        list(ShardSet(copy))
    target.unlink()
    with pytest.raises(ShardError, match="missing"):
        list(ShardSet(copy))
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSet(copy.parent)


def test_state_from_shares_the_vocabulary_and_mismatch_is_refused():
    out, _ = built("tabular")
    root = scratch("state-from")
    write_shards("tabular", [PENGUINS], root / "other", bins=8, progress=False)
    with pytest.raises(VocabMismatchError, match="--state-from"):
        ShardSet([out, root / "other"])
    m = write_shards("tabular", [PENGUINS], root / "same", state_from=out, progress=False)
    assert m["adapter"]["fingerprint"] == built("tabular")[1]["adapter"]["fingerprint"]
    assert ShardSet([out, root / "same"]).spec == ShardSet(out).spec
    with pytest.raises(ShardError, match="drop --bins"):
        write_shards("tabular", [PENGUINS], root / "x", state_from=out, bins=4, progress=False)
    with pytest.raises(ShardError, match="holds tabular shards, not protein"):
        write_shards("protein", [PENGUINS], root / "y", state_from=out, progress=False)


def test_overwrite_rules_and_interrupted_runs(monkeypatch):
    root = scratch("overwrite")
    out = root / "dir"
    first = write_shards("tabular", [PENGUINS], out, shard_size=50, progress=False)
    assert len(first["shards"]) == 7
    with pytest.raises(ShardError, match="already holds shards.*--overwrite"):
        write_shards("tabular", [PENGUINS], out, progress=False)
    calls = {"n": 0}
    real = TabularAdapter.encode_many

    def dying(self, raw):
        calls["n"] += 1
        if calls["n"] == 120:
            raise KeyboardInterrupt
        return real(self, raw)

    monkeypatch.setattr(TabularAdapter, "encode_many", dying)
    with pytest.raises(KeyboardInterrupt):
        write_shards("tabular", [PENGUINS], out, shard_size=20, overwrite=True, progress=False)
    assert load_manifest(out) == first  # the previous complete run is untouched
    assert sorted(p.name for p in out.iterdir()) == sorted([s["file"] for s in first["shards"]] + [MANIFEST, REJECTS])
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        write_shards("tabular", [PENGUINS], root / "fresh", shard_size=20, progress=False)
    assert not (root / "fresh").exists()  # a failed run leaves no empty output folder behind
    monkeypatch.setattr(TabularAdapter, "encode_many", real)
    second = write_shards("tabular", [PENGUINS], out, shard_size=200, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == [s["file"] for s in second["shards"]] == ["tabular-000000.tar", "tabular-000001.tar"]


def test_killed_process_leaves_no_complete_looking_shard():
    root = scratch("killed")
    out = root / "mnist"
    cmd = [sys.executable, str(ROOT / "tools" / "shard.py"), "--modality", "pixels", "--input", str(MNIST_IMAGES), str(MNIST_LABELS),
           "--output", str(out), "--shard-size", "25", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            staged = list(out.glob(".staging-*/*.tar")) if out.exists() else []
            if len(staged) >= 3:
                break
            time.sleep(0.005)
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be killed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / MANIFEST).exists() and not list(out.glob("*.tar"))
    manifest = write_shards("pixels", [MNIST_IMAGES, MNIST_LABELS], out, shard_size=5000, progress=False)  # no --overwrite needed
    assert manifest["records_written"] == 10_000 and not list(out.glob(".staging-*"))


def test_rejects_reconcile_for_hand_made_bad_inputs():
    root = scratch("bad-shards")
    (root / "bad.csv").write_text("a,b\n1,x\n2,y,z\n3\n,\n4,w\n")
    m = write_shards("tabular", [root / "bad.csv"], root / "out", progress=False)
    rejects = [json.loads(line) for line in (root / "out" / REJECTS).read_text().splitlines()]
    assert (m["records_in"], m["records_written"], m["records_rejected"]) == (5, 3, 2)
    assert [r["id"].rsplit(":", 1)[1] for r in rejects] == ["3", "4"] and all("ragged" in r["reason"] for r in rejects)
    assert sum(isinstance(i, Rejected) for i in TabularAdapter().read([root / "bad.csv"])) == 2


# --- manifests and shards that lie, escape or are damaged -------------------------------------


def _penguin_copy(name):
    dst = scratch(f"lies-{name}") / "tab"
    shutil.copytree(built("tabular")[0], dst)
    return dst


def _edit_manifest(d, change):
    m = json.loads((d / MANIFEST).read_text())
    change(m)
    (d / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("key", ["modality", "records_in", "adapter", "vocab", "shards", "samples_written"])
def test_manifest_missing_a_key_is_one_line(key):
    d = _penguin_copy(f"missing-{key}")
    _edit_manifest(d, lambda m: m.pop(key))
    with pytest.raises(ShardError, match=f"key '{key}'") as exc:
        ShardSet(d)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/x.tar", "..", ""])
def test_manifest_shard_paths_stay_inside_the_directory(name):
    d = _penguin_copy("escape")
    outside = d.parent / "outside.tar"
    shutil.copy(d / "tabular-000000.tar", outside)

    def point_outside(m):
        m["shards"][0]["file"] = name
    _edit_manifest(d, point_outside)
    with pytest.raises(ShardError, match=r"shards\[0\]\.file.*must be a file name inside"):
        ShardSet(d)


def test_a_manifest_that_lies_about_a_record_count_is_caught_on_read():
    d = _penguin_copy("count")

    def lie(m):
        m["shards"][0]["records"] += 1
        m["samples_written"] += 1
        m["records_written"] += 1
        m["records_in"] += 1
    _edit_manifest(d, lie)
    with pytest.raises(ShardError, match="its manifest says"):
        list(ShardSet(d))


def _plant_record(d, fields, meta=None):
    """Replace the first shard by one record with ``fields`` ([name, support, tokens]), resealed in the manifest."""
    import io
    import webdataset as wds

    buf = io.BytesIO()
    np.save(buf, np.concatenate([np.asarray(t, dtype=np.int16).reshape(-1) for _, _, t in fields]), allow_pickle=False)
    header = {"fields": [[n, s, [len(t)]] for n, s, t in fields], "meta": meta or {"id": "planted"}}
    path = d / "tabular-000000.tar"
    with open(path, "wb") as f:
        w = wds.TarWriter(f, encoder=False, mtime=0)
        w.write({"__key__": "0000000000", "tokens.npy": buf.getvalue(), "json": json.dumps(header).encode()})
        w.close()

    def reseal(m):
        old = m["shards"][0]["records"]
        m["shards"][0].update(records=1, sha256=sha256_file(path), bytes=path.stat().st_size)
        for key in ("samples_written", "records_written", "records_in"):
            m[key] -= old - 1
    _edit_manifest(d, reseal)


def test_out_of_range_ids_and_unknown_supports_in_a_shard():
    d = _penguin_copy("ids")
    m = load_manifest(d)
    support = m["vocab"]["supports"][0]
    _plant_record(d, [["x", support["name"], [support["size"]]]])
    with pytest.raises(ShardError, match="holds ids outside"):
        list(ShardSet(d))
    _plant_record(d, [["x", "tabular/col:nope", [0]]])
    with pytest.raises(ShardError, match="'tabular/col:nope' is not in the manifest's vocabulary"):
        list(ShardSet(d))


def test_garbage_record_header_is_one_line():
    d = _penguin_copy("header")
    _plant_record(d, [["x", "tabular/col:species", [0]]], meta=["not", "a", "dict"])
    with pytest.raises(ShardError, match="unreadable shard"):
        list(ShardSet(d))


# --- --overwrite swaps whole data sets ---------------------------------------------------------


def test_overwrite_swaps_so_one_complete_data_set_is_always_there(monkeypatch):
    from maskdiff.data import shard_writer as shards_mod

    out = scratch("swap") / "tab"
    first = write_shards("tabular", [PENGUINS], out, shard_size=50, progress=False)
    (out / "NOTES.md").write_text("mine")
    seen = []
    real = shards_mod._exchange

    def observed(stage, target):
        seen.append((load_manifest(target)["shards"] == first["shards"], len(list(ShardSet(stage))) == first["samples_written"]))
        done = real(stage, target)
        seen.append((len(list(ShardSet(target))) == first["samples_written"], done))
        return done

    monkeypatch.setattr(shards_mod, "_exchange", observed)
    second = write_shards("tabular", [PENGUINS], out, shard_size=200, overwrite=True, progress=False)
    assert seen == [(True, True), (True, True)]  # before: the old set complete and the new one staged complete; after: the new one
    assert load_manifest(out) == second and (out / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["tab"]  # the old set is gone, no staging left


def test_failed_overwrite_keeps_the_old_data_set(monkeypatch):
    from maskdiff.adapters import Reject

    out = scratch("swap-fail") / "tab"
    first = write_shards("tabular", [PENGUINS], out, shard_size=50, progress=False)

    def refuse(self, raw):
        raise Reject("planted refusal")

    monkeypatch.setattr(TabularAdapter, "encode_many", refuse)
    with pytest.raises(ShardError, match="planted refusal.*shards already in .* are kept"):
        write_shards("tabular", [PENGUINS], out, overwrite=True, progress=False)
    assert load_manifest(out) == first and len(list(ShardSet(out))) == first["samples_written"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tab"]


@pytest.mark.parametrize("modality", ["protein", "tabular"])
def test_workers_write_the_same_bytes_as_one(modality):
    root = scratch(f"workers-{modality}")
    if modality == "protein":  # with refused records among them
        (root / "in.faa").write_text(Path(built("protein")[1]["inputs"][0]).read_text() + ">illegal\nMKVJOU1\n>inner\nMK*VL\n")
    inputs = [root / "in.faa"] if modality == "protein" else [PENGUINS]
    one = write_shards(modality, inputs, root / "one", shard_size=40, max_len=200 if modality == "protein" else None, progress=False)
    two = write_shards(modality, inputs, root / "two", shard_size=40, max_len=200 if modality == "protein" else None, progress=False, workers=2)
    assert one["records_rejected"] > 0 or modality == "tabular"
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]] and len(one["shards"]) > 2
    assert (root / "one" / REJECTS).read_bytes() == (root / "two" / REJECTS).read_bytes()
    assert {k: v for k, v in one.items() if k != "created"} == {k: v for k, v in two.items() if k != "created"}
