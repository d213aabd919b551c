"""Benchmarks of the core, each figure beside its baseline run in the same process.

    python tools/bench.py [--quick] [--threads N] [--json outputs/bench.json] [--only train,sample,...]

Sections (the baseline in brackets):

* train   character model (tiny-shakespeare as 27 symbols, windows of 256,
          batch 32, linear schedule, 2 layers, d=128): training tokens/s and
          memory saved for backward per step, support-restricted outputs
          [dense (B, L, V) outputs]
* eval    the same model: ELBO evaluation tokens/s [dense]
* table   16-column table with a 1,000-category column: training tokens/s
          [dense; and the same table with a 10-category column instead]
* sample  16 x 256 tokens, 256 steps, at 2 layers/d=128 and 4 layers/d=256:
          seconds (also with the network in bfloat16), tokens/s, network
          evaluations per sample [the stepwise sampler: the whole batch
          through the dense network at every step, float32]
* impute  3,000 table rows with a 1,000-category column, ~7% of cells
          missing, one draw: rows/s [stepwise, dense]
* kernels Triton vs the PyTorch reference for the cross-entropy and the
          reverse step (needs a GPU; on a CPU Triton only runs interpreted)
* mfu     bf16 model FLOP utilisation of a 12-layer, 768-wide model at
          sequence length 1024, against the card's bf16 peak (needs a GPU)
* trainer tools/train.py end to end (DeepSpeed engine, loader, metrics) on
          configs/text.yaml at 2 layers/d=128: training tokens/s [a plain
          loop: the same model, optimiser and batches, in this process]; the
          loader alone: tokens/s [the training rate it has to feed]
* shard   tools/shard.py's write path (fit, encode, tar, sha256, manifest)
          on the shipped protein and table samples: records/s [parsing the
          input alone]

bench_shard.py (streaming, sizes, --workers, resume) and bench_train.py
(processes, packing) hold the data-path benchmarks in more detail.

Prints a table and writes JSON. Thread policy: OMP_WAIT_POLICY=PASSIVE is set
before torch starts (spinning OpenMP threads collapse when another process
competes for the cores), and ``--threads auto`` uses the cores not already
busy according to the 1-minute load average (at least 1).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP runtime) starts

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from maskdiff.core import kernels
from maskdiff.core import sampler as sampler_module
from maskdiff.core.batch import Batch, collate  # noqa: E402
from maskdiff.core.elbo import elbo  # noqa: E402
from maskdiff.core.modalities import modality_id  # noqa: E402
from maskdiff.core.model import Denoiser, DenoiserConfig  # noqa: E402
from maskdiff.core.sampler import SamplerOptions, sample  # noqa: E402
from maskdiff.core.schedules import ModalitySchedules, make_schedule  # noqa: E402
from maskdiff.core.tokens import Field, Record, Support, VocabSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT, TABULAR = modality_id("text"), modality_id("tabular")
SECTIONS = ("train", "eval", "table", "sample", "impute", "kernels", "mfu", "trainer", "shard")


@dataclass
class Row:
    name: str
    value: float | None
    unit: str
    baseline: float | None
    baseline_name: str
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline (> 1 = better)."""
        if not self.value or not self.baseline:
            return None
        return self.value / self.baseline if self.higher_is_better else self.baseline / self.value


class DenseView:
    """A denoiser seen only through its dense forward: the baseline of support-restricted outputs."""

    def __init__(self, model: Denoiser):
        self.model, self.spec, self.time_conditioned = model, model.spec, model.time_conditioned

    def __call__(self, x_t, batch, t):
        return self.model(x_t, batch, t)


