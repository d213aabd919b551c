"""Shard directories read as streams: over HTTP (a server started here), file://, pipe:, and failures that name the shard."""

from __future__ import annotations

import shutil
import sys
import tracemalloc
from pathlib import Path

import pytest
from adapter_fixtures import built
from shard_server import corrupt_first_header, served  # noqa: F401  (served: a fixture)

from maskdiff.data.shards import ChecksumError, ShardError, ShardSet


def _ids(records) -> list[tuple[str, int]]:
    return [(r.meta["id"], r.meta.get("window", 0)) for r in records]


def _copy(modality: str, root: Path) -> tuple[Path, dict]:
    out, manifest = built(modality)
    shutil.copytree(out, root / modality)
    return root / modality, manifest


def test_http_file_and_pipe_directories_read_the_same_records(served):
    root, url, _ = served
    local, manifest = _copy("text", root)  # text: the BPE model file next to the manifest is fetched too
    want = _ids(ShardSet(local))
    for where in (f"{url}/text", f"{url}/text/", local.as_uri(), f"pipe:cat {local}/{{}}"):
        shards = ShardSet(where)
        assert _ids(shards) == want, where
        assert shards.spec == ShardSet(local).spec and len(want) == manifest["samples_written"]
    rec = next(iter(ShardSet(f"{url}/text", decoded=True)))
    assert isinstance(rec[1], str) and rec[1]


def test_corrupt_shard_over_http_stops_naming_it_or_is_skipped_and_counted(served):
    root, url, _ = served
    d, manifest = _copy("tabular", root)
    bad = manifest["shards"][1]
    data = bytearray((d / bad["file"]).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / bad["file"]).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=rf"^{url}/tabular/{bad['file']}: sha256 .* does not match") as e:
        list(ShardSet(f"{url}/tabular"))
    assert "\n" not in str(e.value)
    lines: list[str] = []
    shards = ShardSet(f"{url}/tabular", bad_shards="skip", report=lines.append)
    got = list(shards)
    (skipped,) = shards.skipped
    assert skipped.shard == bad["file"] and skipped.read + skipped.skipped == bad["records"]
    assert len(got) == manifest["samples_written"] - skipped.skipped
    assert len(lines) == 1 and bad["file"] in lines[0] and f"{skipped.skipped} record(s)" in lines[0]


def test_a_reader_whose_whole_share_is_bad_stops_with_one_line_instead_of_spinning(served):
    root, url, _ = served
    d, manifest = _copy("tabular", root)
    bad = manifest["shards"][0]  # 4 shards for 4 readers, unshuffled: reader 0 owns this one only, in every epoch
    corrupt_first_header(d / bad["file"])

    def reader(rank: int):
        return iter(ShardSet(f"{url}/tabular", bad_shards="skip", repeat=True, rank=rank, world_size=4, report=lambda msg: None))

    with pytest.raises(ShardError, match=rf"^{url}/tabular: reader 0 of 4 \(ranks x loader workers\) read no record in epoch 0: "
                                         rf"every shard of its share was bad and skipped \({bad['file']}\)$"):
        next(reader(0))
    assert next(reader(1)).meta["id"]  # the others read on


def test_vanished_or_dropped_shard_is_one_line_naming_it(served):
    root, url, drop = served
    d, manifest = _copy("tabular", root)
    first, second = manifest["shards"][0], manifest["shards"][1]
    (d / first["file"]).unlink()
    with pytest.raises(ShardError, match=rf"^{url}/tabular/{first['file']}: shard listed in .* is missing \(HTTP 404"):
        list(ShardSet(f"{url}/tabular"))
    shutil.copy(built("tabular")[0] / first["file"], d / first["file"])
    drop[f"/tabular/{second['file']}"] = second["bytes"] // 2
    with pytest.raises(ShardError, match=rf"^{url}/tabular/{second['file']}: the connection dropped after \d+ bytes"):
        list(ShardSet(f"{url}/tabular"))
    shards = ShardSet(f"{url}/tabular", bad_shards="skip", report=lambda msg: None)
    got = list(shards)
    (skipped,) = shards.skipped
    assert skipped.shard == second["file"] and 0 < skipped.skipped < second["records"]
    assert len(got) == manifest["samples_written"] - skipped.skipped


def test_unreachable_or_unsupported_locations_are_one_line(served, monkeypatch):
    root, url, _ = served
    with pytest.raises(ShardError, match=rf"^{url}/nothing: no manifest.json .*HTTP 404"):
        ShardSet(f"{url}/nothing")
    with pytest.raises(ShardError, match=r"^http://127\.0\.0\.1:9/x/manifest.json: cannot connect"):
        ShardSet("http://127.0.0.1:9/x")
    with pytest.raises(ShardError, match=r"needs \{\} where the file name goes"):
        ShardSet("pipe:cat /tmp/manifest.json")
    with pytest.raises(ShardError, match=r"the command exited with status"):
        ShardSet(f"pipe:cat {root}/none/{{}}")
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if fsspec were not installed
    with pytest.raises(ShardError, match=r"^s3://bucket/dir: reading s3:// shard directories needs fsspec"):
        ShardSet("s3://bucket/dir")


