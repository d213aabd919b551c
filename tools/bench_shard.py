#!/usr/bin/env python
"""Throughput of tools/shard.py's write path per modality, against parse-only.

For each modality it times, on the same input in the same run:

* parse: the adapter's reader alone (files -> raw records, nothing encoded);
* shard: ``write_shards`` end to end (fit pass, encode, tar shards, sha256,
  manifest) into a temporary folder.

and prints records/s and MB/s (input bytes as stored on disk) for both, and the
ratio shard time / parse time (the overhead of fitting, encoding and writing).

    python tools/bench_shard.py                 # the shipped samples under data/
    python tools/bench_shard.py --full          # the full development data (../shared/data)
    python tools/bench_shard.py --modality protein --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from maskdiff.adapters import get_adapter
from maskdiff.shards import write_shards

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", action="append", choices=sorted(SAMPLES), help="only these (repeatable; default all)")
    ap.add_argument("--full", action="store_true", help="use the full development data in ../shared/data instead of data/")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs (default 1)")
    args = ap.parse_args(argv)
    table = FULL if args.full else SAMPLES
    header = f"{'modality':9} {'records':>8} {'samples':>8} {'in MB':>7} {'out MB':>7} | {'parse rec/s':>11} {'parse MB/s':>10} | {'shard rec/s':>11} {'shard MB/s':>10} | {'shard/parse':>11}"
    print(header)
    print("-" * len(header))
    for modality in args.modality or list(table):
        paths, options = table[modality]
        inputs = [(ROOT / p).resolve() for p in paths]
        missing = [p for p in inputs if not p.is_file()]
        if missing:
            print(f"error: {missing[0]}: no such file", file=sys.stderr)
            return 2
        r = bench(modality, inputs, options, args.repeat)
        print(f"{modality:9} {r['records']:8d} {r['samples']:8d} {r['in_mb']:7.2f} {r['out_mb']:7.1f} | "
              f"{r['records'] / r['parse_s']:11.0f} {r['in_mb'] / r['parse_s']:10.2f} | "
              f"{r['records'] / r['shard_s']:11.0f} {r['in_mb'] / r['shard_s']:10.2f} | {r['shard_s'] / r['parse_s']:10.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
