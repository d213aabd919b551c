"""Helpers for the training tests: shared tiny shards and tools/train.py runs in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TRAIN = [sys.executable, str(ROOT / "tools" / "train.py")]
# the DeepSpeed op compiled on first use is cached in the (gitignored) build folder
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))


def tiny_shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config's shards, built once per pytest run from the shipped data."""
    from maskdiff.config import load_config, to_run_config
    from maskdiff.data.loader import ensure_shards

    root = tmp_path_factory.getbasetemp() / "tiny-shards"
    ensure_shards(to_run_config(load_config(TINY, [f"data.shard_root={root}"])), log=lambda _: None)
    return root


def env() -> dict[str, str]:
    e = dict(os.environ, TORCH_EXTENSIONS_DIR=EXTENSIONS, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], *, procs: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``tools/train.py ARGS`` in a fresh process (``procs`` > 1: under torchrun, gloo)."""
    if procs == 1:
        cmd = TRAIN + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(free_port())] + TRAIN[1:] + args
    res = subprocess.run(cmd + ["--no-progress"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-4000:]}")
    return res


def run_two_nodes(args: list[str], launcher: str, workdir: Path, timeout: int = 300) -> list[str]:
    """``tools/train.py ARGS`` as two one-process "nodes" on this machine, started side by side and meeting at one
    free localhost port; returns each node's stderr. ``launcher``: ``torchrun`` (``--nnodes 2 --node_rank R``) or
    ``deepspeed`` (a two-host hostfile, each node started with ``--no_ssh --node_rank R``)."""
    port = free_port()
    if launcher == "torchrun":
        node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port), "--node_rank"]
    elif launcher == "deepspeed":
        hostfile = workdir / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        node = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--master_addr", "127.0.0.1", "--master_port", str(port), "--node_rank"]
    else:
        raise ValueError(f"launcher {launcher!r}: torchrun or deepspeed")
    nodes = [subprocess.Popen(node + [str(rank)] + TRAIN[1:] + args + ["--no-progress"], cwd=ROOT, env=env(), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True) for rank in (0, 1)]
    errs = []
    try:
        for rank, p in enumerate(nodes):
            _, err = p.communicate(timeout=timeout)
            errs.append(err)
            if p.returncode != 0:
                raise AssertionError(f"{launcher} node {rank} exited {p.returncode}:\n{err[-4000:]}")
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the node's launcher and its worker
                p.wait()
    return errs


def tiny_args(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["--config", str(TINY), f"data.shard_root={shards}", f"run_dir={run_dir}", *overrides]


def metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [m for m in lines if kind is None or m["kind"] == kind]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "bundle" / "model.safetensors"))


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the TensorBoard event files in ``log_dir`` (purged events left out, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
