"""What a training log line measures: per-modality nats and tokens summed over micro-batches and ranks, and peak memory."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from maskdiff.core.bits import bits_per_token
from maskdiff.core import modalities


@dataclass
class Tally:
    """Per-modality nats and tokens, plus totals, summed over micro-batches (then over ranks)."""

    nats: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    positions: int = 0

    def add(self, per_modality: dict[str, tuple[float, int]], positions: int) -> None:
        for mod, (n, k) in per_modality.items():
            self.nats[mod] = self.nats.get(mod, 0.0) + n
            self.tokens[mod] = self.tokens.get(mod, 0) + k
        self.positions += positions

    def reduced(self, device: torch.device) -> Tally:
        """The sum over all ranks (every rank must call it)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self
        names = modalities.names()
        v = torch.tensor([self.nats.get(m, 0.0) for m in names] + [self.tokens.get(m, 0) for m in names] + [self.positions],
                         dtype=torch.float64, device=device)
        dist.all_reduce(v)
        k = len(names)
        present = [i for i in range(k) if v[k + i] > 0]
        return Tally({names[i]: float(v[i]) for i in present}, {names[i]: int(v[k + i]) for i in present}, int(v[-1]))

    def token_counts(self) -> dict[str, int]:
        return {m: self.tokens[m] for m in modalities.names() if m in self.tokens}

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def bits_per_token(self) -> dict[str, float]:
        return {m: bits_per_token(self.nats[m], self.tokens[m]) for m in modalities.names() if self.tokens.get(m)}

    def nats_per_token(self) -> float:
        return sum(self.nats.values()) / max(1, self.total_tokens)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


__all__ = ["Tally", "peak_memory_mb"]
