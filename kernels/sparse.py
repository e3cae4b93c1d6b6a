"""sparse family, Triton: CSR SpMM with the normalisation applied on the fly, and LightGCN stacks.

    A_hat[r, c] = rs[r] * v[e] * cs[c]            (rs, v, cs optional: ones)
    spmm:       out[r, :] = rs[r] * sum_e v[e] cs[col[e]] X[col[e], :]
    propagate:  E_0 = X, E_k = A_hat E_{k-1},  out = sum_k w_k E_k   (layers never stacked)

The meaning is ``diffcore.reference.sparse``; the CPU twin is csrc/cpu/sparse.cpp, whose layer
scheme this follows: layers are kept as ``S_k = cs * E_k`` in the accumulation dtype (float32, or
float64 for float64 features), and the pass that writes a row of E_k also adds ``w_k E_k`` into the
combine. One program per (row, block of feature columns), looping over the row's nonzeros in
blocks of BLOCK_E: a row-per-program SpMM (a hub row is one long program; the CUDA C++ kernel in
csrc/cuda/sparse.cu gives each row a warp instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_rows, device_guard, finish, scratch, unit_cols
from .philox import round_to

_FEATURE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_BLOCK_E = 16  # nonzeros gathered at once
_MAX_BLOCK_D = 128  # feature columns per program at most


@triton.jit
def _csr_layer_kernel(
    crow_ptr,  # (n + 1,) int64
    col_ptr,  # (nnz,) int32/int64
    val_ptr,  # (nnz,) float32, or None (ones)
    rs_ptr,  # (n,) float32 row scale, or None
    cs_ptr,  # (m,) float32 column scale, or None
    y_ptr,  # (m, d) rows gathered: X (scaled by cs per nonzero when SCALE_IN) or S_{k-1}
    y_row_stride,
    next_ptr,  # (n, d) accumulation dtype, contiguous: S_k = cs * e is written here, or None
    x0_ptr,  # (n, d) E_0, added with weight w0, or None
    x0_row_stride,
    sum_ptr,  # (n, d) accumulation dtype: the running combine, read when READ_SUM
    sum_row_stride,
    out_ptr,  # (n, d): where this pass's combine goes (the result in the last pass), or None
    out_row_stride,
    d,
    w0: tl.float64,  # float arguments: see kernels/_launch.py's F64_SCALARS
    wk: tl.float64,
    SCALE_IN: tl.constexpr,
    READ_SUM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """For one row r and BLOCK_D columns: ``e = rs[r] sum_e w_e y[col[e]]``; stores ``cs[r] e``
    into next; writes ``wk e (+ w0 x0[r]) (+ sum[r])`` to out."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < d
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        emask = offs < end
        c = tl.load(col_ptr + offs, mask=emask, other=0).to(tl.int64)
        w = tl.full([BLOCK_E], 1.0, ACC)
        if val_ptr is not None:
            w = tl.load(val_ptr + offs, mask=emask, other=0.0).to(ACC)
        if SCALE_IN:
            w = w * tl.load(cs_ptr + c, mask=emask, other=0.0).to(ACC)
        y = tl.load(y_ptr + c[:, None] * y_row_stride + cols[None, :], mask=emask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(y.to(ACC) * w[:, None], axis=0)
    e = acc
    if rs_ptr is not None:
        e = e * tl.load(rs_ptr + row).to(ACC)
    if next_ptr is not None:
        s = e
        if cs_ptr is not None:
            s = s * tl.load(cs_ptr + row).to(ACC)
        tl.store(next_ptr + row * d + cols, s, mask=dmask)
    if out_ptr is not None:
        o = e * tl.full([], wk, ACC)
        if x0_ptr is not None:
            o += tl.full([], w0, ACC) * tl.load(x0_ptr + row * x0_row_stride + cols, mask=dmask).to(ACC)
        if READ_SUM:
            o += tl.load(sum_ptr + row * sum_row_stride + cols, mask=dmask)
        tl.store(out_ptr + row * out_row_stride + cols, round_to(o, out_ptr.dtype.element_ty), mask=dmask)


def _check_csr(crow, col, values, row_scale, col_scale, x: torch.Tensor) -> None:
    """The checks of csrc/cpu/sparse.cpp, values included (host-side: on CUDA this synchronises)."""
    check_rows(x, "x", _FEATURE_DTYPES)
    if crow.dim() != 1 or crow.dtype != torch.int64 or crow.numel() < 1:
        raise RuntimeError(f"crow: expected (rows + 1,) int64 row pointers, got {crow.dtype} {tuple(crow.shape)}")
    if col.dim() != 1 or col.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"col: expected 1-D int32 or int64 column indices, got {col.dtype} {tuple(col.shape)}")
    n, m = crow.numel() - 1, x.shape[0]
    for name, t, size in (("crow", crow, None), ("col", col, None), ("values", values, col.numel()),
                          ("row_scale", row_scale, n), ("col_scale", col_scale, m)):
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"{name}: expected a tensor on {x.device} (the device of x), got {t.device}")
        if not t.is_contiguous():
            raise RuntimeError(f"{name}: expected a contiguous tensor")
        if size is not None and (t.dtype != torch.float32 or t.dim() != 1 or t.numel() != size):
            raise RuntimeError(f"{name}: expected ({size},) float32, got {t.dtype} {tuple(t.shape)}")
    if int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow.diff() < 0).any()):
        raise RuntimeError(f"crow: expected non-decreasing row pointers from 0 to nnz = {col.numel()}")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= m):
        raise RuntimeError(f"sparse: a column index lies outside [0, {m})")


