"""What the command-line tools share: argument parsing, user errors, outputs, bundles.

Every tool follows the same conventions: ``main(argv) -> exit status``; a
problem with the user's input (a missing bundle, a vocabulary that does not
fit, unknown columns) prints one ``error: ...`` line on stderr and exits with
2, never a traceback; outputs are written to a temporary file and renamed
into place, and an existing output is only replaced with ``--overwrite``;
progress bars appear on a terminal only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .bundle import open_bundle
from .errors import UserError, user_errors
from .files import atomic_path, write_text
from .progress import add_progress_flags
from maskdiff.core.sampler import GRIDS, METHODS, SamplerOptions

USER_ERROR, INTERRUPTED = 2, 130


def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv``, check the shared options and run ``main``; user errors become one line on stderr and status 2."""
    args = parser.parse_args(argv)
    try:
        check_args(args)
        return main(args) or 0
    except user_errors() as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return USER_ERROR
    except OSError as e:  # an output in a read-only folder, under a file, a full disk
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def one_line(msg: str) -> str:
    """A user error's message on one line; from a DataLoader worker, the original message without the worker's traceback."""
    if "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(msg.split("\n"))


# option -> (lowest allowed value, whether the lowest is allowed): checked when a tool has the option
RANGES: dict[str, tuple[float, bool]] = {
    "num": (1, True), "batch_size": (1, True), "steps": (1, True), "nrow": (1, True), "repeats": (1, True), "limit": (1, True),
    "length": (1, True), "span": (1, True), "temperature": (0, False), "top_p": (0, False), "confidence_noise": (0, True),
    "guidance": (0, True),
}


def check_args(args: argparse.Namespace) -> None:
    """Numbers are finite and in range (NaN and infinities never pass), ``--device`` names a usable device."""
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} {value}: must be a finite number")
        if key in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, inclusive = RANGES[key]
            if value < lo or (value == lo and not inclusive):
                raise UserError(f"{flag} {value}: must be {'>=' if inclusive else '>'} {lo:g}")
    if getattr(args, "top_p", None) is not None and args.top_p > 1:
        raise UserError(f"--top-p {args.top_p}: must be at most 1")
    if getattr(args, "device", None) is not None:
        check_device(args.device)


def check_device(name: str) -> torch.device:
    """A torch device that exists on this machine, else a one-line :class:`UserError`."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise UserError(f"--device {name}: not available here (use cpu or cuda)")


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``doc`` and whose epilog is the rest."""
    head, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="BUNDLE", help="a bundle directory written by tools/train.py (runs/<name>/bundle, or the run directory)")


def add_sampling(p: argparse.ArgumentParser, steps: int = 64, batch_size: int = 64, top_p: float = 1.0) -> None:
    """Sampler options shared by every generating tool."""
    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same output (default 0)")
    g.add_argument("--steps", type=int, default=steps, help=f"reverse diffusion steps (default {steps})")
    g.add_argument("--method", default="ancestral", choices=METHODS,
                   help="ancestral: MD4 reverse step; genmd4: state-dependent step (GenMD4-trained modalities); topk: confidence-ordered unmasking")
    g.add_argument("--grid", default="cosine", choices=GRIDS, help="time grid of the reverse steps (default cosine)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of each draw (default 1)")
    g.add_argument("--top-p", type=float, default=top_p,
                   help=f"nucleus sampling: keep the smallest set of values with this much mass (default {top_p:g}{' = off' if top_p == 1 else ''})")
    g.add_argument("--confidence-noise", type=float, default=0.0, help="topk: Gumbel noise on the confidence, scaled by t (default 0)")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"records sampled together (default {batch_size})")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")


def sampler_options(args: argparse.Namespace, guidance_supports: Sequence[int] = ()) -> SamplerOptions:
    """SamplerOptions from the options of :func:`add_sampling` (and ``--guidance`` where a tool has it)."""
    guidance = float(getattr(args, "guidance", 0.0) or 0.0)
    return SamplerOptions(steps=args.steps, grid=args.grid, method=args.method, temperature=args.temperature, top_p=args.top_p,
                          guidance=guidance if guidance_supports else 0.0, guidance_supports=tuple(guidance_supports),
                          confidence_noise=args.confidence_noise)


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_progress_flags(p)


def check_outputs(paths: Sequence[str | Path], overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite``; the parent folder must be creatable."""
    for p in map(Path, paths):
        if p.is_dir():
            raise UserError(f"{p}: is a directory, expected a file name")
        if p.exists() and not overwrite:
            raise UserError(f"{p}: already exists; pass --overwrite to replace it")
        _check_writable_parent(p)


def _check_writable_parent(p: Path) -> None:
    """The nearest existing ancestor of ``p`` must be a writable directory (checked before any work)."""
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{p}: cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{p}: cannot be created: {parent} is not writable")


def emit(text: str, output: str | Path | None, summary: str) -> None:
    """Write ``text`` to ``output`` (atomically) and print ``summary``, or print ``text`` itself."""
    if output:
        write_text(output, text)
        print(summary)
    else:
        sys.stdout.write(text)

def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for tensors on ``device`` (None when unknown)."""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.mem_get_info(d)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def batch_bytes(bundle, batch_size: int, tokens: int) -> int:
    """A generous estimate of the memory one forward pass of ``batch_size`` records of ``tokens`` positions takes."""
    m = bundle.config.model
    per_position = 4 * (16 * m.dim + 3 * bundle.spec.num_clean + 2 * m.heads * tokens)  # activations, logits + draws, attention
    return batch_size * tokens * per_position


def check_memory(bundle, batch_size: int, tokens: int, device: str, given: int | None = None) -> None:
    """Refuse up front a batch that cannot fit in memory, rather than being killed half-way."""
    need, have = batch_bytes(bundle, batch_size, tokens), available_memory(device)
    if have is not None and need > have:
        raise UserError(f"--batch-size {given or batch_size}: a batch of {batch_size} records of {tokens} tokens needs about {need / 2**30:.1f} GiB, "
                        f"more than the {have / 2**30:.1f} GiB free on {device}; lower --batch-size")


def check_count(num: int, tokens: int) -> None:
    """Refuse up front a ``--num`` whose records and outputs alone would not fit in this machine's memory."""
    need, have = num * (32 * tokens + 4096), available_memory("cpu")  # ids, filled copies, decoded output, per-record overhead
    if have is not None and need > have:
        raise UserError(f"--num {num}: {num:,} records of up to {tokens} tokens need about {need / 2**30:.1f} GiB, "
                        f"more than the {have / 2**30:.1f} GiB free; ask for fewer (several runs with other --seed values add up)")


def check_fill_memory(bundle, records: Sequence, batch_size: int, device: str) -> None:
    """:func:`check_memory` for sampling ``records`` in batches of ``batch_size``."""
    if records:
        tokens = max(sum(f.tokens.size for f in r.fields) for r in records)
        check_memory(bundle, min(batch_size, len(records)), tokens, device, given=batch_size)


def generator(seed: int, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


__all__ = [
    "USER_ERROR", "UserError", "add_model", "add_output", "add_sampling", "atomic_path", "check_outputs", "generator",
    "batch_bytes", "check_args", "check_count", "check_device", "check_fill_memory", "check_memory", "one_line", "open_bundle", "parser", "run", "sampler_options", "user_errors", "write_text",
]
