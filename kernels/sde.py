"""sde family, Triton: the fused step behind the score-SDE predictors and the Langevin corrector.

    (a, b, c, k) = coef[r] (or coef[0] for all rows)     float64 or float32 rows
    s            = k * score
    g            = 1, or with snr: snr * mean_r ||z_r|| / mean_r ||s_r||
    x_mean[r, :] = a x[r, :] + b g^2 s[r, :]
    out[r, :]    = x_mean[r, :] + c g z[r, :]
    z            = the given noise, or the Philox stream (seed, offset) at index r * N + j, or none

The meaning is ``diffcore.reference.sde.step``; the CPU twin is csrc/cpu/sde.cpp. The corrector's
batch factor g takes two small kernels before the step: per-row norms (one program per row), then
one program that sums them over the rows in a fixed order, so g does not depend on the grid.
Seeded noise is drawn for the norms and drawn again by the step (no noise tensor is stored).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffcore.reference.sde import ZERO_SCORE

from ._launch import check_like, check_noise, check_rows, device_guard, finish, scratch, unit_cols
from .philox import philox_normal, round_to, seed_words

_MAX_BLOCK = 2048  # columns per program at most; the values do not depend on it
_REDUCE_BLOCK = 1024  # rows per iteration of the batch reduction


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
def _sde_row_norms_kernel(
    norms_ptr,  # (B, 2) float32: ||z_r||, |k_r| ||s_r||
    s_ptr,  # (B, N) score, unit column stride
    s_row_stride,
    z_ptr,  # (B, N) given noise, or None (seeded or noiseless)
    z_row_stride,
    coef_ptr,  # (R, 4) float32 rows (a, b k, c, |k|), contiguous
    coef_row_stride,  # 4, or 0 for one row
    n_cols,  # N
    seed_lo,
    seed_hi,
    offset,
    SEEDED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The two norms of one row r, its columns in blocks of BLOCK, in order."""
    row = tl.program_id(0).to(tl.int64)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    zz = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = tl.load(s_ptr + row * s_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        ss += s * s
        if z_ptr is not None:
            z = tl.load(z_ptr + row * z_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            zz += z * z
        elif SEEDED:
            z = tl.where(mask, philox_normal(row * n_cols + cols, seed_lo, seed_hi, offset), 0.0)
            zz += z * z
    abs_k = tl.load(coef_ptr + row * coef_row_stride + 3)
    tl.store(norms_ptr + 2 * row, tl.sqrt(tl.sum(zz, axis=0)))
    tl.store(norms_ptr + 2 * row + 1, abs_k * tl.sqrt(tl.sum(ss, axis=0)))


@triton.jit
def _sde_batch_factor_kernel(
    factor_ptr,  # (1,) float32: g
    norms_ptr,  # (B, 2) float32
    n_rows,  # B
    snr,
    BLOCK: tl.constexpr,
):
    """``g = snr * mean ||z_r|| / mean |k_r| ||s_r||``: one program, rows in blocks, in order."""
    z_acc = tl.zeros([BLOCK], dtype=tl.float32)
    s_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        mask = rows < n_rows
        z_acc += tl.load(norms_ptr + 2 * rows, mask=mask, other=0.0)
        s_acc += tl.load(norms_ptr + 2 * rows + 1, mask=mask, other=0.0)
    z_mean = tl.sum(z_acc, axis=0) / n_rows
    s_mean = tl.sum(s_acc, axis=0) / n_rows
    tl.store(factor_ptr, snr * z_mean / s_mean)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
def _sde_step_kernel(
    out_ptr,  # (B, N) float32/float16/bfloat16, unit column stride
    out_row_stride,
    mean_ptr,  # (B, N) x_mean, or None (not written)
    mean_row_stride,
    x_ptr,  # (B, N) out's dtype, unit column stride (the same memory as out when in place)
    x_row_stride,
    s_ptr,  # (B, N) score
    s_row_stride,
    z_ptr,  # (B, N) given noise, or None (seeded or noiseless)
    z_row_stride,
    coef_ptr,  # (R, 4) float32 rows (a, b k, c, |k|), contiguous
    coef_row_stride,  # 4, or 0 for one row
    factor_ptr,  # (1,) float32 g, or None (g = 1)
    n_cols,  # N
    seed_lo,
    seed_hi,
    offset,
    SEEDED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``x_mean = a x + b g^2 s``, ``out = x_mean + c g z`` for one row r and BLOCK columns."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(coef_ptr + row * coef_row_stride)
    b = tl.load(coef_ptr + row * coef_row_stride + 1)
    c = tl.load(coef_ptr + row * coef_row_stride + 2)
    if factor_ptr is not None:
        g = tl.load(factor_ptr)
        b = b * (g * g)
        c = c * g
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + row * s_row_stride + cols, mask=mask).to(tl.float32)
    mean = a * x + b * s
    acc = mean
    if z_ptr is not None:
        if c != 0.0:
            acc = mean + c * tl.load(z_ptr + row * z_row_stride + cols, mask=mask).to(tl.float32)
    elif SEEDED:
        if c != 0.0:
            acc = mean + c * philox_normal(row * n_cols + cols, seed_lo, seed_hi, offset)
    if mean_ptr is not None:
        tl.store(mean_ptr + row * mean_row_stride + cols, round_to(mean, mean_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + row * out_row_stride + cols, round_to(acc, out_ptr.dtype.element_ty), mask=mask)


def _coefficients(coef: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """The (R, 4) float32 rows ``(a, b k, c, |k|)`` from the float64 (or float32) ``coef``."""
    if coef.dim() != 2 or coef.shape[1] != 4 or coef.shape[0] not in (1, rows):
        raise RuntimeError(f"sde_step: coef must be (1, 4) or ({rows}, 4), got {tuple(coef.shape)}")
    if coef.dtype not in (torch.float64, torch.float32):
        raise RuntimeError(f"sde_step: coef must be float64 or float32, got {coef.dtype}")
    if coef.device != device:
        raise RuntimeError(f"coef: expected a tensor on {device} (the device of x), got {coef.device}")
    c = coef.to(torch.float64)
    return torch.stack([c[:, 0], c[:, 1] * c[:, 3], c[:, 2], c[:, 3].abs()], 1).float().contiguous()


def sde_step_out(
    x: torch.Tensor,  # (B, N) float32/float16/bfloat16
    score: torch.Tensor,  # (B, N) x's dtype
    coef: torch.Tensor,  # (1, 4) or (B, 4) float64/float32 rows (a, b, c, k)
    noise: torch.Tensor | None,  # (B, N) x's dtype
    seed: int | None,
    offset: int,
    snr: float | None,
    out: torch.Tensor,  # (B, N) x's dtype; may be x itself
    mean_out: torch.Tensor | None,  # (B, N) x's dtype, or None: x_mean is not written
) -> None:
    """Writes ``out = x_mean + c g z`` and ``mean_out = x_mean = a x + b g^2 k score`` row by row,
    math in float32 (``g`` as in the module docstring). Rows may be strided; ``out`` may be ``x``."""
    check_rows(x, "x")
    check_like(score, x, "score")
    check_noise(x, noise, seed, offset)
    if snr is not None and not snr > 0:
        raise RuntimeError(f"snr: expected snr > 0, got {snr}")
    check_like(out, x, "out")
    if mean_out is not None:
        check_like(mean_out, x, "mean_out")
    rows, cols = x.shape
    coef32 = _coefficients(coef, rows, x.device)
    if rows == 0 or cols == 0:
        return

    xs, ss, zs = (unit_cols(v) for v in (x, score, noise))
    dst, mean_dst = scratch(out), scratch(mean_out)
    seed_lo, seed_hi = seed_words(seed) if seed is not None else (0, 0)
    coef_stride = 0 if coef32.shape[0] == 1 else 4
    block = min(_MAX_BLOCK, triton.next_power_of_2(cols))
    with device_guard(x):
        factor = None
        if snr is not None:
            norms = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
            _sde_row_norms_kernel[(rows,)](
                norms, ss, ss.stride(0), zs, 0 if zs is None else zs.stride(0), coef32, coef_stride,
                cols, seed_lo, seed_hi, offset, SEEDED=seed is not None, BLOCK=block,
            )
            torch._assert_async(norms[:, 1].sum() != 0, ZERO_SCORE)  # no host sync on a GPU
            factor = torch.empty(1, dtype=torch.float32, device=x.device)
            _sde_batch_factor_kernel[(1,)](factor, norms, rows, float(snr), BLOCK=_REDUCE_BLOCK)
        _sde_step_kernel[(rows, triton.cdiv(cols, block))](
            dst, dst.stride(0),
            mean_dst, 0 if mean_dst is None else mean_dst.stride(0),
            xs, xs.stride(0),
            ss, ss.stride(0),
            zs, 0 if zs is None else zs.stride(0),
            coef32, coef_stride, factor, cols, seed_lo, seed_hi, offset,
            SEEDED=seed is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )
    finish(dst, out)
    finish(mean_dst, mean_out)