def pick_threads(arg: str) -> int:
    cores = os.cpu_count() or 1
    if arg != "auto":
        return max(1, int(arg))
    busy = math.floor(os.getloadavg()[0])
    return max(1, min(cores, cores - busy))


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, run in turns (so that load changes hit all alike)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_mib(fn: Callable[[], torch.Tensor]) -> float:
    """MiB of tensors autograd keeps for the backward pass of ``fn()`` (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values()) / 2**20


# --- data -----------------------------------------------------------------------------------------
def char_batch(n: int, length: int, seed: int = 0) -> tuple[VocabSpec, Batch]:
    """Windows of tiny-shakespeare as 27 symbols (a-z and space; everything else becomes a space)."""
    text = (ROOT / "data/text/tinyshakespeare.txt").read_text().lower()
    ids = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64) - ord("a")
    ids = np.where((ids >= 0) & (ids < 26), ids, 26)
    spec = VocabSpec([Support("text/char", "text", 27)])
    starts = np.random.default_rng(seed).integers(0, len(ids) - length, n)
    return spec, collate([Record([Field("text", "text/char", ids[s : s + length])]) for s in starts], spec)


def table_spec(big: int) -> VocabSpec:
    return VocabSpec([Support("tabular/col:big", "tabular", big)] + [Support(f"tabular/col:c{i}", "tabular", 2 + i) for i in range(15)])


def table_batch(spec: VocabSpec, rows: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    records = [Record([Field(s.name.split("/")[1], s.name, [int(rng.integers(0, s.size))]) for s in spec.supports]) for _ in range(rows)]
    return collate(records, spec)


# --- sections -------------------------------------------------------------------------------------
def bench_train(quick: bool) -> list[Row]:
    spec, batch = char_batch(32, 256)
    torch.manual_seed(0)
    model = Denoiser(spec, DenoiserConfig(dim=128, depth=2, heads=4))
    schedules = ModalitySchedules({TEXT: make_schedule("linear")})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step(denoiser) -> Callable[[], None]:
        def run() -> None:
            loss = elbo(denoiser, batch, schedules, generator=gen).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return run

    sec = interleaved({"restricted": step(model), "dense": step(DenseView(model))}, 3 if quick else 10)
    tokens = int(batch.valid.sum())
    mem_r = saved_mib(lambda: elbo(model, batch, schedules, generator=gen).loss)
    mem_d = saved_mib(lambda: elbo(DenseView(model), batch, schedules, generator=gen).loss)
    return [
        Row("train tokens/s (char 2L d128, 32x256)", tokens / sec["restricted"], "tok/s", tokens / sec["dense"], "dense outputs"),
        Row("train memory saved for backward", mem_r, "MiB", mem_d, "dense outputs", higher_is_better=False),
    ]


def bench_eval(quick: bool) -> list[Row]:
    spec, batch = char_batch(32, 256, seed=1)
    torch.manual_seed(0)
    model = Denoiser(spec, DenoiserConfig(dim=128, depth=2, heads=4)).eval()
    schedules = ModalitySchedules({TEXT: make_schedule("linear")})
    gen = torch.Generator().manual_seed(0)

    def run(denoiser) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode():
                elbo(denoiser, batch, schedules, generator=gen)
        return go

    sec = interleaved({"restricted": run(model), "dense": run(DenseView(model))}, 3 if quick else 10)
    tokens = int(batch.valid.sum())
    return [Row("ELBO eval tokens/s (char 2L d128)", tokens / sec["restricted"], "tok/s", tokens / sec["dense"], "dense outputs")]


def bench_table(quick: bool) -> list[Row]:
    rows = 128 if quick else 256
    fns, tokens = {}, {}
    for big in (1000, 10):
        spec = table_spec(big)
        batch = table_batch(spec, rows)
        torch.manual_seed(0)
        model = Denoiser(spec, DenoiserConfig(dim=128, depth=2, heads=4))
        schedules = ModalitySchedules({TABULAR: make_schedule("poly2")})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens[big] = int(batch.valid.sum())
        for name, denoiser in (("restricted", model), ("dense", DenseView(model))):
            if big == 10 and name == "dense":
                continue

            def run(denoiser=denoiser, batch=batch, schedules=schedules, opt=opt) -> None:
                loss = elbo(denoiser, batch, schedules).loss
                opt.zero_grad()
                loss.backward()
                opt.step()

            fns[f"{name} {big}"] = run
    sec = interleaved(fns, 3 if quick else 10)
    tps = {k: tokens[int(k.split()[1])] / v for k, v in sec.items()}
    return [
        Row(f"table train tokens/s (16 cols, 1000-cat, {rows} rows)", tps["restricted 1000"], "tok/s", tps["dense 1000"], "dense outputs"),
        Row("same, relative to a 10-category column", tps["restricted 1000"], "tok/s", tps["restricted 10"], "no big column",
            note="target: within 20%"),
    ]


def stepwise_dense(model: Denoiser, batch: Batch, schedules: ModalitySchedules, opts: SamplerOptions, generator) -> tuple[torch.Tensor, int]:
    """The baseline sampler: every step, every row with a masked position, through the dense network."""
    with torch.inference_mode():
        predict = sampler_module._Predictor(DenseView(model), batch, model.spec, opts)
        x = sampler_module._sample_stepwise(predict, batch, schedules, sampler_module.time_grid(opts.steps, opts.grid), opts, generator)
    return x, predict.row_calls


SAMPLE_SIZES = [(128, 2), (256, 4)]  # (dim, depth); --sample-sizes overrides


def bench_sample(quick: bool) -> list[Row]:
    sizes = SAMPLE_SIZES[:1] if quick and len(SAMPLE_SIZES) > 1 else SAMPLE_SIZES
    steps = 64 if quick else 256
    spec = VocabSpec([Support("text/char", "text", 27)])
    out = []
    for dim, depth in sizes:
        torch.manual_seed(0)
        model = Denoiser(spec, DenoiserConfig(dim=dim, depth=depth, heads=4)).eval()
        schedules = ModalitySchedules({TEXT: make_schedule("linear")})
        batch = collate([Record([Field("text", "text/char", [0] * 256)]) for _ in range(16)], spec)
        batch = batch.with_tokens(torch.full_like(batch.tokens, spec.mask_id))
        opts = SamplerOptions(steps=steps)
        start = time.perf_counter()
        res = sample(model, batch, schedules, opts, torch.Generator().manual_seed(0))
        fast = time.perf_counter() - start
        start = time.perf_counter()
        _, base_rows = stepwise_dense(model, batch, schedules, opts, torch.Generator().manual_seed(0))
        slow = time.perf_counter() - start
        tag = f"{depth}L d{dim}, 16x256, {steps} steps"
        out.append(Row(f"sample seconds ({tag})", fast, "s", slow, "stepwise dense", higher_is_better=False))
        if (dim, depth) == sizes[0]:  # bf16 on a CPU is several times slower than float32: once, at the smallest size
            start = time.perf_counter()
            sample(model, batch, schedules, replace(opts, precision="bfloat16"), torch.Generator().manual_seed(0))
            low = time.perf_counter() - start
            out.append(Row(f"sample seconds, bf16 network ({tag})", low, "s", slow, "stepwise dense", higher_is_better=False, note="not exact: bf16 model"))
        out += [
            Row(f"sample tokens/s ({tag})", 16 * 256 / fast, "tok/s", 16 * 256 / slow, "stepwise dense"),
            Row(f"network evaluations per sample ({tag})", res.row_calls / 16, "calls", base_rows / 16, "stepwise dense", higher_is_better=False),
        ]
    return out


def bench_impute(quick: bool) -> list[Row]:
    rows = 500 if quick else 3000
    spec = table_spec(1000)
    batch = table_batch(spec, rows, seed=2)
    holes = torch.rand(batch.shape, generator=torch.Generator().manual_seed(0)) < 0.07
    batch = batch.with_tokens(torch.where(holes, spec.mask_id, batch.tokens))
    torch.manual_seed(0)
    model = Denoiser(spec, DenoiserConfig(dim=128, depth=2, heads=4)).eval()
    schedules = ModalitySchedules({TABULAR: make_schedule("poly2")})
    opts = SamplerOptions(steps=32)
    start = time.perf_counter()
    sample(model, batch, schedules, opts, torch.Generator().manual_seed(0))
    fast = time.perf_counter() - start
    start = time.perf_counter()
    stepwise_dense(model, batch, schedules, opts, torch.Generator().manual_seed(0))
    slow = time.perf_counter() - start
    return [Row(f"impute rows/s ({rows} rows, {int(holes.sum())} cells, 1000-cat col)", rows / fast, "rows/s", rows / slow, "stepwise dense",
                note="core sampler only (no CSV)")]


def bench_kernels(quick: bool) -> list[Row]:
    if not (kernels.triton_available() and torch.cuda.is_available()):
        why = "triton not installed" if not kernels.triton_available() else "no GPU (Triton runs on the CPU only interpreted)"
        return [Row("kernels: Triton vs reference", None, "", None, "reference", note=why)]
    dev = torch.device("cuda")
    n, K = (4096, 1000) if quick else (65536, 1000)
    z = torch.randn(n, K, device=dev, requires_grad=True)
    y = torch.randint(0, K, (n,), device=dev)
    w = torch.rand(K, device=dev, requires_grad=True)
    u = torch.rand(n, dtype=torch.float64, device=dev)
    rate = torch.rand(K, dtype=torch.float64, device=dev)

    def ce(impl: str) -> Callable[[], None]:
        def go() -> None:
            c, e = kernels.support_ce(z, y, w, impl=impl)
            (c.sum() + e.sum()).backward()
            torch.cuda.synchronize()
        return go

    def rev(impl: str) -> Callable[[], None]:
        def go() -> None:
            kernels.reverse_step(z.detach(), u, rate, impl=impl)
            torch.cuda.synchronize()
        return go

    sec = interleaved({"ce t": ce("triton"), "ce r": ce("reference"), "rev t": rev("triton"), "rev r": rev("reference")}, 5 if quick else 20)
    return [
        Row(f"support_ce fwd+bwd rows/s ({n}x{K}, GenMD4)", n / sec["ce t"], "rows/s", n / sec["ce r"], "reference"),
        Row(f"reverse_step rows/s ({n}x{K})", n / sec["rev t"], "rows/s", n / sec["rev r"], "reference"),
    ]


# dense bf16 tensor-core peak FLOP/s by card name (first match wins)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def training_flops(model: Denoiser, tokens: int, masked: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward).

    6 per weight per token for the blocks, 12 * depth * seq * dim per token for
    the attention scores and mixing, and the output layer 6 * dim * K at the
    masked positions only (the restricted outputs compute nothing elsewhere).
    """
    blocks = sum(p.numel() for p in model.blocks.parameters())
    cfg, head = model.cfg, model.spec.num_clean * model.cfg.dim
    return 6.0 * blocks * tokens + 12.0 * cfg.depth * seq * cfg.dim * tokens + 6.0 * head * masked


