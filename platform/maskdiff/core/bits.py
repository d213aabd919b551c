"""Bits per token: the one conversion behind every likelihood figure the project reports.

A negative ELBO summed over N tokens, in nats, is ``nats / (N ln 2)`` bits per
token (bits per dimension for an image's pixels).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

LN2 = math.log(2)


def bits_per_token(nats: float, tokens: int) -> float:
    """Summed nats over ``tokens`` tokens, in bits per token."""
    return nats / (tokens * LN2)


def mean_bits_and_stderr(nats_per_estimate: Iterable[float], tokens: int) -> tuple[float, float | None]:
    """Mean bits/token of independent estimates of the same summed nats (e.g. Monte Carlo passes over one
    set of records) and its standard error, std / sqrt(n); None from a single estimate (JSON has no NaN)."""
    bits = np.array(list(nats_per_estimate)) / (tokens * LN2)
    se = float(bits.std(ddof=1) / math.sqrt(bits.size)) if bits.size > 1 else None
    return float(bits.mean()), se


__all__ = ["LN2", "bits_per_token", "mean_bits_and_stderr"]
