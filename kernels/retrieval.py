"""retrieval family, Triton: the k best items of each row, from scores or from queries and items.

    scores = x                                   (items None: x (B, n_items) holds the scores)
           = round_to_x_dtype(x @ items.T)       (x (B, d) queries, items (n_items, d); accumulated in
                                                  float32, float64 for float64)
    scores[r, col[crow[r]:crow[r+1]]] = -inf     (each row's history)
    values, ids = the first k of each row sorted stably by score, descending

The meaning is ``diffcore.reference.retrieval``: ties go to the lower item id, and masked items
(-inf) follow the unmasked ones in id order.

Design. One program per (tile of BLOCK_B rows, block of BLOCK_N items), on a 1-D grid whose row
tile varies fastest (the programs running together share an item block, which stays in L2). A
program

1. makes its (BLOCK_B, BLOCK_N) tile of scores: loaded (scores path), or ``q @ items_block.T``
   over d in chunks of BLOCK_D (queries path) with ``tl.dot`` and then rounded to x's dtype
   (``round_to``); the (B, n_items) scores are never stored;
2. masks the history that falls in its block: the launcher sorts the keys ``row * n_items + col``
   once and finds, by ``searchsorted``, where each (row, block) starts, so a program reads only
   its own history entries (not the whole row's history once per block);
3. records whether an unmasked score in the tile is NaN (one flag per program);
4. takes its top KB = min(k, BLOCK_N) per row in KB rounds of "max, then the lowest index among
   the lanes equal to it", excluding taken and out-of-range lanes (an ``alive`` mask; masked items,
   at -inf, stay selectable), and writes them, best first, as candidates (B, n_blocks * KB).

The launcher then raises on a NaN flag and merges the candidates: the first k of a stable
descending sort. Candidates lie block by block (ids ascending from block to block) and, within a
block, by score with ties in id order, so the stable sort breaks ties by id: the reference's
order. The merge sorts packed int64 keys ``(order-preserving bits of the float32 value, reversed
candidate position)`` with ``torch.topk`` (a selection, not a sort; -0.0 is folded into +0.0
first, as the sort compares them equal), and float64 candidates with ``torch.sort(stable=True)``.
Every element of a row's top k is in its block's top KB, so the merge sees all of them.

Numerics. Products are exact for float16/bfloat16 (upcast to float32, then ``tl.dot`` in TF32,
which represents every float16 and bfloat16 value exactly; the interpreter's bfloat16 ``tl.dot``
is wrong, and this path avoids it), float32 uses IEEE float32 (no TF32), float64 a broadcast
multiply and sum. Each block's dot may accumulate in another order than torch's one GEMM, so
scores can differ from ``x @ items.T`` in the last bit (and near-equal scores order differently).
A value is the maximum of its round, so where +0.0 and -0.0 tie, the zero returned may carry the
other sign than the reference's (the ids, and the values as numbers, are the same).

NaN. Checked in the kernel on the scores after masking, as the reference does: a NaN score at a
masked (history) position is ignored; any other raises ``ValueError`` (on CUDA the check
synchronises). On the queries path NaN scores come from NaN queries or items, or from Inf ones
(``inf * 0``, ``inf - inf``); an Inf that makes only +-inf scores is valid, as in the reference.

Limits. Step 4 costs O(KB * BLOCK_B * BLOCK_N) per program, i.e. O(k) per score: right for the
k of 10 to 100 recommenders retrieve, slow for k in the thousands. The candidates take
B * n_blocks * KB values and ids, about n_items * k / BLOCK_N per row, and the history table
B * (n_blocks + 1) int64. Default blocks (``block_n`` overrides BLOCK_N; the tests force small
ones): scores, BLOCK_N 1024 and tiles of about 1024 scores; queries, 16 rows by 256 or 512 items
(by k) and BLOCK_D up to 64; float64 queries, 8 rows by 128 items, BLOCK_D 8. Never below
n_items' power of two. They are untuned guesses for a GPU: the tests run the interpreter only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_guard
from .philox import round_to

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NAN_MESSAGE = "scores: expected no NaN (check the queries and items for NaN and Inf)"
_SCORES_BLOCK_N = 1024  # items per program on the scores path
_SCORES_TILE = 1024  # scores per program on the scores path (rows * items)
_MAX_BLOCK_D = 64  # query columns per dot at most


@triton.jit
def _block_topk_kernel(
    x_ptr,  # (B, n_items) scores, or (B, d) queries; any strides
    stride_xb,
    stride_xc,
    items_ptr,  # (n_items, d) x's dtype, any strides, or None (scores path)
    stride_in,
    stride_id,
    bounds_ptr,  # (B, n_blocks + 1) int64: row r's history in block j is hist[bounds[r, j]:bounds[r, j + 1]]; or None
    hist_ptr,  # (nnz,) int64 item ids, sorted within each row
    cand_val_ptr,  # (B, P) float32 (float64 for float64 x), P = n_blocks * KB
    cand_id_ptr,  # (B, P) int32/int64
    nan_ptr,  # (n_tiles * n_blocks,) int32: 1 where the program saw an unmasked NaN score
    B,
    n,
    d,
    n_tiles,
    n_blocks,
    KB,
    P,
    ACC: tl.constexpr,  # tl.float32, or tl.float64
    USE_DOT: tl.constexpr,
    TF32: tl.constexpr,  # the dot's inputs are upcast float16/bfloat16: exact in TF32
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """For rows ``tile * BLOCK_B + [0, BLOCK_B)`` and items ``blk * BLOCK_N + [0, BLOCK_N)``:
    candidates ``cand[r, blk * KB + t]`` = the t-th best (value, id) of the row in the block."""
    pid = tl.program_id(0)
    tile = pid % n_tiles
    blk = pid // n_tiles
    rows = tile.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    local = tl.arange(0, BLOCK_N)
    offs = blk.to(tl.int64) * BLOCK_N + local
    rmask = rows < B
    nmask = offs < n
    valid = rmask[:, None] & nmask[None, :]

    # 1. the scores of the tile
    if items_ptr is None:
        s = tl.load(x_ptr + rows[:, None] * stride_xb + offs[None, :] * stride_xc, mask=valid, other=0.0).to(ACC)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
        for d0 in range(0, d, BLOCK_D):
            dd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)  # dd * stride: 64-bit for column-major operands
            dmask = dd < d
            q = tl.load(x_ptr + rows[:, None] * stride_xb + dd[None, :] * stride_xc,
                        mask=rmask[:, None] & dmask[None, :], other=0.0).to(ACC)
            it = tl.load(items_ptr + offs[None, :] * stride_in + dd[:, None] * stride_id,
                         mask=dmask[:, None] & nmask[None, :], other=0.0).to(ACC)  # (BLOCK_D, BLOCK_N)
            if USE_DOT:
                if TF32:
                    acc = tl.dot(q, it, acc, input_precision="tf32")
                else:
                    acc = tl.dot(q, it, acc, input_precision="ieee")
            else:
                acc += tl.sum(q[:, :, None] * it[None, :, :], axis=1)
        s = round_to(acc, x_ptr.dtype.element_ty).to(ACC)

    # 2. the history in this block
    if bounds_ptr is not None:
        brow = bounds_ptr + rows * (n_blocks + 1) + blk
        lo = tl.load(brow, mask=rmask, other=0)
        cnt = tl.load(brow + 1, mask=rmask, other=0) - lo
        for i in range(0, tl.max(cnt, axis=0)):
            h = tl.load(hist_ptr + lo + i, mask=i < cnt, other=-1)
            s = tl.where(offs[None, :] == h[:, None], float("-inf"), s)

    # 3. NaN among the unmasked scores
    tl.store(nan_ptr + pid, tl.max(((s != s) & valid).to(tl.int32)))

    # 4. the block's top KB per row, best first, ties to the lowest index
    alive = valid
    out = rows * P + blk * KB
    for t in range(0, KB):
        m = tl.max(tl.where(alive, s, float("-inf")), axis=1)
        idx = tl.min(tl.where(alive & (s == m[:, None]), local[None, :], BLOCK_N), axis=1)
        alive = alive & (local[None, :] != idx[:, None])
        got = idx < BLOCK_N  # false only once every lane is taken or out of range: a padding candidate
        tl.store(cand_val_ptr + out + t, tl.where(got, m, float("-inf")), mask=rmask)
        ident = tl.where(got, blk.to(tl.int64) * BLOCK_N + idx, -1)
        tl.store(cand_id_ptr + out + t, ident.to(cand_id_ptr.dtype.element_ty), mask=rmask)


def _check(x, items, k, crow, col, values, ids) -> int:
    """The op's argument checks (host-side; the col range check synchronises on CUDA). -> n_items."""
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise RuntimeError(f"x: expected a 2-D float32, float64, float16 or bfloat16 tensor, got {x.dtype} "
                           f"{tuple(x.shape)}")
    if items is not None:
        if items.dim() != 2 or items.shape[1] != x.shape[1] or items.dtype != x.dtype or items.device != x.device:
            raise RuntimeError(f"items: expected (n_items, {x.shape[1]}) {x.dtype} on {x.device}, got "
                               f"{tuple(items.shape)} {items.dtype} on {items.device}")
    n = x.shape[1] if items is None else items.shape[0]
    if not 1 <= k <= n:
        raise RuntimeError(f"k: expected an int in [1, {n}], got {k}")
    rows = x.shape[0]
    if (crow is None) != (col is None):
        raise RuntimeError("crow, col: expected both or neither")
    if crow is not None:
        for name, t in (("crow", crow), ("col", col)):
            if t.dim() != 1 or t.dtype != torch.int64 or t.device != x.device:
                raise RuntimeError(f"{name}: expected a 1-D int64 tensor on {x.device}, got {t.dtype} "
                                   f"{tuple(t.shape)} on {t.device}")
        if crow.numel() != rows + 1:
            raise RuntimeError(f"crow: expected ({rows + 1},) row pointers, got {tuple(crow.shape)}")
        if int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow.diff() < 0).any()):
            raise RuntimeError(f"crow: expected non-decreasing row pointers from 0 to nnz = {col.numel()}")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n):
            raise RuntimeError(f"col: an item id lies outside [0, {n})")
    if values.shape != (rows, k) or values.dtype != x.dtype:
        raise RuntimeError(f"values: expected {(rows, k)} {x.dtype}, got {tuple(values.shape)} {values.dtype}")
    if ids.shape != (rows, k) or ids.dtype != torch.int64:
        raise RuntimeError(f"ids: expected {(rows, k)} int64, got {tuple(ids.shape)} {ids.dtype}")
    return n


