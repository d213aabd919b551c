"""The repository's `platform/` folder must never shadow Python's standard `platform` module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_importable_from_repo_root():
    code = "import platform, maskdiff, torch; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in {"Linux", "Darwin", "Windows"}
    assert not Path(out[1]).resolve().is_relative_to(ROOT)


def test_platform_folder_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    import maskdiff

    assert Path(maskdiff.__file__).resolve().parent == ROOT / "platform" / "maskdiff"


def test_every_package_folder_is_listed_for_a_plain_install():
    """setuptools installs only the packages pyproject.toml lists: a folder left out is missing from a
    wheel (though an editable install still finds it)."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: ROOT / path for name, path in tool["package-dir"].items()}
    on_disk = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk <= set(tool["packages"]), sorted(on_disk - set(tool["packages"]))
