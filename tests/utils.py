"""Helpers shared by the test modules: implementations as pytest parameters, tolerances by dtype.

The tolerances and the low-precision rule live with the ops in ``diffcore._cases`` (the table
``python -m diffcore.parity`` uses too); this module re-exports them under the names tests use."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import diffcore
from diffcore._cases import DTYPES, FP32_TOL, standard_tolerance
from diffcore._cases import arrange as _arrange

__all__ = [
    "DTYPES", "FP32_TOL", "assert_close_to_reference", "impl_params", "maybe_use", "run_python", "run_with_isa",
    "strided_rows",
]


def impl_params(op: str, device: str = "cpu") -> list:
    """Every registered implementation of ``op`` as a pytest param, skipped with its reason when it
    cannot run on ``device`` here."""
    params = []
    for name, impl in sorted(diffcore.implementations(op).items()):
        reason = impl.reason(device)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def maybe_use(name: str | None):
    """``diffcore.use(name)``, or nothing (the dispatcher) for None."""
    return diffcore.use(name) if name is not None else contextlib.nullcontext()


def assert_close_to_reference(out: torch.Tensor, ref_fp32: torch.Tensor, ref_same_dtype: torch.Tensor) -> None:
    """fp32: close to the fp32 reference. Low precision (flash-attention's rule): the error against
    the fp32 reference is at most twice that of the reference computed in the same dtype."""
    verdict = standard_tolerance(out.dtype).check(out, ref_fp32, ref_same_dtype)
    assert verdict.passed, f"{out.dtype}: {verdict.message}"


def strided_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values laid out as: contiguous, rows with a padded stride, or column-major."""
    return x if kind == "contiguous" else _arrange(x, kind)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh Python with ``env`` added to the environment (2 minutes at most)."""
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def run_with_isa(isa: str, code: str) -> list[str]:
    """Runs ``code`` in a fresh Python whose C++ kernels are the ``isa`` build ("avx2", "default"),
    forced with ATEN_CPU_CAPABILITY; returns its stdout split on whitespace. Skips the test when
    the extension is not loaded."""
    if diffcore._library._C is None:
        pytest.skip(f"the C++ extension is not loaded: {diffcore._library.EXTENSION_MISSING}")
    res = run_python(code, ATEN_CPU_CAPABILITY=isa)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()
