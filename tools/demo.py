#!/usr/bin/env python
"""The whole pipeline on the shipped data, end to end, with a report to look at.

Shards all four modalities (text, MNIST digits, proteins, the adult table),
trains the joint model of configs/joint.yaml, then samples an image grid
(class-conditional) and an inpainting, imputes held-back cells of held-out
table rows and scores them against a mode/mean baseline, generates and
infills proteins, infills and continues text, evaluates the ELBO on held-out
data against a unigram baseline, and writes OUT/report.md with the pictures,
loss curves and tables. About 10-15 minutes on a 2-core CPU.

examples:
  python tools/demo.py                      # everything, into outputs/ (run in runs/demo)
  python tools/demo.py --steps 200          # a shorter training run
  python tools/demo.py --reuse              # keep runs/demo's trained bundle, redo the rest

Each stage prints the equivalent tools/*.py command. The demo owns OUT and
RUN_DIR: a new run replaces both (with --reuse the run directory is kept).
Shards are built once under shards/ and reused. Exit status: 0 done, 2 a
problem with the input, 1 a stage failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def parse(argv: list[str] | None) -> argparse.Namespace:
    head, _, rest = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs", help="report folder (default outputs)")
    p.add_argument("--run-dir", default="runs/demo", help="training run directory (default runs/demo)")
    p.add_argument("--config", default="configs/joint.yaml", help="run configuration (default configs/joint.yaml)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default 1000, about 8 minutes on 2 cores)")
    p.add_argument("--reuse", action="store_true", help="reuse the bundle in --run-dir if there is one instead of training")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stages:
    """Runs tools in this process (or training in a child) and times each stage."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._modules: dict[str, object] = {}

    def tool(self, name: str, *args: object) -> None:
        argv = [str(a) for a in args]
        log("$ python " + shlex.join([f"tools/{name}.py", *argv]))
        mod = self._modules.get(name)
        if mod is None:
            spec = importlib.util.spec_from_file_location(f"maskdiff_tool_{name}", TOOLS / f"{name}.py")
            assert spec and spec.loader
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            self._modules[name] = mod
        code = mod.main(argv)  # type: ignore[attr-defined]
        if code != 0:
            raise SystemExit(code)

    def timed(self, stage: str):
        stages = self

        class _T:
            def __enter__(self):
                log(f"--- {stage} ---")
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                stages.times[stage] = time.perf_counter() - self.t0
                if exc[0] is None:
                    log(f"{stage}: {stages.times[stage]:.0f} s")

        return _T()


