"""Generate or infill protein sequences with a trained model and write them as FASTA.

examples:
  # 20 new sequences, lengths drawn from the training length distribution
  python tools/protein.py --model runs/joint/bundle --num 20 --output new.fasta

  # fixed length, conditioned on a header field the model was trained with
  python tools/protein.py --model runs/joint/bundle --num 10 --length 80 --condition PE=1 --output pe1.fasta

  # infill a motif template: keep M, K, T ... L, L, V, design the 4 residues at the underscores
  python tools/protein.py --model runs/joint/bundle --template MKT____LLV --num 5 --output infill.fasta

Templates use one letter per residue and _ (or - or ?) for each residue to
fill. Without --template and --length, lengths are drawn from the training
length distribution stored in the bundle (older bundles: the training shards,
found through the bundle's config), or from --lengths-from DIR. Header fields not given with --condition are sampled too
and written into each FASTA header as KEY=value. The same --seed gives the
same sequences. Exit status: 0 done, 2 a problem with the input (one line on
stderr).
"""

from __future__ import annotations

import sys
from pathlib import Path

from maskdiff import cli
from maskdiff.progress import progress_enabled


def build_parser():
    p = cli.parser(__doc__)
    cli.add_model(p)
    p.add_argument("--output", required=True, metavar="OUT.fasta", help="FASTA file to write")
    p.add_argument("--num", type=int, default=10, help="number of sequences (default 10)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--template", metavar="SEQ", help="masked template, e.g. MKT____LLV")
    what.add_argument("--length", type=int, help="length of every generated sequence")
    p.add_argument("--lengths-from", nargs="+", metavar="DIR", default=[], help="protein shard directories to draw lengths from")
    p.add_argument("--condition", nargs="+", default=[], metavar="KEY=VALUE", help="header fields to condition on, e.g. PE=1")
    p.add_argument("--dataset", metavar="NAME", help="the model learned several FASTA data sets: generate as this one (its header fields)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight on the given conditions (default 0 = off)")
    p.add_argument("--prefix", default="sample", help="FASTA ids are PREFIX-1, PREFIX-2, ... (default sample)")
    cli.add_sampling(p, steps=64)
    cli.add_output(p)
    return p


def check_prefix(prefix: str) -> str:
    """A FASTA id prefix: printable, without whitespace or '>' (which would start another record)."""
    if not prefix or any(c.isspace() or not c.isprintable() or c == ">" for c in prefix):
        raise cli.UserError(f"--prefix {prefix!r}: must be non-empty, without spaces, line breaks, control characters or '>'")
    return prefix


def check_lengths_from(dirs: list[str]) -> None:
    """--lengths-from must name protein shard directories."""
    from maskdiff.data.shards import load_manifest

    for d in dirs:
        modality = load_manifest(d).get("modality")
        if modality != "protein":
            raise cli.UserError(f"--lengths-from {d}: holds {modality} shards, not protein")


def header_text(value: object) -> str:
    """A condition value as header text: one line, no '>'."""
    return "_".join(str(value).replace(">", "_").split())


def fasta(records: list[tuple[str, str]], width: int = 60) -> str:
    return "".join(f">{header}\n" + "".join(seq[i : i + width] + "\n" for i in range(0, len(seq), width)) for header, seq in records)


def run(args) -> int:
    import numpy as np

    from maskdiff.tasks.generation import conditions, fill, length_sampler, parse_pairs
    from maskdiff.tasks.templates import protein_template
    from maskdiff.core.tokens import MISSING, Field, Record

    from maskdiff.adapters.protein import ALPHABET, RESIDUE

    if args.num < 1:
        raise cli.UserError(f"--num {args.num}: must be >= 1")
    if args.length is not None and args.length < 1:
        raise cli.UserError(f"--length {args.length}: must be >= 1")
    check_prefix(args.prefix)
    out = Path(args.output)
    cli.check_outputs([out], args.overwrite)
    check_lengths_from(args.lengths_from)
    bundle = cli.open_bundle(args.model, "protein", args.device)
    adapter = bundle.adapter("protein", args.dataset)
    cli.check_count(args.num, adapter.max_len + len(adapter.vocabs or {}))
    given = conditions(adapter.vocabs or {}, parse_pairs(args.condition), "--condition")
    rng = np.random.default_rng(args.seed)
    if args.template:
        templates = [protein_template(args.template, ALPHABET, adapter.max_len)] * args.num
    else:
        if args.length is not None:
            if args.length > adapter.max_len:
                raise cli.UserError(f"--length {args.length}: longer than the {adapter.max_len} residues the model was trained on")
            lengths = np.full(args.num, args.length)
        else:
            lengths = rng.choice(length_sampler(bundle, "protein", "sequence", args.lengths_from), size=args.num)
        templates = [np.full(int(n), MISSING, dtype=np.int64) for n in lengths]
    records = []
    for i, tokens in enumerate(templates):
        fields = [Field("sequence", RESIDUE, tokens.copy())]
        fields += [Field(k, adapter.support_name(k), np.array([given.get(k, MISSING)])) for k in (adapter.vocabs or {})]
        records.append(Record(fields, {"index": i}))
    supports = [bundle.spec.support_id(adapter.support_name(k)) for k in given] if args.guidance > 0 else []
    cli.check_fill_memory(bundle, records, args.batch_size, args.device)
    filled = fill(bundle, records, cli.sampler_options(args, supports), cli.generator(args.seed, args.device), batch_size=args.batch_size,
                  device=args.device, progress=progress_enabled(args.progress))
    entries = []
    for i, rec in enumerate(filled.records, 1):
        d = adapter.decode(rec)
        tags = " ".join(f"{header_text(k)}={header_text(v)}" for k, v in d["conditions"].items())
        entries.append((f"{args.prefix}-{i} {tags} length={len(d['sequence'])}".replace("  ", " "), d["sequence"]))
    cli.write_text(out, fasta(entries))
    print(f"wrote {len(entries)} sequence(s) to {out}, {filled.network_calls} network evaluations")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
