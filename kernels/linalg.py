"""linalg family, Triton: sketches ``A @ Omega`` with Omega generated in registers, never stored.

    Omega (n x k): element (i, j) is element i * k + j of the Philox stream (seed, offset)
      gaussian     z_(i k + j)                                  (kernels/philox.py)
      rademacher   1 - 2 * bit31(w)        w = word (i k + j) % 4 of counter offset + (i k + j) // 4
      sparse       rademacher * [(w >> 7) & 0xffffff < threshold],  threshold = floor(density 2^24)
    dense:  out = scale * A @ Omega                 A (m, n), float32/float64, any strides
    csr:    out = scale * A_hat @ Omega             A_hat[r, c] = rs[r] v[e] cs[c]

The meaning is ``diffcore.reference.linalg``; the CPU twin is csrc/cpu/linalg.cpp. On a GPU
arithmetic is cheap and memory is not, so each program regenerates the Omega it needs instead of
sharing tiles: the dense kernel (one program per BLOCK_M x BLOCK_K block of the output) makes
each (BLOCK_N x BLOCK_K) tile of Omega in registers as it walks n; the CSR kernel (one program per
row and BLOCK_K columns) makes Omega's rows at the row's column indices. float32 products use
``tl.dot`` in IEEE float32 (no TF32); float64 ones a broadcast multiply and sum. ``scale`` is
applied by the launcher (a float kernel argument would be float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_guard, finish, scratch
from .philox import philox4x32_10, philox_normal, seed_words

_DTYPES = (torch.float32, torch.float64)
_KINDS = {"gaussian": 0, "rademacher": 1, "sparse": 2}
_BLOCK_E = 16  # nonzeros gathered at once
_MAX_BLOCK_K = 32  # output columns per program at most (64 spilled 312 bytes a thread on sm_90)


@triton.jit
def _omega(idx, seed_lo, seed_hi, offset, threshold, KIND: tl.constexpr):
    """Omega's values at the logical indices ``idx`` (int64 block, i * k + j), as float32."""
    if KIND == 0:
        return philox_normal(idx, seed_lo, seed_hi, offset)
    counter = (idx >> 2).to(tl.uint64) + offset.to(tl.uint64)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
    lane = idx & 3
    w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    sign = tl.where((w >> 31) == 0, 1.0, -1.0)
    if KIND == 2:
        keep = ((w >> 7) & 0xFFFFFF) < threshold.to(tl.uint32)
        sign = tl.where(keep, sign, 0.0)
    return sign


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "threshold"])
def _dense_sketch_kernel(
    a_ptr,  # (m, n) float32/float64
    out_ptr,  # (m, k) contiguous, a's dtype
    m,
    n,
    k,
    stride_am,
    stride_an,
    seed_lo,
    seed_hi,
    offset,
    threshold,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[rm, rk] = sum_i a[rm, i] Omega[i, rk] for this program's block."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mmask = rm < m
    kmask = rk < k
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    for i0 in range(0, n, BLOCK_N):
        ri = i0 + tl.arange(0, BLOCK_N).to(tl.int64)
        imask = ri < n
        a = tl.load(a_ptr + rm[:, None] * stride_am + ri[None, :] * stride_an, mask=mmask[:, None] & imask[None, :],
                    other=0.0)
        w = _omega(ri[:, None] * k + rk[None, :], seed_lo, seed_hi, offset, threshold, KIND)
        w = tl.where(imask[:, None] & kmask[None, :], w, 0.0).to(ACC)
        if ACC == tl.float64:
            acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)
        else:
            acc = tl.dot(a, w, acc, input_precision="ieee")
    tl.store(out_ptr + rm[:, None] * k + rk[None, :], acc, mask=mmask[:, None] & kmask[None, :])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "threshold"])
