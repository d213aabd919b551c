#!/usr/bin/env python
"""Build the compact sample data under data/ from the full development data.

Deterministic: running it twice gives byte-identical files.

    python tools/make_samples.py [--source ../shared/data] [--dest data]

* text/tinyshakespeare.txt, pixels/mnist-t10k-*, protein/PRJEB85-HG003687.faa,
  tabular/penguins*.csv, tabular/adult.names: copied whole;
* protein/uniprot-trembl-2k.fasta.gz: every 10th record (records 1, 11, 21, ...)
  of uniprot-trembl-20k.fasta.gz, records unchanged, gzipped with mtime 0;
* tabular/adult-sample.csv: the header and every 10th data row (rows 1, 11,
  21, ...) of adult.data.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHOLE = [
    "text/tinyshakespeare.txt",
    "pixels/mnist-t10k-images-idx3-ubyte.gz",
    "pixels/mnist-t10k-labels-idx1-ubyte.gz",
    "protein/PRJEB85-HG003687.faa",
    "tabular/penguins.csv",
    "tabular/penguins-raw.csv",
    "tabular/adult.names",
]
EVERY = 10


def every_nth_fasta(src: Path, dest: Path, n: int) -> int:
    kept, index, keep = [], -1, False
    with gzip.open(src, "rt", encoding="utf-8", newline="") as f:
        for line in f:
            if line.startswith(">"):
                index += 1
                keep = index % n == 0
            if keep:
                kept.append(line)
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        out.write("".join(kept).encode("utf-8"))
    return index // n + 1


def every_nth_row(src: Path, dest: Path, n: int) -> int:
    with open(src, encoding="utf-8", newline="") as f:
        header, *rows = f.readlines()
    sample = rows[::n]
    with open(dest, "w", encoding="utf-8", newline="") as out:
        out.write(header)
        out.writelines(sample)
    return len(sample)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data", help="the full development data (default ../shared/data)")
    ap.add_argument("--dest", type=Path, default=ROOT / "data", help="where the samples go (default data/)")
    args = ap.parse_args(argv)
    if not args.source.is_dir():
        print(f"error: {args.source}: no such folder", file=sys.stderr)
        return 2
    for rel in WHOLE:
        (args.dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.source / rel, args.dest / rel)
    n = every_nth_fasta(args.source / "protein/uniprot-trembl-20k.fasta.gz", args.dest / "protein/uniprot-trembl-2k.fasta.gz", EVERY)
    m = every_nth_row(args.source / "tabular/adult.data", args.dest / "tabular/adult-sample.csv", EVERY)
    print(f"wrote {len(WHOLE)} copies, {n} UniProt records, {m} adult rows under {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
