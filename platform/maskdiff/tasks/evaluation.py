"""Likelihood evaluation: the ELBO in bits per token (bits per dimension for images) per modality.

Each of ``repeats`` passes over the records draws one time (and mask) per
record, stratified across each batch; each record's negative ELBO is averaged
over the passes. The figure reported is total nats over total tokens, and its
``stderr_over_records`` is the standard error of that ratio over records
(:func:`~maskdiff.core.bits.ratio_bits_and_stderr`): it covers both the sampling of
records and the Monte Carlo noise left after ``repeats`` passes. Figures are
also broken down by support (field), so an image's bits/dim leaves its class
label out.
Tokens still masked at t_min are decoded by the model (``decode="model"``,
the tighter bound; training keeps uniform decoding, which saves a network
call per step for a term that is small once w is learned).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from maskdiff.core.batch import collate
from maskdiff.core.bits import bits_per_token, ratio_bits_and_stderr
from maskdiff.errors import UserError
from maskdiff.core.elbo import elbo
from maskdiff.core import modalities
from maskdiff.core.tokens import Record, VocabMismatchError, VocabSpec


@dataclass
class Tally:
    """Per support name, one entry per record: nats (mean over passes) and tokens (0 where the record has none)."""

    nats: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]


def check_shards(bundle, shard_spec: VocabSpec, adapter_fingerprint: str, source: str, where: str) -> None:
    """The shards' supports and adapter (of ``source``, :attr:`Adapter.key`) must be the bundle's (else :class:`VocabMismatchError`)."""
    modality = source.partition("/")[0]
    if modality not in bundle.modalities:
        raise UserError(f"{where}: holds {modality} data, which the model was not trained on; its modalities are {', '.join(bundle.modalities)}")
    if source not in bundle.adapters:
        raise VocabMismatchError(f"{where}: holds the {source} data set, which the model was not trained on; its sources are {', '.join(sorted(bundle.adapters))}")
    for s in shard_spec.supports:
        mine = bundle.spec.supports[bundle.spec.index[s.name]] if s.name in bundle.spec.index else None
        if mine != s:
            raise VocabMismatchError(f"{where}: support {s.name!r} is {s}, the model's is {mine}; the shards were made with another vocabulary")
    if bundle.adapters[source].fingerprint() != adapter_fingerprint:
        raise VocabMismatchError(f"{where}: the {modality} adapter state (e.g. the BPE model or the column bins) differs from the model's; "
                                 f"shard the data with --state-from the model's training shards")


@torch.no_grad()
def evaluate_records(bundle, records: Sequence[Record], *, repeats: int = 4, batch_size: int = 32, seed: int = 0,
                     device: str = "cpu", decode: str = "model") -> Tally:
    """Negative ELBO per support over ``repeats`` passes (see the module docstring); ``decode`` as :func:`~maskdiff.core.elbo.elbo`."""
    if repeats < 1:
        raise UserError(f"--repeats {repeats}: must be >= 1")
    spec = bundle.spec
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    # sort by length so batches pad little; the estimate does not depend on the order
    ordered = sorted(records, key=len)
    batches = [collate(ordered[i : i + batch_size], spec).to(device) for i in range(0, len(ordered), batch_size)]
    nats = torch.zeros(len(spec.supports), len(ordered), dtype=torch.float64)
    tokens = torch.cat([_per_record_support(b, b.valid.double(), len(spec.supports)) for b in batches], dim=1)
    for _ in range(repeats):
        per_batch = [elbo(bundle.denoiser, b, bundle.schedules, draws=1, generator=g, decode=decode).position_nats for b in batches]
        nats += torch.cat([_per_record_support(b, v.double(), len(spec.supports)) for b, v in zip(batches, per_batch)], dim=1).cpu()
    present = tokens.sum(1) > 0
    return Tally({s.name: (nats[i] / repeats).numpy() for i, s in enumerate(spec.supports) if present[i]},
                 {s.name: tokens[i].numpy() for i, s in enumerate(spec.supports) if present[i]})


def _per_record_support(batch, values: torch.Tensor, supports: int) -> torch.Tensor:
    """(supports, records) sums of position values (B, L) over each record's valid positions of each support."""
    rows = [batch.per_record_sum(torch.where(batch.valid & (batch.support_ids == sid), values, 0.0)) for sid in range(supports)]
    return torch.stack(rows).cpu()


