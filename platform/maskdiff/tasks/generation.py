"""Filling records with a bundle: batched, seeded sampling shared by every task.

:func:`fill` completes every MISSING local id of a list of records (known
positions never change), ``batch_size`` records at a time, and counts the
network evaluations. :func:`conditions` turns ``KEY=VALUE`` pairs into local
ids of a modality's conditioning fields, and :func:`length_sampler` draws
sequence lengths from the lengths seen in training shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from maskdiff.adapters import OTHER, CategoryVocab

from maskdiff.errors import UserError
from maskdiff.core.sampler import SamplerOptions, complete
from maskdiff.core.tokens import Record


@dataclass
class Filled:
    records: list[Record]
    network_calls: int


def fill(bundle, records: Sequence[Record], opts: SamplerOptions, generator: torch.Generator, *, batch_size: int = 64,
         device: str = "cpu", progress: bool = False) -> Filled:
    """Complete every missing position of ``records`` (in batches of ``batch_size``)."""
    try:
        opts.check(bundle.schedules)
    except ValueError as e:
        raise UserError(str(e)) from None
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    out: list[Record] = []
    calls = 0
    bar = tqdm(total=len(records), desc="sampling", unit="record", disable=not progress, leave=False)
    for i in range(0, len(records), batch_size):
        chunk = list(records[i : i + batch_size])
        done, result = complete(bundle.denoiser, chunk, bundle.spec, bundle.schedules, opts, generator, device)
        out.extend(done)
        calls += result.network_calls
        bar.update(len(chunk))
    bar.close()
    return Filled(out, calls)


def parse_pairs(items: Sequence[str], what: str = "--condition") -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def encode_category(vocab: CategoryVocab, value: str, what: str) -> int:
    """The local id of a known category; an unknown value is a user error naming the known ones."""
    local = vocab.encode(value, what)
    if local == vocab.other_id and value != OTHER:
        shown = ", ".join(vocab.categories[:20]) + (" ..." if len(vocab.categories) > 20 else "")
        raise UserError(f"{what} {value!r} is not a value the model was trained with; known: {shown}")
    return local


def conditions(vocabs: Mapping[str, CategoryVocab], given: Mapping[str, str], what: str) -> dict[str, int]:
    """Local ids of the given conditioning fields (the others stay missing and are sampled)."""
    unknown = sorted(set(given) - set(vocabs))
    if unknown:
        known = ", ".join(vocabs) or "none"
        raise UserError(f"{what}: the model has no conditioning field {', '.join(unknown)}; it was trained with: {known}")
    return {k: encode_category(vocabs[k], v, f"{what} {k}=") for k, v in given.items()}


def training_dirs(bundle, modality: str) -> list[Path]:
    """The bundle's training shard directories of ``modality`` that exist here."""
    rc = bundle.config
    src = rc.data.sources.get(modality)
    return [d for d in (rc.data.shard_dir(n) for n in (src.dirs if src else [])) if (d / "manifest.json").is_file()]


def length_sampler(bundle, modality: str, field: str, dirs: Sequence[str | Path] = ()) -> np.ndarray:
    """Lengths of ``field`` to draw from: those in ``dirs`` if given, else the training length
    distribution stored in the bundle, else the bundle's training shards if present here."""
    from maskdiff.data.shards import ShardSet

    stored = bundle.info.get("lengths", {}).get(modality, {}).get(field)
    if stored and not dirs:
        return np.repeat(np.array([int(n) for n in stored]), [int(c) for c in stored.values()])
    paths = [Path(d) for d in dirs] or training_dirs(bundle, modality)
    if not paths:
        raise UserError(f"no {modality} shards to take lengths from (the training shards are not here); give --length N or --lengths-from DIR")
    lengths = np.array([rec[field].tokens.size for rec in ShardSet(paths)])
    if lengths.size == 0:
        raise UserError(f"{', '.join(map(str, paths))}: holds no {modality} records to take lengths from")
    return lengths


__all__ = ["Filled", "conditions", "encode_category", "fill", "length_sampler", "parse_pairs", "training_and_heldout", "training_dirs"]


def training_and_heldout(bundle, modality: str) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records of ``modality`` in the bundle's own shards (the split of :mod:`maskdiff.data.split`)."""
    from maskdiff.data.shards import ShardSet
    from maskdiff.data.split import heldout_records, training_records

    dirs = training_dirs(bundle, modality)
    if not dirs:
        raise UserError(f"the {modality} training shards of this model are not here")
    records, fraction = list(ShardSet(dirs)), bundle.config.data.heldout
    return list(training_records(records, fraction)), list(heldout_records(records, fraction))
