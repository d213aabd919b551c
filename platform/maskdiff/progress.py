"""When progress bars are shown: one policy for every tool and for the library calls they make.

An explicit ``--progress`` / ``--no-progress`` (or a ``progress=`` argument)
wins; otherwise bars appear on a terminal only: not when stderr is redirected
to a file or a pipe, and not under CI (``CI`` set).
"""

from __future__ import annotations

import argparse
import os
import sys


def progress_enabled(flag: bool | None = None) -> bool:
    """The explicit choice when given, else whether stderr is a terminal outside CI."""
    if flag is not None:
        return flag
    return sys.stderr.isatty() and not os.environ.get("CI")


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` into ``args.progress`` (None: decide by :func:`progress_enabled`)."""
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress bars (default: on a terminal, not under CI)")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


__all__ = ["add_progress_flags", "progress_enabled"]
