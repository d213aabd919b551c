"""Fill the missing cells of a table, each conditioned on the observed cells of its row.

examples:
  # learn a model from the table's own observed cells, then fill it (one command)
  python tools/impute.py --input table.csv --output filled.csv

  # the same within 3 minutes; the run (shards, config, model) goes to runs/my-table
  python tools/impute.py --input table.csv --output filled.csv --minutes 3 --run-dir runs/my-table

  # reuse a fitted model (printed at the end of a fit), or a model trained with tools/train.py
  python tools/impute.py --model runs/my-table/model/bundle --input more.csv --output more-filled.csv

  # multiple imputation: filled-1.csv ... filled-5.csv and filled-uncertainty.csv
  python tools/impute.py --model runs/my-table/model/bundle --input table.csv --output filled.csv --draws 5 --seed 1

  # Parquet in, Parquet out (the schema is kept; filled values are cast to it)
  python tools/impute.py --input table.parquet --output filled.parquet

  # a model trained on several tables (e.g. configs with adult and penguins): fill penguin rows
  python tools/impute.py --model runs/tables/bundle --dataset penguins --input penguins-rows.csv --output filled.csv

By default each missing cell gets one best guess: the most probable category,
or for a numeric column the mean of the model's distribution over the
column's bins (each bin at the mean of its training values). Cells missing
together in a row are filled one at a time, the one the model is surest of
first, each conditioned on those already filled. A model fitted here also
corrects its best guesses with what it learned on a tenth of the observed
cells set aside before training: per numeric column, a shrinkage toward the
column mean; per categorical column, the mode where the mode did better
(--no-calibration turns this off). --draws K instead writes K
completed tables drawn from the model (cells filled in random order, each
value drawn from its conditional) and an uncertainty summary with one line
per filled cell: the draws' most frequent value, their agreement, the number
of distinct values and, for numeric columns, mean, standard deviation, min
and max.

Without --model, the table itself is the training data: it is sharded,
a model is sized to the table and trained until --minutes is spent (which
covers fitting and filling; the default fits a table of about 5,000 rows x 20
columns on 2 CPU cores), calibrated, and the run directory is printed for
reuse. Free-text
and identifier columns (many distinct values, most seen once), dates and
columns with no observed value are passed through unchanged, with a note. A
table with nothing missing is reported and copied to --output unchanged.

A cell is missing when it is empty or one of the missing-value texts (by
default NA, N/A, ?, NaN, null, NULL; a model remembers those it was trained
with). Observed cells are written back byte for byte. Exit status: 0 done, 2
a problem with the input (one line on stderr).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

# Read when torch loads OpenMP: idle OpenMP threads yield the core (no collapse under load).
ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
for _key, _value in ENVIRONMENT.items():
    os.environ.setdefault(_key, _value)

from maskdiff import cli
from maskdiff.progress import progress_enabled  # noqa: E402

DEFAULT_MINUTES = 8.0


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--model", metavar="BUNDLE", help="a trained bundle (default: learn one from --input itself)")
    p.add_argument("--input", required=True, metavar="TABLE", help="CSV or Parquet table with missing cells")
    p.add_argument("--output", required=True, metavar="FILLED", help="where to write the completed table (same format as the input)")
    p.add_argument("--draws", type=int, default=0, metavar="K", help="write K completed tables drawn from the model and an uncertainty summary "
                   "(default 0: one best guess per cell)")
    p.add_argument("--temperature", type=float, default=1.0, help="--draws: softmax temperature of each draw (default 1)")
    p.add_argument("--no-calibration", dest="calibrate", action="store_false",
                   help="best guess: the model's own, without the held-out correction a fitted bundle stores")
    p.add_argument("--passthrough", default="", metavar="COLS", help="comma-separated columns to copy unchanged (not learned, not filled)")
    p.add_argument("--dataset", metavar="NAME", help="--model learned several tables: fill the input as this one (default: the one whose "
                   "columns the input holds most of)")
    fit = p.add_argument_group("fitting (without --model)")
    fit.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help=f"time budget for fitting and filling (default {DEFAULT_MINUTES:g})")
    fit.add_argument("--run-dir", metavar="DIR", help="where the fitted run goes (default runs/impute-<input name>)")
    fit.add_argument("--na-values", metavar="LIST", help="cell texts that mean missing, comma-separated (default NA,N/A,?,NaN,null,NULL)")
    fit.add_argument("--delimiter", default=",", metavar="CHAR", help="CSV field delimiter (default ,)")
    fit.add_argument("--categorical", metavar="COLS", help="columns to treat as categorical though they hold numbers")
    g = p.add_argument_group("running")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same output (default 0)")
    g.add_argument("--batch-size", type=int, default=512, help="rows filled together (default 512)")
    g.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads (default min(2, cores))")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    cli.add_output(p)
    return p


def outputs(output: Path, draws: int) -> tuple[list[Path], Path | None]:
    """The completed tables' paths and the uncertainty summary's (None for the best guess)."""
    if draws == 0:
        return [output], None
    suffix = "".join(output.suffixes[-1:])
    stem = output.name[: len(output.name) - len(suffix)] if suffix else output.name
    return [output.with_name(f"{stem}-{k}{suffix}") for k in range(1, draws + 1)], output.with_name(f"{stem}-uncertainty.csv")


def fit_options(args) -> dict:
    options = {"delimiter": args.delimiter}
    for key in ("na_values", "categorical", "passthrough"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    return options


def run(args) -> int:
    import torch

    from maskdiff.tasks.imputation import check_columns, impute, table_adapter, tables_of, uncertainty, write_summary
    from maskdiff.tasks.table_fit import fit_table
    from maskdiff.data.tables import read_table, write_table

    started = time.perf_counter()
    if args.threads < 1:
        raise cli.UserError(f"--threads {args.threads}: must be >= 1")
    torch.set_num_threads(args.threads)
    out, source = Path(args.output), Path(args.input)
    if args.draws < 0:
        raise cli.UserError(f"--draws {args.draws}: must be >= 0")
    if args.dataset and not args.model:
        raise cli.UserError("--dataset names a table of --model; without --model the model is learned from --input alone")
    tables, summary = outputs(out, args.draws)
    cli.check_outputs(tables + ([summary] if summary else []), args.overwrite)
    if source.resolve() in {t.resolve() for t in tables}:
        raise cli.UserError(f"--output {out}: is the input; give another file name")
    delimiter = args.delimiter
    na = [v.strip() for v in (args.na_values or "NA,N/A,?,NaN,null,NULL").split(",") if v.strip()]
    bundle = cli.open_bundle(args.model, "tabular", args.device) if args.model else None
    if bundle is not None and (args.dataset or len(tables_of(bundle)) < 2):  # else the table read as given tells which
        adapter = table_adapter(bundle, dataset=args.dataset)
        delimiter = adapter.options.get("delimiter", ",")
        na = [v.strip() for v in (adapter.options.get("na_values") or "").split(",") if v.strip()]
    table = read_table(source, delimiter, na)
    want = "parquet" if out.suffix.lower() in (".parquet", ".pq") else "csv"
    if want != table.kind:
        raise cli.UserError(f"--output {out}: the input is {table.kind}, so the output must be too (give a .{'parquet' if table.kind == 'parquet' else 'csv'} name)")
    passthrough = [c.strip() for c in args.passthrough.split(",") if c.strip()]
    if bundle is not None:
        check_columns(table, table_adapter(bundle, table.columns, args.dataset), passthrough)
    if not any(v is None for row in table.values for v in row):
        with cli.atomic_path(tables[0]) as tmp:
            shutil.copyfile(source, tmp)
        print(f"{source}: no cell is missing; copied it unchanged to {tables[0]}")
        return 0
    if bundle is None:
        run_dir = Path(args.run_dir or Path("runs") / f"impute-{source.name.split('.')[0]}")
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        path, _ = fit_table(source, run_dir, minutes=args.minutes, adapter_options=fit_options(args), seed=args.seed,
                            overwrite=args.overwrite, progress=progress_enabled(args.progress), log=log)
        bundle = cli.open_bundle(path, "tabular", args.device)
        log(f"fitted in {time.perf_counter() - started:.0f} s; reuse it with --model {path}")
    t0 = time.perf_counter()
    imp = impute(bundle, table, draws=args.draws, temperature=args.temperature, passthrough=passthrough, batch_size=args.batch_size,
                 device=args.device, progress=progress_enabled(args.progress), seed=args.seed, calibrate=args.calibrate, dataset=args.dataset)
    for path, filled in zip(tables, imp.draws):
        write_table(table, filled, path, delimiter)
    if summary:
        write_summary(uncertainty(imp), summary)
    if imp.refused:
        shown = "; ".join(f"data row {r + 1}: {why}" for r, why in imp.refused[:3])
        print(f"{len(imp.refused)} row(s) the model cannot read are left as they are ({shown}{' ...' if len(imp.refused) > 3 else ''})",
              file=sys.stderr)
    rows = len({r for r, _ in imp.cells})
    wrote = ", ".join(map(str, tables[:3])) + (" ..." if len(tables) > 3 else "") + (f" and {summary}" if summary else "")
    what = f"{args.draws} draw(s)" if args.draws else "best guess"
    print(f"filled {len(imp.cells)} cell(s) in {rows} of {table.num_rows} row(s), {what}, {imp.network_calls} network calls "
          f"in {time.perf_counter() - t0:.1f} s; wrote {wrote}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
