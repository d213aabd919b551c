#!/usr/bin/env python
"""Training throughput and peak memory, 1 and N processes, against the loader's throughput alone.

For each config and process count, trains ``--steps`` steps with tools/train.py
(DeepSpeed, gloo on CPU) in a scratch run directory and reads tokens/s (valid
tokens over all processes per second of training steps, excluding evaluation
and checkpoints) and peak memory (the largest process) from its summary. Then
times the data loader alone on the first config (the same mixed, shuffled,
padded batches, in one process) and reports loader tokens/s divided by the
one-process training tokens/s: above 1 the loader is not the bottleneck.

example:
  python tools/bench_train.py --configs configs/text.yaml configs/joint.yaml --procs 1 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_once(config: str, procs: int, steps: int, run_dir: Path, overrides: list[str]) -> dict:
    args = [str(ROOT / "tools" / "train.py"), "--config", config, f"run_dir={run_dir}", f"train.steps={steps}", f"train.log_every={steps}",
            f"train.eval_every={10 * steps}", f"train.checkpoint_every={10 * steps}", "train.eval_batches=1", "train.plots=false", *overrides,
            "--no-progress"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{config} with {procs} process(es) failed:\n{res.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def loader_throughput(config: str, overrides: list[str], batches: int) -> float:
    """Valid tokens per second of the training batch stream alone (one process, no workers)."""
    from maskdiff.config import load_config, to_run_config
    from maskdiff.loader import ensure_shards, open_sources, train_dataset

    rc = to_run_config(load_config(config, overrides))
    ensure_shards(rc)
    sets, spec = open_sources(rc, 0, 1, shuffle_buffer=rc.data.shuffle_buffer, seed=rc.seed, repeat=True)
    it = iter(train_dataset(rc, sets, spec, 0))
    next(it)  # fill the shuffle buffers
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(next(it).valid.sum())
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/text.yaml", "configs/joint.yaml"])
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--loader-batches", type=int, default=300)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = p.parse_intermixed_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for config in args.configs:
            for procs in args.procs:
                s = train_once(config, procs, args.steps, Path(tmp) / f"{Path(config).stem}-{procs}", args.overrides)
                rows.append({"config": config, "processes": procs, "tokens_per_s": s["tokens_per_s"], "peak_mem_mb": s["peak_mem_mb"],
                             "parameters": s["parameters"]})
                print(f"{config:24s} {procs} proc  {s['tokens_per_s']:10,.0f} tokens/s  peak {s['peak_mem_mb']:7.0f} MiB  "
                      f"({s['parameters'] / 1e6:.2f}M params)", flush=True)
    results: dict = {"train": rows, "steps": args.steps}
    for config in args.configs:
        loader = loader_throughput(config, args.overrides, args.loader_batches)
        train1 = next(r["tokens_per_s"] for r in rows if r["config"] == config and r["processes"] == min(args.procs))
        results.setdefault("loader", []).append({"config": config, "tokens_per_s": loader, "ratio_to_training": loader / train1})
        print(f"loader alone ({config}): {loader:,.0f} tokens/s = {loader / train1:,.0f}x the {min(args.procs)}-process training rate")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
