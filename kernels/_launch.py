"""What every launcher shares: the CUDA device guard, the operand checks, and operands with unit
column stride (the kernels index a row as ``base + r * row_stride + j``).

F64_SCALARS: compiled Triton types a Python float argument as float32, and the interpreter keeps it
a Python float that the first operation (``tl.cast`` included) rounds to float32. A float argument
of a kernel that also computes in float64 is therefore annotated ``tl.float64`` (compiled: a
float64 scalar) and turned into the compute dtype with ``tl.full([], x, ACC)`` (a cast of that
scalar; in the interpreter, a constant made from the Python float in ACC directly): a float64 step
then uses the exact value on both, a float32 one the value rounded once."""

from __future__ import annotations

import contextlib

import torch

from diffcore._checks import FEATURE_DTYPES, dtype_names, like


def device_guard(t: torch.Tensor):
    """The CUDA device of ``t`` as the current device while a kernel launches; nothing on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_rows(x: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...] = FEATURE_DTYPES) -> None:
    """``x`` (named ``name``) a 2-D tensor of one of ``dtypes``, else a RuntimeError naming it."""
    if x.dim() != 2:
        raise RuntimeError(f"{name}: expected a 2-D tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise RuntimeError(f"{name}: expected {dtype_names(dtypes)}, got {x.dtype}")


def check_noise(x: torch.Tensor, noise: torch.Tensor | None, seed: int | None, offset: int) -> None:
    """A step's noise: a tensor like x, or drawn from the Philox stream (seed, offset), not both."""
    if noise is not None:
        check_like(noise, x, "noise")
    if noise is not None and seed is not None:
        raise RuntimeError("noise and seed: give one, not both")
    if offset < 0:
        raise RuntimeError(f"offset: must be non-negative, got {offset}")


def check_like(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """``t`` (named ``name``) on x's device with x's dtype and shape: the public API's check
    (``_checks.like``), raised as the RuntimeError a kernel-level check gives (as the C++ kernels'
    TORCH_CHECKs do)."""
    try:
        like(name, t, x, "x")
    except (TypeError, ValueError) as e:
        raise RuntimeError(str(e)) from None


def _strided_cols(t: torch.Tensor | None) -> bool:
    return t is not None and t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1


def unit_cols(t: torch.Tensor | None) -> torch.Tensor | None:
    """A read operand: ``t`` itself, or a contiguous copy when its columns are strided (None, 1-D
    and one-column tensors pass as they are)."""
    return t.contiguous() if _strided_cols(t) else t


def scratch(out: torch.Tensor | None, *, contiguous: bool = False) -> torch.Tensor | None:
    """A written operand: ``out`` itself, or an empty tensor with unit column stride (with
    ``contiguous``: wholly contiguous, for kernels that index it flat) that the launcher copies into
    ``out`` after the kernel (``finish``)."""
    fresh = out is not None and (not out.is_contiguous() if contiguous else _strided_cols(out))
    return torch.empty(out.shape, dtype=out.dtype, device=out.device) if fresh else out


def finish(dst: torch.Tensor | None, out: torch.Tensor | None) -> None:
    """Copies a ``scratch`` destination back into ``out``; nothing when the kernel wrote ``out``."""
    if dst is not out:
        out.copy_(dst)
