"""diffusion family, Triton: the fused affine step behind q_sample, p_step and ddim_step.

    f          = (1 + w) * model_out - w * uncond_out        (uncond_out optional: f = model_out)
    out[r, :]  = a_r * x[r, :] + b_r * f[r, :] + c_r * z[r, :]
    (a_r, b_r, c_r) = float32(table[t[r]])   (or table[r] / table[0] when t is not given)
    z          = the given noise, or the Philox stream (seed, offset) at index r * N + j

The meaning is ``diffcore.reference.diffusion.step``; the CPU twin is csrc/cpu/diffusion.cpp. A row
whose c is 0 (t = 0 of p_step) takes no noise (``diffcore.reference.diffusion.noise_term``). One
program per (row, block of columns).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import check_like, check_noise, check_rows, device_guard, finish, scratch, unit_cols
from .philox import philox_normal, round_to, seed_words

_MAX_BLOCK = 2048  # columns per program at most; the values do not depend on it


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
def _diffusion_step_kernel(
    out_ptr,  # (B, N) float32/float16/bfloat16, unit column stride
    out_row_stride,
    x_ptr,  # (B, N) out's dtype, unit column stride (the same memory as out when in place)
    x_row_stride,
    f_ptr,  # (B, N) model output, or None (q_sample)
    f_row_stride,
    u_ptr,  # (B, N) unconditional model output, or None (no guidance)
    u_row_stride,
    z_ptr,  # (B, N) given noise, or None (seeded or noiseless)
    z_row_stride,
    coef_ptr,  # (B, 3) float32 rows (a, b, c), contiguous
    n_cols,  # N
    guidance,  # w
    seed_lo,  # low 32 bits of the seed (SEEDED only)
    seed_hi,  # high 32 bits of the seed (SEEDED only)
    offset,  # first Philox counter (SEEDED only)
    SEEDED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[r, j] = a_r x[r, j] + b_r f[r, j] + c_r z[r, j]`` for one row r and BLOCK columns j."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(coef_ptr + 3 * row)
    b = tl.load(coef_ptr + 3 * row + 1)
    c = tl.load(coef_ptr + 3 * row + 2)
    acc = a * tl.load(x_ptr + row * x_row_stride + cols, mask=mask).to(tl.float32)
    if f_ptr is not None:
        f = tl.load(f_ptr + row * f_row_stride + cols, mask=mask).to(tl.float32)
        if u_ptr is not None:
            u = tl.load(u_ptr + row * u_row_stride + cols, mask=mask).to(tl.float32)
            f = (1.0 + guidance) * f - guidance * u
        acc += b * f
    if z_ptr is not None:
        if c != 0.0:
            acc += c * tl.load(z_ptr + row * z_row_stride + cols, mask=mask).to(tl.float32)
    elif SEEDED:
        if c != 0.0:
            acc += c * philox_normal(row * n_cols + cols, seed_lo, seed_hi, offset)
    tl.store(out_ptr + row * out_row_stride + cols, round_to(acc, out_ptr.dtype.element_ty), mask=mask)


def _coefficients(
    table: torch.Tensor,  # (K, 3) float64/float32
    t: torch.Tensor | None,  # (B,) or (1,) int64, or None
    rows: int,  # B
    clamp_t: bool,
    device: torch.device,
) -> torch.Tensor:
    """The (B, 3) float32 rows ``float32(table[t[r]])`` (t None: ``table[r]`` or ``table[0]``),
    contiguous on ``device``. Checks t's values on the host: on CUDA this synchronises."""
    if table.dim() != 2 or table.shape[1] != 3:
        raise RuntimeError(f"diffusion_step: table must be (K, 3), got {tuple(table.shape)}")
    if table.dtype not in (torch.float64, torch.float32):
        raise RuntimeError(f"diffusion_step: table must be float64 or float32, got {table.dtype}")
    if table.device != device:
        raise RuntimeError(f"table: expected a tensor on {device} (the device of x), got {table.device}")
    K = table.shape[0]
    if t is None:
        if K not in (1, rows):
            raise RuntimeError(f"diffusion_step: without t, table needs 1 or {rows} rows, got {K}")
        return table.float().expand(rows, 3).contiguous()
    if t.dtype != torch.int64:
        raise RuntimeError(f"t: expected an int64 tensor, got {t.dtype}")
    if t.numel() not in (1, rows):
        raise RuntimeError(f"t: expected {rows} timesteps (one per row) or 1, got {t.numel()}")
    if t.device != device:
        raise RuntimeError(f"t: expected a tensor on {device} (the device of x), got {t.device}")
    t = t.reshape(-1)
    k = t.clamp(max=K - 1) if clamp_t else t
    outside = (k < 0) | (k >= K)
    if bool(outside.any()):
        r = int(outside.nonzero()[0, 0])
        raise RuntimeError(f"t: every timestep must lie in [0, {K}), got t[{r}] = {int(t[r])}")
    return table[k].float().expand(rows, 3).contiguous()


