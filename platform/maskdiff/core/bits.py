"""Bits per token: the one conversion behind every likelihood figure the project reports.

A negative ELBO summed over N tokens, in nats, is ``nats / (N ln 2)`` bits per
token (bits per dimension for an image's pixels).
"""

from __future__ import annotations

import math
import numpy as np

LN2 = math.log(2)


def bits_per_token(nats: float, tokens: int) -> float:
    """Summed nats over ``tokens`` tokens, in bits per token."""
    return nats / (tokens * LN2)


def ratio_bits_and_stderr(nats: np.ndarray, tokens: np.ndarray) -> tuple[float, float | None]:
    """Bits/token over a set of records, R = sum_r nats_r / sum_r tokens_r, and its standard error over
    records (delta method for a ratio estimator): SE(R)^2 = sum_r (nats_r - R tokens_r)^2 / (n (n - 1) mean(tokens)^2),
    in bits. None from a single record (JSON has no NaN)."""
    nats, tokens = np.asarray(nats, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    ratio = nats.sum() / tokens.sum()
    n = nats.size
    if n < 2:
        return float(ratio / LN2), None
    var = np.sum((nats - ratio * tokens) ** 2) / (n * (n - 1) * tokens.mean() ** 2)
    return float(ratio / LN2), float(np.sqrt(var) / LN2)


__all__ = ["LN2", "bits_per_token", "ratio_bits_and_stderr"]
