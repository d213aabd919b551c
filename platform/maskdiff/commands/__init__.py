"""The command-line tools, one module per command, and the ``maskdiff`` command that runs them.

``maskdiff impute --input t.csv --output f.csv`` runs the same ``main(argv)``
as ``python tools/impute.py --input t.csv --output f.csv``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib import import_module
from types import ModuleType

COMMANDS = ("shard", "train", "sample", "impute", "protein", "text", "evaluate")

_INHERITED = frozenset(os.environ)  # the environment the process started with


def command(name: str) -> ModuleType:
    """The module of one command (``build_parser``/``main``)."""
    return import_module(f"{__name__}.{name}")


def usage() -> str:
    lines = ["usage: maskdiff COMMAND [options ...]", "", "commands:"]
    lines += [f"  {name:<9} {command(name).__doc__.strip().splitlines()[0]}" for name in COMMANDS]
    lines += ["", "maskdiff COMMAND --help explains one command, with examples."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from maskdiff import __version__

        print(f"maskdiff {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: {name!r} is not a maskdiff command; choose from {', '.join(COMMANDS)} (maskdiff --help)", file=sys.stderr)
        return 2
    module = command(name)
    if argv is None and any(key not in _INHERITED for key in getattr(module, "ENVIRONMENT", {})):
        # torch is loaded already; the command's environment takes effect in a fresh interpreter only
        os.execv(sys.executable, [sys.executable, "-m", "maskdiff", *args])
    prog, sys.argv[0] = sys.argv[0], f"maskdiff {name}"  # argparse's usage line
    try:
        return module.main(rest)
    finally:
        sys.argv[0] = prog