def test_memory_while_reading_is_bounded_by_the_record_not_the_shard():
    out, manifest = built("pixels")
    shards = ShardSet(out)
    biggest = max(s["bytes"] for s in manifest["shards"])
    tracemalloc.start()
    try:
        n = sum(1 for _ in shards)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == manifest["samples_written"]
    assert peak < biggest / 4, (peak, biggest)


def _as_version_1(src: Path, dest: Path) -> None:
    """Copy a shard directory, rewriting its shards in the version-1 layout (two tar members per record)."""
    import json

    import webdataset as wds

    from maskdiff.data.shard_format import legacy_members
    from maskdiff.data.shards import MANIFEST, load_manifest, sha256_file

    shutil.copytree(src, dest)
    m = load_manifest(src)
    dtype = m["token_dtype"]
    records = iter(ShardSet(src))
    for entry in m["shards"]:
        path = dest / entry["file"]
        with open(path, "wb") as f:
            w = wds.TarWriter(f, encoder=False, mtime=0)
            for k in range(entry["records"]):
                rec = next(records)
                del rec.meta["modality"], rec.meta["source"]
                w.write({"__key__": f"{k:010d}", **legacy_members(rec, dtype)})
            w.close()
        entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    m["version"] = 1
    (dest / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(("modality", "ratio"), [("tabular", 0.55), ("pixels", 0.75)])  # the saving is ~1 KB a record
def test_old_two_member_layout_reads_the_same_and_is_larger(modality, ratio, tmp_path):
    new, manifest = built(modality)
    old = tmp_path / "v1"
    _as_version_1(new, old)
    a, b = list(ShardSet(new)), list(ShardSet(old))
    assert manifest["version"] == 2 and len(a) == len(b) == manifest["samples_written"]
    for x, y in zip(a, b):
        assert x.meta == y.meta and [(f.name, f.support, f.shape, f.tokens.tolist()) for f in x.fields] == \
            [(f.name, f.support, f.shape, f.tokens.tolist()) for f in y.fields]
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.tar"))  # noqa: E731
    assert size(new) < ratio * size(old), (size(new), size(old))


@pytest.mark.parametrize("consumers", [1, 3, 7])  # 7 > the 4 shards: every consumer reads every 7th record
def test_a_stream_restarted_at_its_position_continues_exactly(consumers):
    out, manifest = built("tabular")
    shards = ShardSet(out, shuffle_buffer=30, seed=5, repeat=True)
    per_epoch = manifest["samples_written"] // consumers
    for consumer in {0, consumers - 1}:
        full = shards.stream(consumer, consumers)
        for advance in (0, 1, 29, 61, per_epoch + 7):  # inside windows, across one, into the next epoch
            position = dict(full.position)
            want = [_ids([next(full)]) for _ in range(40)]
            again = shards.stream(consumer, consumers, position)
            assert [_ids([next(again)]) for _ in range(40)] == want, (consumer, position)
            for _ in range(max(0, advance - 40)):
                next(full)


@pytest.mark.parametrize("consumers", [1, 7])  # each reads from every shard (7 > the 4 shards: every 7th record)
def test_a_restarted_stream_counts_skipped_records_as_the_uninterrupted_one(consumers, tmp_path):
    out, manifest = built("tabular")
    shutil.copytree(out, tmp_path / "tabular")
    bad = manifest["shards"][1]
    corrupt_first_header(tmp_path / "tabular" / bad["file"])
    shards = ShardSet(tmp_path / "tabular", shuffle_buffer=30, seed=5, repeat=True, bad_shards="skip", report=lambda msg: None)
    good = (manifest["samples_written"] - bad["records"]) // consumers
    full = shards.stream(0, consumers)
    counts = []
    for taken in range(2 * good + 10):  # into the third epoch; windows of 30 cut across the bad shard's slots
        position = dict(full.position)
        next(full)
        counts.append(full.skipped_records)
        if taken % 7 == 0:
            again = shards.stream(0, consumers, position)
            next(again)
            assert again.skipped_records == counts[-1], (taken, position)
    increases = [b - a for a, b in zip([0] + counts, counts) if b != a]
    assert len(increases) >= 2 and all(d > 0 for d in increases)  # counted anew in each epoch
    if consumers == 1:
        assert increases[:2] == [bad["records"]] * 2
