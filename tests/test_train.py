"""Training the tiny config under DeepSpeed: one process, two processes (gloo), metrics and outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from training_support import metrics, run_train, tiny_args, tiny_shard_root, weights

pytestmark = pytest.mark.slow
STEPS = ["train.steps=40", "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=20"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-step single-process run of the tiny config (text with GenMD4, table with linear)."""
    run = tmp_path_factory.mktemp("train") / "run"
    run_train(tiny_args(tiny_shard_root(tmp_path_factory), run, *STEPS))
    return run


def test_loss_is_finite_and_falls(one_process: Path) -> None:
    train = metrics(one_process, "train")
    assert [m["step"] for m in train] == list(range(5, 41, 5))
    assert all(math.isfinite(m["loss"]) for m in train)
    first, last = train[0]["loss"], sum(m["loss"] for m in train[-2:]) / 2
    assert last < 0.85 * first, (first, last)
    evals = metrics(one_process, "eval")
    assert [m["step"] for m in evals] == [0, 10, 20, 30, 40]  # step 0: the untrained model
    for mod in ("text", "tabular"):
        assert evals[-1]["bits_per_token"][mod] < 0.95 * evals[0]["bits_per_token"][mod]


def test_separate_bits_per_modality_and_learned_w(one_process: Path) -> None:
    for m in metrics(one_process):
        assert set(m["bits_per_token"]) == {"text", "tabular"}
        assert all(math.isfinite(b) and b > 0 for b in m["bits_per_token"].values())
    train = metrics(one_process, "train")
    assert set(train[-1]["w"]) == {"text"}  # only the GenMD4 modality has learned w
    w = train[-1]["w"]["text"]
    assert abs(w["mean"] - 1.0) > 0.02 and w["max"] - w["min"] > 0.01  # moved from init 1, per value
    assert all(m["tokens_per_s"] > 0 and m["peak_mem_mb"] > 0 for m in train)


def test_run_outputs(one_process: Path) -> None:
    summary = json.loads((one_process / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 40 and set(summary["heldout_bits_per_token"]) == {"text", "tabular"}
    assert (one_process / "config.yaml").is_file() and (one_process / "bundle" / "model.safetensors").is_file()
    for mod in ("text", "tabular"):
        png = one_process / "plots" / f"{mod}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tags = sorted(p.name for p in (one_process / "checkpoints").glob("step*"))
    assert tags == ["step00000020", "step00000040"]
    assert (one_process / "checkpoints" / "latest").read_text().strip() == "step00000040"


def test_two_processes_gloo_zero2_matches_zero0(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """2 ranks: each trains on its own part of the data; ZeRO-2 gives ZeRO-0's weights."""
    shards = tiny_shard_root(tmp_path_factory)
    short = ["train.steps=8", "train.log_every=4", "train.eval_every=8", "train.checkpoint_every=8"]
    runs = {}
    for stage in (0, 2):
        runs[stage] = tmp_path / f"zero{stage}"
        res = run_train(tiny_args(shards, runs[stage], *short, f"deepspeed.zero_stage={stage}"), procs=2)
        assert "2 process(es)" in res.stderr
    train = metrics(runs[2], "train")
    assert all(math.isfinite(m["loss"]) for m in train) and set(train[-1]["bits_per_token"]) == {"text", "tabular"}
    a, b = weights(runs[0]), weights(runs[2])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert sorted(p.name for p in (runs[2] / "checkpoints" / "step00000008").glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]
