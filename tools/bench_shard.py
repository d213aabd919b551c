#!/usr/bin/env python
"""Throughput of the shard write and read paths.

Sections (``--section``, repeatable; default all):

* ``write``: tools/shard.py's write path per modality, against parse-only;
* ``stream``: reading a shard directory over HTTP (a local server started
  here) against reading it from local disk, records/s, MB/s and the ratio;
* ``size``: bytes per stored record, in the version-1 layout (two tar members
  a record) and now (one);
* ``workers``: ``tools/shard.py --workers 1`` and ``2`` on a generated FASTA
  of growing size, in a child process: seconds, records/s, the speed-up and
  the child's peak resident memory (flat in the record count when streaming);
* ``resume``: the training batch stream (protein + tabular, shuffled, mixed)
  started fresh against started at a position saved after N micro-batches:
  time to the first batch, and the time drawing those N batches took (what
  replaying them would cost).

For each modality ``write`` times, on the same input in the same run:

* parse: the adapter's reader alone (files -> raw records, nothing encoded);
* shard: ``write_shards`` end to end (fit pass, encode, tar shards, sha256,
  manifest) into a temporary folder.

and prints records/s and MB/s (input bytes as stored on disk) for both, and the
ratio shard time / parse time (the overhead of fitting, encoding and writing).

    python tools/bench_shard.py                 # the shipped samples under data/
    python tools/bench_shard.py --full          # the full development data (../shared/data)
    python tools/bench_shard.py --modality protein --repeat 3
    python tools/bench_shard.py --section stream --section size
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from maskdiff.adapters import get_adapter
from maskdiff.data.shards import ShardSet, write_shards

ROOT = Path(__file__).resolve().parents[1]
SAMPLES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "text": (["data/text/tinyshakespeare.txt"], {"vocab_size": 4096, "max_len": 512}),
    "pixels": (["data/pixels/mnist-t10k-images-idx3-ubyte.gz", "data/pixels/mnist-t10k-labels-idx1-ubyte.gz"], {}),
    "protein": (["data/protein/PRJEB85-HG003687.faa", "data/protein/uniprot-trembl-2k.fasta.gz"], {}),
    "tabular": (["data/tabular/adult-sample.csv"], {}),
}
FULL: dict[str, tuple[list[str], dict[str, Any]]] = {
    "text": (["../shared/data/text/tinyshakespeare.txt"], {"vocab_size": 4096, "max_len": 512}),
    "pixels": (["../shared/data/pixels/mnist-t10k-images-idx3-ubyte.gz", "../shared/data/pixels/mnist-t10k-labels-idx1-ubyte.gz"], {}),
    "protein": (["../shared/data/protein/uniprot-trembl-20k.fasta.gz"], {}),
    "tabular": (["../shared/data/tabular/adult.data"], {}),
}


def bench(modality: str, inputs: list[Path], options: dict[str, Any], repeat: int) -> dict[str, float]:
    size_mb = sum(p.stat().st_size for p in inputs) / 1e6
    reader_options = {k: v for k, v in options.items() if k != "max_len"}
    parse_s, shard_s, n, manifest = float("inf"), float("inf"), 0, {}
    for _ in range(repeat):
        t = time.perf_counter()
        n = sum(1 for _ in get_adapter(modality, **reader_options).read(inputs))
        parse_s = min(parse_s, time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            manifest = write_shards(modality, inputs, Path(tmp) / "out", progress=False, **options)
            shard_s = min(shard_s, time.perf_counter() - t)
    out_mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    return {"records": n, "samples": manifest["samples_written"], "in_mb": size_mb, "out_mb": out_mb, "parse_s": parse_s, "shard_s": shard_s}


def bench_stream(directory: Path, repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` read time of every record of ``directory``, from disk and over a local HTTP server."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        times = {}
        for name, where in (("disk", str(directory)), ("http", f"http://127.0.0.1:{server.server_address[1]}")):
            best, n = float("inf"), 0
            for _ in range(repeat):
                t = time.perf_counter()
                n = sum(1 for _ in ShardSet(where))
                best = min(best, time.perf_counter() - t)
            times[name] = best
    finally:
        server.shutdown()
        server.server_close()
    return {"records": n, "disk_s": times["disk"], "http_s": times["http"]}


def sample_shards(table: dict[str, tuple[list[str], dict[str, Any]]], modality: str, out: Path, **kw: Any) -> tuple[Path, dict[str, Any]]:
    """Shards of the modality's benchmark input in ``out``, and their manifest."""
    paths, options = table[modality]
    return out, write_shards(modality, [(ROOT / p).resolve() for p in paths], out, progress=False, **options, **kw)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def stream_section(table: dict[str, tuple[list[str], dict[str, Any]]], modalities: list[str], repeat: int) -> None:
    print(f"{'modality':9} {'records':>8} {'MB':>7} | {'disk rec/s':>10} {'disk MB/s':>9} | {'http rec/s':>10} {'http MB/s':>9} | {'http/disk':>9}")
    for modality in modalities:
        with tempfile.TemporaryDirectory() as tmp:
            out, manifest = sample_shards(table, modality, Path(tmp) / "shards")
            mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
            r = bench_stream(out, repeat)
        print(f"{modality:9} {r['records']:8d} {mb:7.1f} | {r['records'] / r['disk_s']:10.0f} {mb / r['disk_s']:9.1f} | "
              f"{r['records'] / r['http_s']:10.0f} {mb / r['http_s']:9.1f} | {r['disk_s'] / r['http_s']:8.0%}")


