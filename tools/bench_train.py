#!/usr/bin/env python
"""Training throughput and peak memory, 1 and N processes, against the loader's throughput alone.

For each config and process count, trains ``--steps`` steps with tools/train.py
(DeepSpeed, gloo on CPU) in a scratch run directory and reads tokens/s (valid
tokens over all processes per second of training steps, excluding evaluation
and checkpoints) and peak memory (the largest process) from its summary. Then
times the data loader alone on the first config (the same mixed, shuffled,
padded batches, in one process) and reports loader tokens/s divided by the
one-process training tokens/s: above 1 the loader is not the bottleneck.

``--packing`` instead compares unpacked and packed batches (``data.pack``)
on the first config: the padding fraction of the loader's batches (padding
positions / all positions) and the useful (ELBO) tokens/s of one-process
training, each run ``--repeats`` times in turns, printed beside each other
with their ratio, the thread count and the load average.

example:
  python tools/bench_train.py --configs configs/text.yaml configs/joint.yaml --procs 1 2 --steps 30
  python tools/bench_train.py --packing --configs configs/joint.yaml --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
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
            f"train.eval_every={10 * steps}", f"train.checkpoint_every={10 * steps}", "train.eval_batches=1", "train.plots=false", "train.tensorboard=false", *overrides,
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


def loader_padding(config: str, overrides: list[str], batches: int) -> tuple[float, float]:
    """Padding positions / all positions of the first ``batches`` training batches, and their mean size in positions."""
    from maskdiff.config import load_config, to_run_config
    from maskdiff.data.loader import ensure_shards, open_sources, train_dataset

    rc = to_run_config(load_config(config, overrides))
    ensure_shards(rc)
    sets, spec = open_sources(rc, 0, 1, shuffle_buffer=rc.data.shuffle_buffer, seed=rc.seed, repeat=True)
    it = iter(train_dataset(rc, sets, spec, 0))
    pad = positions = 0
    for _ in range(batches):
        b = next(it)
        pad, positions = pad + int(b.pad.sum()), positions + b.pad.numel()
    return pad / positions, positions / batches


def packing_comparison(config: str, steps: int, repeats: int, batches: int, overrides: list[str]) -> dict:
    """Unpacked against packed batches on one config: loader padding and one-process training tokens/s."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    load = os.getloadavg()
    print(f"packing on {config}: {steps} steps x {repeats} runs each, in turns; {threads} thread(s) of {os.cpu_count()} cores; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    modes = {"unpacked": ["data.pack=false"], "packed": ["data.pack=true"]}
    out: dict = {"config": config, "steps": steps, "repeats": repeats, "threads": threads, "load_avg_before": load}
    for name, extra in modes.items():
        pad, size = loader_padding(config, overrides + extra, batches)
        out[name] = {"padding": pad, "positions_per_batch": size, "tokens_per_s": []}
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        for i in range(repeats):
            for name, extra in modes.items():
                s = train_once(config, 1, steps, Path(tmp) / f"{name}-{i}", overrides + extra)
                out[name]["tokens_per_s"].append(s["tokens_per_s"])
                print(f"  run {i + 1} {name:8s} {s['tokens_per_s']:10,.0f} useful tokens/s", flush=True)
    for name in modes:
        out[name]["median_tokens_per_s"] = statistics.median(out[name]["tokens_per_s"])
    before, after = out["unpacked"], out["packed"]
    out["tokens_per_s_ratio"] = after["median_tokens_per_s"] / before["median_tokens_per_s"]
    out["load_avg_after"] = os.getloadavg()
    print(f"{'':10s} {'padding':>8s} {'positions/batch':>16s} {'useful tokens/s':>16s}")
    for name in modes:
        r = out[name]
        print(f"{name:10s} {r['padding']:8.2%} {r['positions_per_batch']:16,.0f} {r['median_tokens_per_s']:16,.0f}")
    print(f"{'ratio':10s} {'':8s} {after['positions_per_batch'] / before['positions_per_batch']:15.2f}x "
          f"{out['tokens_per_s_ratio']:15.2f}x   (padding over {batches} loader batches; tokens/s: median of {repeats} runs; "
          f"load average now {out['load_avg_after'][0]:.2f})")
    return out


def loader_throughput(config: str, overrides: list[str], batches: int) -> float:
    """Valid tokens per second of the training batch stream alone (one process, no workers)."""
    from maskdiff.config import load_config, to_run_config
    from maskdiff.data.loader import ensure_shards, open_sources, train_dataset

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
    p.add_argument("--packing", action="store_true", help="only compare unpacked and packed batches on the first config")
    p.add_argument("--repeats", type=int, default=2, help="--packing: training runs per mode, in turns")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = p.parse_intermixed_args(argv)
    if args.packing:
        out = packing_comparison(args.configs[0], args.steps, args.repeats, args.loader_batches, args.overrides)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return 0
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
