"""A tiny randomly initialised bundle over all four modalities, built once per test run.

Small shards of the shipped data are written first, and the bundle is made
from their adapters and vocabulary, so the tools can be tried against both
(lengths from shards, evaluation, vocabulary checks). Behaviour, not quality.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from adapter_fixtures import PENGUINS, ROOT, SHAKESPEARE, UNIPROT, first_fasta_records, mnist_idx_head, scratch

from maskdiff.commands import COMMANDS


@functools.lru_cache(maxsize=None)
def tiny_bundle() -> Path:
    from maskdiff.bundle import export_bundle
    from maskdiff.config import load_config, to_run_config
    from maskdiff.core.joint import JointModel
    from maskdiff.data.shards import ShardSet

    root = scratch("tasks-bundle")
    src = root / "src"
    src.mkdir()
    text = src / "text.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    dirs = {
        "text": _shards("text", [text], root / "text", max_len=32, vocab_size=400),
        "pixels": _shards("pixels", mnist_idx_head(60, src), root / "pixels", size="8x8", resize=True),
        "protein": _shards("protein", [first_fasta_records(UNIPROT, 60, src / "p.fasta")], root / "protein", max_len=40, condition="PE"),
        "tabular": _shards("tabular", [PENGUINS], root / "tabular", bins=8),
    }
    sets = ShardSet(list(dirs.values()))
    overrides = [f"data.sources.{m}.dirs=[{d}]" for m, d in dirs.items()] + [
        "data.heldout=0.2", "model.dim=16", "model.depth=1", "model.heads=2",
        "schedules.text.kind=genmd4", "schedules.pixels.kind=cosine", "schedules.protein.kind=linear", "schedules.tabular.kind=linear",
    ]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = JointModel(sets.spec, to_run_config(cfg))
    return export_bundle(root / "bundle", model, cfg, sets.spec, sets.adapters, step=0)


def _shards(modality: str, inputs: list[Any], out: Path, **options: Any) -> Path:
    from maskdiff.data.shards import write_shards

    write_shards(modality, inputs, out, progress=False, **options)
    return out


def shard_dir(modality: str) -> Path:
    return tiny_bundle().parent / modality


@functools.lru_cache(maxsize=None)
def tampered_bundle() -> Path:
    """A copy of the tiny bundle whose vocab.json no longer matches bundle.json."""
    out = scratch("tasks-tampered") / "bundle"
    shutil.copytree(tiny_bundle(), out)
    vocab = json.loads((out / "vocab.json").read_text())
    vocab["supports"][-1]["size"] += 1
    for key in ("mask_id", "pad_id", "vocab_size", "fingerprint"):
        vocab.pop(key)
    (out / "vocab.json").write_text(json.dumps(vocab))
    return out


@functools.lru_cache(maxsize=None)
def load_tool(name: str) -> Any:
    """A command's module (maskdiff.commands), or another tool's script loaded from tools/."""
    if name in COMMANDS:
        return importlib.import_module(f"maskdiff.commands.{name}")
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(capsys, name: str, *args: Any) -> tuple[int, str, str]:
    code = load_tool(name).main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
