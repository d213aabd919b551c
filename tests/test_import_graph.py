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


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, at the top or inside functions."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        elif (node.module or "").startswith("maskdiff."):
            base = node.module.removeprefix("maskdiff.")
        else:
            continue
        for alias in node.names:
            name = f"{base}.{alias.name}".strip(".")
            found |= {name} & known or {base} & known
    return found


def test_the_library_imports_flow_one_way() -> None:
    """No cycle among the package's modules: e.g. the trainer uses its rooms (run directory, optimiser, metrics ...), never the reverse."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(p, set(paths)) for name, p in paths.items()}
    assert "training.run_dir" in graph["training.trainer"] and "data.split" in graph["data.loader"]
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, path + [name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])


LAYERS = ("core", "data", "training", "tasks")  # each may import those before it, never those after


def test_the_folders_are_layers_that_import_only_downwards() -> None:
    """The science (core) knows nothing of the data path, training or the tasks; the data path nothing of
    training or the tasks; training nothing of the tasks."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    upward = []
    for name, path in paths.items():
        layer = name.split(".")[0]
        if layer not in LAYERS:
            continue
        for dep in imported_modules(path, set(paths)):
            if dep.split(".")[0] in LAYERS and LAYERS.index(dep.split(".")[0]) > LAYERS.index(layer):
                upward.append(f"{name} -> {dep}")
    assert not upward, upward
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} >= set(LAYERS)
