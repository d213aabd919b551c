"""Training the tiny config under DeepSpeed: one process, two processes (gloo), metrics and outputs."""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from adapter_fixtures import PENGUINS
from shard_server import corrupt_first_header, served  # noqa: F401  (served: a fixture)
from training_support import TINY, metrics, run_train, run_two_nodes, tensorboard_scalars, tiny_args, tiny_shard_root, weights

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
    # the loss mixes modalities in proportions that vary per token-budgeted batch: compare one modality
    first, last = (sum(m["bits_per_token"]["text"] for m in ms) / 2 for ms in (train[:2], train[-2:]))
    assert last < 0.9 * first, (first, last)
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
    events = tensorboard_scalars(one_process / "tensorboard")  # the same figures as metrics.jsonl
    for kind in ("train", "eval"):
        for mod in ("text", "tabular"):
            want = [(m["step"], pytest.approx(m["bits_per_token"][mod])) for m in metrics(one_process, kind)]
            assert events[f"{kind}/bits_per_token/{mod}"] == want
    assert [s for s, _ in events["train/tokens_per_s"]] == list(range(5, 41, 5))
    tags = sorted(p.name for p in (one_process / "checkpoints").glob("step*"))
    assert tags == ["step00000020", "step00000040"]
    assert (one_process / "checkpoints" / "latest").read_text().strip() == "step00000040"


