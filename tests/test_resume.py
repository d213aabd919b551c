"""Resume: N steps straight equals N/2 steps, a fresh process, and N/2 more."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from adapter_fixtures import PENGUINS
from shard_server import served  # noqa: F401  (a fixture)
from training_support import ROOT, TRAIN, env, metrics, run_train, tensorboard_scalars, tiny_args, tiny_shard_root, weights

pytestmark = pytest.mark.slow
RUN = ["train.steps=12", "train.log_every=2", "train.eval_every=6", "train.checkpoint_every=4", "data.bucket=3"]
TIMING = ("tokens_per_s", "peak_mem_mb")


def assert_same_run(straight: Path, resumed: Path) -> None:
    """The same final weights, and the same losses, lr, w and data at every logged step (timings aside)."""
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    assert strip(metrics(straight)) == strip(metrics(resumed))


def test_resume_continues_the_same_trajectory(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    shards = tiny_shard_root(tmp_path_factory)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(tiny_args(shards, straight, *RUN, "train.tensorboard=false"))
    assert not (straight / "tensorboard").exists()
    run_train(tiny_args(shards, split, *RUN, "--until", "6"))
    assert not (split / "bundle").exists() and (split / "checkpoints" / "latest").read_text().strip() == "step00000006"
    res = run_train(["--resume", str(split)])
    assert "resuming" in res.stderr and "steps 6 -> 12" in res.stderr
    assert_same_run(straight, split)
    events = tensorboard_scalars(split / "tensorboard")  # one curve across the resume, as in metrics.jsonl
    assert events["train/loss"] == [(m["step"], pytest.approx(m["loss"])) for m in metrics(split, "train")]


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    res = run_train(["--resume", str(tmp_path / "nothing")], check=False)
    assert res.returncode == 2 and "no such config file" in res.stderr


def test_a_run_streaming_over_http_killed_mid_run_resumes_to_the_weights_of_an_uninterrupted_one(
        served, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: F811
    """The table streamed from a local HTTP server, text from disk, packed batches; the process is killed (SIGKILL)
    after its first checkpoint and resumed: the same weights and per-step losses as a run never interrupted."""
    from maskdiff.data.shards import write_shards

    root, url, _ = served
    write_shards("tabular", [PENGUINS], root / "penguins", shard_size=50, bins=16, progress=False)
    run = [f"data.sources.tabular.dirs=['{url}/penguins']", "data.pack=true", "train.steps=60", "train.log_every=5",
           "train.eval_every=60", "train.checkpoint_every=10"]
    shards = tiny_shard_root(tmp_path_factory)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(tiny_args(shards, straight, *run))
    proc = subprocess.Popen(TRAIN + tiny_args(shards, killed, *run) + ["--no-progress"], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = killed / "checkpoints" / "latest", time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9 and not (killed / "bundle").exists(), "the run ended before it could be killed"
    res = run_train(["--resume", str(killed)])
    assert "resuming" in res.stderr and "-> 60" in res.stderr
    assert_same_run(straight, killed)
