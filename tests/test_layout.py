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