SHORT = ["train.steps=8", "train.log_every=4", "train.eval_every=8", "train.checkpoint_every=8"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-step run of the tiny config by one node with two processes (torchrun, gloo, ZeRO 0)."""
    run = tmp_path_factory.mktemp("two") / "zero0"
    res = run_train(tiny_args(tiny_shard_root(tmp_path_factory), run, *SHORT, "deepspeed.zero_stage=0"), procs=2)
    assert "2 process(es)" in res.stderr
    return run


def test_two_processes_gloo_zero2_matches_zero0(two_processes: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """2 ranks: each trains on its own part of the data; ZeRO-2 gives ZeRO-0's weights."""
    zero2 = tmp_path / "zero2"
    res = run_train(tiny_args(tiny_shard_root(tmp_path_factory), zero2, *SHORT, "deepspeed.zero_stage=2"), procs=2)
    assert "2 process(es)" in res.stderr
    train = metrics(zero2, "train")
    assert all(math.isfinite(m["loss"]) for m in train) and set(train[-1]["bits_per_token"]) == {"text", "tabular"}
    a, b = weights(two_processes), weights(zero2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert sorted(p.name for p in (zero2 / "checkpoints" / "step00000008").glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_train_the_same_weights_as_one_node_with_two_processes(
        launcher: str, two_processes: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two one-process "nodes" on localhost (torchrun --nnodes 2, or the DeepSpeed launcher with a two-host hostfile)
    form the same two ranks as one node with two processes: the same data split and gradient sums, bit for bit."""
    nodes = tmp_path / "nodes"
    errs = run_two_nodes(tiny_args(tiny_shard_root(tmp_path_factory), nodes, *SHORT, "deepspeed.zero_stage=0"), launcher, tmp_path)
    assert "2 process(es)" in errs[0]  # rank 0 is on node 0 and says how many processes joined
    a, b = weights(two_processes), weights(nodes)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[0]}"
    curves = [[(m["kind"], m["step"], m.get("loss"), m["bits_per_token"]) for m in metrics(run)] for run in (nodes, two_processes)]
    assert curves[0] == curves[1]
    assert sorted(p.name for p in (nodes / "checkpoints" / "step00000008").glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]


def test_bad_shard_records_skipped_on_every_rank_and_worker_are_counted_in_metrics_and_summary(served, tmp_path: Path) -> None:
    """2 processes x 2 loader workers stream a table over HTTP (data.bad_shards=skip) in which the first shard of reader 0
    (rank 0, worker 0) and of reader 3 (rank 1, worker 1) is corrupt: the first metrics line and the summary count the
    records of both, skipped in two worker processes of two ranks; a resumed run carries the count on."""
    from maskdiff.data.shards import ShardSet, write_shards

    root, url, _ = served
    manifest = write_shards("tabular", [PENGUINS], root / "penguins", shard_size=20, bins=16, progress=False)
    ends = list(itertools.accumulate(entry["records"] for entry in manifest["shards"]))
    shard_of = {r.meta["id"]: bisect.bisect_right(ends, k) for k, r in enumerate(ShardSet(root / "penguins"))}  # unshuffled: in order
    readers = ShardSet(root / "penguins", shuffle_buffer=1, seed=0)  # as the run reads it: shard order shuffled with the seed
    bad = [manifest["shards"][shard_of[next(readers.stream(k, 4)).meta["id"]]] for k in (0, 3)]
    for entry in bad:
        corrupt_first_header(root / "penguins" / entry["file"])
    run = tmp_path / "run"
    res = run_train(tiny_args(tmp_path / "shards", run, "data.sources.text.weight=0", f"data.sources.tabular.dirs=['{url}/penguins']",
                              "data.bad_shards=skip", "data.workers=2", "data.shuffle_buffer=1", "data.batch_size=4", "data.heldout=0",
                              "seed=0", "train.steps=4", "train.log_every=2", "train.checkpoint_every=4", "--until", "2"), procs=2)
    want = sum(entry["records"] for entry in bad)
    assert [m["skipped_records"] for m in metrics(run, "train")] == [want]  # by step 2 every worker gave a batch
    assert json.loads((run / "summary.json").read_text())["skipped_records"] == want
    # each reader's own warning, printed in its worker process
    assert sorted(re.findall(r"(\d+) record\(s\) of it skipped here", res.stderr)) == sorted(str(entry["records"]) for entry in bad)
    assert f"{want} record(s) of bad shards skipped" in res.stderr
    # resumed, each reader draws its current bucket again, its bad shard included, and does not count it twice
    res = run_train(["--resume", str(run)], procs=2)
    assert len(re.findall(r"record\(s\) of it skipped here", res.stderr)) == 2
    assert [m["skipped_records"] for m in metrics(run, "train")] == [want, 0]
    assert json.loads((run / "summary.json").read_text())["skipped_records"] == want


# --- the loader alone (no engine) ------------------------------------------------------------


def _rows(batches) -> Counter:
    return Counter(tuple(row[valid].tolist()) for b in batches for row, valid in zip(b.tokens, ~b.pad))


def _loader(shards: Path, rank: int, world: int, *overrides: str, start: dict | None = None):
    from maskdiff.config import load_config, to_run_config
    from maskdiff.data.loader import open_sources, train_dataset

    rc = to_run_config(load_config(TINY, [f"data.shard_root={shards}", *overrides]))
    sets, spec = open_sources(rc, rank, world, shuffle_buffer=rc.data.shuffle_buffer, seed=rc.seed, repeat=True)
    return train_dataset(rc, sets, spec, rank, start=start), sets, rc


def test_ranks_and_workers_read_disjoint_records(tmp_path_factory: pytest.TempPathFactory) -> None:
    """2 ranks x 2 DataLoader workers: within an epoch no training record comes out twice."""
    from maskdiff.core.batch import collate
    from maskdiff.data.loader import batches
    from maskdiff.data.shards import ShardSet
    from maskdiff.data.split import training_records

    shards = tiny_shard_root(tmp_path_factory)
    seen: list = []
    for rank in (0, 1):
        ds, sets, rc = _loader(shards, rank, 2, "data.sources.text.weight=0", "data.batch_size=1", "data.bucket=1")
        train = list(training_records(ShardSet(sets["tabular"].dirs), rc.data.heldout))
        it = batches(ds, workers=2)
        seen += [next(it) for _ in range(len(train) // 2 - 10)]  # a little less than one epoch per rank
    everything = _rows(collate([r], ds.spec) for r in train)
    got = _rows(seen)
    assert sum(got.values()) == len(seen) > 0.9 * len(train)
    assert not (got - everything), "a record was read twice within an epoch"


def test_stream_resumes_at_a_saved_position(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Starting at a saved position gives exactly the batches that followed it (also with workers, mid-turn),
    and a position saved with another worker count is refused with what to do."""
    from maskdiff.data.loader import PositionMismatch, batches

    shards = tiny_shard_root(tmp_path_factory)
    for workers in (0, 2):
        full = batches(_loader(shards, 0, 1, f"data.workers={workers}", "data.pack=false")[0], workers)  # packed: test_packing.py
        head = [next(full) for _ in range(5)]
        position = json.loads(json.dumps(full.position()))  # as saved in a checkpoint
        head += [next(full) for _ in range(6)]
        tail = batches(_loader(shards, 0, 1, f"data.workers={workers}", "data.pack=false", start=position)[0], workers)
        for a in head[5:]:
            b = next(tail)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.support_ids, b.support_ids)
    with pytest.raises(PositionMismatch, match=r"data.workers=2; this run has 1 with data.workers=0. Resume with the same"):
        batches(_loader(shards, 0, 1, start=position)[0], 0)
    mixed = {m for b in head for m in b.modality_ids[~b.pad].unique().tolist()}
    assert len(mixed) == 2 and any(b.pad.any() for b in head)  # both modalities, padded batches


def test_learning_rate_decay_follows_the_time_budget_when_it_runs_out_first() -> None:
    from maskdiff.config import load_config, to_run_config
    from maskdiff.training.optimizer import lr_lambda
    from maskdiff.training.time_budget import TimeBudget

    rc = to_run_config(load_config(TINY, ["train.steps=1000", "optim.warmup_steps=10", "optim.decay=cosine", "optim.min_lr_ratio=0.1"]))
    budget = TimeBudget(1.0, torch.device("cpu"))
    f = lr_lambda(rc, budget)
    at_step_100 = f(100)  # 90 of 990 decay steps
    assert at_step_100 == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 90 / 990)))
    budget.spent = 0.5  # half the time is gone: the decay is half way although the steps are not
    assert f(100) == pytest.approx(0.1 + 0.9 * 0.5) and f(5) == pytest.approx(0.6)  # warmup is by steps
    budget.spent = 2.0
    assert f(100) == pytest.approx(0.1)
    assert TimeBudget(None, torch.device("cpu")).tick() is False


