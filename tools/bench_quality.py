#!/usr/bin/env python
"""Quality benchmarks of a trained joint model on its held-out data (figures, not tests).

examples:
  # after `make demo` (or tools/train.py --config configs/joint.yaml): all benchmarks, JSON to stdout
  python tools/bench_quality.py --model runs/demo/bundle

  # only imputation and likelihood, results to a file
  python tools/bench_quality.py --model runs/demo/bundle --only impute likelihood --output bench.json

* impute: held-out rows of the training table with 20% of cells hidden;
  accuracy (categorical) and RMSE / column std (numeric) of the model against
  mode/mean, k-nearest-neighbour and iterative imputation (scikit-learn).
* likelihood: ELBO bits/token of held-out proteins and text (bits/dim of
  images) against a unigram model of the training records.
* images: class-conditional samples scored by a logistic-regression
  classifier trained on the real training images: how often it agrees with
  the requested class, its mean confidence, and the class balance of
  unconditional samples; real held-out images give the reference.

Needs the model's training shards (under the config's shard_root) and, for
the k-NN / iterative baselines and the classifier, scikit-learn (the 'bench'
extra). Exit status: 0 done, 2 a problem with the input.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np

from maskdiff import cli

BENCHES = ("impute", "likelihood", "images")


def build_parser():
    p = cli.parser(__doc__)
    cli.add_model(p)
    p.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES), help="benchmarks to run (default all)")
    p.add_argument("--per-class", type=int, default=20, help="images: samples per class (default 20)")
    p.add_argument("--steps", type=int, default=48, help="sampling steps (default 48)")
    p.add_argument("--limit", type=int, default=256, help="likelihood: held-out records per modality (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--output", metavar="FILE.json", help="write the JSON here instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise cli.UserError("this benchmark needs scikit-learn: pip install -e '.[bench]' (or pip install scikit-learn)") from None
    import sklearn.experimental.enable_iterative_imputer  # noqa: F401
    from sklearn import impute, linear_model

    return impute, linear_model


def bench_impute(bundle, args) -> dict:
    from maskdiff.imputation import consensus, heldout_split, hide_cells, impute, mode_mean_baseline, score, with_hidden
    from maskdiff.sampler import SamplerOptions

    sk_impute, _ = sklearn()
    adapter = bundle.adapters["tabular"]
    train, test = heldout_split(bundle)
    cells = hide_cells(test, list(adapter.columns), 0.2, np.random.default_rng(args.seed))
    kinds = {c: adapter.kind(c) for c in adapter.columns}
    imp = impute(bundle, with_hidden(test, cells), SamplerOptions(steps=args.steps), cli.generator(args.seed), draws=5)
    out = {"rows": test.num_rows, "cells": len(cells), "model (consensus of 5 draws)": score(test, cells, consensus(imp.draws, test.columns, kinds), kinds)["all"],
           "model (one draw)": score(test, cells, imp.draws[0], kinds)["all"],
           "mode/mean": score(test, cells, mode_mean_baseline(train, cells, kinds), kinds)["all"]}
    X_train, X_test = _encode(train, kinds), _encode(with_hidden(test, cells), kinds)
    for name, imputer in (("knn", sk_impute.KNNImputer(n_neighbors=5)), ("iterative", sk_impute.IterativeImputer(max_iter=10, random_state=args.seed))):
        filled = _decode(imputer.fit(X_train[0]).transform(X_test[0]), X_test[1], test.columns, kinds)
        out[name] = score(test, cells, {c: filled[c] for c in cells}, kinds)["all"]
    return out


def _encode(table, kinds):
    """Numeric matrix (categories as codes, missing as NaN) and the code books, for scikit-learn."""
    books = {}
    X = np.full((table.num_rows, len(table.columns)), np.nan)
    for j, name in enumerate(table.columns):
        if kinds[name] == "categorical":
            books[j] = sorted({str(r[j]) for r in table.values if r[j] is not None})
    for i, row in enumerate(table.values):
        for j, v in enumerate(row):
            if v is not None:
                X[i, j] = books[j].index(str(v)) if j in books and str(v) in books[j] else (np.nan if j in books else float(v))
    return X, books


def _decode(X, books, columns, kinds):
    out = {}
    for i in range(X.shape[0]):
        for j, name in enumerate(columns):
            v = X[i, j]
            out[(i, j)] = books[j][int(np.clip(round(v), 0, len(books[j]) - 1))] if j in books else float(v)
    return out


def bench_likelihood(bundle, args) -> dict:
    from maskdiff.evaluation import evaluate_records, summarise, unigram_bits
    from maskdiff.generation import heldout_records

    out = {}
    for mod in bundle.config.modalities:
        train, test = heldout_records(bundle, mod)
        test = test[: args.limit]
        s = summarise(evaluate_records(bundle, test, repeats=3, seed=args.seed), bundle.spec, len(test))[mod]
        out[mod] = {"model_bits_per_token": s["bits_per_token"], "stderr": s["stderr"], "unigram_bits_per_token": unigram_bits(train, test, bundle.spec)[mod],
                    "records": len(test)}
        if "bits_per_dim" in s:
            out[mod]["model_bits_per_dim"] = s["bits_per_dim"]
    return out


def bench_images(bundle, args) -> dict:
    from maskdiff.generation import fill, heldout_records
    from maskdiff.images import image_records
    from maskdiff.sampler import SamplerOptions

    _, linear_model = sklearn()
    adapter = bundle.adapters["pixels"]
    train, test = heldout_records(bundle, "pixels")
    X = np.stack([r["image"].tokens.reshape(-1) for r in train]) / 255.0
    y = np.array([adapter.decode(r)["label"] for r in train])
    clf = linear_model.LogisticRegression(max_iter=300).fit(X, y)
    Xt = np.stack([r["image"].tokens.reshape(-1) for r in test]) / 255.0
    yt = np.array([adapter.decode(r)["label"] for r in test])
    classes = list(adapter.labels.categories) if adapter.labels else []
    labels = [c for c in classes for _ in range(args.per_class)]
    cond = fill(bundle, image_records(adapter, len(labels), labels), SamplerOptions(steps=args.steps), cli.generator(args.seed))
    uncond = fill(bundle, image_records(adapter, len(labels)), SamplerOptions(steps=args.steps), cli.generator(args.seed + 1))

    def scored(records):
        imgs = np.stack([r["image"].tokens.reshape(-1) for r in records]) / 255.0
        return clf.predict(imgs), clf.predict_proba(imgs).max(1)

    pc, confc = scored(cond.records)
    pu, confu = scored(uncond.records)
    balance = Counter(pu.tolist())
    return {"classifier_heldout_accuracy": float((clf.predict(Xt) == yt).mean()), "real_confidence": float(clf.predict_proba(Xt).max(1).mean()),
            "conditional_agreement": float((pc == np.array(labels)).mean()), "conditional_confidence": float(confc.mean()),
            "unconditional_confidence": float(confu.mean()),
            "unconditional_class_share": {c: balance.get(c, 0) / len(pu) for c in classes}, "samples": len(labels)}


def run(args) -> int:
    if args.output:
        cli.check_outputs([args.output], args.overwrite)
    bundle = cli.open_bundle(args.model)
    result = {"model": args.model, "step": bundle.info.get("step")}
    for name, fn in (("impute", bench_impute), ("likelihood", bench_likelihood), ("images", bench_images)):
        if name in args.only:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result[name] = fn(bundle, args)
    text = json.dumps(result, indent=1) + "\n"
    cli.emit(text, args.output, text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