def write_section(table: dict[str, tuple[list[str], dict[str, Any]]], modalities: list[str], repeat: int) -> None:
    header = f"{'modality':9} {'records':>8} {'samples':>8} {'in MB':>7} {'out MB':>7} | {'parse rec/s':>11} {'parse MB/s':>10} | {'shard rec/s':>11} {'shard MB/s':>10} | {'shard/parse':>11}"
    print(header)
    print("-" * len(header))
    for modality in modalities:
        paths, options = table[modality]
        r = bench(modality, [(ROOT / p).resolve() for p in paths], options, repeat)
        print(f"{modality:9} {r['records']:8d} {r['samples']:8d} {r['in_mb']:7.2f} {r['out_mb']:7.1f} | "
              f"{r['records'] / r['parse_s']:11.0f} {r['in_mb'] / r['parse_s']:10.2f} | "
              f"{r['records'] / r['shard_s']:11.0f} {r['in_mb'] / r['shard_s']:10.2f} | {r['shard_s'] / r['parse_s']:10.1f}x")


def size_section(table: dict[str, tuple[list[str], dict[str, Any]]], modalities: list[str], repeat: int) -> None:
    import webdataset as wds

    from maskdiff.data.shard_format import legacy_members

    print(f"{'modality':9} {'records':>8} | {'v1 B/rec':>9} {'v2 B/rec':>9} | {'v2/v1':>6}")
    for modality in modalities:
        with tempfile.TemporaryDirectory() as tmp:
            out, manifest = sample_shards(table, modality, Path(tmp) / "shards")
            sink, records = _CountingSink(), iter(ShardSet(out))
            for shard in manifest["shards"]:  # the same records, shard by shard, in the old layout
                writer = wds.TarWriter(sink, encoder=False, mtime=0)
                for k in range(shard["records"]):
                    rec = next(records)
                    del rec.meta["modality"], rec.meta["source"]
                    writer.write({"__key__": f"{k:010d}", **legacy_members(rec, manifest["token_dtype"])})
                writer.close()
        n = manifest["samples_written"]
        old = sink.size
        new = sum(s["bytes"] for s in manifest["shards"])
        print(f"{modality:9} {n:8d} | {old / n:9.0f} {new / n:9.0f} | {new / old:6.2f}")


class _CountingSink:
    """A write-only file that counts the bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def generated_fasta(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` UniProt-style protein records of 50-600 residues."""
    rng = random.Random(seed)
    residues = "ACDEFGHIKLMNPQRSTVWY"
    with open(path, "w") as f:
        for i in range(n):
            seq = "".join(rng.choices(residues, k=rng.randint(50, 600)))
            f.write(f">tr|G{i:07d}|G{i:07d}_GEN Generated protein OS=Organism {rng.randint(0, 40)} OX={i % 97} PE={rng.randint(1, 5)} SV=1\n")
            f.write("\n".join(seq[j:j + 60] for j in range(0, len(seq), 60)) + "\n")
    return path