def test_a_time_budget_stops_the_run_with_a_bundle(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = tmp_path / "timed"
    res = run_train(tiny_args(tiny_shard_root(tmp_path_factory), run, "train.steps=100000", "train.minutes=0.05",
                              "train.log_every=1000000", "train.eval_every=1000000", "optim.warmup_steps=1"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["out_of_time"] and 1 <= summary["step"] < 100000
    assert "train.minutes=0.05 spent" in res.stderr
    assert (run / "bundle" / "bundle.json").is_file()
    from maskdiff.config import load_config, to_run_config

    optim = to_run_config(load_config(run / "config.yaml")).optim
    last = metrics(run, "train")[-1]
    # by steps the decay would hardly have begun (tens of 100,000 steps); by time it is at (or a step from) the floor
    assert last["step"] == summary["step"] and optim.lr * optim.min_lr_ratio <= last["lr"] < 0.3 * optim.lr


def test_a_stop_file_spends_the_budget_at_once() -> None:
    from maskdiff.training.time_budget import TimeBudget

    with tempfile.TemporaryDirectory() as tmp:
        stop = Path(tmp) / "STOP"
        budget = TimeBudget(None, torch.device("cpu"), stop)
        assert budget.tick() is False and budget.spent == 0.0
        stop.touch()
        assert budget.tick() is True and budget.spent >= 1.0 and budget.stop_requested


def test_a_stop_file_ends_the_run_with_its_bundle_and_a_stale_one_does_not(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "STOP").touch()  # left by an earlier start: must not stop this one

    def stop_after_step_3() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").is_file() else ""
            if any(f'"step": {k},' in text for k in (3, 4, 5)):
                (run / "STOP").touch()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=stop_after_step_3, daemon=True)
    watcher.start()
    res = run_train(tiny_args(tiny_shard_root(tmp_path_factory), run, "train.steps=100000", "train.log_every=1",
                              "train.eval_every=1000000", "--overwrite"))
    watcher.join(timeout=5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and 3 <= summary["step"] < 100000
    assert "asked for a stop" in res.stderr and (run / "bundle" / "bundle.json").is_file()
