#!/usr/bin/env python
"""The whole pipeline on the shipped data, end to end, with a report to look at.

Shards all four modalities (text, MNIST digits, proteins, the adult table),
trains the joint model of configs/joint.yaml, and beside it a model for each
headline task: a class-conditional digit model (configs/pixels.yaml) and a
model of the adult table fitted by the one-command imputation path. Then it
samples class-conditional digits (with guidance) and an inpainting, hides 20%
of the table's cells and fills them (scored against the column mode / mean),
generates and infills proteins, infills and continues text, evaluates the
ELBO on held-out data against a unigram baseline, and writes OUT/report.md
with the pictures, loss curves and tables. About 25 minutes on a 2-core CPU.

examples:
  python tools/demo.py                      # everything, into outputs/ (run in runs/demo)
  python tools/demo.py --steps 200 --pixels-steps 300 --impute-minutes 1   # a quick look
  python tools/demo.py --reuse              # keep runs/demo's trained bundle, redo the rest

Each stage prints the equivalent tools/*.py command. The demo owns OUT and
RUN_DIR: a new run replaces both (with --reuse the run directory is kept).
Shards are built once under shards/ and reused. Exit status: 0 done, 2 a
problem with the input, 1 a stage failed.
"""

from __future__ import annotations

import argparse
import importlib
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
    p.add_argument("--pixels-steps", type=int, default=2000, help="digit model training steps (default 2000, about 10 minutes; configs/pixels.yaml trains 4000)")
    p.add_argument("--impute-minutes", type=float, default=3.0, help="budget of the table model's fit and fill (default 3)")
    p.add_argument("--reuse", action="store_true", help="reuse the bundle in --run-dir if there is one instead of training")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stages:
    """Runs tools in this process (or training in a child) and times each stage."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def tool(self, name: str, *args: object) -> None:
        argv = [str(a) for a in args]
        log("$ python " + shlex.join([f"tools/{name}.py", *argv]))
        code = importlib.import_module(f"maskdiff.commands.{name}").main(argv)
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


def train(args, config: str, run_dir: Path, steps: int) -> Path:
    bundle = run_dir / "bundle"
    if args.reuse and (bundle / "bundle.json").is_file():
        log(f"reusing {bundle}")
        return bundle
    cmd = [sys.executable, str(TOOLS / "train.py"), "--config", config, "--overwrite", "--no-progress", f"run_dir={run_dir}",
           f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={max(25, steps // 5)}",
           f"train.log_every={max(10, steps // 25)}"]
    log("$ " + shlex.join(["python", *cmd[1:]]))
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(1)
    return bundle


def images(args, st: Stages, model: Path, joint: Path, out: Path, bundle) -> dict:
    from PIL import Image

    from maskdiff.tasks.generation import training_and_heldout

    labels = bundle.adapters["pixels"].labels
    classes = labels.categories[:10] if labels else []
    grids = {}
    for name, path, guidance in (("grid", model, 3.0), ("joint-grid", joint, 0.0)):
        grids[name] = out / "images" / f"{name}.png"
        st.tool("sample", "--model", path, "--num", 4 * max(1, len(classes)), *(["--label", *classes] if classes else []), "--steps", 64,
                "--guidance", guidance, "--seed", args.seed, "--output", grids[name], "--no-progress", "--overwrite")
    _, test = training_and_heldout(bundle, "pixels")
    real = out / "images" / "heldout.png"
    Image.fromarray(test[0]["image"].tokens.astype(np.uint8)[:, :, 0]).save(real)
    inpaint = out / "images" / "inpaint.png"
    st.tool("sample", "--model", model, "--input", real, "--keep", "top", "--num", 8, "--steps", 64, "--seed", args.seed,
            "--output", inpaint, "--no-progress", "--overwrite")
    return {**grids, "real": real, "inpaint": inpaint, "classes": classes, "label": bundle.adapters["pixels"].decode(test[0])["label"]}


def tables(args, st: Stages, joint: Path, out: Path, bundle) -> dict:
    from maskdiff.tasks.imputation_quality import hide_cells, mode_mean_baseline, score, with_hidden
    from maskdiff.data.tables import read_table, write_table

    adapter = bundle.adapter("tabular")
    source = Path(bundle.config.data.build[bundle.config.data.sources["tabular"].dirs[0]].inputs[0])
    na = [v.strip() for v in adapter.options["na_values"].split(",") if v.strip()]
    truth = read_table(source, adapter.options["delimiter"], na)
    cells = hide_cells(truth, truth.columns, 0.2, np.random.default_rng(args.seed))
    masked = out / "tables" / "masked.csv"
    write_table(with_hidden(truth, cells), {}, masked)
    filled = out / "tables" / "filled.csv"
    st.tool("impute", "--input", masked, "--output", filled, "--minutes", args.impute_minutes, "--run-dir", Path(args.run_dir).with_name("demo-adult"),
            "--seed", args.seed, "--no-progress", "--overwrite")
    kinds = {c: adapter.kind(c) for c in adapter.columns}
    got = read_table(filled, adapter.options["delimiter"], na)
    guess = {(r, c): got.values[r][c] for r, c in cells}
    joint_filled = out / "tables" / "filled-by-joint.csv"
    st.tool("impute", "--model", joint, "--input", masked, "--output", joint_filled, "--seed", args.seed, "--no-progress", "--overwrite")
    jt = read_table(joint_filled, adapter.options["delimiter"], na)
    return {"rows": truth.num_rows, "cells": len(cells), "model": score(truth, cells, guess, kinds),
            "joint": score(truth, cells, {(r, c): jt.values[r][c] for r, c in cells}, kinds),
            "baseline": score(truth, cells, mode_mean_baseline(with_hidden(truth, cells), cells, kinds), kinds), "kinds": kinds,
            "masked": masked, "filled": filled}


def proteins(args, st: Stages, model: Path, out: Path, bundle) -> dict:
    from maskdiff.adapters.protein import ALPHABET
    from maskdiff.tasks.generation import training_and_heldout

    gen = out / "proteins" / "generated.fasta"
    st.tool("protein", "--model", model, "--num", 8, "--steps", 64, "--seed", args.seed, "--output", gen, "--no-progress", "--overwrite")
    _, test = training_and_heldout(bundle, "protein")
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
    from maskdiff.tasks.evaluation import unigram_bits
    from maskdiff.tasks.generation import training_and_heldout, training_dirs

    dirs = [d for mod in bundle.config.modalities for d in training_dirs(bundle, mod)]
    path = out / "eval.json"
    st.tool("evaluate", "--model", model, "--shards", *dirs, "--repeats", 3, "--limit", 96, "--seed", args.seed, "--output", path, "--overwrite")
    result = json.loads(path.read_text())
    unigram = {}
    for mod in bundle.config.modalities:
        train, test = training_and_heldout(bundle, mod)
        unigram.update(unigram_bits(train, test[:96], bundle.spec))
    return {"eval": result, "unigram": unigram}


def write_report(out: Path, run_dir: Path, bundle, res: dict, times: dict[str, float]) -> Path:
    from maskdiff.tasks.report import Report

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
    r.para(f"The digit model (configs/pixels.yaml), guidance 3: four samples of each class {', '.join(im['classes'])} (one row per class).")
    r.image(rel(im["grid"]), "sampled digits")
    r.para("The joint model, no guidance, for comparison:")
    r.image(rel(im["joint-grid"]), "sampled digits, joint model")
    r.para(f"Inpainting: the top half of a held-out digit (label {im['label']}) is kept, the rest is sampled 8 times.")
    r.image(rel(im["real"]), "held-out digit")
    r.image(rel(im["inpaint"]), "inpaintings")
    tb = res["tables"]
    r.heading("Tabular imputation (adult)")
    r.para(f"{tb['cells']} cells hidden at random (20%, at least one per row) in {tb['rows']} rows. `tools/impute.py` without "
           "`--model` learns a model from the cells left and fills each hidden cell with its best guess (most probable category; "
           "posterior mean for numbers). Beside it: the joint model (which saw these rows whole in training, so it is flattered) and the "
           "column mode / mean of the observed cells. Numeric columns: RMSE / column std (lower is better).")
    rows = []
    for name, m in tb["model"].items():
        if name == "all":
            continue
        metric = "accuracy" if "accuracy" in m else "nrmse"
        rows.append([name, "accuracy" if metric == "accuracy" else "RMSE/std", m["cells"], m[metric], tb["joint"][name][metric], tb["baseline"][name][metric]])
    a, j, b = tb["model"]["all"], tb["joint"]["all"], tb["baseline"]["all"]
    rows.append(["**all categorical**", "accuracy", a["categorical_cells"], a["accuracy"], j["accuracy"], b["accuracy"]])
    rows.append(["**all numeric**", "RMSE / column std", a["numeric_cells"], a["nrmse"], j["nrmse"], b["nrmse"]])
    r.table(["column", "metric", "cells", "fitted table model", "joint model", "mode/mean"], rows)
    r.para(f"Files: [`{rel(tb['masked'])}`]({rel(tb['masked'])}), [`{rel(tb['filled'])}`]({rel(tb['filled'])}).")
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
    r.para(f"ELBO in bits per token (bits/dim for the image pixels), ± standard error over records "
           f"(each record averaged over {ev['eval']['repeats']} Monte Carlo passes), against a unigram model fitted on the training records (lower is better).")
    rows = []
    for mod, e in ev["eval"]["modalities"].items():
        rows.append([mod, e["records"], e["tokens"], f"{e['bits_per_token']:.3f} ± {e['stderr_over_records']:.3f}", ev["unigram"].get(mod, float("nan")),
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
        with st.timed("train joint"):
            model = train(args, args.config, run_dir, args.steps)
        with st.timed("train digits"):
            digits = train(args, "configs/pixels.yaml", run_dir.with_name(run_dir.name + "-pixels"), args.pixels_steps)
        if out.exists():
            shutil.rmtree(out)
        (out / "images").mkdir(parents=True)
        (out / "tables").mkdir(parents=True)
        bundle = open_bundle(model)
        if (run_dir / "plots").is_dir():
            shutil.copytree(run_dir / "plots", out / "plots")
        res: dict = {}
        with st.timed("images"):
            res["images"] = images(args, st, digits, model, out, bundle)
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
