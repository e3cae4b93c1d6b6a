"""Top-k retrieval, the last step of every recommender: from scores, or from queries and item
embeddings with the scores computed blockwise (never the whole (B, n_items) matrix at once).

This is the first implementation, in torch ops (no registered op, no C++/Triton kernel yet):
scores (or one block of them) are masked and sorted with a *stable* descending sort, so ties are
broken deterministically, lower item id first. Blocks are merged by concatenating the running
top-k (lower ids) before the block's candidates and sorting stably again, which keeps that rule.

Edge cases: a history item gets score ``-inf``; a user whose every item is excluded, or ``k``
larger than the unexcluded items, gets ``-inf`` entries filled with the lowest-id excluded items.
NaN scores sort first (they count as largest in ``torch.sort``); give finite scores.
From queries, each block's scores come from its own matmul, which may round differently in the
last bit from one whole ``queries @ items.T`` (and so order near-equal scores differently).
"""

from __future__ import annotations

import torch

from diffcore import _checks

__all__ = ["topk"]

_BLOCK = 4096
_DTYPES = _checks.FEATURE_DTYPES + (torch.float64,)
_CSR = "a sparse CSR tensor or (crow_indices, col_indices)"


def _history(
    exclude: object, rows: int, n_items: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``exclude`` as (row index, item index) int64 pairs; a sparse CSR (rows, n_items) tensor or a
    ``(crow_indices, col_indices)`` pair."""
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        if exclude.layout != torch.sparse_csr:
            raise TypeError(f"exclude: expected {_CSR}, got {exclude.layout}")
        if tuple(exclude.shape) != (rows, n_items):
            raise ValueError(f"exclude: expected shape ({rows}, {n_items}), got {tuple(exclude.shape)}")
        crow, col = exclude.crow_indices(), exclude.col_indices()
    elif isinstance(exclude, (tuple, list)) and len(exclude) == 2:
        crow, col = (torch.as_tensor(a) for a in exclude)
    else:
        raise TypeError(f"exclude: expected {_CSR}, got {type(exclude).__name__}")
    if crow.dim() != 1 or crow.numel() != rows + 1 or col.dim() != 1:
        raise ValueError(f"exclude: expected crow_indices of shape ({rows + 1},) and 1-D col_indices")
    crow, col = crow.to(device=device, dtype=torch.long), col.to(device=device, dtype=torch.long)
    if col.numel() != int(crow[-1]):
        raise ValueError(f"exclude: crow_indices ends at {int(crow[-1])}, col_indices has {col.numel()} entries")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n_items):
        raise ValueError(f"exclude: item ids must lie in [0, {n_items})")
    row = torch.repeat_interleave(torch.arange(rows, device=device), crow.diff())
    return row, col


def _sorted_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def topk(
    scores_or_queries: torch.Tensor,
    k: int,
    *,
    items: torch.Tensor | None = None,
    exclude: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    block_size: int = _BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items per row.

    Args:
        scores_or_queries: scores (B, n_items) when ``items`` is None, else queries (B, d) scored
            as ``queries @ items.T``, ``block_size`` items at a time.
        k: 1 <= k <= n_items.
        items: (n_items, d) item embeddings, same dtype and device as the queries.
        exclude: each row's history, masked to ``-inf``: a sparse CSR (B, n_items) tensor or a
            ``(crow_indices, col_indices)`` pair (values are ignored).
    Returns:
        ``(values, indices)``, both (B, k): scores in descending order (ties: lower item id first)
        and int64 item ids. Not differentiable.
    """
    x = _checks.float_tensor("scores_or_queries", scores_or_queries, ndim=2, dtypes=_DTYPES)
    if items is not None:
        _checks.float_tensor("items", items, ndim=2, dtypes=_DTYPES)
        if items.shape[1] != x.shape[1] or items.dtype != x.dtype or items.device != x.device:
            raise ValueError(
                f"items: expected (n_items, {x.shape[1]}) {x.dtype} on {x.device}, got "
                f"{tuple(items.shape)} {items.dtype} on {items.device}"
            )
    n_items = x.shape[1] if items is None else items.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_items:
        raise ValueError(f"k: expected an int in [1, {n_items}], got {k!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    B = x.shape[0]
    history = _history(exclude, B, n_items, x.device)
    with torch.no_grad():
        if items is None:
            scores = x
            if history is not None:
                scores = x.clone()
                scores[history] = float("-inf")
            return _sorted_top(scores, k)
        best_values = x.new_empty(B, 0)
        best_ids = torch.empty(B, 0, dtype=torch.long, device=x.device)
        for start in range(0, n_items, block_size):
            stop = min(start + block_size, n_items)
            block = x @ items[start:stop].T
            if history is not None:
                row, col = history
                keep = (col >= start) & (col < stop)
                block[row[keep], col[keep] - start] = float("-inf")
            values, ids = _sorted_top(block, k)
            merged_values = torch.cat([best_values, values], 1)
            merged_ids = torch.cat([best_ids, ids + start], 1)
            best_values, order = _sorted_top(merged_values, k)
            best_ids = merged_ids.gather(1, order)
        return best_values, best_ids