def summarise(tally: Tally, spec: VocabSpec, records: int) -> dict[str, Any]:
    """Per modality: bits/token (all its fields), its standard error, tokens, and the per-field breakdown."""
    out: dict[str, Any] = {}
    for mod in spec.modalities:
        names = [n for n in tally.tokens if spec.support(n).modality == mod]
        if not names:
            continue
        tokens = np.sum([tally.tokens[n] for n in names], axis=0)
        bits, se = ratio_bits_and_stderr(np.sum([tally.nats[n] for n in names], axis=0), tokens)
        entry: dict[str, Any] = {"bits_per_token": bits, "stderr_over_records": se, "tokens": int(tokens.sum()), "records": records, "fields": {}}
        for n in names:
            b, s = ratio_bits_and_stderr(tally.nats[n], tally.tokens[n])
            entry["fields"][n] = {"bits_per_token": b, "stderr_over_records": s, "tokens": int(tally.tokens[n].sum())}
        per_dim = modalities.get(mod).per_dim_support
        if per_dim in entry["fields"]:
            entry["bits_per_dim"] = entry["fields"][per_dim]["bits_per_token"]
            entry["bits_per_dim_stderr_over_records"] = entry["fields"][per_dim]["stderr_over_records"]
        out[mod] = entry
    return out


def shard_records(bundle, dirs: Sequence[str | Path], split: str = "auto", limit: int | None = None) -> tuple[dict[str, list[Record]], dict[str, str]]:
    """Records of each shard directory, checked against the bundle; ``split`` all | heldout | auto.

    ``auto`` takes only the held-out records (:mod:`maskdiff.data.split`) from the
    directories the model was trained on, and all records from the others.
    """
    from maskdiff.data.shards import ShardSet, load_manifest
    from maskdiff.data.split import heldout_records

    if split not in ("all", "heldout", "auto"):
        raise UserError(f"--split {split!r}: expected all, heldout or auto")
    rc = bundle.config
    trained = {rc.data.shard_dir(n).resolve() for src in rc.data.sources.values() for n in src.dirs}
    by_mod: dict[str, list[Record]] = {}
    used: dict[str, str] = {}
    for d in map(Path, dirs):
        if not d.exists():
            raise UserError(f"{d}: no such shard directory")
        m, shards = load_manifest(d), ShardSet(d)
        check_shards(bundle, shards.spec, m["adapter"]["fingerprint"], shards.keys[0], str(d))
        which = split if split != "auto" else ("heldout" if d.resolve() in trained else "all")
        used[str(d)] = which
        recs = by_mod.setdefault(m["modality"], [])
        for rec in shards if which == "all" else heldout_records(shards, rc.data.heldout):
            recs.append(rec)
            if limit is not None and len(recs) >= limit:
                break
    for mod, recs in by_mod.items():
        if not recs:
            raise UserError(f"no {mod} records to evaluate (the held-out split is empty: data.heldout={rc.data.heldout}); try --split all")
    return by_mod, used





def unigram_bits(train: Iterable[Record], test: Sequence[Record], spec: VocabSpec) -> dict[str, float]:
    """Bits/token on ``test`` of a per-support unigram model fitted on ``train`` (add-one smoothed), per modality."""
    counts = {s.name: np.ones(s.size) for s in spec.supports}
    for rec in train:
        for f in rec.fields:
            t = f.tokens.reshape(-1)
            counts[f.support] += np.bincount(t[t >= 0], minlength=counts[f.support].size)
    nats: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for rec in test:
        for f in rec.fields:
            t = f.tokens.reshape(-1)
            t = t[t >= 0]
            p = counts[f.support] / counts[f.support].sum()
            mod = spec.support(f.support).modality
            nats[mod] = nats.get(mod, 0.0) - float(np.log(p[t]).sum())
            tokens[mod] = tokens.get(mod, 0) + t.size
    return {m: bits_per_token(nats[m], tokens[m]) for m in nats}
__all__ = ["Tally", "check_shards", "evaluate_records", "shard_records", "summarise", "unigram_bits"]
