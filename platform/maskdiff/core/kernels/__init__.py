"""Fused kernels with plain PyTorch references, chosen automatically.

``support_ce`` (the MD4 / GenMD4 cross-entropy over one support, forward and
backward) and ``reverse_step`` (the sampler's unmask decision and float64
categorical draw) run as Triton kernels on CUDA tensors when Triton is
installed, and as the references of :mod:`.reference` otherwise. On a CPU the
Triton versions run only in Triton's interpreter (``TRITON_INTERPRET=1``
set before the first use), which is how the tests check them.
``impl`` forces one: ``"auto"``, ``"triton"`` or ``"reference"``.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from torch import Tensor

from . import reference

IMPLS = ("auto", "triton", "reference")
_triton: ModuleType | None = None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_module() -> ModuleType:
    global _triton
    if _triton is None:
        from . import triton_kernels

        _triton = triton_kernels
    return _triton


def chosen(x: Tensor, impl: str = "auto") -> str:
    """Which implementation runs for tensors like ``x``: Triton on a GPU (or in the interpreter), else the reference."""
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel implementation {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return "triton" if triton_available() and (x.is_cuda or interpreted) else "reference"


def support_ce(logits: Tensor, target: Tensor, w: Tensor | None = None, a: Tensor | None = None, impl: str = "auto"):
    mod = _triton_module() if chosen(logits, impl) == "triton" else reference
    return mod.support_ce(logits, target, w, a)


def reverse_step(logits: Tensor, u: Tensor, rate: Tensor | None = None, temperature: float = 1.0, impl: str = "auto") -> Tensor:
    mod = _triton_module() if chosen(logits, impl) == "triton" else reference
    return mod.reverse_step(logits, u, rate, temperature)


__all__ = ["IMPLS", "chosen", "reverse_step", "support_ce", "triton_available"]
