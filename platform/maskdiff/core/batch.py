"""Records to padded tensors: the one input format of the denoiser, losses and samplers.

A row holds one record (:func:`collate`) or several laid end to end
(:func:`collate_rows`, see :mod:`maskdiff.core.packing`); a packed batch carries
segment ids and per-record positions, and every per-example quantity (the
ELBO's time and mask draw, a dropped condition) is drawn per record.
"""

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

    Packed rows (several records per row) also carry ``segment_ids``, the
    index of each position's record in the batch (records numbered row-major
    from 0; a row's trailing padding takes the id of its last record), and
    ``record_positions``, each position's index within its record (RoPE
    restarts per record). Both are None when every row holds one record: then
    the record of row b is record b and positions are the sequence index.
    """

    tokens: Tensor
    support_ids: Tensor
    modality_ids: Tensor
    valid: Tensor
    pad: Tensor
    mask_id: int
    segment_ids: Tensor | None = None
    record_positions: Tensor | None = None

    TENSORS = ("tokens", "support_ids", "modality_ids", "valid", "pad")
    PACKING = ("segment_ids", "record_positions")

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    @property
    def num_records(self) -> int:
        """Records in the batch: the rows, or one more than the last segment id (the last position's)."""
        return self.shape[0] if self.segment_ids is None else int(self.segment_ids[-1, -1]) + 1

    def record_ids(self) -> Tensor:
        """(B, L) index of each position's record: ``segment_ids``, or the row."""
        if self.segment_ids is not None:
            return self.segment_ids
        B, L = self.shape
        return torch.arange(B, device=self.tokens.device).view(B, 1).expand(B, L)

    def per_record_sum(self, values: Tensor) -> Tensor:
        """(B, L) values summed over each record's positions: (num_records,)."""
        if self.segment_ids is None:
            return values.sum(-1)
        out = torch.zeros(self.num_records, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.segment_ids.reshape(-1), values.reshape(-1))

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, **{k: v.to(device) for k in self.TENSORS + self.PACKING if (v := getattr(self, k)) is not None})

    def repeat(self, k: int) -> Batch:
        """Each example k times, draw-major: rows [j*B:(j+1)*B] are draw j (its records numbered j*N + r)."""
        out = replace(self, **{name: getattr(self, name).repeat(k, 1) for name in self.TENSORS})
        if self.segment_ids is None:
            return out
        shift = torch.arange(k, device=self.segment_ids.device).repeat_interleave(self.shape[0]).view(-1, 1) * self.num_records
        return replace(out, segment_ids=self.segment_ids.repeat(k, 1) + shift, record_positions=self.record_positions.repeat(k, 1))

    def with_tokens(self, tokens: Tensor) -> Batch:
        return replace(self, tokens=tokens)


def collate(records: Sequence[Record], spec: VocabSpec, length: int | None = None) -> Batch:
    """Flatten each record's fields in order and right-pad to a common length (one record per row)."""
    if not records:
        raise ValueError("collate: no records")
    return collate_rows([[r] for r in records], spec, length)


def collate_rows(rows: Sequence[Sequence[Record]], spec: VocabSpec, length: int | None = None) -> Batch:
    """Lay each row's records end to end and right-pad the rows to a common length.

    With a row of several records the batch is packed (segment ids and
    per-record positions, see :class:`Batch`); with one record per row it is
    the plain batch of :func:`collate`.
    """
    if not rows or not all(rows):
        raise ValueError("collate: no records (or an empty row)")
    flat = [[_flatten(r, spec) for r in row] for row in rows]
    sizes = [[len(parts[0]) for parts in row] for row in flat]
    longest = max(sum(row) for row in sizes)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"collate: a row has {longest} tokens, more than the length {length}")
    B = len(rows)
    keys = ("tokens", "support_ids", "modality_ids")
    out = {k: np.zeros((B, length), np.int64) for k in keys}
    out["tokens"][:] = spec.pad_id
    packed = any(len(row) > 1 for row in rows)
    segments, record_pos = np.zeros((B, length), np.int64), np.zeros((B, length), np.int64)
    record = 0
    for b, (row, row_sizes) in enumerate(zip(flat, sizes)):
        start = 0
        for parts, n in zip(row, row_sizes):
            for key, values in zip(keys, parts):
                out[key][b, start : start + n] = values
            segments[b, start:] = record  # the row's trailing padding keeps its last record's id
            record_pos[b, start:] = np.arange(length - start)
            start += n
            record += 1
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    pad = tensors["tokens"] == spec.pad_id
    valid = ~pad & (tensors["tokens"] != spec.mask_id)
    if not packed:
        return Batch(**tensors, valid=valid, pad=pad, mask_id=spec.mask_id)
    return Batch(**tensors, valid=valid, pad=pad, mask_id=spec.mask_id, segment_ids=torch.from_numpy(segments),
                 record_positions=torch.from_numpy(record_pos))


def _flatten(record: Record, spec: VocabSpec) -> tuple[np.ndarray, ...]:
    tokens, supports, modalities = [], [], []
    for f in record.fields:
        local = f.tokens.reshape(-1)
        n = local.size
        sid = spec.support_id(f.support)
        tokens.append(spec.to_global(f.support, local))
        supports.append(np.full(n, sid))
        modalities.append(np.full(n, spec.modality_id(spec.supports[sid].modality)))
    return tuple(np.concatenate(parts) for parts in (tokens, supports, modalities))


def split(batch: Batch, records: Sequence[Record], spec: VocabSpec, tokens: Tensor | None = None) -> list[Record]:
    """Write (B, L) global ids back into copies of ``records`` (the inverse of :func:`collate`)."""
    if batch.packed:
        raise ValueError("split: the batch is packed; sampling and imputation take one record per row")
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
    """Condition on the listed fields, dropping each with prob ``p`` per record (classifier-free guidance).

    A conditioning field (a digit's label, a protein's evidence level) is given,
    not modelled: it is never masked and stays out of the ELBO, so the network
    always sees it while it learns p(x | c). A dropped field is masked instead
    (and still left out of the ELBO), so the same network also learns p(x).
    """
    if not support_ids:
        return batch
    ids = torch.as_tensor(list(support_ids), dtype=torch.long, device=batch.tokens.device)
    is_condition = (batch.support_ids.unsqueeze(-1) == ids) & ~batch.pad.unsqueeze(-1)  # (B, L, fields)
    coin = torch.rand((batch.num_records, len(ids)), generator=generator, device=batch.tokens.device) < p  # (records, fields)
    dropped = (is_condition & coin[batch.record_ids()]).any(-1)
    return replace(batch, tokens=torch.where(dropped, batch.mask_id, batch.tokens), valid=batch.valid & ~is_condition.any(-1))


__all__ = ["Batch", "collate", "collate_rows", "drop_fields", "split"]
