"""Benchmark of the diffusion core: ELBO training steps and reverse sampling.

Prints tokens/s and peak memory for one training step (forward + backward)
with MD4 and GenMD4 schedules (GenMD4 with K RLOO draws costs K forward
passes), and sampler throughput with and without output caching, each as a
ratio to a baseline run in the same process.

    python tools/bench_core.py [--batch 16] [--length 784] [--dim 128] [--depth 4]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from maskdiff.batch import collate
from maskdiff.elbo import elbo
from maskdiff.model import Denoiser, DenoiserConfig
from maskdiff.sampler import sample
from maskdiff.schedules import ModalitySchedules, make_schedule
from maskdiff.tokens import MODALITIES, Field, Record, Support, VocabSpec

PIXELS = MODALITIES.index("pixels")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=784, help="tokens per record (784 = one MNIST digit)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sample-steps", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = VocabSpec([Support("pixels/value", "pixels", 256)])
    rng = np.random.default_rng(0)
    records = [Record([Field("image", "pixels/value", rng.integers(0, 256, args.length))]) for _ in range(args.batch)]
    batch = collate(records, spec)
    tokens = batch.valid.sum().item()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.length} tokens; dim {args.dim}, depth {args.depth}")

    rows = []
    for name, kind, draws, tc in [("MD4 cosine", "cosine", 1, False), ("MD4 cosine, time-conditioned", "cosine", 1, True), ("GenMD4, K=2", "genmd4", 2, True)]:
        model = Denoiser(spec, DenoiserConfig(dim=args.dim, depth=args.depth, heads=4, time_conditioning=tc))
        schedules = ModalitySchedules({PIXELS: make_schedule(kind, spec.num_clean)})
        params = list(model.parameters()) + list(schedules.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            res = elbo(model, batch, schedules, draws=draws)
            opt.zero_grad()
            res.loss.backward()
            opt.step()

        sec = timed(step, args.repeats)
        rows.append((name, tokens / sec))
    base = rows[0][1]
    print("\ntraining step (forward + backward + AdamW)")
    for name, tps in rows:
        print(f"  {name:34s} {tps:10.0f} tokens/s   x{tps / base:.2f} of MD4")
    print(f"  peak RSS so far: {peak_rss_mib():.0f} MiB")

    model = Denoiser(spec, DenoiserConfig(dim=args.dim, depth=args.depth, heads=4)).eval()
    schedules = ModalitySchedules({PIXELS: make_schedule("cosine")})
    masked = batch.with_tokens(torch.full_like(batch.tokens, spec.mask_id))
    print(f"\nsampling {args.batch} records from all-masked, {args.sample_steps} steps")
    results = {}
    for label, steps in [("cached (time-free network)", args.sample_steps), ("cached, 4x more steps", 4 * args.sample_steps)]:
        start = time.perf_counter()
        res = sample(model, masked, schedules, steps=steps, generator=torch.Generator().manual_seed(0))
        sec = time.perf_counter() - start
        results[label] = (sec, res.network_calls)
        print(f"  {label:34s} {sec:7.2f} s  {res.network_calls:4d} network calls  {tokens / sec:9.0f} tokens/s")
    ratio = results["cached, 4x more steps"][0] / results["cached (time-free network)"][0]
    print(f"  4x the steps costs x{ratio:.2f} the time: steps on which nothing changes reuse the last output")
    print(f"\npeak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
