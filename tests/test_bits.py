"""Bits per token from summed nats: one conversion for the ELBO, the trainer's tallies and evaluation."""

from __future__ import annotations

import math

import pytest

from maskdiff.core.bits import LN2, bits_per_token, mean_bits_and_stderr


def test_bits_per_token_is_nats_over_n_ln2() -> None:
    assert bits_per_token(10 * LN2, 10) == 1.0
    assert bits_per_token(3.0, 2) == pytest.approx(1.5 / math.log(2))


def test_mean_and_standard_error_over_estimates() -> None:
    bits, se = mean_bits_and_stderr([2 * 4 * LN2, 4 * 4 * LN2, 6 * 4 * LN2], tokens=4)  # 2, 4, 6 bits/token
    assert bits == pytest.approx(4.0) and se == pytest.approx(2.0 / math.sqrt(3))  # sample std 2 over sqrt(3)
    assert mean_bits_and_stderr([5 * LN2], tokens=5) == (pytest.approx(1.0), None)  # one estimate: no error bar


def test_trainer_tally_reports_the_same_figures() -> None:
    from maskdiff.training.train_metrics import Tally

    tally = Tally()
    tally.add({"tabular": (6 * LN2, 3), "text": (8 * LN2, 4)}, positions=10)
    tally.add({"text": (4 * LN2, 4)}, positions=5)
    assert tally.bits_per_token() == {"text": bits_per_token(12 * LN2, 8), "tabular": bits_per_token(6 * LN2, 3)}
    assert list(tally.bits_per_token()) == ["text", "tabular"]  # the canonical modality order
