"""The front door: the ``maskdiff`` command, ``python -m maskdiff``, the tools/ wrappers and ``maskdiff.load``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from adapter_fixtures import ROOT
from tasks_fixtures import tiny_bundle

import maskdiff
from maskdiff.commands import COMMANDS, command
from maskdiff.commands import main as maskdiff_main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_lists_every_command_with_its_summary():
    proc = _run("-m", "maskdiff", "--help")
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        summary = command(name).__doc__.strip().splitlines()[0]
        assert f"  {name:<9} {summary}" in proc.stdout


def test_command_help_is_the_tools_help():
    proc = _run("-m", "maskdiff", "impute", "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout, proc.stderr
    assert proc.stdout.startswith("usage: maskdiff impute ")
    script = _run(str(ROOT / "tools" / "impute.py"), "--help")
    assert script.returncode == 0 and script.stdout.startswith("usage: impute.py ")
    assert proc.stdout.partition("\n\n")[2] == script.stdout.partition("\n\n")[2]  # the same text after the usage lines


def test_unknown_or_missing_command_is_status_2():
    proc = _run("-m", "maskdiff", "frobnicate", "--help")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: 'frobnicate' is not a maskdiff command")
    assert maskdiff_main([]) == 2


@pytest.mark.parametrize("name", COMMANDS)
def test_tools_scripts_are_wrappers_of_the_commands(name):
    proc = _run(str(ROOT / "tools" / f"{name}.py"), "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and f"tools/{name}.py" in proc.stdout, proc.stderr


def test_in_process_dispatch_runs_the_command_with_its_prog(capsys):
    with pytest.raises(SystemExit) as exc:
        maskdiff_main(["sample", "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: maskdiff sample ")


def test_load_returns_a_bundle():
    from maskdiff.bundle import Bundle

    bundle = maskdiff.load(tiny_bundle())
    assert isinstance(bundle, Bundle) and bundle.spec.vocab_size > 0 and set(bundle.adapters)


@pytest.mark.parametrize("entry", ["tool", "command"])
def test_training_sets_a_short_openmp_spin_before_torch_loads_unless_a_wait_policy_is_set(entry):
    """The training entry points shorten libgomp's spin (GOMP_SPINCOUNT) before torch starts OpenMP, so a run does
    not collapse beside another busy process; an OMP_WAIT_POLICY the user chose is left to decide alone."""
    import os

    probe = ("import os, runpy, sys; sys.argv = ['train', '--help']; "
             + ("runpy.run_path('tools/train.py', run_name='probe'); " if entry == "tool" else "import maskdiff.commands.train; ")
             + "print(os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for policy, expected in ((None, "1000"), ("PASSIVE", "None")):
        run_env = env if policy is None else {**env, "OMP_WAIT_POLICY": policy}
        proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300, env=run_env)
        assert proc.returncode == 0 and proc.stdout.split() == [expected], proc.stderr
