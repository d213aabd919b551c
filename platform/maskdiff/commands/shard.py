"""Turn raw files into token shards that training reads.

Writes DIR/<name>-000000.tar ... (webdataset), DIR/manifest.json (adapter state,
vocabulary spec, counts, per-shard sha256) and DIR/rejects.jsonl (every refused
input record with the reason). records_in == records_written + records_rejected.

examples:
  # the simplest: a FASTA file to DIR (crop at 1024 residues, terminal '*' stripped)
  python tools/shard.py --modality protein --input X.fasta --output DIR

  # proteins, cropped to 512 residues, organism and evidence level as conditions
  python tools/shard.py --modality protein --input data/protein/uniprot-trembl-2k.fasta.gz \\
      --output shards/uniprot --max-len 512 --condition OS,PE

  # a large FASTA, encoded by 2 processes (the same bytes as one)
  python tools/shard.py --modality protein --input big.fasta --output shards/big --workers 2

  # MNIST from its IDX files (labels paired automatically), 2000 images per shard
  python tools/shard.py --modality pixels --input data/pixels/mnist-t10k-images-idx3-ubyte.gz \\
      data/pixels/mnist-t10k-labels-idx1-ubyte.gz --output shards/mnist --shard-size 2000

  # an image folder with one sub-folder per class, resizing odd sizes to 32x32
  python tools/shard.py --modality pixels --input photos/ --output shards/photos --size 32x32 --resize

  # text: train a 4096-piece BPE model, windows of 256 tokens
  python tools/shard.py --modality text --input data/text/tinyshakespeare.txt --output shards/shakespeare \\
      --vocab-size 4096 --max-len 256

  # a table, 'year' forced categorical; then a second table with the same vocabulary
  python tools/shard.py --modality tabular --input data/tabular/penguins.csv --output shards/penguins --categorical year
  python tools/shard.py --modality tabular --input more-penguins.csv --output shards/penguins2 --state-from shards/penguins

  # two tables that both have a 'sex' column, to train together: each named (tabular/adult/col:sex, tabular/penguins/col:sex)
  python tools/shard.py --modality tabular --input data/tabular/adult-sample.csv --output shards/adult --name adult
  python tools/shard.py --modality tabular --input data/tabular/penguins.csv --output shards/penguins --name penguins

reading the shards back (what training uses):
  from maskdiff.data.shards import ShardSet
  data = ShardSet(["shards/uniprot", "shards/mnist"], shuffle_buffer=1000)   # .spec, .adapters
  for record in torch.utils.data.DataLoader(data, batch_size=None, num_workers=2): ...

exit status: 0 done (see rejects.jsonl for refused records), 2 a problem with the
input, the output folder or the options (one line on stderr), 130 interrupted
(nothing half-written is left in DIR).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from maskdiff.adapters import ADAPTERS, InputError, Option
from maskdiff.progress import add_progress_flags
from maskdiff.data.shards import DEFAULT_SHARD_SIZE, REJECTS, write_shards
from maskdiff.core.tokens import VocabMismatchError


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[Option, set[str]]]]:
    ap = argparse.ArgumentParser(prog="tools/shard.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", required=True, choices=sorted(ADAPTERS), help="what the input holds")
    ap.add_argument("--input", required=True, nargs="+", action="extend", metavar="PATH",
                    help="input files, folders (searched recursively) or glob patterns; text files, images / .npy / .npz / IDX, FASTA[.gz], CSV / Parquet")
    ap.add_argument("--output", required=True, metavar="DIR", help="shard directory to create (must not hold shards already, unless --overwrite)")
    ap.add_argument("--name", help="shard file name prefix and data set name (default: the modality); a table's columns and a FASTA file's "
                                   "header fields are named under it (tabular/NAME/col:age), so several tables train together")
    ap.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N", help=f"stored records (text: windows) per shard (default {DEFAULT_SHARD_SIZE})")
    ap.add_argument("--max-len", type=int, metavar="L", help="text: tokens per window (default 1024); protein: length limit, see --length-policy (default 1024)")
    ap.add_argument("--overwrite", action="store_true", help="replace the data set already in DIR (built aside, then swapped in whole: DIR always holds one complete data set; other files in DIR are kept)")
    ap.add_argument("--state-from", metavar="DIR", help="reuse the fitted adapter (vocabulary, bins, BPE model) of another shard directory of this modality")
    ap.add_argument("--workers", type=int, default=1, metavar="N", help="encode in N processes while this one reads the input (same output bytes as 1; default 1)")
    add_progress_flags(ap)
    owners: dict[str, tuple[Option, set[str]]] = {}
    for modality, cls in ADAPTERS.items():
        for opt in cls.options_spec:
            owners.setdefault(opt.key, (opt, set()))[1].add(modality)
    groups = {m: ap.add_argument_group(f"{m} options") for m in ADAPTERS}
    shared = ap.add_argument_group("options of several modalities")
    for key, (opt, mods) in owners.items():
        group = groups[next(iter(mods))] if len(mods) == 1 else shared
        extra = "" if len(mods) == 1 else f" [{', '.join(sorted(mods))}]"
        if opt.flag:
            group.add_argument(opt.cli, dest=key, action="store_true", default=None, help=opt.help + extra)
        else:
            group.add_argument(opt.cli, dest=key, type=opt.type, choices=opt.choices, metavar=opt.metavar, default=None, help=opt.help + extra)
    return ap, owners


def main(argv: list[str] | None = None) -> int:
    ap, owners = build_parser()
    args = ap.parse_args(argv)
    options: dict[str, Any] = {}
    for key, (opt, mods) in owners.items():
        value = getattr(args, key)
        if value is None:
            continue
        if args.modality not in mods:
            ap.error(f"{opt.cli} is a {'/'.join(sorted(mods))} option, not for --modality {args.modality}")
        options[key] = value

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        m = write_shards(args.modality, args.input, args.output, name=args.name, shard_size=args.shard_size, max_len=args.max_len,
                         overwrite=args.overwrite, state_from=args.state_from, progress=args.progress,
                         workers=args.workers, **options)
    except (InputError, VocabMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.output} holds no partial shards", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    size = sum(s["bytes"] for s in m["shards"]) / 1e6
    extra = f"; refused records and reasons in {args.output}/{REJECTS}" if m["records_rejected"] else ""
    windows = f" as {m['samples_written']} windows" if m["samples_written"] != m["records_written"] else ""
    print(f"{args.modality}: {m['records_in']} records in, {m['records_written']} written{windows}, {m['records_rejected']} rejected "
          f"-> {args.output} ({len(m['shards'])} shard(s), {size:.1f} MB){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
