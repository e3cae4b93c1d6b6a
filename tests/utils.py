"""Helpers shared by the test modules: implementations as pytest parameters, tolerances by dtype."""

from __future__ import annotations

import pytest
import torch

import diffcore

# (rtol, atol) for float32 results; low precision is judged against the same-dtype reference.
FP32_TOL = (1e-5, 1e-5)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def impl_params(op: str, device: str = "cpu") -> list:
    """Every registered implementation of ``op`` as a pytest param, skipped with its reason when it
    cannot run on ``device`` here."""
    params = []
    for name, impl in sorted(diffcore.implementations(op).items()):
        reason = impl.reason(device)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_close_to_reference(out: torch.Tensor, ref_fp32: torch.Tensor, ref_same_dtype: torch.Tensor) -> None:
    """fp32: close to the fp32 reference. Low precision (flash-attention's rule): the error against
    the fp32 reference is at most twice that of the reference computed in the same dtype."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref_fp32, rtol=FP32_TOL[0], atol=FP32_TOL[1] * max(1.0, ref_fp32.abs().max().item()))
        return
    err = (out.float() - ref_fp32).abs().max().item()
    ref_err = (ref_same_dtype.float() - ref_fp32).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"{out.dtype}: error {err:.3g} > 2 x reference error {ref_err:.3g}"


def strided_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values laid out as: contiguous, rows with a padded stride, or column-major."""
    if kind == "contiguous":
        return x
    if kind == "row_stride":
        wide = torch.empty(x.shape[0], x.shape[1] + 5, dtype=x.dtype)
        wide[:, : x.shape[1]] = x
        return wide[:, : x.shape[1]]
    return x.t().contiguous().t()
