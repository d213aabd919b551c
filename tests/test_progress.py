"""One progress-bar policy for every tool: an explicit flag wins, else bars on a terminal outside CI only."""

from __future__ import annotations

import argparse
import io
import signal

import pytest
from adapter_fixtures import PENGUINS, load_shard_cli

from maskdiff.progress import add_progress_flags, progress_enabled


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty, ci, flag, shown", [
    (True, None, None, True),     # a terminal: bars
    (False, None, None, False),   # redirected to a file or a pipe: none
    (True, "true", None, False),  # CI: none, even on a pseudo-terminal
    (False, "true", True, True),  # --progress wins
    (True, None, False, False),   # --no-progress wins
])
def test_policy(monkeypatch: pytest.MonkeyPatch, tty: bool, ci: str | None, flag: bool | None, shown: bool) -> None:
    monkeypatch.setattr("sys.stderr", Terminal() if tty else io.StringIO())
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert progress_enabled(flag) is shown


def test_flags_parse_to_one_tristate() -> None:
    p = argparse.ArgumentParser()
    add_progress_flags(p)
    assert [p.parse_args(a).progress for a in ([], ["--progress"], ["--no-progress"])] == [None, True, False]
    with pytest.raises(SystemExit):
        p.parse_args(["--progress", "--no-progress"])


@pytest.mark.parametrize("flag, shown", [("--progress", True), ("--no-progress", False), (None, False)])
def test_shard_tool_follows_the_flag(tmp_path, capsys, monkeypatch: pytest.MonkeyPatch, flag: str | None, shown: bool) -> None:
    monkeypatch.delenv("CI", raising=False)  # pytest's captured stderr is not a terminal: no flag means no bar
    cli = load_shard_cli()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["--modality", "tabular", "--input", str(PENGUINS), "--output", str(tmp_path / "out")] + ([flag] if flag else []))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0
    assert ("rec/s]" in capsys.readouterr().err) is shown  # the bar's rate column