def _layer(crow, col, values, row_scale, col_scale, *, y, scale_in, next_, x0, w0, wk, sum_, out, acc_dtype):
    """One launch of the layer kernel over every row (n = crow.numel() - 1)."""
    n, d = crow.numel() - 1, y.shape[1]
    block_d = min(_MAX_BLOCK_D, triton.next_power_of_2(d))
    grid = (n, triton.cdiv(d, block_d))
    _csr_layer_kernel[grid](
        crow, col, values, row_scale, col_scale,
        y, y.stride(0),
        next_,
        x0, 0 if x0 is None else x0.stride(0),
        sum_, 0 if sum_ is None else sum_.stride(0),
        out, 0 if out is None else out.stride(0),
        d, float(w0), float(wk),
        SCALE_IN=scale_in, READ_SUM=sum_ is not None,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        BLOCK_E=_BLOCK_E, BLOCK_D=block_d,
    )


def sparse_spmm_out(
    crow: torch.Tensor,  # (n + 1,) int64
    col: torch.Tensor,  # (nnz,) int32/int64
    values: torch.Tensor | None,  # (nnz,) float32
    row_scale: torch.Tensor | None,  # (n,) float32
    col_scale: torch.Tensor | None,  # (m,) float32
    t_crow: torch.Tensor,  # the transpose's arrays (backward only)
    t_col: torch.Tensor,
    t_values: torch.Tensor | None,
    x: torch.Tensor,  # (m, d)
    out: torch.Tensor,  # (n, d) x's dtype
) -> None:
    """Writes ``out = A_hat x`` (accumulation in float32, float64 for float64 x)."""
    _check_csr(crow, col, values, row_scale, col_scale, x)
    if out.shape != (crow.numel() - 1, x.shape[1]) or out.dtype != x.dtype:
        expected = (crow.numel() - 1, x.shape[1])
        raise RuntimeError(f"out: expected {expected} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dst = scratch(out)
    with device_guard(x):
        _layer(crow, col, values, row_scale, col_scale, y=unit_cols(x), scale_in=col_scale is not None,
               next_=None, x0=None, w0=0.0, wk=1.0, sum_=None, out=dst, acc_dtype=acc_dtype)
    finish(dst, out)


def sparse_propagate_out(
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    t_crow: torch.Tensor,
    t_col: torch.Tensor,
    t_values: torch.Tensor | None,
    x: torch.Tensor,  # (n, d) E_0
    num_layers: int,
    weights: list[float],  # num_layers + 1
    out: torch.Tensor,  # (n, d) x's dtype
) -> None:
    """Writes ``out = sum_k weights[k] A_hat^k x``, one launch per layer, no layer stacked."""
    _check_csr(crow, col, values, row_scale, col_scale, x)
    n = crow.numel() - 1
    if x.shape[0] != n:
        raise RuntimeError(f"E0: expected {n} rows (one per node of the graph), got {x.shape[0]}")
    if len(weights) != num_layers + 1:
        raise RuntimeError(f"weights: expected {num_layers + 1} layer weights, got {len(weights)}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise RuntimeError(f"out: expected {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if num_layers == 0:
        out.copy_(x.to(acc_dtype) * weights[0])
        return
    if out.numel() == 0:
        return
    x = unit_cols(x)
    dst = scratch(out)
    combine = dst if dst.dtype == acc_dtype else torch.empty(x.shape, dtype=acc_dtype, device=x.device)
    layers = [torch.empty(x.shape, dtype=acc_dtype, device=x.device) if num_layers > k else None for k in (2, 1)]
    summed = False  # whether combine holds a partial sum
    with device_guard(x):
        for k in range(1, num_layers + 1):
            first, last = k == 1, k == num_layers
            x0 = x if first and weights[0] != 0.0 else None
            if last:
                target = dst
            elif weights[k] != 0.0 or x0 is not None:
                target = combine
            else:
                target = None  # this layer adds nothing to the combine
            _layer(
                crow, col, values, row_scale, col_scale,
                y=x if first else layers[(k - 1) % 2], scale_in=first and col_scale is not None,
                next_=None if last else layers[k % 2], x0=x0, w0=weights[0], wk=weights[k],
                sum_=combine if summed and target is not None else None, out=target, acc_dtype=acc_dtype,
            )
            summed = summed or target is not None
    finish(dst, out)