def _config(x: torch.Tensor, items, n: int, k: int, block_n: int | None) -> tuple[int, int, int, bool, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_D, USE_DOT, num_warps). BLOCK_B and BLOCK_N are constexprs: a new
    power of two of B (below the tile's rows) or a new block_n compiles the kernel again."""
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise RuntimeError(f"block_n: expected a power of two, got {block_n}")
    if items is None:  # tiles of about _SCORES_TILE scores: a few rows of small blocks, one row of large ones
        bn = block_n or min(_SCORES_BLOCK_N, triton.next_power_of_2(n))
        return max(1, min(_SCORES_TILE // bn, 16, triton.next_power_of_2(x.shape[0]))), bn, 1, False, 4
    d = x.shape[1]
    if x.dtype == torch.float64:  # no dot: a (BLOCK_B, BLOCK_D, BLOCK_N) product in registers
        bn = block_n or min(128, max(16, triton.next_power_of_2(n)))
        return 8, bn, min(8, triton.next_power_of_2(max(d, 1))), False, 4
    # candidates ~ n_items * k / BLOCK_N per row: BLOCK_N grows with k (n_items / 8 up to k = 64)
    bn = block_n or min(512, max(256, triton.next_power_of_2(8 * k)), max(16, triton.next_power_of_2(n)))
    if bn < 16:  # tl.dot needs 16 on each side: small test blocks take the broadcast product
        return 16, bn, min(16, triton.next_power_of_2(max(d, 1))), False, 4
    bd = max(16, min(_MAX_BLOCK_D, 16384 // bn, triton.next_power_of_2(max(d, 1))))
    return 16, bn, bd, True, 4 if bn <= 256 else 8


def _history_blocks(crow, col, rows: int, n: int, block_n: int, n_blocks: int):
    """(bounds (rows, n_blocks + 1) int64, hist (nnz,) int64): row r's history ids in item block j,
    sorted, are ``hist[bounds[r, j]:bounds[r, j + 1]]``; (None, None) without history."""
    if crow is None or col.numel() == 0:
        return None, None
    r = torch.arange(rows, device=col.device)
    keys = torch.sort(torch.repeat_interleave(r, crow.diff(), output_size=col.numel()) * n + col).values
    edges = (torch.arange(n_blocks + 1, device=col.device) * block_n).clamp_(max=n)
    bounds = torch.searchsorted(keys, r[:, None] * n + edges[None, :])
    return bounds.contiguous(), keys % n


def _merge(cand_val: torch.Tensor, cand_id: torch.Tensor, k: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k candidates of each row in stable descending order of value."""
    if n_blocks == 1:  # its k candidates are already the answer, in order
        return cand_val, cand_id
    if cand_val.dtype == torch.float64:
        order = torch.sort(cand_val, dim=1, descending=True, stable=True).indices[:, :k]
    else:
        # A stable sort as one selection: key = (value's order-preserving bits, P - 1 - position),
        # unique per row. Negative floats have their magnitude bits flipped; -0.0 becomes +0.0.
        bits = (cand_val + 0.0).view(torch.int32).to(torch.int64)
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # in [-2^31, 2^31)
        p = cand_val.shape[1]
        later = torch.arange(p - 1, -1, -1, dtype=torch.int64, device=cand_val.device)
        order = torch.topk(ordered * (1 << 32) + later, k, dim=1).indices
    return cand_val.gather(1, order), cand_id.gather(1, order)


def retrieval_topk_out(
    x: torch.Tensor,  # (B, n_items) scores, or (B, d) queries
    items: torch.Tensor | None,  # (n_items, d) or None
    k: int,
    crow: torch.Tensor | None,  # (B + 1,) int64
    col: torch.Tensor | None,  # (nnz,) int64
    values: torch.Tensor,  # (B, k) x's dtype
    ids: torch.Tensor,  # (B, k) int64
    *,
    block_n: int | None = None,  # items per program (a power of two); None: chosen here
) -> None:
    """Writes each row's k best (values, ids); ValueError on an unmasked NaN score."""
    n = _check(x, items, k, crow, col, values, ids)
    rows = x.shape[0]
    if rows == 0:
        return
    block_b, bn, bd, use_dot, warps = _config(x, items, n, k, block_n)
    n_blocks, n_tiles, kb = triton.cdiv(n, bn), triton.cdiv(rows, block_b), min(k, bn)
    # Padding candidates (value -inf, id -1: a partial last block with fewer than KB items) are
    # never among the first k. The real candidates are at least k (one block: min(k, n) = k; else
    # the first, full block gives min(k, BLOCK_N), which is k unless KB = BLOCK_N, when every block
    # gives all its items: n_items >= k), and the padding is last of all: last in the last block,
    # which is last in the row, so the stable order puts it after every -inf real candidate.
    p = n_blocks * kb
    bounds, hist = _history_blocks(crow, col, rows, n, bn, n_blocks)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cand_val = torch.empty((rows, p), dtype=acc, device=x.device)
    cand_id = torch.empty((rows, p), dtype=torch.int32 if n < 2**31 else torch.int64, device=x.device)
    nan = torch.empty(n_tiles * n_blocks, dtype=torch.int32, device=x.device)
    with device_guard(x):
        _block_topk_kernel[(n_tiles * n_blocks,)](
            x, x.stride(0), x.stride(1),
            items, 0 if items is None else items.stride(0), 0 if items is None else items.stride(1),
            bounds, hist, cand_val, cand_id, nan,
            rows, n, x.shape[1], n_tiles, n_blocks, kb, p,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            USE_DOT=use_dot, TF32=x.dtype in (torch.float16, torch.bfloat16),
            BLOCK_B=block_b, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
        )
    if bool(nan.any()):
        raise ValueError(_NAN_MESSAGE)
    v, i = _merge(cand_val, cand_id, k, n_blocks)
    values.copy_(v)
    ids.copy_(i)
