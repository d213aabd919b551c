#!/usr/bin/env python
"""Quality benchmarks against the tools a user would otherwise reach for (figures, not tests).

examples:
  # fit-and-impute on the shipped tables (adult, penguins) against scikit-learn's imputers
  python tools/bench_quality.py --only tables --output bench.json --markdown bench.md

  # any other table, with a smaller budget
  python tools/bench_quality.py --only tables --table my.csv --minutes 3

  # a trained model: held-out bits/token per modality, and class-conditional digits
  python tools/bench_quality.py --only likelihood images --model runs/pixels/bundle

* tables: in each table 20% of the observed cells are hidden (at least one
  per row); the one-command fit-and-impute path (tools/impute.py without
  --model, the default budget) learns from what is left and fills them. Per
  column: accuracy (categorical) and RMSE / std of the hidden values
  (numeric), beside the column mode / mean, 5-nearest-neighbour (numeric
  columns standardised), scikit-learn's IterativeImputer as it comes
  (Bayesian ridge regressions) and with a random forest (MissForest-style),
  categories as codes, fitted on the same hidden table; then the overall
  figures and the median numeric column.
* likelihood: ELBO bits/token of the model's held-out records per modality
  against a unigram model of its training records.
* images: class-conditional digits scored by two classifiers trained on
  the model's real training digits (a logistic regression, and a small
  convolutional network that is right far more often on real digits): how
  often each agrees with the requested class and its confidence, without
  guidance, with classifier-free guidance, and with guidance and nucleus
  sampling (--top-p); real held-out digits give each judge's reference.

Needs scikit-learn (the 'bench' extra). Exit status: 0 done, 2 a problem with
the input.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from maskdiff import cli
from maskdiff.commands.impute import DEFAULT_MINUTES  # noqa: E402
from maskdiff.commands.sample import SAMPLE_TOP_P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("tables", "likelihood", "images")
SHIPPED_TABLES = ("data/tabular/adult-sample.csv", "data/tabular/penguins.csv")


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--model", metavar="BUNDLE", help="likelihood / images: a trained bundle")
    p.add_argument("--only", nargs="+", choices=BENCHES, default=["tables"], help="benchmarks to run (default tables)")
    p.add_argument("--table", nargs="+", metavar="CSV", help=f"tables: the tables to use (default {' '.join(SHIPPED_TABLES)})")
    p.add_argument("--minutes", type=float, help="tables: fit-and-impute budget per table (default: tools/impute.py's)")
    p.add_argument("--hide", type=float, default=0.2, help="tables: fraction of observed cells hidden (default 0.2)")
    p.add_argument("--per-class", type=int, default=20, help="images: samples per class (default 20)")
    p.add_argument("--steps", type=int, default=64, help="images: sampling steps (default 64)")
    p.add_argument("--guidance", type=float, default=3.0, help="images: guidance weight of the guided runs (default 3)")
    p.add_argument("--top-p", type=float, default=SAMPLE_TOP_P, help=f"images: nucleus of the last guided run (default {SAMPLE_TOP_P}, tools/sample.py's)")
    p.add_argument("--limit", type=int, default=256, help="likelihood: held-out records per modality (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--output", metavar="FILE.json", help="write the JSON here instead of stdout")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the tables as Markdown")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


def sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise cli.UserError("this benchmark needs scikit-learn: pip install -e '.[bench]' (or pip install scikit-learn)") from None
    import sklearn.experimental.enable_iterative_imputer  # noqa: F401
    from sklearn import ensemble, impute, linear_model

    return impute, linear_model, ensemble


# --- tables -----------------------------------------------------------------------------------


def bench_table(path: Path, args) -> dict:
    from maskdiff.tasks.imputation import impute
    from maskdiff.tasks.imputation_quality import hide_cells, mode_mean_baseline, score, with_hidden
    from maskdiff.tasks.table_fit import fit_table
    from maskdiff.data.tables import read_table, write_table

    minutes = args.minutes or DEFAULT_MINUTES
    truth = read_table(path, ",", ["NA", "N/A", "?", "NaN", "null", "NULL"])
    cells = hide_cells(truth, truth.columns, args.hide, np.random.default_rng(args.seed))
    hidden = with_hidden(truth, cells)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / path.name
        write_table(hidden, {}, src)
        t0 = time.perf_counter()
        bundle_path, plan = fit_table(src, Path(tmp) / "run", minutes=minutes, seed=args.seed, log=lambda m: print(m, file=sys.stderr))
        fitted = time.perf_counter() - t0
        bundle = cli.open_bundle(bundle_path, "tabular")
        t0 = time.perf_counter()
        imp = impute(bundle, hidden, seed=args.seed)
        filled = time.perf_counter() - t0
        raw = impute(bundle, hidden, seed=args.seed, calibrate=False)  # the same fill without the held-out correction
    adapter = bundle.adapter("tabular")
    refused = {r for r, _ in imp.refused}  # rows the model cannot read (an inf): left as they are, not scored
    learned = [(r, c) for r, c in cells if truth.columns[c] in adapter.columns and r not in refused]
    kinds = {c: adapter.kind(c) for c in adapter.columns}
    results = {"model": score(truth, learned, imp.draws[0], kinds), "model, uncalibrated": score(truth, learned, raw.draws[0], kinds),
               "mode/mean": score(truth, learned, mode_mean_baseline(hidden, learned, kinds), kinds)}
    results.update(sklearn_baselines(truth, hidden, learned, kinds, args.seed))
    return {"table": str(path), "rows": truth.num_rows, "hidden_cells": len(learned), "refused_rows": len(refused),
            "passed_through": adapter.passthrough,
            "fit_seconds": round(fitted, 1), "impute_seconds": round(filled, 1), "steps": bundle.info["step"], "batch_rows": plan.batch_rows,
            "calibration": bundle.info.get("imputation_calibration", {}), "results": results}


def sklearn_baselines(truth, hidden, cells, kinds, seed: int) -> dict:
    from maskdiff.tasks.imputation_quality import score

    sk_impute, linear_model, ensemble = sklearn()
    names = [c for c in hidden.columns if c in kinds]
    X, books = _encode(hidden, names, kinds)
    numeric = [j for j, c in enumerate(names) if kinds[c] == "numeric"]
    mu, sd = np.nanmean(X[:, numeric], 0), np.nanstd(X[:, numeric], 0) + 1e-12
    out = {}
    forest = ensemble.RandomForestRegressor(n_estimators=100, n_jobs=2, random_state=seed)
    for name, imputer, scaled in (("5-NN", sk_impute.KNNImputer(n_neighbors=5), True),
                                  ("iterative linear", sk_impute.IterativeImputer(estimator=linear_model.BayesianRidge(), max_iter=10,
                                                                                  random_state=seed), False),
                                  ("iterative RF", sk_impute.IterativeImputer(estimator=forest, max_iter=5, random_state=seed), False)):
        Z = X.copy()
        if scaled:
            Z[:, numeric] = (Z[:, numeric] - mu) / sd
        t0 = time.perf_counter()
        F = imputer.fit_transform(Z)
        if scaled:
            F[:, numeric] = F[:, numeric] * sd + mu
        guesses = _decode(F, books, hidden.columns, names, cells)
        out[name] = score(truth, cells, guesses, kinds)
        out[name]["all"]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _encode(table, names, kinds):
    """A float matrix of the learned columns (categories as codes, missing as NaN) and the code books."""
    cols = [table.columns.index(c) for c in names]
    books = {j: sorted({str(r[c]) for r in table.values if r[c] is not None}) for j, c in enumerate(cols) if kinds[names[j]] == "categorical"}
    index = {j: {v: i for i, v in enumerate(b)} for j, b in books.items()}
    X = np.full((table.num_rows, len(cols)), np.nan)
    for i, row in enumerate(table.values):
        for j, c in enumerate(cols):
            if row[c] is not None:
                X[i, j] = index[j][str(row[c])] if j in books else float(row[c])
    return X, books


def _decode(F, books, columns, names, cells):
    where = {c: j for j, c in enumerate(names)}
    out = {}
    for r, c in cells:
        j = where[columns[c]]
        out[(r, c)] = books[j][int(np.clip(round(F[r, j]), 0, len(books[j]) - 1))] if j in books else float(F[r, j])
    return out


def tables_markdown(results: list[dict]) -> str:
    """One Markdown table per benchmarked table: per column, the model beside each baseline (best in bold)."""
    lines = []
    for res in results:
        methods = list(res["results"])
        lines += [f"**{Path(res['table']).name}** ({res['rows']} rows, {res['hidden_cells']} hidden cells; fit {res['fit_seconds']:.0f} s, "
                  f"impute {res['impute_seconds']:.1f} s)", "", "| column | metric | " + " | ".join(methods) + " |",
                  "|---|---|" + "---|" * len(methods)]
        model = res["results"]["model"]
        for col in [c for c in model if c != "all"]:
            metric = "accuracy" if "accuracy" in model[col] else "nrmse"
            lines.append(_markdown_row(col, metric == "accuracy", [res["results"][m][col][metric] for m in methods]))
        for label, figure in (("*all categorical*", "accuracy"), ("*all numeric*", "nrmse"), ("*median numeric column*", "median")):
            vals = [overall(res["results"][m], figure) for m in methods]
            if all(v is not None for v in vals):
                lines.append(_markdown_row(label, figure == "accuracy", vals))
        lines.append("")
    return "\n".join(lines)


def _markdown_row(label: str, accuracy: bool, vals: list[float]) -> str:
    """``| label | metric | v1 | v2 ... |`` with the best value (highest accuracy, lowest RMSE/std) in bold."""
    best = max(vals) if accuracy else min(vals)
    cells = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in vals]
    return f"| {label} | {'accuracy' if accuracy else 'RMSE/std'} | " + " | ".join(cells) + " |"


def overall(scores: dict, figure: str) -> float | None:
    """A method's accuracy over all categorical cells, RMSE/std over all numeric cells, or its median numeric column's RMSE/std."""
    if figure == "median":
        numeric = [v["nrmse"] for c, v in scores.items() if c != "all" and "nrmse" in v]
        return float(np.median(numeric)) if numeric else None
    return scores["all"][figure] if scores["all"].get("categorical_cells" if figure == "accuracy" else "numeric_cells") else None


# --- a trained model --------------------------------------------------------------------------


def bench_likelihood(bundle, args) -> dict:
    from maskdiff.tasks.evaluation import evaluate_records, summarise, unigram_bits
    from maskdiff.tasks.generation import training_and_heldout

    out = {}
    for mod in bundle.config.modalities:
        train, test = training_and_heldout(bundle, mod)
        test = test[: args.limit]
        s = summarise(evaluate_records(bundle, test, repeats=3, seed=args.seed), bundle.spec, len(test))[mod]
        out[mod] = {"model_bits_per_token": s["bits_per_token"], "stderr_over_records": s["stderr_over_records"], "unigram_bits_per_token": unigram_bits(train, test, bundle.spec)[mod],
                    "records": len(test)}
        if "bits_per_dim" in s:
            out[mod]["model_bits_per_dim"] = s["bits_per_dim"]
    return out


def logistic_judge(X: np.ndarray, y: np.ndarray, seed: int):
    """A logistic regression on the pixels: (images) -> (labels, confidences)."""
    _, linear_model, _ = sklearn()
    clf = linear_model.LogisticRegression(max_iter=500, random_state=seed).fit(X, y)
    return lambda imgs: (clf.predict(imgs), clf.predict_proba(imgs).max(1))


def cnn_judge(X: np.ndarray, y: np.ndarray, shape: tuple[int, int, int], seed: int, epochs: int = 8):
    """A small convolutional network (two 3x3 conv + pool layers, 8 passes of Adam; about 20 s on
    one core for 10,000 14x14 digits) on images of ``shape`` (h, w, c), flattened channels last:
    (images) -> (labels, confidences)."""
    import torch
    from torch import nn

    classes = np.unique(y)
    target = torch.as_tensor(np.searchsorted(classes, y))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    h, w, c = shape

    def as_images(a: np.ndarray):
        return torch.as_tensor(a, dtype=torch.float32).view(-1, h, w, c).permute(0, 3, 1, 2)

    net = nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (h // 4) * (w // 4), len(classes)))
    images = as_images(X)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(epochs):
        for b in torch.randperm(len(images), generator=g).split(64):
            loss = nn.functional.cross_entropy(net(images[b]), target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    def judge(imgs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            p = net(as_images(imgs)).softmax(-1).numpy()
        return classes[p.argmax(1)], p.max(1)

    return judge


def bench_images(bundle, args) -> dict:
    from maskdiff.tasks.generation import fill, training_and_heldout
    from maskdiff.tasks.images import image_records
    from maskdiff.core.sampler import SamplerOptions

    adapter = bundle.adapters["pixels"]
    if adapter.labels is None:
        raise cli.UserError(f"{args.model}: the pixels model was trained without class labels")
    if not 0 < args.top_p <= 1:
        raise cli.UserError(f"--top-p {args.top_p}: must be in (0, 1]")
    train, test = training_and_heldout(bundle, "pixels")

    def pixels(records) -> np.ndarray:
        return np.stack([r["image"].tokens.reshape(-1) for r in records]) / 255.0

    X, y = pixels(train), np.array([adapter.decode(r)["label"] for r in train])
    Xt, yt = pixels(test), np.array([adapter.decode(r)["label"] for r in test])
    judges = {"logistic regression": logistic_judge(X, y, args.seed), "CNN": cnn_judge(X, y, adapter.shape, args.seed)}
    out: dict = {"judges": {}}
    for name, judge in judges.items():
        pred, conf = judge(Xt)
        out["judges"][name] = {"heldout_accuracy": float((pred == yt).mean()), "real_confidence": float(conf.mean()), "heldout": len(yt)}
    classes = list(adapter.labels.categories)
    labels = [c for c in classes for _ in range(args.per_class)]
    out["samples"] = len(labels)
    label_support = bundle.spec.support_id("pixels/label")
    runs = {"no guidance": (0.0, 1.0), f"guidance {args.guidance:g}": (args.guidance, 1.0)}
    if args.top_p < 1:
        runs[f"guidance {args.guidance:g}, top-p {args.top_p:g}"] = (args.guidance, args.top_p)
    for run, (w, top_p) in runs.items():
        opts = SamplerOptions(steps=args.steps, guidance=w, guidance_supports=(label_support,) if w > 0 else (), top_p=top_p)
        t0 = time.perf_counter()
        done = fill(bundle, image_records(adapter, len(labels), labels), opts, cli.generator(args.seed))
        seconds = round(time.perf_counter() - t0, 1)
        imgs = pixels(done.records)
        out[run] = {"seconds": seconds}
        for name, judge in judges.items():
            pred, conf = judge(imgs)
            out[run][name] = {"agreement": float((pred == np.array(labels)).mean()), "confidence": float(conf.mean())}
    return out


def run(args) -> int:
    outputs = [p for p in (args.output, args.markdown) if p]
    cli.check_outputs(outputs, args.overwrite)
    if ("likelihood" in args.only or "images" in args.only) and not args.model:
        raise cli.UserError("--only likelihood / images need --model BUNDLE")
    if not 0 < args.hide < 1:
        raise cli.UserError(f"--hide {args.hide}: must be between 0 and 1")
    sklearn()
    result: dict = {}
    if "tables" in args.only:
        result["tables"] = []
        for path in args.table or [ROOT / t for t in SHIPPED_TABLES]:
            print(f"table {path} ...", file=sys.stderr, flush=True)
            result["tables"].append(bench_table(Path(path), args))
    if args.model:
        bundle = cli.open_bundle(args.model)
        result["model"] = {"path": args.model, "step": bundle.info.get("step")}
        for name, fn in (("likelihood", bench_likelihood), ("images", bench_images)):
            if name in args.only:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                result[name] = fn(bundle, args)
    text = json.dumps(result, indent=1) + "\n"
    if args.markdown and "tables" in result:
        cli.write_text(args.markdown, tables_markdown(result["tables"]))
    cli.emit(text, args.output, text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