def bench_mfu(quick: bool) -> list[Row]:
    """bf16 training of a 12-layer, 768-wide model at sequence length 1024 (GPU only)."""
    if not torch.cuda.is_available():
        return [Row("bf16 MFU, 12L d768, seq 1024", None, "", None, "peak", note="no GPU")]
    dev, name = torch.device("cuda"), torch.cuda.get_device_name()
    spec = VocabSpec([Support("text/bpe", "text", 32768)])
    torch.manual_seed(0)
    model = Denoiser(spec, DenoiserConfig(dim=768, depth=12, heads=12)).to(dev)
    schedules = ModalitySchedules({TEXT: make_schedule("linear")})
    batch_size = 4 if quick else 16
    ids = torch.randint(0, 32768, (batch_size, 1024))
    batch = collate([Record([Field("text", "text/bpe", row.numpy())]) for row in ids], spec).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            res = elbo(model, batch, schedules)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    sec = interleaved({"step": step}, 5 if quick else 20)["step"]
    tokens = int(batch.valid.sum())
    achieved = training_flops(model, tokens, tokens // 2, 1024) / sec  # a linear schedule masks half on average
    peak = next((v for k, v in PEAK_BF16 if k in name), None)
    return [
        Row(f"bf16 model TFLOP/s, 12L d768, seq 1024 ({name})", achieved / 1e12, "TFLOP/s", peak / 1e12 if peak else None, f"{name} bf16 peak",
            note="ratio = MFU; target >= 0.45"),
        Row("same: training tokens/s", tokens / sec, "tok/s", None, "-", note=f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"),
    ]


def bench_trainer(quick: bool) -> list[Row]:
    """tools/train.py end to end against a plain loop over the same model, optimiser and batches."""
    import tempfile

    import bench_train  # a sibling in tools/ (on sys.path when this file runs)

    from maskdiff.config import load_config, to_run_config
    from maskdiff.core.joint import JointModel
    from maskdiff.data.loader import ensure_shards, open_sources, train_dataset

    config, steps = "configs/text.yaml", 10 if quick else 30
    overrides = ["model.depth=2", "model.dim=128", "model.heads=4"]
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tool = bench_train.train_once(config, 1, steps, Path(tmp) / "run", overrides)["tokens_per_s"]
    rc = to_run_config(load_config(str(ROOT / config), overrides))
    ensure_shards(rc)
    sets, spec = open_sources(rc, 0, 1, shuffle_buffer=rc.data.shuffle_buffer, seed=rc.seed, repeat=True)
    it = iter(train_dataset(rc, sets, spec, 0))
    batches = [next(it) for _ in range(steps)]
    torch.manual_seed(rc.seed)
    model = JointModel(spec, rc)
    opt = torch.optim.AdamW(model.parameters(), lr=rc.optim.lr, weight_decay=rc.optim.weight_decay)
    gen = torch.Generator().manual_seed(0)

    def step(batch: Batch) -> int:
        result = model(batch, generator=gen)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        return sum(n for _, n in result.per_modality().values())

    step(batches[0])  # warm-up, untimed
    start = time.perf_counter()
    tokens = sum(step(batch) for batch in batches[1:])
    plain = tokens / (time.perf_counter() - start)
    loader = bench_train.loader_throughput(str(ROOT / config), overrides, 20 if quick else 100)
    tag = f"text.yaml 2L d128, {steps} steps"
    return [Row(f"tools/train.py tokens/s ({tag})", tool, "tok/s", plain, "plain loop", note="target: within 10%"),
            Row("loader tokens/s (the same batches, one process)", loader, "tok/s", tool, "train.py's rate")]


def bench_shard(quick: bool) -> list[Row]:
    """tools/shard.py's write path on the shipped samples against parsing their input alone."""
    import bench_shard  # a sibling in tools/

    out = []
    for modality in ("protein", "tabular"):
        paths, options = bench_shard.SAMPLES[modality]
        r = bench_shard.bench(modality, [ROOT / p for p in paths], options, 1 if quick else 3)
        out.append(Row(f"shard.py records/s ({modality}, {r['records']:,} records)", r["records"] / r["shard_s"], "rec/s",
                       r["records"] / r["parse_s"], "parse only"))
    return out


BENCHES: dict[str, Callable[[bool], list[Row]]] = {
    "train": bench_train, "eval": bench_eval, "table": bench_table, "sample": bench_sample, "impute": bench_impute, "kernels": bench_kernels,
    "mfu": bench_mfu, "trainer": bench_trainer, "shard": bench_shard,
}


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs (about a minute on one core)")
    ap.add_argument("--threads", default="auto", help="torch threads: a number, or auto (free cores by load average)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs/bench.json", help="where to write the figures")
    ap.add_argument("--sample-sizes", default=None, metavar="DxL,...", help="sampling sizes as dim x depth (default 128x2,256x4; --quick: 128x2)")
    args = ap.parse_args()
    if args.sample_sizes:
        SAMPLE_SIZES[:] = [tuple(int(v) for v in size.split("x")) for size in args.sample_sizes.split(",")]
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        sys.exit(f"bench.py: unknown section(s) {sorted(unknown)}; expected some of {SECTIONS}")
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the same for the training processes this starts
    load = os.getloadavg()
    env = {"torch": torch.__version__, "threads": threads, "cores": os.cpu_count(), "load_avg_1_5_15": load,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "quick": args.quick,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(f"torch {torch.__version__}; {threads} thread(s) of {os.cpu_count()} cores; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"OMP_WAIT_POLICY={env['omp_wait_policy']}; device {env['device']}")
    rows: list[Row] = []
    for name in chosen:
        start = time.perf_counter()
        got = BENCHES[name](args.quick)
        rows += got
        print(f"  [{name}: {time.perf_counter() - start:.0f} s]", flush=True)
    width = max(len(r.name) for r in rows)
    print(f"\n{'benchmark':{width}}  {'value':>10} {'unit':6}  {'baseline':>10}  {'ratio':>6}  baseline is")
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio else "-"
        print(f"{r.name:{width}}  {fmt(r.value):>10} {r.unit:6}  {fmt(r.baseline):>10}  {ratio:>6}  {r.baseline_name}{'; ' + r.note if r.note else ''}")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; load average now {os.getloadavg()[0]:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"environment": env, "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
