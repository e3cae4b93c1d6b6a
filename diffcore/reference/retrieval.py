"""Reference of the retrieval family: the scores in full, the history masked, a stable sort.

The meaning of ``torch.ops.diffcore.retrieval_topk(x, items, k, crow, col)`` (DESIGN.md
"Retrieval")::

    scores = x                      (items None: x holds the scores, (B, n_items))
           = x @ items.T            (else: x the queries (B, d), items (n_items, d), in x's dtype)
    scores[r, col[crow[r]:crow[r+1]]] = -inf       (each row's history; duplicates allowed)
    values, ids = the first k of each row sorted by score, descending, ties to the lower item id

So a row with fewer than k items above -inf returns them first, then the items at -inf (masked,
or scored -inf themselves) in id order. NaN scores are an error (the kernels cannot order them).
"""

from __future__ import annotations

import torch

from diffcore.reference.sparse import csr_rows


def history_pairs(crow: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, item) int64 index pairs of a CSR history ``(crow (B + 1,), col (nnz,))``."""
    return csr_rows(crow), col.long()


def scores(x: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
    """(B, n_items): ``x`` itself, or ``x @ items.T``."""
    return x if items is None else x @ items.T


def topk(
    x: torch.Tensor, items: torch.Tensor | None, k: int, crow: torch.Tensor | None, col: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, k) in x's dtype, ids (B, k) int64): the op's meaning, above."""
    s = scores(x, items).clone()
    if crow is not None:
        s[history_pairs(crow, col)] = float("-inf")
    if bool(s.isnan().any()):
        raise ValueError("scores: expected no NaN (check the queries and items for NaN and Inf)")
    values, ids = torch.sort(s, dim=1, descending=True, stable=True)
    return values[:, :k], ids[:, :k]
