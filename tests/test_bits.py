"""Bits per token from summed nats: one conversion for the ELBO, the trainer's tallies and evaluation."""

from __future__ import annotations

import math

import pytest

from maskdiff.core.bits import LN2, bits_per_token, ratio_bits_and_stderr


def test_bits_per_token_is_nats_over_n_ln2() -> None:
    assert bits_per_token(10 * LN2, 10) == 1.0
    assert bits_per_token(3.0, 2) == pytest.approx(1.5 / math.log(2))


def test_ratio_and_standard_error_over_records_by_hand() -> None:
    # records (nats / ln 2, tokens): (2, 1), (6, 2), (4, 2); R = 12 / 5 = 2.4 bits/token
    # residuals nats_r - R tokens_r: -0.4, 1.2, -0.8 -> sum of squares 2.24; n (n - 1) mean(tokens)^2 = 6 * 25 / 9
    bits, se = ratio_bits_and_stderr([2 * LN2, 6 * LN2, 4 * LN2], [1, 2, 2])
    assert bits == pytest.approx(2.4) and se == pytest.approx(math.sqrt(2.24 / (6 * 25 / 9)))
    # equal lengths: the ordinary standard error of per-record bits/token (2, 4, 6 -> 2 / sqrt(3))
    assert ratio_bits_and_stderr([8 * LN2, 16 * LN2, 24 * LN2], [4, 4, 4])[1] == pytest.approx(2.0 / math.sqrt(3))
    assert ratio_bits_and_stderr([5 * LN2], [5]) == (pytest.approx(1.0), None)  # one record: no error bar


def test_trainer_tally_reports_the_same_figures() -> None:
    from maskdiff.training.train_metrics import Tally

    tally = Tally()
    tally.add({"tabular": (6 * LN2, 3), "text": (8 * LN2, 4)}, positions=10)
    tally.add({"text": (4 * LN2, 4)}, positions=5)
    assert tally.bits_per_token() == {"text": bits_per_token(12 * LN2, 8), "tabular": bits_per_token(6 * LN2, 3)}
    assert list(tally.bits_per_token()) == ["text", "tabular"]  # the canonical modality order
