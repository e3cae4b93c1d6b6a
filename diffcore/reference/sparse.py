"""Reference of the sparse family, written as LightGCN-PyTorch writes it.

LightGCN-PyTorch (``dataloader.getSparseGraph`` and ``LightGCN.computer``) materialises the
normalised graph ``D^-1/2 A D^-1/2`` as a COO tensor, multiplies it into the embeddings with
``torch.sparse.mm`` once per layer, keeps every layer, ``torch.stack``s them and takes the mean.
Eager, readable, no fusion: this is the meaning the kernels are tested against and the baseline
the bench times.
"""

from __future__ import annotations

import torch


def csr_rows(crow: torch.Tensor) -> torch.Tensor:
    """(nnz,) int64: the row of every nonzero of a CSR matrix with row pointers ``crow``."""
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())

def normalized_coo(
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    col_scale: torch.Tensor | None,
    n_cols: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The normalised graph as a coalesced COO tensor (rows x n_cols) of ``dtype``:
    ``A_hat[r, c] = row_scale[r] * values[e] * col_scale[c]`` (absent factors are ones)."""
    n_rows = crow.numel() - 1
    rows = csr_rows(crow)
    cols = col.long()
    data = torch.ones(cols.numel(), dtype=dtype, device=crow.device)
    if values is not None:
        data = data * values.to(dtype)
    if row_scale is not None:
        data = data * row_scale.to(dtype)[rows]
    if col_scale is not None:
        data = data * col_scale.to(dtype)[cols]
    index = torch.stack([rows, cols])
    return torch.sparse_coo_tensor(index, data, (n_rows, n_cols), is_coalesced=True, check_invariants=False)


def spmm(graph: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A_hat X``: graph (n, m) sparse COO, x (m, d) -> (n, d)."""
    return torch.sparse.mm(graph, x)


def propagate(
    graph: torch.Tensor, all_emb: torch.Tensor, n_layers: int, weights: list[float] | None = None
) -> torch.Tensor:
    """LightGCN's ``computer()``: ``embs = [E0, A E0, ..., A^L E0]``, stacked, then their mean
    (``weights=None``) or their weighted sum ``sum_k weights[k] E_k``. all_emb: (n, d)."""
    embs = [all_emb]
    for layer in range(n_layers):
        all_emb = torch.sparse.mm(graph, all_emb)
        embs.append(all_emb)
    embs = torch.stack(embs, dim=1)
    if weights is None:
        return torch.mean(embs, dim=1)
    w = torch.tensor(weights, dtype=embs.dtype, device=embs.device)
    return (embs * w.view(1, -1, 1)).sum(dim=1)


def spmm_op(crow, col, values, row_scale, col_scale, t_crow, t_col, t_values, x) -> torch.Tensor:
    """The op ``sparse_spmm`` (its transposed arrays serve only the backward)."""
    graph = normalized_coo(crow, col, values, row_scale, col_scale, x.shape[0], x.dtype)
    return spmm(graph, x)


def propagate_op(
    crow, col, values, row_scale, col_scale, t_crow, t_col, t_values, x, num_layers, weights
) -> torch.Tensor:
    """The op ``sparse_propagate``: ``sum_k weights[k] A_hat^k x``, as LightGCN computes it (the
    mean when every weight is ``1 / (num_layers + 1)``)."""
    graph = normalized_coo(crow, col, values, row_scale, col_scale, x.shape[0], x.dtype)
    mean = all(w == 1.0 / (num_layers + 1) for w in weights)
    return propagate(graph, x, num_layers, None if mean else list(weights))
