"""Records to padded tensors: the one input format of the denoiser, losses and samplers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .tokens import Record, VocabSpec


@dataclass
class Batch:
    """A padded batch of records, every tensor of shape (B, L).

    ``tokens`` holds global ids: clean ids, ``mask_id`` for a missing value and
    ``pad_id`` after the end of a record (the ids of ``VocabSpec``). ``valid`` marks the positions that
    count in the ELBO (neither padding nor missing).
    """

    tokens: Tensor
    support_ids: Tensor
    modality_ids: Tensor
    positions: Tensor  # position within the field (raster order for images)
    valid: Tensor
    pad: Tensor
    mask_id: int

    TENSORS = ("tokens", "support_ids", "modality_ids", "positions", "valid", "pad")

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, **{k: getattr(self, k).to(device) for k in self.TENSORS})

    def repeat(self, k: int) -> Batch:
        """Each example k times, draw-major: rows [j*B:(j+1)*B] are draw j."""
        return replace(self, **{name: getattr(self, name).repeat(k, 1) for name in self.TENSORS})

    def with_tokens(self, tokens: Tensor) -> Batch:
        return replace(self, tokens=tokens)


def collate(records: Sequence[Record], spec: VocabSpec, length: int | None = None) -> Batch:
    """Flatten each record's fields in order and right-pad to a common length."""
    if not records:
        raise ValueError("collate: no records")
    rows = [_flatten(r, spec) for r in records]
    longest = max(len(row[0]) for row in rows)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"collate: a record has {longest} tokens, more than the length {length}")
    B = len(rows)
    out = {
        "tokens": np.full((B, length), spec.pad_id, np.int64),
        "support_ids": np.zeros((B, length), np.int64),
        "modality_ids": np.zeros((B, length), np.int64),
        "positions": np.zeros((B, length), np.int64),
    }
    for b, row in enumerate(rows):
        for key, values in zip(("tokens", "support_ids", "modality_ids", "positions"), row):
            out[key][b, : len(values)] = values
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    pad = tensors["tokens"] == spec.pad_id
    valid = ~pad & (tensors["tokens"] != spec.mask_id)
    return Batch(**tensors, valid=valid, pad=pad, mask_id=spec.mask_id)


def _flatten(record: Record, spec: VocabSpec) -> tuple[np.ndarray, ...]:
    tokens, supports, modalities, positions = [], [], [], []
    for f in record.fields:
        local = f.tokens.reshape(-1)
        n = local.size
        sid = spec.support_id(f.support)
        tokens.append(spec.to_global(f.support, local))
        supports.append(np.full(n, sid))
        modalities.append(np.full(n, spec.modality_id(spec.supports[sid].modality)))
        positions.append(np.arange(n))
    return tuple(np.concatenate(parts) for parts in (tokens, supports, modalities, positions))


def split(batch: Batch, records: Sequence[Record], spec: VocabSpec, tokens: Tensor | None = None) -> list[Record]:
    """Write (B, L) global ids back into copies of ``records`` (the inverse of :func:`collate`)."""
    tokens = batch.tokens if tokens is None else tokens
    out = []
    for b, record in enumerate(records):
        row = tokens[b].cpu().numpy()
        start, new_fields = 0, []
        for f in record.fields:
            n = f.tokens.size
            local = spec.to_local(f.support, row[start : start + n]).reshape(f.tokens.shape)
            new_fields.append(replace(f, tokens=local))
            start += n
        out.append(Record(new_fields, dict(record.meta)))
    return out


def drop_fields(batch: Batch, support_ids: Sequence[int], p: float, generator: torch.Generator | None = None) -> Batch:
    """Condition on the listed fields, dropping each with prob ``p`` per example (classifier-free guidance).

    A conditioning field (a digit's label, a protein's evidence level) is given,
    not modelled: it is never masked and stays out of the ELBO, so the network
    always sees it while it learns p(x | c). A dropped field is masked instead
    (and still left out of the ELBO), so the same network also learns p(x).
    """
    if not support_ids:
        return batch
    B = batch.shape[0]
    ids = torch.as_tensor(list(support_ids), dtype=torch.long, device=batch.tokens.device)
    is_condition = (batch.support_ids.unsqueeze(-1) == ids) & ~batch.pad.unsqueeze(-1)  # (B, L, fields)
    coin = torch.rand((B, len(ids)), generator=generator, device=batch.tokens.device) < p  # (B, fields)
    dropped = (is_condition & coin.unsqueeze(1)).any(-1)
    return replace(batch, tokens=torch.where(dropped, batch.mask_id, batch.tokens), valid=batch.valid & ~is_condition.any(-1))


__all__ = ["Batch", "collate", "drop_fields", "split"]