def _csr_sketch_kernel(
    crow_ptr,  # (rows + 1,) int64
    col_ptr,  # (nnz,) int32/int64
    val_ptr,  # (nnz,) float32/float64, or None (ones)
    rs_ptr,  # (rows,) float32, or None
    cs_ptr,  # (n_cols,) float32, or None
    out_ptr,  # (rows, k) contiguous
    k,
    seed_lo,
    seed_hi,
    offset,
    threshold,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[r, rk] = rs[r] * sum_e v[e] cs[c] Omega[c, rk], c = col[e], over row r."""
    row = tl.program_id(0).to(tl.int64)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = rk < k
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    acc = tl.zeros([BLOCK_K], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        emask = offs < end
        c = tl.load(col_ptr + offs, mask=emask, other=0).to(tl.int64)
        w = tl.full([BLOCK_E], 1.0, ACC)
        if val_ptr is not None:
            w = tl.load(val_ptr + offs, mask=emask, other=0.0).to(ACC)
        if cs_ptr is not None:
            w = w * tl.load(cs_ptr + c, mask=emask, other=0.0).to(ACC)
        w = tl.where(emask, w, 0.0)
        om = _omega(c[:, None] * k + rk[None, :], seed_lo, seed_hi, offset, threshold, KIND).to(ACC)
        acc += tl.sum(om * w[:, None], axis=0)
    if rs_ptr is not None:
        acc = acc * tl.load(rs_ptr + row).to(ACC)
    tl.store(out_ptr + row * k + rk, acc, mask=kmask)


def _omega_args(kind: str, density: float, seed: int, offset: int) -> tuple[int, int, int, int, int]:
    if kind not in _KINDS:
        raise RuntimeError(f"kind: expected 'gaussian', 'rademacher' or 'sparse', got '{kind}'")
    if offset < 0:
        raise RuntimeError(f"offset: expected a non-negative int, got {offset}")
    threshold = 0
    if kind == "sparse":
        if not 0 < density <= 1:
            raise RuntimeError(f"density: expected a value in (0, 1], got {density}")
        threshold = int(density * (1 << 24))  # floor(density 2^24), as the reference
    seed_lo, seed_hi = seed_words(seed)
    return _KINDS[kind], seed_lo, seed_hi, offset, threshold


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def linalg_sketch_out(
    a: torch.Tensor,  # (m, n) float32/float64
    k: int,
    kind: str,
    density: float,
    scale: float,
    seed: int,
    offset: int,
    out: torch.Tensor,  # (m, k) a's dtype
) -> None:
    """Writes ``out = scale * (a @ Omega)``; NaN/Inf in a raise (host-side: on CUDA this syncs)."""
    if a.dim() != 2 or a.dtype not in _DTYPES:
        raise RuntimeError(f"A: expected a 2-D float32 or float64 tensor, got {a.dtype} {tuple(a.shape)}")
    if k < 0:
        raise RuntimeError(f"k: expected a non-negative number of columns, got {k}")
    kind_id, seed_lo, seed_hi, offset, threshold = _omega_args(kind, density, seed, offset)
    m, n = a.shape
    if out.shape != (m, k) or out.dtype != a.dtype:
        raise RuntimeError(f"out: expected {(m, k)} {a.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return
    if a.numel() and not bool(torch.isfinite(a).all()):
        raise RuntimeError("A: expected finite values, found NaN or Inf")
    dst = scratch(out, contiguous=True)
    fp64 = a.dtype == torch.float64
    block_m, block_n = (16, 16) if fp64 else (32, 32)
    block_k = max(16, min(_MAX_BLOCK_K if not fp64 else 16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    with device_guard(a):
        _dense_sketch_kernel[grid](
            a, dst, m, n, k, a.stride(0), a.stride(1), seed_lo, seed_hi, offset, threshold,
            KIND=kind_id, ACC=_acc(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    if scale != 1.0:  # on the host: a float argument would reach the kernel as float32
        dst.mul_(scale)
    finish(dst, out)


def linalg_sketch_csr_out(
    crow: torch.Tensor,  # (rows + 1,) int64
    col: torch.Tensor,  # (nnz,) int32/int64
    values: torch.Tensor | None,  # (nnz,) float32/float64
    row_scale: torch.Tensor | None,  # (rows,) float32
    col_scale: torch.Tensor | None,  # (n_cols,) float32
    n_cols: int,
    k: int,
    kind: str,
    density: float,
    scale: float,
    seed: int,
    offset: int,
    dtype: torch.dtype,
    out: torch.Tensor,  # (rows, k) dtype
) -> None:
    """Writes ``out = scale * (A_hat @ Omega)`` (accumulation in ``dtype``)."""
    if dtype not in _DTYPES:
        raise RuntimeError(f"dtype: expected float32 or float64, got {dtype}")
    if crow.dim() != 1 or crow.dtype != torch.int64 or crow.numel() < 1:
        raise RuntimeError(f"crow: expected (rows + 1,) int64 row pointers, got {crow.dtype} {tuple(crow.shape)}")
    if col.dim() != 1 or col.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"col: expected 1-D int32 or int64 column indices, got {col.dtype} {tuple(col.shape)}")
    kind_id, seed_lo, seed_hi, offset, threshold = _omega_args(kind, density, seed, offset)
    rows, nnz = crow.numel() - 1, col.numel()
    for name, t, size in (("values", values, nnz), ("row_scale", row_scale, rows), ("col_scale", col_scale, n_cols)):
        if t is None:
            continue
        if t.device != crow.device or not t.is_contiguous() or t.dim() != 1 or t.numel() != size:
            raise RuntimeError(f"{name}: expected a contiguous ({size},) tensor on {crow.device}")
        if t.dtype not in (_DTYPES if name == "values" else (torch.float32,)):
            raise RuntimeError(f"{name}: unexpected dtype {t.dtype}")
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow.diff() < 0).any()):
        raise RuntimeError(f"crow: expected non-decreasing row pointers from 0 to nnz = {nnz}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= n_cols):
        raise RuntimeError(f"linalg_sketch_csr: column indices must lie in [0, {n_cols})")
    if values is not None and nnz and not bool(torch.isfinite(values).all()):
        raise RuntimeError("values: expected finite values, found NaN or Inf")
    if out.shape != (rows, k) or out.dtype != dtype:
        raise RuntimeError(f"out: expected {(rows, k)} {dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return
    dst = scratch(out, contiguous=True)
    block_k = min(_MAX_BLOCK_K, triton.next_power_of_2(k))
    grid = (rows, triton.cdiv(k, block_k))
    with device_guard(crow):
        _csr_sketch_kernel[grid](
            crow, col, values, row_scale, col_scale, dst, k, seed_lo, seed_hi, offset, threshold,
            KIND=kind_id, ACC=_acc(dtype), BLOCK_E=_BLOCK_E, BLOCK_K=block_k,
        )
    if scale != 1.0:
        dst.mul_(scale)
    finish(dst, out)
