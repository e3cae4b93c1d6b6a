"""training family, Triton: DiffRec's per-row diffusion loss, its Lt_history update, LightGCN's BPR
loss and SGL's InfoNCE, forward and backward.

    diffusion loss   out[r] = w_r / pt_r * term_r;  term_r = mean_j (target - m)^2, or for the eps
                     likelihood rows (t = 0) mean_j (x0 - x0_hat)^2 / 2 with
                     x0_hat = c3 (c1 x0 + c2 z) - c4 m, c = float32(table[t_r, 1:5])
    history update   DiffRec's loop over the batch, as one program per timestep: the k-th row that
                     drew t lands at position count[t] + k - shift, shift = max(0, count + n_t - H)
    BPR              loss_b = softplus(<u, n> - <u, p>) + wd / 2 (|u0|^2 + |p0|^2 + |n0|^2),
                     the features in chunks of at most _BPR_BLOCK_D; the backward adds each row's
                     gradient into the tables with atomics
    InfoNCE          loss_i = logsumexp_j(<a_i, b_j> / tau) - <a_i, b_i> / tau, a running
                     logsumexp over blocks of columns (flash-attention's scheme); the backward
                     recomputes the logits, by row blocks for d/da and by column blocks for d/db;
                     the logits sum the features in chunks of at most _NCE_BLOCK_K, and each
                     gradient program writes a tile of at most _NCE_BLOCK_D features (recomputing
                     the full logits), so any d fits a program

The meaning is ``diffcore.reference.training``; the CPU twin is csrc/cpu/training.cpp. Values that
need checking (timesteps, pt, indices) are checked on the host before anything is launched (on
CUDA this synchronises). float16/bfloat16 compute in float32, float64 in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_guard, finish, scratch, unit_cols
from .philox import round_to

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_BLOCK = 2048  # columns per program of the diffusion loss at most
_BLOCK_ROWS = 16  # batch rows per program of BPR
_BPR_BLOCK_D = 32  # features per chunk of BPR's rows at most (128 spilled registers on sm_90)
_HISTORY_BLOCK = 1024  # history slots per chunk of the history update at most
_NCE_BLOCK = 32  # rows and columns of an InfoNCE logits block at most
_NCE_BLOCK_K = 32  # features per chunk of an InfoNCE logits block at most (128 spilled on sm_90)
_NCE_BLOCK_D = 64  # features per gradient tile at most
_NORM_EPS = 1e-12  # F.normalize's eps
_LIKELIHOOD: tl.constexpr = tl.constexpr(2)  # row mode: 0 target x0, 1 target noise, 2 eps likelihood at t = 0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_range(name: str, index: torch.Tensor, n: int, what: str = "index") -> None:
    flat = index.reshape(-1)
    outside = (flat < 0) | (flat >= n)
    if bool(outside.any()):
        i = int(outside.nonzero()[0, 0])
        raise RuntimeError(f"{name}: every {what} must lie in [0, {n}), got {name}[{i}] = {int(flat[i])}")


# --- diffusion loss -----------------------------------------------------------------------------
@triton.jit
def _diffusion_loss_kernel(
    out_ptr,  # (B,) float64
    m_ptr,  # (B, N) model output, unit column stride
    m_row_stride,
    x_ptr,  # (B, N) x0
    x_row_stride,
    z_ptr,  # (B, N) noise, or None
    z_row_stride,
    mode_ptr,  # (B,) int32 row mode
    coef_ptr,  # (B, 4) float32 c1..c4
    weight_ptr,  # (B,) float64 w_r / pt_r
    n_cols,  # N
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[r] = w_r term_r`` for one row r, its columns in blocks of BLOCK, in order."""
    row = tl.program_id(0).to(tl.int64)
    mode = tl.load(mode_ptr + row)
    c1 = tl.load(coef_ptr + 4 * row).to(ACC)
    c2 = tl.load(coef_ptr + 4 * row + 1).to(ACC)
    c3 = tl.load(coef_ptr + 4 * row + 2).to(ACC)
    c4 = tl.load(coef_ptr + 4 * row + 3).to(ACC)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        m = tl.load(m_ptr + row * m_row_stride + cols, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(ACC)
        e = x - m
        if z_ptr is not None:
            z = tl.load(z_ptr + row * z_row_stride + cols, mask=mask, other=0.0).to(ACC)
            x_hat = c3 * (c1 * x + c2 * z) - c4 * m
            e = tl.where(mode == 1, z - m, tl.where(mode == _LIKELIHOOD, x - x_hat, e))
        acc += e * e
    term = tl.sum(acc, axis=0).to(tl.float64) / n_cols
    term = tl.where(mode == _LIKELIHOOD, 0.5 * term, term)
    tl.store(out_ptr + row, tl.load(weight_ptr + row) * term)


@triton.jit
def _diffusion_loss_backward_kernel(
    g_ptr,  # (B, N) d/dm, contiguous, model_out's dtype
    m_ptr,
    m_row_stride,
    x_ptr,
    x_row_stride,
    z_ptr,
    z_row_stride,
    mode_ptr,
    coef_ptr,
    scale_ptr,  # (B,) float64 s_r = g_r w_r / (pt_r N)
    n_cols,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``d/dm = 2 s (m - target)``, or ``s c4 (x0 - x0_hat)`` on likelihood rows, for one row and
    BLOCK columns."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    mode = tl.load(mode_ptr + row)
    c1 = tl.load(coef_ptr + 4 * row).to(ACC)
    c2 = tl.load(coef_ptr + 4 * row + 1).to(ACC)
    c3 = tl.load(coef_ptr + 4 * row + 2).to(ACC)
    c4 = tl.load(coef_ptr + 4 * row + 3).to(ACC)
    s = tl.load(scale_ptr + row)
    k = tl.where(mode == _LIKELIHOOD, s * c4.to(tl.float64), -2.0 * s).to(ACC)
    m = tl.load(m_ptr + row * m_row_stride + cols, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(ACC)
    e = x - m
    if z_ptr is not None:
        z = tl.load(z_ptr + row * z_row_stride + cols, mask=mask, other=0.0).to(ACC)
        x_hat = c3 * (c1 * x + c2 * z) - c4 * m
        e = tl.where(mode == 1, z - m, tl.where(mode == _LIKELIHOOD, x - x_hat, e))
    tl.store(g_ptr + row * n_cols + cols, round_to(k * e, g_ptr.dtype.element_ty), mask=mask)


def _loss_rows(model_out, x0, noise, t, table, pt, eps, reweight):
    """Checks the operands and gathers the per-row (mode, float32 coefficients, w / pt)."""
    if model_out.dim() != 2:
        raise RuntimeError(f"model_out: expected a 2-D tensor, got {model_out.dim()}-D with shape "
                           f"{tuple(model_out.shape)}")
    if model_out.dtype not in _DTYPES:
        raise RuntimeError(f"model_out: expected float32, float16, bfloat16 or float64, got {model_out.dtype}")
    for name, v in (("x0", x0), ("noise", noise)):
        if v is not None and (v.shape != model_out.shape or v.dtype != model_out.dtype or v.device != model_out.device):
            raise RuntimeError(f"{name}: expected a {tuple(model_out.shape)} {model_out.dtype} tensor on "
                               f"{model_out.device} (like model_out), got {tuple(v.shape)} {v.dtype} on {v.device}")
    if eps and noise is None:
        raise RuntimeError("noise: prediction='eps' needs the noise (its target)")
    if table.dim() != 2 or table.shape[1] != 5 or table.dtype not in (torch.float64, torch.float32):
        raise RuntimeError(f"training_diffusion_loss: table must be (T, 5) float64 or float32, got "
                           f"{tuple(table.shape)} {table.dtype}")
    rows = model_out.shape[0]
    if t.dtype != torch.int64 or t.numel() not in (1, rows):
        raise RuntimeError(f"t: expected {rows} int64 timesteps (one per row) or 1, got {t.numel()} {t.dtype}")
    t = t.reshape(-1).expand(rows)
    _check_range("t", t, table.shape[0], "timestep")
    weight = table[t, 0].double() if reweight else torch.ones(rows, dtype=torch.float64, device=t.device)
    if pt is not None:
        if pt.shape != (rows,):
            raise RuntimeError(f"pt: expected shape ({rows},), got {tuple(pt.shape)}")
        bad = ~(pt > 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise RuntimeError(f"pt: every probability must be positive, got pt[{i}] = {float(pt[i])}")
        weight = weight / pt.double()
    mode = torch.full((rows,), 1 if eps else 0, dtype=torch.int32, device=t.device)
    if eps and reweight:
        mode = torch.where(t == 0, _LIKELIHOOD.value, mode).to(torch.int32)
    coef = table[t, 1:].float().contiguous()
    return mode, coef, weight.contiguous()


def _loss_launch(kernel, grid, first, model_out, x0, noise, mode, coef, last, block):
    ms, xs, zs = (unit_cols(v) for v in (model_out, x0, noise))
    with device_guard(model_out):
        kernel[grid](
            first, ms, ms.stride(0), xs, xs.stride(0), zs, 0 if zs is None else zs.stride(0),
            mode, coef, last, model_out.shape[1],
            ACC=tl.float64 if model_out.dtype == torch.float64 else tl.float32, BLOCK=block,
        )


def training_diffusion_loss_out(
    model_out: torch.Tensor,  # (B, N) float32/float16/bfloat16/float64
    x0: torch.Tensor,  # (B, N) like model_out
    noise: torch.Tensor | None,  # (B, N) like model_out
    t: torch.Tensor,  # (B,) or (1,) int64
    table: torch.Tensor,  # (T, 5) float64 rows (w, sqrt_ab, sqrt_1mab, sqrt_recip_ab, sqrt_recipm1_ab)
    pt: torch.Tensor | None,  # (B,) float, > 0
    eps: bool,
    reweight: bool,
    out: torch.Tensor,  # (B,) float64
) -> None:
    """Writes DiffRec's per-row loss ``w[t] term / pt`` (see the module docstring) into ``out``."""
    mode, coef, weight = _loss_rows(model_out, x0, noise, t, table, pt, eps, reweight)
    rows, cols = model_out.shape
    if rows == 0:
        return
    if cols == 0:
        out.fill_(float("nan"))
        return
    dst = scratch(out, contiguous=True)
    block = min(_MAX_BLOCK, triton.next_power_of_2(cols))
    _loss_launch(_diffusion_loss_kernel, (rows,), dst, model_out, x0, noise, mode, coef, weight, block)
    finish(dst, out)


def training_diffusion_loss_backward_out(
    grad: torch.Tensor,  # (B,) d total / d loss
    model_out: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor | None,
    t: torch.Tensor,
    table: torch.Tensor,
    pt: torch.Tensor | None,
    eps: bool,
    reweight: bool,
    out: torch.Tensor,  # (B, N) model_out's dtype: d total / d model_out
) -> None:
    """Writes ``d/dm = grad_r w_r / (pt_r N) (2 (m - target))`` (or ``c4 (x0 - x0_hat)`` on the
    eps likelihood rows) into ``out``."""
    mode, coef, weight = _loss_rows(model_out, x0, noise, t, table, pt, eps, reweight)
    rows, cols = model_out.shape
    if grad.numel() != rows:
        raise RuntimeError(f"grad: expected {rows} values (one per row), got {grad.numel()}")
    if rows == 0 or cols == 0:
        return
    scale = (grad.reshape(-1).double() * weight / cols).contiguous()
    dst = scratch(out, contiguous=True)
    block = min(_MAX_BLOCK, triton.next_power_of_2(cols))
    grid = (rows, triton.cdiv(cols, block))
    _loss_launch(_diffusion_loss_backward_kernel, grid, dst, model_out, x0, noise, mode, coef, scale, block)
    finish(dst, out)


# --- history update -----------------------------------------------------------------------------
@triton.jit
def _history_update_kernel(
    hist_ptr,  # (T, H) float64
    hist_row_stride,
    hist_col_stride,
    count_ptr,  # (T,) int64
    count_stride,
    t_ptr,  # (B,) int64, contiguous
    loss_ptr,  # (B,) float64, contiguous
    n_batch,  # B
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Timestep k = program_id: its n_k new losses in batch order appended to its FIFO."""
    k = tl.program_id(0).to(tl.int64)
    row = hist_ptr + k * hist_row_stride
    c0 = tl.load(count_ptr + k * count_stride)
    n_k = c0 * 0  # int64, like the sums added to it
    for start in range(0, n_batch, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        tv = tl.load(t_ptr + offs, mask=offs < n_batch, other=-1)
        n_k += tl.sum((tv == k).to(tl.int64), axis=0)
    total = c0 + n_k
    kept = tl.minimum(total, H)
    shift = total - kept  # values dropped from the front of old + new
    for h0 in range(0, H, BLOCK_H):  # the kept old values move to the front, chunk by chunk
        j = h0 + tl.arange(0, BLOCK_H)  # a chunk writes below what later chunks read
        old = tl.load(row + (j + shift) * hist_col_stride, mask=(j + shift < c0) & (j < H), other=0.0)
        tl.debug_barrier()
        tl.store(row + j * hist_col_stride, old, mask=j < c0 - shift)
    seen = c0 * 0
    for start in range(0, n_batch, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        inside = offs < n_batch
        tv = tl.load(t_ptr + offs, mask=inside, other=-1)
        hit = (tv == k) & inside
        rank = tl.cumsum(hit.to(tl.int64), axis=0) - 1 + seen
        pos = c0 + rank - shift
        value = tl.load(loss_ptr + offs, mask=inside, other=0.0)
        tl.store(row + pos * hist_col_stride, value, mask=hit & (pos >= 0))
        seen += tl.sum(hit.to(tl.int64), axis=0)
    tl.store(count_ptr + k * count_stride, kept)


def _history_block(H: int) -> int:
    return min(_HISTORY_BLOCK, triton.next_power_of_2(max(H, 1)))


def training_history_update_out(
    history: torch.Tensor,  # (T, H) float64, updated in place
    count: torch.Tensor,  # (T,) int64, updated in place
    t: torch.Tensor,  # (B,) int64
    losses: torch.Tensor,  # (B,) float
) -> None:
    """DiffRec's ``Lt_history`` update with its batch-order FIFO semantics, one program per timestep."""
    if history.dim() != 2 or history.dtype != torch.float64:
        raise RuntimeError(f"history: expected a (T, H) float64 tensor, got {tuple(history.shape)} {history.dtype}")
    if count.shape != (history.shape[0],) or count.dtype != torch.int64:
        raise RuntimeError(f"count: expected a ({history.shape[0]},) int64 tensor, got {tuple(count.shape)} "
                           f"{count.dtype}")
    if t.dim() != 1 or t.dtype != torch.int64:
        raise RuntimeError(f"t: expected a 1-D int64 tensor, got {tuple(t.shape)} {t.dtype}")
    if losses.shape != t.shape or not losses.dtype.is_floating_point:
        raise RuntimeError(f"losses: expected {t.shape[0]} float values (one per timestep), got {tuple(losses.shape)} "
                           f"{losses.dtype}")
    T, H = history.shape
    _check_range("t", t, T, "timestep")
    _check_range("count", count, H + 1, "count")
    if t.numel() == 0 or T == 0:
        return
    with device_guard(history):
        _history_update_kernel[(T,)](
            history, history.stride(0), history.stride(1), count, count.stride(0),
            t.contiguous(), losses.double().contiguous(), t.numel(), H,
            BLOCK_B=min(1024, triton.next_power_of_2(t.numel())), BLOCK_H=_history_block(H),
        )


# --- BPR ----------------------------------------------------------------------------------------
@triton.jit
def _bpr_index(users_ptr, pos_ptr, neg_ptr, rows, rmask):
    u_idx = tl.load(users_ptr + rows, mask=rmask, other=0).to(tl.int64)
    p_idx = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
    n_idx = tl.load(neg_ptr + rows, mask=rmask, other=0).to(tl.int64)
    return u_idx, p_idx, n_idx


@triton.jit
def _bpr_chunk(user_ptr, us, item_ptr, its, u_idx, p_idx, n_idx, rmask, c0, d, BLOCK_D: tl.constexpr,
               ACC: tl.constexpr):
    """Features c0 .. c0 + BLOCK_D of the rows' user, positive and negative rows (zeros outside)."""
    cols = c0 + tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < d)[None, :]
    u = tl.load(user_ptr + u_idx[:, None] * us + cols[None, :], mask=mask, other=0.0).to(ACC)
    p = tl.load(item_ptr + p_idx[:, None] * its + cols[None, :], mask=mask, other=0.0).to(ACC)
    n = tl.load(item_ptr + n_idx[:, None] * its + cols[None, :], mask=mask, other=0.0).to(ACC)
    return cols, mask, u, p, n


@triton.jit
def _bpr_forward_kernel(
    rows_ptr,  # (B,) per-row losses, the compute dtype
    user_ptr,  # (n_users, d) unit column stride
    user_row_stride,
    item_ptr,  # (n_items, d)
    item_row_stride,
    user_ego_ptr,  # (n_users', d) or None: the L2 term on the score rows
    user_ego_row_stride,
    item_ego_ptr,
    item_ego_row_stride,
    users_ptr,  # (B,) int32/int64
    pos_ptr,
    neg_ptr,
    n_batch,
    d,
    weight_decay: tl.float64,  # float arguments: see kernels/_launch.py's F64_SCALARS
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``softplus(<u, n> - <u, p>) + wd / 2 (|u0|^2 + |p0|^2 + |n0|^2)`` for BLOCK_B batch rows,
    the features in chunks of BLOCK_D."""
    weight_decay = tl.full([], weight_decay, ACC)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < n_batch
    u_idx, p_idx, n_idx = _bpr_index(users_ptr, pos_ptr, neg_ptr, rows, rmask)
    x = tl.zeros([BLOCK_B], dtype=ACC)
    sq = tl.zeros([BLOCK_B], dtype=ACC)
    for c0 in range(0, d, BLOCK_D):
        cols, mask, u, p, n = _bpr_chunk(user_ptr, user_row_stride, item_ptr, item_row_stride, u_idx, p_idx, n_idx,
                                         rmask, c0, d, BLOCK_D, ACC)
        x += tl.sum(u * (n - p), axis=1)
        if weight_decay != 0.0:
            if user_ego_ptr is not None:
                _, _, u, p, n = _bpr_chunk(user_ego_ptr, user_ego_row_stride, item_ego_ptr, item_ego_row_stride,
                                           u_idx, p_idx, n_idx, rmask, c0, d, BLOCK_D, ACC)
            sq += tl.sum(u * u + p * p + n * n, axis=1)
    loss = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))) + 0.5 * weight_decay * sq
    tl.store(rows_ptr + rows, loss, mask=rmask)


@triton.jit
def _bpr_backward_kernel(
    row_grad_ptr,  # (B,) d total / d loss_b, the compute dtype
    g_user_ptr,  # (n_users, d) contiguous accumulators, the compute dtype
    g_item_ptr,
    g_user_ego_ptr,  # or None
    g_item_ego_ptr,
    user_ptr,
    user_row_stride,
    item_ptr,
    item_row_stride,
    user_ego_ptr,
    user_ego_row_stride,
    item_ego_ptr,
    item_ego_row_stride,
    users_ptr,
    pos_ptr,
    neg_ptr,
    n_batch,
    d,
    weight_decay: tl.float64,  # float arguments: see kernels/_launch.py's F64_SCALARS
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adds BLOCK_B rows' gradients into the tables: c = g sigmoid(<u, n - p>),
    du = c (n - p), dp = -c u, dn = c u, and wd g times each ego row (into the score tables
    without ego tables). Two sweeps over the features in chunks of BLOCK_D: the scores, then the
    gradients."""
    weight_decay = tl.full([], weight_decay, ACC)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < n_batch
    u_idx, p_idx, n_idx = _bpr_index(users_ptr, pos_ptr, neg_ptr, rows, rmask)
    x = tl.zeros([BLOCK_B], dtype=ACC)
    for c0 in range(0, d, BLOCK_D):
        cols, mask, u, p, n = _bpr_chunk(user_ptr, user_row_stride, item_ptr, item_row_stride, u_idx, p_idx, n_idx,
                                         rmask, c0, d, BLOCK_D, ACC)
        x += tl.sum(u * (n - p), axis=1)
    g = tl.load(row_grad_ptr + rows, mask=rmask, other=0.0)
    ex = tl.exp(-tl.abs(x))
    sig = tl.where(x >= 0, 1.0 / (1.0 + ex), ex / (1.0 + ex))
    c = (g * sig)[:, None]
    reg = (weight_decay * g)[:, None]
    for c0 in range(0, d, BLOCK_D):
        cols, mask, u, p, n = _bpr_chunk(user_ptr, user_row_stride, item_ptr, item_row_stride, u_idx, p_idx, n_idx,
                                         rmask, c0, d, BLOCK_D, ACC)
        du = c * (n - p)
        dp = -c * u
        dn = c * u
        if g_user_ego_ptr is None:
            du += reg * u
            dp += reg * p
            dn += reg * n
        else:
            _, _, u0, p0, n0 = _bpr_chunk(user_ego_ptr, user_ego_row_stride, item_ego_ptr, item_ego_row_stride,
                                          u_idx, p_idx, n_idx, rmask, c0, d, BLOCK_D, ACC)
            tl.atomic_add(g_user_ego_ptr + u_idx[:, None] * d + cols[None, :], reg * u0, mask=mask)
            tl.atomic_add(g_item_ego_ptr + p_idx[:, None] * d + cols[None, :], reg * p0, mask=mask)
            tl.atomic_add(g_item_ego_ptr + n_idx[:, None] * d + cols[None, :], reg * n0, mask=mask)
        tl.atomic_add(g_user_ptr + u_idx[:, None] * d + cols[None, :], du, mask=mask)
        tl.atomic_add(g_item_ptr + p_idx[:, None] * d + cols[None, :], dp, mask=mask)
        tl.atomic_add(g_item_ptr + n_idx[:, None] * d + cols[None, :], dn, mask=mask)


def _bpr_operands(user_table, item_table, users, pos, neg, user_ego, item_ego):
    if user_table.dim() != 2 or user_table.dtype not in _DTYPES:
        raise RuntimeError(f"user_table: expected a 2-D float32, float16, bfloat16 or float64 tensor, got "
                           f"{tuple(user_table.shape)} {user_table.dtype}")
    for name, v in (("item_table", item_table), ("user_ego", user_ego), ("item_ego", item_ego)):
        if v is not None and (v.dim() != 2 or v.dtype != user_table.dtype or v.shape[1] != user_table.shape[1]
                              or v.device != user_table.device):
            raise RuntimeError(f"{name}: expected a (n, {user_table.shape[1]}) {user_table.dtype} tensor on "
                               f"{user_table.device}, got {tuple(v.shape)} {v.dtype} on {v.device}")
    if (user_ego is None) != (item_ego is None):
        raise RuntimeError("user_ego and item_ego: give both or neither")
    B = users.shape[0]
    for name, v, n in (("users", users, user_table.shape[0]), ("pos", pos, item_table.shape[0]),
                       ("neg", neg, item_table.shape[0])):
        if v.dim() != 1 or v.shape[0] != B or v.dtype not in (torch.int64, torch.int32):
            raise RuntimeError(f"{name}: expected {B} int64 or int32 indices, got {tuple(v.shape)} {v.dtype}")
        _check_range(name, v, n)
    if user_ego is not None:
        _check_range("users", users, user_ego.shape[0], "index of user_ego")
        _check_range("pos", pos, item_ego.shape[0], "index of item_ego")
        _check_range("neg", neg, item_ego.shape[0], "index of item_ego")
    tables = tuple(unit_cols(v) for v in (user_table, item_table, user_ego, item_ego))
    return tables, tuple(v.contiguous() for v in (users, pos, neg))


def _bpr_block_d(d: int) -> int:
    return min(_BPR_BLOCK_D, triton.next_power_of_2(d))


def _stride0(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction not in ("mean", "sum"):
        raise RuntimeError(f"reduction: expected 'mean', 'sum' or 'none', got '{reduction}'")
    total = rows.double().sum()
    return total / rows.numel() if reduction == "mean" else total


def _row_grads(grad: torch.Tensor, reduction: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "none":
        return grad.reshape(rows).to(dtype).contiguous()
    g = grad.reshape(()).to(dtype)
    return (g / rows if reduction == "mean" else g).expand(rows).contiguous()


def training_bpr_loss_out(
    user_table: torch.Tensor,  # (n_users, d)
    item_table: torch.Tensor,  # (n_items, d)
    users: torch.Tensor,  # (B,) int64/int32
    pos: torch.Tensor,  # (B,)
    neg: torch.Tensor,  # (B,)
    user_ego: torch.Tensor | None,  # (n_users', d) layer-0 table, or None
    item_ego: torch.Tensor | None,
    weight_decay: float,
    reduction: str,
    out: torch.Tensor,  # () or (B,) the tables' dtype
) -> None:
    """Writes the BPR loss (see the module docstring), reduced by ``reduction``, into ``out``."""
    (u, i, ue, ie), (us, ps, ns) = _bpr_operands(user_table, item_table, users, pos, neg, user_ego, item_ego)
    B, d = us.shape[0], u.shape[1]
    acc = _acc_dtype(u.dtype)
    rows = torch.zeros(B, dtype=acc, device=u.device)
    if B > 0 and d > 0:
        with device_guard(u):
            _bpr_forward_kernel[(triton.cdiv(B, _BLOCK_ROWS),)](
                rows, u, u.stride(0), i, i.stride(0), ue, _stride0(ue), ie, _stride0(ie), us, ps, ns, B, d,
                float(weight_decay), ACC=tl.float64 if acc == torch.float64 else tl.float32,
                BLOCK_B=_BLOCK_ROWS, BLOCK_D=_bpr_block_d(d),
            )
    elif B > 0:
        rows.fill_(0.6931471805599453)  # softplus(0): no features, score 0
    out.copy_(_reduce(rows, reduction))


def training_bpr_loss_backward_out(
    grad: torch.Tensor,  # () or (B,)
    user_table: torch.Tensor,
    item_table: torch.Tensor,
    users: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    user_ego: torch.Tensor | None,
    item_ego: torch.Tensor | None,
    weight_decay: float,
    reduction: str,
    g_user: torch.Tensor,  # (n_users, d) dense gradient of user_table
    g_item: torch.Tensor,  # (n_items, d)
    g_user_ego: torch.Tensor,  # like user_ego, or (0,) without ego tables
    g_item_ego: torch.Tensor,
) -> None:
    """Writes the dense gradients of the four tables: each batch row's contribution added with
    atomics (float32 accumulators for float16/bfloat16 tables)."""
    (u, i, ue, ie), (us, ps, ns) = _bpr_operands(user_table, item_table, users, pos, neg, user_ego, item_ego)
    B, d = us.shape[0], u.shape[1]
    acc = _acc_dtype(u.dtype)
    if reduction not in ("mean", "sum", "none"):
        raise RuntimeError(f"reduction: expected 'mean', 'sum' or 'none', got '{reduction}'")
    row_grad = _row_grads(grad, reduction, B, acc)
    outs = [g_user, g_item] + ([g_user_ego, g_item_ego] if ue is not None else [])
    bufs = [o if o.dtype == acc and o.is_contiguous() else torch.empty(o.shape, dtype=acc, device=o.device)
            for o in outs]
    for buf in bufs:
        buf.zero_()
    if B > 0 and d > 0:
        ego_bufs = bufs[2:] if ue is not None else [None, None]
        with device_guard(u):
            _bpr_backward_kernel[(triton.cdiv(B, _BLOCK_ROWS),)](
                row_grad, bufs[0], bufs[1], ego_bufs[0], ego_bufs[1],
                u, u.stride(0), i, i.stride(0), ue, _stride0(ue), ie, _stride0(ie), us, ps, ns, B, d,
                float(weight_decay), ACC=tl.float64 if acc == torch.float64 else tl.float32,
                BLOCK_B=_BLOCK_ROWS, BLOCK_D=_bpr_block_d(d),
            )
    for out, buf in zip(outs, bufs):
        if buf is not out:
            out.copy_(buf)


# --- InfoNCE ------------------------------------------------------------------------------------
@triton.jit
def _nce_block(x_ptr, rows, n, cols, d):
    offsets = rows.to(tl.int64)[:, None] * d + cols[None, :]  # 64-bit: B d may pass 2^31
    return tl.load(x_ptr + offsets, mask=(rows < n)[:, None] & (cols < d)[None, :], other=0.0)


@triton.jit
def _nce_logits(a_ptr, i, b_ptr, j, n, d, tau, BK: tl.constexpr, ACC: tl.constexpr):
    """``<a_i, b_j> / tau`` for the rows i and columns j, over the features in chunks of BK."""
    logits = tl.zeros([i.shape[0], j.shape[0]], dtype=ACC)
    for k0 in range(0, d, BK):
        k = k0 + tl.arange(0, BK)
        a = _nce_block(a_ptr, i, n, k, d)
        b = _nce_block(b_ptr, j, n, k, d)
        logits += tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC)
    return logits / tau


@triton.jit
def _nce_lse(a_ptr, i, b_ptr, n, d, tau, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    """Running logsumexp over the columns of ``a b^T / tau`` for the rows i, and the diagonal
    logits."""
    m_i = tl.full([i.shape[0]], float("-inf"), dtype=ACC)
    s_i = tl.zeros([i.shape[0]], dtype=ACC)
    diag = tl.zeros([i.shape[0]], dtype=ACC)
    for j0 in range(0, n, BN):
        j = j0 + tl.arange(0, BN)
        logits = _nce_logits(a_ptr, i, b_ptr, j, n, d, tau, BK, ACC)
        logits = tl.where((j < n)[None, :], logits, float("-inf"))
        diag += tl.sum(tl.where(i[:, None] == j[None, :], logits, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    return m_i + tl.log(s_i), diag


@triton.jit
def _nce_forward_kernel(
    rows_ptr,  # (B,) per-row losses, the compute dtype
    a_ptr,  # (B, d) prepared rows (normalised when cosine), contiguous, the compute dtype
    b_ptr,
    n,  # B
    d,
    tau: tl.float64,  # float arguments: see kernels/_launch.py's F64_SCALARS
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """``logsumexp_j(<a_i, b_j> / tau) - <a_i, b_i> / tau`` for BM rows i."""
    tau = tl.full([], tau, ACC)
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    lse, diag = _nce_lse(a_ptr, i, b_ptr, n, d, tau, BN, BK, ACC)
    tl.store(rows_ptr + i, lse - diag, mask=i < n)


@triton.jit
def _nce_backward_a_kernel(
    ga_ptr,  # (B, d) d/d a^, the compute dtype
    lse_ptr,  # (B,) written: each row's logsumexp
    g_ptr,  # (B,) d total / d loss_i
    a_ptr,
    b_ptr,
    n,
    d,
    tau: tl.float64,  # float arguments: see kernels/_launch.py's F64_SCALARS
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """``d/da^_i = g_i / tau (sum_j P_ij b^_j - b^_i)``, P the row softmax, for BM rows i and the
    BD features of program_id(1)."""
    tau = tl.full([], tau, ACC)
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    kd = tl.program_id(1) * BD + tl.arange(0, BD)
    lse, diag = _nce_lse(a_ptr, i, b_ptr, n, d, tau, BN, BK, ACC)
    g = tl.load(g_ptr + i, mask=i < n, other=0.0)
    acc = tl.zeros([BM, BD], dtype=ACC)
    for j0 in range(0, n, BN):
        j = j0 + tl.arange(0, BN)
        logits = _nce_logits(a_ptr, i, b_ptr, j, n, d, tau, BK, ACC)
        q = g[:, None] * tl.exp(logits - lse[:, None])
        q = tl.where((j < n)[None, :], q, 0.0) - tl.where(i[:, None] == j[None, :], g[:, None], 0.0)
        b = _nce_block(b_ptr, j, n, kd, d)
        acc += tl.dot(q.to(b.dtype), b, input_precision="ieee", out_dtype=ACC)
    mask = (i < n)[:, None] & (kd < d)[None, :]
    tl.store(ga_ptr + i.to(tl.int64)[:, None] * d + kd[None, :], acc / tau, mask=mask)
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + i, lse, mask=i < n)


@triton.jit
def _nce_backward_b_kernel(
    gb_ptr,  # (B, d) d/d b^, the compute dtype
    lse_ptr,  # (B,) the rows' logsumexp
    g_ptr,
    a_ptr,
    b_ptr,
    n,
    d,
    tau: tl.float64,  # float arguments: see kernels/_launch.py's F64_SCALARS
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """``d/db^_j = 1 / tau (sum_i g_i P_ij a^_i - g_j a^_j)`` for BN columns j and the BD
    features of program_id(1)."""
    tau = tl.full([], tau, ACC)
    j = tl.program_id(0) * BN + tl.arange(0, BN)
    kd = tl.program_id(1) * BD + tl.arange(0, BD)
    acc = tl.zeros([BN, BD], dtype=ACC)
    for i0 in range(0, n, BM):
        i = i0 + tl.arange(0, BM)
        lse = tl.load(lse_ptr + i, mask=i < n, other=0.0)
        g = tl.load(g_ptr + i, mask=i < n, other=0.0)
        logits = _nce_logits(a_ptr, i, b_ptr, j, n, d, tau, BK, ACC)
        q = g[:, None] * tl.exp(logits - lse[:, None])
        q = tl.where((i < n)[:, None], q, 0.0) - tl.where(i[:, None] == j[None, :], g[:, None], 0.0)
        a = _nce_block(a_ptr, i, n, kd, d)
        acc += tl.dot(tl.trans(q).to(a.dtype), a, input_precision="ieee", out_dtype=ACC)
    mask = (j < n)[:, None] & (kd < d)[None, :]
    tl.store(gb_ptr + j.to(tl.int64)[:, None] * d + kd[None, :], acc / tau, mask=mask)


def _nce_prepare(a: torch.Tensor, b: torch.Tensor, temperature: float, cosine: bool):
    if a.dim() != 2 or a.dtype not in _DTYPES:
        raise RuntimeError(f"a: expected a 2-D float32, float16, bfloat16 or float64 tensor, got {tuple(a.shape)} "
                           f"{a.dtype}")
    if b.shape != a.shape or b.dtype != a.dtype or b.device != a.device:
        raise RuntimeError(f"b: expected a {tuple(a.shape)} {a.dtype} tensor on {a.device} (like a), got "
                           f"{tuple(b.shape)} {b.dtype} on {b.device}")
    if not temperature > 0:
        raise RuntimeError(f"temperature: expected a positive float, got {temperature}")
    acc = _acc_dtype(a.dtype)
    a32, b32 = a.to(acc).contiguous(), b.to(acc).contiguous()
    if not cosine:
        return a32, b32, None, None
    na = a32.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    nb = b32.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return (a32 / na).contiguous(), (b32 / nb).contiguous(), na, nb


def _nce_size(n: int, cap: int) -> int:
    """A block side for n rows or features: a power of two, at most cap, at least 16 (tl.dot)."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _nce_blocks(n: int, d: int) -> dict:
    """The logits blocks: BM x BN, summed over BK features at a time."""
    block = _nce_size(n, _NCE_BLOCK)
    return {"BM": block, "BN": block, "BK": _nce_size(d, _NCE_BLOCK_K)}


def training_info_nce_out(
    a: torch.Tensor,  # (B, d) float32/float16/bfloat16/float64
    b: torch.Tensor,  # (B, d) like a
    temperature: float,
    cosine: bool,
    reduction: str,
    out: torch.Tensor,  # () or (B,) a's dtype
) -> None:
    """Writes the in-batch InfoNCE loss (see the module docstring), reduced, into ``out``."""
    an, bn, _, _ = _nce_prepare(a, b, temperature, cosine)
    B, d = a.shape
    rows = torch.empty(B, dtype=an.dtype, device=a.device)
    if B > 0:
        acc = tl.float64 if an.dtype == torch.float64 else tl.float32
        blocks = _nce_blocks(B, d)
        with device_guard(a):
            _nce_forward_kernel[(triton.cdiv(B, blocks["BM"]),)](rows, an, bn, B, d, float(temperature), ACC=acc,
                                                                 **blocks)
    out.copy_(_reduce(rows, reduction))


def _normalize_backward(xhat: torch.Tensor, norms: torch.Tensor, ghat: torch.Tensor) -> torch.Tensor:
    """d/dx of x / max(|x|, eps) applied to ghat."""
    radial = xhat * (xhat * ghat).sum(1, keepdim=True)
    return torch.where(norms > _NORM_EPS, (ghat - radial) / norms, ghat / _NORM_EPS)


def training_info_nce_backward_out(
    grad: torch.Tensor,  # () or (B,)
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float,
    cosine: bool,
    reduction: str,
    g_a: torch.Tensor,  # (B, d) a's dtype
    g_b: torch.Tensor,  # (B, d) b's dtype
) -> None:
    """Writes d total / d a and d total / d b: two passes over the logits blocks (rows, then
    columns), then the normalisation's Jacobian for ``cosine``."""
    if reduction not in ("mean", "sum", "none"):
        raise RuntimeError(f"reduction: expected 'mean', 'sum' or 'none', got '{reduction}'")
    an, bn, na, nb = _nce_prepare(a, b, temperature, cosine)
    B, d = a.shape
    ga, gb = torch.zeros_like(an), torch.zeros_like(bn)
    if B > 0:
        g = _row_grads(grad, reduction, B, an.dtype)
        lse = torch.empty(B, dtype=an.dtype, device=a.device)
        acc = tl.float64 if an.dtype == torch.float64 else tl.float32
        blocks = {**_nce_blocks(B, d), "BD": _nce_size(d, _NCE_BLOCK_D)}  # BD: features per gradient tile
        tiles = triton.cdiv(max(d, 1), blocks["BD"])
        with device_guard(a):
            _nce_backward_a_kernel[(triton.cdiv(B, blocks["BM"]), tiles)](ga, lse, g, an, bn, B, d,
                                                                           float(temperature), ACC=acc, **blocks)
            _nce_backward_b_kernel[(triton.cdiv(B, blocks["BN"]), tiles)](gb, lse, g, an, bn, B, d,
                                                                           float(temperature), ACC=acc, **blocks)
        if cosine:
            ga, gb = _normalize_backward(an, na, ga), _normalize_backward(bn, nb, gb)
    g_a.copy_(ga)
    g_b.copy_(gb)

