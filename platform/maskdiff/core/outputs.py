"""Support-restricted outputs: logits over each position's own support, only where needed.

A position of field f may only take the clean values of f's support, a
contiguous range of global ids (``VocabSpec.id_range``). Instead of logits
over the whole clean vocabulary at every position, the ELBO and the sampler
ask for the positions they need (``where``: masked positions in training,
positions being filled in sampling), grouped by support; each group carries
logits over that support's values only, indexed by local id.

A denoiser that implements ``support_logits`` (``maskdiff.core.model.Denoiser``)
computes only those; any other callable returning dense log-probabilities
(B, L, num_clean) is sliced to the same form (tests' exact oracles).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import torch
from torch import Tensor

from .batch import Batch
from .tokens import VocabSpec


@dataclass
class SupportGroup:
    """Positions of one support: ``rows`` index the selected positions (row-major order of ``where``)."""

    support: int
    start: int  # global id of the support's local value 0
    rows: Tensor  # (n,) long
    logits: Tensor  # (n, size) unnormalised, over local ids

    @property
    def size(self) -> int:
        return self.logits.shape[-1]


class DenseDenoiser(Protocol):
    def __call__(self, x_t: Tensor, batch: Batch, t: Tensor | None) -> Tensor:
        """Log-probabilities (B, L, num_clean) over clean values; -inf outside each field's support."""
        ...


class RestrictedDenoiser(Protocol):
    spec: VocabSpec

    def support_logits(self, x_t: Tensor, batch: Batch, t: Tensor | None, where: Tensor) -> list[SupportGroup]:
        """Logits at the positions ``where`` (B, L) only, grouped by support."""
        ...


AnyDenoiser = RestrictedDenoiser | DenseDenoiser


def group_by_support(support_ids: Tensor) -> list[tuple[int, Tensor]]:
    """(support id, indices into ``support_ids``) for each support present, in one sort."""
    if support_ids.numel() == 0:
        return []
    lo, hi = support_ids.aminmax()
    if bool(lo == hi):  # one support (a text or image model): no sort
        return [(int(lo), torch.arange(support_ids.numel(), device=support_ids.device))]
    order = torch.argsort(support_ids, stable=True)
    present, counts = torch.unique_consecutive(support_ids[order], return_counts=True)
    return list(zip(present.tolist(), torch.split(order, counts.tolist())))


def spec_of(denoiser: object, spec: VocabSpec | None) -> VocabSpec:
    found = spec if spec is not None else getattr(denoiser, "spec", None)
    if found is None:
        raise ValueError("the vocabulary spec (support sizes) is needed: pass spec= or give the denoiser a .spec")
    return found


def support_sizes(spec: VocabSpec, device: torch.device | str | None = None) -> Tensor:
    """(num_supports,) support sizes: K of each field, from the spec (not from model outputs)."""
    return _sizes(tuple(s.size for s in spec.supports), str(device))


@lru_cache(maxsize=64)
def _sizes(sizes: tuple[int, ...], device: str) -> Tensor:
    with torch.inference_mode(False):  # a cached tensor must also serve outside inference mode
        return torch.tensor(sizes, dtype=torch.long, device=None if device == "None" else device)


def support_logits(
    denoiser: AnyDenoiser,
    x_t: Tensor,
    batch: Batch,
    t: Tensor | None,
    where: Tensor,
    spec: VocabSpec | None = None,
) -> list[SupportGroup]:
    """Logits at ``where`` grouped by support: restricted when the denoiser can, else sliced from its dense output."""
    if hasattr(denoiser, "support_logits"):  # a RestrictedDenoiser (an attribute test: Protocol isinstance is slow)
        return denoiser.support_logits(x_t, batch, t, where)
    spec = spec_of(denoiser, spec)
    logp = denoiser(x_t, batch, t)[where]
    groups = []
    for sid, rows in group_by_support(batch.support_ids[where]):
        r = spec.id_range(spec.supports[sid].name)
        groups.append(SupportGroup(sid, r.start, rows, logp[rows, r.start : r.stop]))
    return groups


__all__ = ["AnyDenoiser", "DenseDenoiser", "RestrictedDenoiser", "SupportGroup", "group_by_support", "spec_of", "support_logits", "support_sizes"]
