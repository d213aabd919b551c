"""Helpers for the adapter, shard and shard CLI tests: shipped data paths, small
shard directories built once per test run, hand-made bad inputs."""

from __future__ import annotations

import atexit
import functools
import gzip
import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskdiff.adapters import Rejected, get_adapter

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SHAKESPEARE = DATA / "text" / "tinyshakespeare.txt"
MNIST_IMAGES = DATA / "pixels" / "mnist-t10k-images-idx3-ubyte.gz"
MNIST_LABELS = DATA / "pixels" / "mnist-t10k-labels-idx1-ubyte.gz"
PRJEB85 = DATA / "protein" / "PRJEB85-HG003687.faa"
UNIPROT = DATA / "protein" / "uniprot-trembl-2k.fasta.gz"
ADULT = DATA / "tabular" / "adult-sample.csv"
PENGUINS = DATA / "tabular" / "penguins.csv"
PENGUINS_RAW = DATA / "tabular" / "penguins-raw.csv"

_SCRATCH = Path(tempfile.mkdtemp(prefix="maskdiff-shard-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, True)


def scratch(name: str) -> Path:
    """A fresh folder that lives for the whole test run."""
    p = _SCRATCH / name
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    return p


def read_all(modality: str, paths: list[Any], **options: Any) -> tuple[Any, list[tuple[str, Any]], list[Rejected]]:
    """Read and fit an adapter; return it, the raw records and the read-time rejects."""
    adapter = get_adapter(modality, **options)
    items = list(adapter.read(paths))
    raws = [i for i in items if not isinstance(i, Rejected)]
    rejects = [i for i in items if isinstance(i, Rejected)]
    adapter.fit(raw for _, raw in raws)
    return adapter, raws, rejects


# --- small real inputs -----------------------------------------------------------------------


def first_fasta_records(src: Path, n: int, dest: Path) -> Path:
    """The first ``n`` records of a (gzipped) FASTA file, unchanged."""
    opener = gzip.open if src.suffix == ".gz" else open
    out, count = [], 0
    with opener(src, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith(">"):
                count += 1
                if count > n:
                    break
            out.append(line)
    dest.write_text("".join(out))
    return dest


def first_csv_rows(src: Path, n: int, dest: Path) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dest.write_text("".join(lines[: n + 1]))
    return dest


def mnist_arrays(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST test images (N, 28, 28) and labels, read independently of the adapter."""
    with gzip.open(MNIST_IMAGES, "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(MNIST_LABELS, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return images[:n].copy(), labels[:n].copy()


def mnist_idx_head(n: int, dest: Path) -> list[Path]:
    """The first ``n`` MNIST test images and labels as (uncompressed) IDX files."""
    images, labels = mnist_arrays(n)
    img, lab = dest / "images-idx3-ubyte", dest / "labels-idx1-ubyte"
    img.write_bytes((2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28)) + images.tobytes())
    lab.write_bytes((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    return [img, lab]


def mnist_png_folder(dest: Path, n: int = 30) -> Path:
    """MNIST digits as 8-bit PNGs in one sub-folder per class (``dest/<label>/<i>.png``)."""
    images, labels = mnist_arrays(n)
    for i, (img, lab) in enumerate(zip(images, labels)):
        (dest / str(lab)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(dest / str(lab) / f"{i:04d}.png")
    return dest


# --- built shard directories -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def built(modality: str) -> tuple[Path, dict[str, Any]]:
    """A shard directory of a small sample of the shipped data, built once per test run."""
    from maskdiff.data.shards import write_shards

    src = scratch(f"src-{modality}")
    out = _SCRATCH / f"shards-{modality}"
    if modality == "protein":
        inputs = [first_fasta_records(PRJEB85, 150, src / "prjeb85.faa"), first_fasta_records(UNIPROT, 150, src / "uniprot.fasta")]
        manifest = write_shards("protein", inputs, out, shard_size=70, max_len=300, progress=False)
    elif modality == "pixels":
        inputs = mnist_idx_head(2000, src)
        manifest = write_shards("pixels", inputs, out, shard_size=500, progress=False)
    elif modality == "text":
        manifest = write_shards("text", [SHAKESPEARE], out, shard_size=400, max_len=512, vocab_size=1000, progress=False)
    elif modality == "tabular":
        manifest = write_shards("tabular", [PENGUINS], out, shard_size=100, progress=False)
    else:
        raise ValueError(modality)
    return out, manifest


def load_shard_cli() -> Any:
    """The shard command's module (tools/shard.py runs its main)."""
    return importlib.import_module("maskdiff.commands.shard")