def shard_in_child(fasta: Path, out: Path, workers: int) -> tuple[float, float]:
    """Wall seconds and peak resident MB of ``maskdiff shard`` run as a child process."""
    cmd = [sys.executable, "-m", "maskdiff", "shard", "--modality", "protein", "--input", str(fasta), "--output", str(out),
           "--max-len", "512", "--workers", str(workers), "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024


def workers_section(table: dict[str, tuple[list[str], dict[str, Any]]], modalities: list[str], repeat: int) -> None:
    print(f"{'records':>8} {'FASTA MB':>8} | {'1 worker s':>10} {'rec/s':>7} {'RSS MB':>7} | {'2 workers s':>11} {'rec/s':>7} {'RSS MB':>7} | {'speed-up':>8}")
    for n in (10_000, 40_000):
        with tempfile.TemporaryDirectory() as tmp:
            fasta = generated_fasta(Path(tmp) / "gen.fasta", n)
            runs = {w: min((shard_in_child(fasta, Path(tmp) / f"out{w}-{k}", w) for k in range(repeat)), key=lambda r: r[0]) for w in (1, 2)}
            mb = fasta.stat().st_size / 1e6
        (t1, rss1), (t2, rss2) = runs[1], runs[2]
        print(f"{n:8d} {mb:8.1f} | {t1:10.1f} {n / t1:7.0f} {rss1:7.0f} | {t2:11.1f} {n / t2:7.0f} {rss2:7.0f} | {t1 / t2:7.2f}x")


def resume_section(table: dict[str, tuple[list[str], dict[str, Any]]], modalities: list[str], repeat: int) -> None:
    from maskdiff.data.loader import BatchLimits, MixedBatches, batches

    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        for m in ("protein", "tabular"):
            sample_shards(table, m, Path(tmp) / m, shard_size=500)
            sets[m] = ShardSet(Path(tmp) / m, shuffle_buffer=256, seed=0, repeat=True, rank=0, world_size=1)
        spec = sets["protein"].spec.merged(sets["tabular"].spec)

        def first_batch(start: dict[str, Any] | None) -> float:
            t = time.perf_counter()
            next(batches(MixedBatches(sets, {"protein": 1.0, "tabular": 1.0}, spec, limits=BatchLimits(4096), bucket=4,
                                      heldout=0.05, start=start), 0))
            return time.perf_counter() - t

        fresh = min(first_batch(None) for _ in range(max(repeat, 3)))
        print(f"fresh start: first batch after {fresh * 1e3:.0f} ms")
        print(f"{'batches run':>11} | {'drawing them s':>14} | {'resume: first batch ms':>22} | {'resume/fresh':>12}")
        for n in (100, 500, 2000):
            it = batches(MixedBatches(sets, {"protein": 1.0, "tabular": 1.0}, spec, limits=BatchLimits(4096), bucket=4, heldout=0.05), 0)
            t = time.perf_counter()
            for _ in range(n):
                next(it)
            drawn = time.perf_counter() - t
            position = it.position()
            resumed = min(first_batch(position) for _ in range(max(repeat, 3)))
            print(f"{n:11d} | {drawn:14.1f} | {resumed * 1e3:22.0f} | {resumed / fresh:11.2f}x")


SECTIONS = {"write": write_section, "stream": stream_section, "size": size_section, "workers": workers_section, "resume": resume_section}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=list(SECTIONS), help="only these (repeatable; default all)")
    ap.add_argument("--modality", action="append", choices=sorted(SAMPLES), help="only these (repeatable; default all)")
    ap.add_argument("--full", action="store_true", help="use the full development data in ../shared/data instead of data/")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs (default 1)")
    args = ap.parse_args(argv)
    table = FULL if args.full else SAMPLES
    modalities = args.modality or list(table)
    missing = [ROOT / p for m in modalities for p in table[m][0] if not (ROOT / p).is_file()]
    if missing:
        print(f"error: {missing[0].resolve()}: no such file", file=sys.stderr)
        return 2
    for i, section in enumerate(args.section or list(SECTIONS)):
        print(("\n" if i else "") + f"== {section}")
        SECTIONS[section](table, modalities, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
