"""The import graph flows one way: the command line uses the library, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "maskdiff"
CLI_LAYER = {"cli", "commands"}
ENTRY_POINTS = {"__main__"}  # `python -m maskdiff` runs the commands


def cli_imports(path: Path) -> list[str]:
    """The import statements of ``path`` that reach the command-line layer."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            parts = module.split(".")
            names = {a.name for a in node.names}
            if (node.level and parts[0] in CLI_LAYER) or (module.startswith("maskdiff.") and parts[1] in CLI_LAYER) \
                    or (module in ("", "maskdiff") and names & CLI_LAYER):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[:2] in (["maskdiff", "cli"], ["maskdiff", "commands"])]
    return found


def test_library_modules_do_not_import_the_command_line() -> None:
    library = [p for p in sorted(PACKAGE.rglob("*.py")) if Path(p.relative_to(PACKAGE).parts[0]).stem not in CLI_LAYER | ENTRY_POINTS]
    assert len(library) > 20
    offenders = {str(p.relative_to(PACKAGE)): cli_imports(p) for p in library if cli_imports(p)}
    assert not offenders, offenders


def test_the_check_sees_each_form_of_import(tmp_path: Path) -> None:
    for line in ("from .cli import UserError", "from . import cli", "from maskdiff.cli import one_line", "import maskdiff.cli",
                 "from .commands import train", "from maskdiff import commands"):
        (tmp_path / "m.py").write_text(line + "\n")
        assert cli_imports(tmp_path / "m.py"), line
    (tmp_path / "m.py").write_text("from .errors import UserError\nfrom .client import x\nimport maskdiff.errors\n")
    assert not cli_imports(tmp_path / "m.py")
