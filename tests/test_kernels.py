"""Fused kernels: Triton (interpreted on the CPU) against the PyTorch references; automatic choice."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskdiff.core import kernels

HERE = Path(__file__).parent
NAMES = [
    "support_ce md4",
    "support_ce genmd4 continuous",
    "support_ce genmd4 T-step",
    "support_ce support wider than a block",
    "reverse_step with rates",
    "reverse_step plain draw, temperature",
    "reverse_step support wider than a block",
    "elbo and sampler end to end",
]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, str(HERE / "kernel_checks.py")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
def test_every_check_is_run(interpreted):
    assert sorted(interpreted) == sorted(NAMES)


@needs_triton
@pytest.mark.parametrize("name", NAMES)
def test_triton_kernel_matches_reference(interpreted, name):
    assert interpreted[name] is None, interpreted[name]


def test_cpu_tensors_use_the_reference_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 3)
    assert kernels.chosen(x) == "reference"
    assert kernels.chosen(x, "triton") == "triton"
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.chosen(x, "cuda")
