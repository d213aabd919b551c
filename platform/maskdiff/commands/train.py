"""Train one masked-diffusion model over several modalities from a config, under DeepSpeed.

examples:
  # the joint model on all four shipped data sets (shards are built on first use)
  python tools/train.py --config configs/joint.yaml

  # overrides are OmegaConf key=value pairs
  python tools/train.py --config configs/text.yaml train.steps=500 optim.lr=3e-4 deepspeed.zero_stage=1

  # stop after step 200 with a checkpoint, later continue the same trajectory
  python tools/train.py --config configs/joint.yaml --until 200
  python tools/train.py --resume runs/joint

  # two processes on one machine (gloo on CPU, nccl on GPUs)
  torchrun --nproc_per_node 2 tools/train.py --config configs/joint.yaml
  deepspeed --num_gpus 2 tools/train.py --config configs/joint.yaml

  # several nodes (on each, R = its rank; SLURM and hostfile forms: docs/training.md)
  torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr node1 --master_port 29500 tools/train.py --config configs/joint.yaml

A run writes runs/<name>/ (config.yaml, metrics.jsonl, checkpoints/, bundle/,
plots/, summary.json); an existing run directory is only replaced with
--overwrite. Exit status: 0 done, 2 a problem with the config or the data
(one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# Read when torch loads OpenMP (libgomp): an idle worker thread spins 1,000 rounds before it sleeps, not
# 300,000, so a run beside another busy process keeps most of its speed (about 1.7x the default there,
# about 4% below it on an idle machine; docs/training.md). A wait policy the user set is left alone.
ENVIRONMENT = {} if "OMP_WAIT_POLICY" in os.environ else {"GOMP_SPINCOUNT": "1000"}
for _key, _value in ENVIRONMENT.items():
    os.environ.setdefault(_key, _value)

from maskdiff.progress import add_progress_flags  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML run configuration (see configs/)")
    src.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--until", type=int, metavar="STEP", help="stop after this step with a checkpoint (the LR schedule still spans train.steps)")
    add_progress_flags(p)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from maskdiff.cli import one_line, user_errors
    from maskdiff.config import ConfigError, load_config
    from maskdiff.config import to_run_config
    from maskdiff.training.run_dir import CONFIG, run_dir_of
    from maskdiff.training.trainer import train

    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's or launcher's stop: same as Ctrl-C
    run_dir = args.resume
    try:
        if args.resume:
            cfg = load_config(Path(args.resume) / CONFIG, args.overrides)
            if cfg.run_dir != args.resume and Path(cfg.run_dir or "").resolve() != Path(args.resume).resolve():
                cfg.run_dir = args.resume
        else:
            cfg = load_config(args.config, args.overrides)
        run_dir = str(run_dir_of(to_run_config(cfg)))
        if args.until is not None and args.until < 1:
            raise ConfigError(f"--until {args.until}: must be >= 1")
        train(cfg, resume=bool(args.resume), overwrite=args.overwrite, until=args.until, progress=args.progress)
    except user_errors() as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = f"; continue from the latest checkpoint with --resume {run_dir}" if run_dir else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
