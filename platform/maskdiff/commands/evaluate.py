"""Evaluate a trained model's ELBO on shards: bits per token per modality (bits per dimension for images).

examples:
  # the held-out split of the training shards (found automatically), JSON on stdout
  python tools/evaluate.py --model runs/joint/bundle --shards shards/shakespeare shards/mnist14

  # other data sharded with the model's adapter state, 8 Monte Carlo passes, JSON to a file
  python tools/evaluate.py --model runs/joint/bundle --shards new-proteins/ --repeats 8 --output eval.json

Shards must have been written with the model's vocabulary (for new data:
tools/shard.py --state-from the training shards); otherwise the tool stops
with exit status 2. --split auto (default) evaluates only the held-out records
(the trainer's split) of directories the model was trained on and every record
of the others. Each of --repeats passes draws one masking time per record;
the JSON gives per modality the bits/token (total nats over total tokens, each
record averaged over the passes) with its standard error over records
(stderr_over_records), the token count, and a per-field breakdown (for pixels, bits_per_dim
counts the image alone). Exit status: 0 done, 2 a problem with the input (one
line on stderr).
"""

from __future__ import annotations

import json
import sys

from maskdiff import cli


def build_parser():
    p = cli.parser(__doc__)
    cli.add_model(p)
    p.add_argument("--shards", nargs="+", required=True, metavar="DIR", help="shard directories (any modalities the model knows)")
    p.add_argument("--split", default="auto", choices=("auto", "heldout", "all"), help="which records to use (default auto)")
    p.add_argument("--repeats", type=int, default=4, help="Monte Carlo passes over the records (default 4)")
    p.add_argument("--limit", type=int, help="at most this many records per modality")
    p.add_argument("--batch-size", type=int, default=32, help="records per batch (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--output", metavar="FILE.json", help="write the JSON here instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def run(args) -> int:
    from maskdiff.tasks.evaluation import evaluate_records, shard_records, summarise

    if args.output:
        cli.check_outputs([args.output], args.overwrite)
    if args.limit is not None and args.limit < 1:
        raise cli.UserError(f"--limit {args.limit}: must be >= 1")
    bundle = cli.open_bundle(args.model, None, args.device)
    by_mod, splits = shard_records(bundle, args.shards, args.split, args.limit)
    report = {"model": str(args.model), "step": bundle.info.get("step"), "repeats": args.repeats, "splits": splits, "modalities": {}}
    for mod, records in by_mod.items():
        tally = evaluate_records(bundle, records, repeats=args.repeats, batch_size=args.batch_size, seed=args.seed, device=args.device)
        report["modalities"].update(summarise(tally, bundle.spec, len(records)))
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    lines = [f"{m}: {e['bits_per_token']:.3f} bits/token"
             + (f" ± {e['stderr_over_records']:.3f} (standard error over records)" if e["stderr_over_records"] is not None else "")
             for m, e in report["modalities"].items()]
    cli.emit(text, args.output, f"wrote {args.output}: " + "; ".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
