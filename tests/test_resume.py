"""Resume: N steps straight equals N/2 steps, a fresh process, and N/2 more."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_support import metrics, run_train, tensorboard_scalars, tiny_args, tiny_shard_root, weights

pytestmark = pytest.mark.slow
RUN = ["train.steps=12", "train.log_every=2", "train.eval_every=6", "train.checkpoint_every=4", "data.bucket=3"]
TIMING = ("tokens_per_s", "peak_mem_mb")


def test_resume_continues_the_same_trajectory(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    shards = tiny_shard_root(tmp_path_factory)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(tiny_args(shards, straight, *RUN, "train.tensorboard=false"))
    assert not (straight / "tensorboard").exists()
    run_train(tiny_args(shards, split, *RUN, "--until", "6"))
    assert not (split / "bundle").exists() and (split / "checkpoints" / "latest").read_text().strip() == "step00000006"
    res = run_train(["--resume", str(split)])
    assert "resuming" in res.stderr and "steps 6 -> 12" in res.stderr
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    assert strip(metrics(straight)) == strip(metrics(split))  # same losses, lr, w and data at every step
    events = tensorboard_scalars(split / "tensorboard")  # one curve across the resume, as in metrics.jsonl
    assert events["train/loss"] == [(m["step"], pytest.approx(m["loss"])) for m in metrics(split, "train")]


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    res = run_train(["--resume", str(tmp_path / "nothing")], check=False)
    assert res.returncode == 2 and "no such config file" in res.stderr
