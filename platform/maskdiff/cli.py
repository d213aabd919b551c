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
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

USER_ERROR, INTERRUPTED = 2, 130


class UserError(Exception):
    """A problem with what the user asked for; the message is shown as is."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input, not a bug (reported in one line)."""
    from maskdiff.adapters import InputError

    from .bundle import BundleError
    from .config import ConfigError
    from .tokens import VocabMismatchError

    return (UserError, InputError, BundleError, ConfigError, VocabMismatchError)


def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run ``main``; user errors become one line on stderr and status 2."""
    args = parser.parse_args(argv)
    try:
        return main(args) or 0
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``doc`` and whose epilog is the rest."""
    head, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="BUNDLE", help="a bundle directory written by tools/train.py (runs/<name>/bundle, or the run directory)")


def add_sampling(p: argparse.ArgumentParser, steps: int = 64, batch_size: int = 64) -> None:
    """Sampler options shared by every generating tool."""
    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same output (default 0)")
    g.add_argument("--steps", type=int, default=steps, help=f"reverse diffusion steps (default {steps})")
    g.add_argument("--method", default="ancestral", choices=("ancestral", "genmd4", "topk"),
                   help="ancestral: MD4 reverse step; genmd4: state-dependent step (GenMD4-trained modalities); topk: confidence-ordered unmasking")
    g.add_argument("--grid", default="cosine", choices=("linear", "cosine"), help="time grid of the reverse steps (default cosine)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of each draw (default 1)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of values with this much mass (default 1 = off)")
    g.add_argument("--confidence-noise", type=float, default=0.0, help="topk: Gumbel noise on the confidence, scaled by t (default 0)")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"records sampled together (default {batch_size})")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress bars (default: on a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")


def show_progress(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return sys.stderr.isatty() and not os.environ.get("CI")


def check_outputs(paths: Sequence[str | Path], overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite``; the parent folder must be creatable."""
    for p in map(Path, paths):
        if p.is_dir():
            raise UserError(f"{p}: is a directory, expected a file name")
        if p.exists() and not overwrite:
            raise UserError(f"{p}: already exists; pass --overwrite to replace it")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def emit(text: str, output: str | Path | None, summary: str) -> None:
    """Write ``text`` to ``output`` (atomically) and print ``summary``, or print ``text`` itself."""
    if output:
        write_text(output, text)
        print(summary)
    else:
        sys.stdout.write(text)


def open_bundle(path: str | Path, modality: str | None = None, device: str = "cpu"):
    """Load a bundle, with a one-line :class:`UserError` for a missing one or a missing modality."""
    from .bundle import load_bundle

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such bundle directory (train one with tools/train.py; it writes runs/<name>/bundle)")
    bundle = load_bundle(p, device=device)
    if modality is not None and modality not in bundle.adapters:
        raise UserError(f"{p}: the model was not trained on {modality} data; its modalities are {', '.join(sorted(bundle.adapters))}")
    return bundle


def generator(seed: int, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


__all__ = [
    "USER_ERROR", "UserError", "add_model", "add_output", "add_sampling", "atomic_path", "check_outputs", "generator",
    "open_bundle", "parser", "run", "show_progress", "user_errors", "write_text",
]
