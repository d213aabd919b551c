#!/usr/bin/env python
"""Fill the missing cells of a table with a trained model, each conditioned on the observed cells of its row.

examples:
  # one completed table; observed cells are written back byte for byte
  python tools/impute.py --model runs/joint/bundle --input table.csv --output filled.csv

  # multiple imputation: filled-1.csv ... filled-5.csv and filled-uncertainty.csv
  python tools/impute.py --model runs/joint/bundle --input table.csv --output filled.csv --draws 5 --seed 1

  # Parquet in, Parquet out (the schema is kept; filled values are cast to it)
  python tools/impute.py --model runs/joint/bundle --input table.parquet --output filled.parquet

  # a column the model was not trained on, copied through unchanged
  python tools/impute.py --model runs/joint/bundle --input table.csv --output filled.csv --passthrough id

A cell is missing when it is empty or one of the model's missing-value texts
(as when the training table was sharded, e.g. NA or ?). Every column of the
input must be a column the model knows (else exit status 2); model columns
absent from the input are treated as unknown and not written. Numeric cells
are filled with the median of the sampled quantile bin (or a uniform draw
inside it with --numeric-decode uniform). The uncertainty summary has one line
per filled cell: the draws' most frequent value, their agreement (the share
of draws that gave it), the number of distinct values and, for numeric
columns, mean, standard deviation, min and max. Exit status: 0 done, 2 a
problem with the input (one line on stderr).
"""

from __future__ import annotations

import sys
from pathlib import Path

from maskdiff import cli


def build_parser():
    p = cli.parser(__doc__)
    cli.add_model(p)
    p.add_argument("--input", required=True, metavar="TABLE", help="CSV or Parquet table with missing cells")
    p.add_argument("--output", required=True, metavar="FILLED", help="where to write the completed table (same format as the input)")
    p.add_argument("--draws", type=int, default=1, metavar="K", help="write K completed tables and an uncertainty summary (default 1)")
    p.add_argument("--passthrough", default="", metavar="COLS", help="comma-separated columns the model does not know, copied unchanged")
    p.add_argument("--numeric-decode", default="median", choices=("median", "uniform"), help="value of a sampled numeric bin (default median)")
    cli.add_sampling(p, steps=32, batch_size=256)
    cli.add_output(p)
    return p


def outputs(output: Path, draws: int) -> tuple[list[Path], Path | None]:
    """The completed tables' paths and the uncertainty summary's (None for one draw)."""
    if draws == 1:
        return [output], None
    suffix = "".join(output.suffixes[-1:])
    stem = output.name[: len(output.name) - len(suffix)] if suffix else output.name
    return [output.with_name(f"{stem}-{k}{suffix}") for k in range(1, draws + 1)], output.with_name(f"{stem}-uncertainty.csv")


def run(args) -> int:
    from maskdiff.generation import sampler_options
    from maskdiff.imputation import impute, read_table, uncertainty, write_summary, write_table

    out = Path(args.output)
    if args.draws < 1:
        raise cli.UserError(f"--draws {args.draws}: must be >= 1")
    tables, summary = outputs(out, args.draws)
    cli.check_outputs(tables + ([summary] if summary else []), args.overwrite)
    bundle = cli.open_bundle(args.model, "tabular", args.device)
    adapter = bundle.adapters["tabular"]
    delimiter = adapter.options.get("delimiter", ",")
    na = [v.strip() for v in (adapter.options.get("na_values") or "").split(",") if v.strip()]
    table = read_table(args.input, delimiter, na)
    want = "parquet" if out.suffix.lower() in (".parquet", ".pq") else "csv"
    if want != table.kind:
        raise cli.UserError(f"--output {out}: the input is {table.kind}, so the output must be too (give a .{'parquet' if table.kind == 'parquet' else 'csv'} name)")
    passthrough = [c.strip() for c in args.passthrough.split(",") if c.strip()]
    imp = impute(bundle, table, sampler_options(args), cli.generator(args.seed, args.device), draws=args.draws, passthrough=passthrough,
                 batch_size=args.batch_size, device=args.device, progress=cli.show_progress(args.progress),
                 numeric_decode=args.numeric_decode, seed=args.seed)
    for path, filled in zip(tables, imp.draws):
        write_table(table, filled, path, delimiter)
    if summary:
        write_summary(uncertainty(imp), summary)
    rows = len({r for r, _ in imp.cells})
    wrote = ", ".join(map(str, tables[:3])) + (" ..." if len(tables) > 3 else "") + (f" and {summary}" if summary else "")
    print(f"filled {len(imp.cells)} cell(s) in {rows} of {table.num_rows} row(s), {args.draws} draw(s), "
          f"{imp.network_calls} network evaluations; wrote {wrote}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