def train(args, st: Stages) -> Path:
    bundle = Path(args.run_dir) / "bundle"
    if args.reuse and (bundle / "bundle.json").is_file():
        log(f"reusing {bundle}")
        return bundle
    cmd = [sys.executable, str(TOOLS / "train.py"), "--config", args.config, "--overwrite", "--no-progress", f"run_dir={args.run_dir}",
           f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}", f"train.eval_every={max(25, args.steps // 5)}",
           f"train.log_every={max(10, args.steps // 25)}"]
    log("$ " + shlex.join(["python", *cmd[1:]]))
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(1)
    return bundle


def images(args, st: Stages, model: Path, out: Path, bundle) -> dict:
    from PIL import Image

    from maskdiff.generation import heldout_records

    labels = bundle.adapters["pixels"].labels
    classes = labels.categories[:10] if labels else []
    grid = out / "images" / "grid.png"
    st.tool("sample", "--model", model, "--num", 4 * max(1, len(classes)), *(["--label", *classes] if classes else []), "--steps", 48,
            "--seed", args.seed, "--output", grid, "--no-progress", "--overwrite")
    _, test = heldout_records(bundle, "pixels")
    real = out / "images" / "heldout.png"
    Image.fromarray(test[0]["image"].tokens.astype(np.uint8)[:, :, 0]).save(real)
    inpaint = out / "images" / "inpaint.png"
    st.tool("sample", "--model", model, "--input", real, "--keep", "top", "--num", 8, "--steps", 48, "--seed", args.seed,
            "--output", inpaint, "--no-progress", "--overwrite")
    return {"grid": grid, "real": real, "inpaint": inpaint, "classes": classes, "label": bundle.adapters["pixels"].decode(test[0])["label"]}


def tables(args, st: Stages, model: Path, out: Path, bundle) -> dict:
    from maskdiff.imputation import consensus, heldout_split, hide_cells, mode_mean_baseline, read_table, score, with_hidden, write_table

    adapter = bundle.adapters["tabular"]
    na = [v.strip() for v in adapter.options["na_values"].split(",") if v.strip()]
    train_t, test_t = heldout_split(bundle)
    rows = list(range(test_t.num_rows))
    truth = out / "tables" / "heldout-truth.csv"
    write_table(test_t, {}, truth)
    cells = hide_cells(test_t, list(adapter.columns), 0.2, np.random.default_rng(args.seed))
    masked = out / "tables" / "heldout-masked.csv"
    write_table(with_hidden(test_t, cells), {}, masked)
    filled = out / "tables" / "filled.csv"
    st.tool("impute", "--model", model, "--input", masked, "--output", filled, "--draws", 5, "--seed", args.seed, "--no-progress", "--overwrite")
    kinds = {c: adapter.kind(c) for c in adapter.columns}
    draws = [read_table(filled.with_name(f"filled-{k}.csv"), adapter.options["delimiter"], na) for k in range(1, 6)]
    per_draw = [{(r, c): d.values[r][c] for r, c in cells} for d in draws]
    return {"rows": len(rows), "cells": len(cells), "model": score(test_t, cells, consensus(per_draw, test_t.columns, kinds), kinds),
            "one_draw": score(test_t, cells, per_draw[0], kinds),
            "baseline": score(test_t, cells, mode_mean_baseline(train_t, cells, kinds), kinds), "kinds": kinds,
            "masked": masked, "filled": filled}


def proteins(args, st: Stages, model: Path, out: Path, bundle) -> dict:
    from maskdiff.adapters.protein import ALPHABET
    from maskdiff.generation import heldout_records

    gen = out / "proteins" / "generated.fasta"
    st.tool("protein", "--model", model, "--num", 8, "--steps", 64, "--seed", args.seed, "--output", gen, "--no-progress", "--overwrite")
    _, test = heldout_records(bundle, "protein")
    seq = "".join(ALPHABET[i] for i in test[0]["sequence"].tokens[:40])
    template = seq[:15] + "_" * 10 + seq[25:]
    infill = out / "proteins" / "infilled.fasta"
    st.tool("protein", "--model", model, "--template", template, "--num", 4, "--steps", 32, "--seed", args.seed, "--output", infill,
            "--no-progress", "--overwrite")
    return {"generated": gen, "infilled": infill, "template": template, "truth": seq}


def texts(args, st: Stages, model: Path, out: Path) -> dict:
    infill = out / "text" / "infilled.txt"
    template = "ROMEO:\\nI [MASK:6] the [MASK:4] night,\\nAnd [MASK:8]\\n"
    st.tool("text", "--model", model, "--template", template, "--num", 3, "--steps", 32, "--seed", args.seed, "--output", infill,
            "--no-progress", "--overwrite")
    cont = out / "text" / "continued.txt"
    st.tool("text", "--model", model, "--prompt", "First Citizen:\\n", "--length", 48, "--num", 2, "--steps", 48, "--seed", args.seed,
            "--output", cont, "--no-progress", "--overwrite")
    return {"infilled": infill, "continued": cont, "template": template}


def evaluation(args, st: Stages, model: Path, out: Path, bundle) -> dict:
    from maskdiff.evaluation import unigram_bits
    from maskdiff.generation import heldout_records, training_dirs

    dirs = [d for mod in bundle.config.modalities for d in training_dirs(bundle, mod)]
    path = out / "eval.json"
    st.tool("evaluate", "--model", model, "--shards", *dirs, "--repeats", 3, "--limit", 96, "--seed", args.seed, "--output", path, "--overwrite")
    result = json.loads(path.read_text())
    unigram = {}
    for mod in bundle.config.modalities:
        train, test = heldout_records(bundle, mod)
        unigram.update(unigram_bits(train, test[:96], bundle.spec))
    return {"eval": result, "unigram": unigram}


def write_report(out: Path, run_dir: Path, bundle, res: dict, times: dict[str, float]) -> Path:
    from maskdiff.report import Report

    rel = lambda p: Path(p).resolve().relative_to(out.resolve()).as_posix()  # noqa: E731
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    r = Report("maskdiff demo: one masked-diffusion model over text, digits, proteins and a table")
    r.para(f"Model: {bundle.info.get('parameters', 0) / 1e6:.2f}M parameters, trained {bundle.info.get('step')} steps on "
           f"{', '.join(bundle.config.modalities)} (schedules: "
           + ", ".join(f"{m} {bundle.config.schedules[m].kind}" for m in bundle.config.modalities)
           + f"). Total wall time {sum(times.values()) / 60:.1f} min.")
    r.table(["stage", "wall time (s)"], [[k, f"{v:.0f}"] for k, v in times.items()])
    r.heading("Loss curves")
    plots = sorted((out / "plots").glob("*.png"))
    for p in plots:
        r.image(rel(p), f"{p.stem} loss curve")
    if summary:
        r.para("Final held-out bits/token: " + ", ".join(f"{m} {b:.3f}" for m, b in summary.get("heldout_bits_per_token", {}).items()))
    im = res["images"]
    r.heading("Images (pixel by pixel, class-conditional)")
    r.para(f"Four samples of each class {', '.join(im['classes'])} (one row per class).")
    r.image(rel(im["grid"]), "sampled digits")
    r.para(f"Inpainting: the top half of a held-out digit (label {im['label']}) is kept, the rest is sampled 8 times.")
    r.image(rel(im["real"]), "held-out digit")
    r.image(rel(im["inpaint"]), "inpaintings")
    tb = res["tables"]
    r.heading("Tabular imputation (adult, held-out rows)")
    r.para(f"{tb['cells']} cells hidden at random (20%, at least one per row) in {tb['rows']} held-out rows; the model fills "
           "each conditioned on the rest of its row; the model's guess is the consensus of 5 draws (most frequent value, or the mean for numbers). Baseline: the training column's mode (categorical) or mean (numeric).")
    rows = []
    for name, m in tb["model"].items():
        if name == "all":
            continue
        b, one = tb["baseline"][name], tb["one_draw"][name]
        metric = "accuracy" if "accuracy" in m else "rmse"
        rows.append([name, metric, m["cells"], m[metric], one[metric], b[metric]])
    a, one, b = tb["model"]["all"], tb["one_draw"]["all"], tb["baseline"]["all"]
    rows.append(["**all categorical**", "accuracy", a["categorical_cells"], a["accuracy"], one["accuracy"], b["accuracy"]])
    rows.append(["**all numeric**", "RMSE / column std", a["numeric_cells"], a["nrmse"], one["nrmse"], b["nrmse"]])
    r.table(["column", "metric", "cells", "model (consensus)", "model (one draw)", "mode/mean"], rows)
    r.para(f"Files: [`{rel(tb['masked'])}`]({rel(tb['masked'])}), [`{rel(tb['filled'])}`]({rel(tb['filled'])}) "
           "(draws `filled-1..5.csv`, per-cell agreement in `filled-uncertainty.csv`).")
    pr = res["proteins"]
    r.heading("Proteins")
    r.para("Generated (lengths drawn from the training distribution, header field sampled too):")
    r.code(Path(pr["generated"]).read_text()[:1500], "text")
    r.para(f"Infilling the template `{pr['template']}` (a held-out sequence's first 40 residues, 10 masked; truth `{pr['truth']}`):")
    r.code(Path(pr["infilled"]).read_text(), "text")
    tx = res["text"]
    r.heading("Text")
    r.para(f"Infilling `{tx['template']}`:")
    r.code(Path(tx["infilled"]).read_text(), "text")
    r.para("Continuing `First Citizen:\\n` by 48 tokens:")
    r.code(Path(tx["continued"]).read_text(), "text")
    ev = res["eval"]
    r.heading("Likelihood on held-out data")
    r.para(f"ELBO in bits per token (bits/dim for the image pixels), mean ± standard error over {ev['eval']['repeats']} Monte Carlo "
           "passes, against a unigram model fitted on the training records (lower is better).")
    rows = []
    for mod, e in ev["eval"]["modalities"].items():
        rows.append([mod, e["records"], e["tokens"], f"{e['bits_per_token']:.3f} ± {e['stderr']:.3f}", ev["unigram"].get(mod, float("nan")),
                     f"{e['bits_per_dim']:.3f}" if "bits_per_dim" in e else "–"])
    r.table(["modality", "records", "tokens", "model bits/token", "unigram bits/token", "bits/dim (image)"], rows)
    return r.write(out / "report.md")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from maskdiff.cli import open_bundle, user_errors

    os.chdir(ROOT)  # the config's data and shard paths are relative to the repository

    t_start = time.perf_counter()
    out, run_dir = Path(args.out), Path(args.run_dir)
    st = Stages()
    try:
        with st.timed("train"):
            model = train(args, st)
        if out.exists():
            shutil.rmtree(out)
        (out / "images").mkdir(parents=True)
        bundle = open_bundle(model)
        if (run_dir / "plots").is_dir():
            shutil.copytree(run_dir / "plots", out / "plots")
        res: dict = {}
        with st.timed("images"):
            res["images"] = images(args, st, model, out, bundle)
        with st.timed("imputation"):
            res["tables"] = tables(args, st, model, out, bundle)
        with st.timed("proteins"):
            res["proteins"] = proteins(args, st, model, out, bundle)
        with st.timed("text"):
            res["text"] = texts(args, st, model, out)
        with st.timed("evaluation"):
            res["eval"] = evaluation(args, st, model, out, bundle)
        report = write_report(out, run_dir, bundle, res, st.times)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        print(f"error: a stage failed (exit status {e.code})", file=sys.stderr)
        return int(e.code or 1)
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min: open {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