class GuidedOperands(NamedTuple):
    """The launch operands of a guided step: unit-column views of x, model_out, uncond_out and
    noise, the destination (``out`` or a scratch, see ``_launch.scratch``), the (B, 3) coefficients
    and the seed's two words."""

    x: torch.Tensor
    f: torch.Tensor | None
    u: torch.Tensor | None
    z: torch.Tensor | None
    dst: torch.Tensor
    coef: torch.Tensor
    seed_lo: int
    seed_hi: int


def guided_operands(
    x: torch.Tensor, f: torch.Tensor | None, f_uncond: torch.Tensor | None, guidance: float, t: torch.Tensor | None,
    table: torch.Tensor, noise: torch.Tensor | None, seed: int | None, offset: int, clamp_t: bool, out: torch.Tensor,
) -> GuidedOperands | None:
    """The checks and operands the fused step and the sphere ``p_step`` share (their C++ twin is
    csrc/cpu/guided_step.h); x itself is checked by the caller. None when there is nothing to write."""
    if f is not None:
        check_like(f, x, "model_out")
    if f_uncond is not None:
        if f is None:
            raise RuntimeError("uncond_out: given without model_out")
        check_like(f_uncond, x, "uncond_out")
    if guidance != 0.0 and f_uncond is None:
        raise RuntimeError("guidance_scale: a non-zero scale needs uncond_out")
    check_noise(x, noise, seed, offset)
    check_like(out, x, "out")
    coef = _coefficients(table, t, x.shape[0], clamp_t, x.device)
    if x.numel() == 0:
        return None
    seed_lo, seed_hi = seed_words(seed) if seed is not None else (0, 0)
    xs, fs, us, zs = (unit_cols(v) for v in (x, f, f_uncond, noise))
    return GuidedOperands(xs, fs, us, zs, scratch(out), coef, seed_lo, seed_hi)


def diffusion_step_out(
    x: torch.Tensor,  # (B, N) float32/float16/bfloat16
    f: torch.Tensor | None,  # (B, N) model output, x's dtype
    f_uncond: torch.Tensor | None,  # (B, N) unconditional model output, x's dtype
    guidance: float,
    t: torch.Tensor | None,  # (B,) or (1,) int64
    table: torch.Tensor,  # (K, 3) float64/float32 rows (a, b, c)
    noise: torch.Tensor | None,  # (B, N) x's dtype
    seed: int | None,
    offset: int,
    clamp_t: bool,
    out: torch.Tensor,  # (B, N) x's dtype; may be x itself
) -> None:
    """Writes ``out = a x + b ((1 + w) f - w f_uncond) + c z`` row by row, math in float32.

    ``(a, b, c) = float32(table[t[r]])`` per row r (t of one element: every row; t None: ``table[r]``,
    or ``table[0]`` for a one-row table); ``clamp_t`` maps ``t >= K`` to ``K - 1``, else t outside
    ``[0, K)`` raises before anything is launched (a host-side check: it synchronises on CUDA).
    ``f`` None drops the b term (q_sample), ``f_uncond`` None means ``f`` as given. ``z`` is
    ``noise``, or with ``seed`` the Philox stream ``(seed, offset)`` at index ``r * N + j``, or
    nothing; a row with ``c == 0`` skips it. Rows may be strided; ``out`` may be ``x``.
    """
    check_rows(x, "x")
    op = guided_operands(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out)
    if op is None:
        return
    rows, cols = x.shape
    block = min(_MAX_BLOCK, triton.next_power_of_2(cols))
    with device_guard(x):
        _diffusion_step_kernel[(rows, triton.cdiv(cols, block))](
            op.dst, op.dst.stride(0),
            op.x, op.x.stride(0),
            op.f, 0 if op.f is None else op.f.stride(0),
            op.u, 0 if op.u is None else op.u.stride(0),
            op.z, 0 if op.z is None else op.z.stride(0),
            op.coef, cols, float(guidance), op.seed_lo, op.seed_hi, offset,
            SEEDED=seed is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )
    finish(op.dst, out)
