"""Top-k retrieval, the last step of every recommender: from scores, or from queries and item
embeddings with the scores computed blockwise (never the whole (B, n_items) matrix at once).

``topk`` checks its arguments and calls the op ``torch.ops.diffcore.retrieval_topk`` (C++ on CPU:
the scores of a block of items by one GEMM, then a buffer of candidates per row fed by a vectorised
scan that skips every score not above the row's current threshold, cut back to its best k when
full; Triton: per-block candidates merged by a stable sort). Its meaning is
``diffcore.reference.retrieval``: masked scores sorted stably, so ties go to the lower item id;
masked items score ``-inf``, so a row with fewer than k items above ``-inf`` is filled up with the
items at ``-inf`` (masked, or scored ``-inf`` themselves) in id order. NaN scores raise. From
queries, each block's scores come from its own GEMM, which may round differently in the last bit
from one whole ``queries @ items.T`` (and so order near-equal scores differently).
"""

from __future__ import annotations

import torch

from diffcore import _checks, _registry

__all__ = ["topk"]

_DTYPES = _checks.FEATURE_DTYPES + (torch.float64,)
_CSR = "a sparse CSR tensor or (crow_indices, col_indices)"
_INDEX_DTYPES = (torch.int64, torch.int32)


def _history(
    exclude: object, rows: int, n_items: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``exclude`` as int64 ``(crow (rows + 1,), col (nnz,))`` on ``device``; a sparse CSR
    (rows, n_items) tensor or a ``(crow_indices, col_indices)`` pair of int64/int32 tensors (or
    what ``torch.as_tensor`` makes one of: lists of ints, integer arrays)."""
    if exclude is None:
        return None, None
    if isinstance(exclude, torch.Tensor):
        if exclude.layout != torch.sparse_csr:
            raise TypeError(f"exclude: expected {_CSR}, got {exclude.layout}")
        if tuple(exclude.shape) != (rows, n_items):
            raise ValueError(f"exclude: expected shape ({rows}, {n_items}), got {tuple(exclude.shape)}")
        crow, col = exclude.crow_indices(), exclude.col_indices()
    elif isinstance(exclude, (tuple, list)) and len(exclude) == 2:
        # an empty list would become a float tensor
        crow, col = (torch.zeros(0, dtype=torch.long) if isinstance(a, (list, tuple)) and not a else torch.as_tensor(a)
                     for a in exclude)
    else:
        raise TypeError(f"exclude: expected {_CSR}, got {type(exclude).__name__}")
    for name, v in (("crow_indices", crow), ("col_indices", col)):  # no bool (as 0/1), float, complex, int8...
        if v.dtype not in _INDEX_DTYPES:
            raise TypeError(f"exclude: expected {name} of dtype int64 or int32, got {v.dtype}")
    if crow.dim() != 1 or crow.numel() != rows + 1 or col.dim() != 1:
        raise ValueError(f"exclude: expected crow_indices of shape ({rows + 1},) and 1-D col_indices, got "
                         f"{tuple(crow.shape)} and {tuple(col.shape)}")
    crow = crow.to(device=device, dtype=torch.long).contiguous()
    col = col.to(device=device, dtype=torch.long).contiguous()
    if torch.compiler.is_compiling():  # the kernel checks the values; reading them here breaks the graph
        return crow, col
    _checks.csr_row_pointers("exclude: crow_indices", crow, rows, col.numel())
    _checks.ids_in_range("exclude: col_indices (item ids)", col, n_items)
    return crow, col


def topk(
    scores_or_queries: torch.Tensor,
    k: int,
    *,
    items: torch.Tensor | None = None,
    exclude: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items per row.

    Args:
        scores_or_queries: scores (B, n_items) when ``items`` is None, else queries (B, d) scored
            as ``queries @ items.T`` a block of items at a time. float32, float64, float16 or
            bfloat16; any strides.
        k: 1 <= k <= n_items.
        items: (n_items, d) item embeddings, same dtype and device as the queries.
        exclude: each row's history, masked to ``-inf``: a sparse CSR (B, n_items) tensor or a
            ``(crow_indices, col_indices)`` pair of int64 or int32 tensors (values are ignored;
            duplicates allowed). Other index dtypes (bool, float, complex, int8/int16/uint8)
            raise TypeError.
    Returns:
        ``(values, indices)``, both (B, k): scores in descending order (ties: lower item id first)
        and int64 item ids. Not differentiable.
    Raises:
        ValueError on NaN scores (found by the kernel: NaN in the queries or items makes them, and
        so does an Inf that meets a zero or an Inf of the other sign); an infinite score is ranked
        as the value it is. No items (n_items == 0) raises ValueError too.
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
    if n_items == 0:
        raise ValueError(f"{'items' if items is not None else 'scores_or_queries'}: expected at least one item, got "
                         f"shape {tuple((x if items is None else items).shape)}")
    k = _checks.integer("k", k, lambda v: 1 <= v <= n_items, f"an int in [1, {n_items}]")
    crow, col = _history(exclude, x.shape[0], n_items, x.device)
    with torch.no_grad():
        impl = _registry.forced_for("retrieval_topk", x.device)
        if impl is None:
            return torch.ops.diffcore.retrieval_topk(x, items, k, crow, col)
        values = x.new_empty((x.shape[0], k))
        ids = torch.empty((x.shape[0], k), dtype=torch.long, device=x.device)
        impl(x, items, k, crow, col, values, ids)
        return values, ids
