"""Reference of the linalg family: Omega materialised, ``A @ Omega``, and Halko–Martinsson–Tropp.

The sketches' meaning (DESIGN.md "Noise"; the kernels generate the same Omega tile by tile and
never store it)::

    Omega (n x k), element (i, j) is element i * k + j of the Philox stream (seed, offset):
      gaussian     z_(i k + j)                                   (diffcore.reference.random)
      rademacher   1 - 2 * bit31(w)     w = word (i k + j) % 4 of counter offset + (i k + j) // 4
      sparse       rademacher * [(w >> 7) & 0xffffff < floor(density * 2^24)]
    sketch = scale * (A @ Omega)

:func:`randomized_svd` is the textbook algorithm (Halko, Martinsson and Tropp 2011, Algorithms 4.3
and 5.1: a Gaussian sketch, ``n_iter`` power iterations re-orthonormalised with Householder QR
after every product, then the SVD of ``B = Q^T A``), written as people write it with
``torch.linalg``, its Omega from the stream above, so its results are comparable with
``diffcore.linalg.randomized_svd`` for the same seed.
"""

from __future__ import annotations

import torch

from diffcore.reference.random import normal, philox4x32_10
from diffcore.reference.sparse import normalized_coo

KINDS = ("gaussian", "rademacher", "sparse")
SPARSE_BITS = 24  # the sparse draw compares 24 bits of the word (bits 7..30) with the threshold


def sparse_threshold(density: float) -> int:
    """An element of a sparse Omega is nonzero iff bits 7..30 of its word are below this."""
    return int(density * (1 << SPARSE_BITS))


def words(n: int, seed: int, offset: int = 0) -> torch.Tensor:
    """Elements ``0 .. n-1`` of the word stream: element i is word ``w_(i % 4)`` of counter
    ``offset + i // 4`` (int64 holding the unsigned 32-bit words), shape (n,)."""
    counter = torch.arange((n + 3) // 4, dtype=torch.int64) + offset
    return torch.stack(philox4x32_10(counter, seed), 1).reshape(-1)[:n]


def omega(
    n: int,
    k: int,
    kind: str = "gaussian",
    density: float = 1 / 3,
    seed: int = 0,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The (n, k) test matrix Omega, materialised (the kernels never store it)."""
    if kind == "gaussian":
        values = normal(n * k, seed, offset)
    else:
        w = words(n * k, seed, offset)
        values = (1 - 2 * (w >> 31)).to(torch.float32)
        if kind == "sparse":
            keep = ((w >> 7) & 0xFFFFFF) < sparse_threshold(density)
            values = values * keep
        elif kind != "rademacher":
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return values.reshape(n, k).to(dtype)


def sketch(
    A: torch.Tensor,
    k: int,
    kind: str = "gaussian",
    density: float = 1 / 3,
    scale: float = 1.0,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """``scale * (A @ Omega)``: A (m, n) dense or torch sparse, float32/float64 -> (m, k)."""
    Omega = omega(A.shape[1], k, kind, density, seed, offset, A.dtype).to(A.device)
    out = torch.sparse.mm(A, Omega) if A.is_sparse else A @ Omega
    return out * scale


def sketch_op(A, k, kind, density, scale, seed, offset) -> torch.Tensor:
    """The op ``linalg_sketch``."""
    return sketch(A, k, kind, density, scale, seed, offset)


def sketch_csr_op(
    crow, col, values, row_scale, col_scale, n_cols, k, kind, density, scale, seed, offset, dtype
) -> torch.Tensor:
    """The op ``linalg_sketch_csr``: the CSR operator ``A_hat[r, c] = rs[r] v[e] cs[c]`` (rows x
    n_cols) as a COO tensor of ``dtype``, times Omega."""
    A = normalized_coo(crow, col, None, row_scale, col_scale, n_cols, dtype)
    if values is not None:  # the values in their own precision (float64 values stay float64)
        A = torch.sparse_coo_tensor(A._indices(), A._values() * values.to(dtype), A.shape, is_coalesced=True,
                                    check_invariants=False)
    return sketch(A, k, kind, density, scale, seed, offset)


def randomized_svd(
    A: torch.Tensor, k: int, oversample: int = 10, n_iter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko–Martinsson–Tropp: A (m, n) dense or torch sparse -> U (m, k), S (k,), Vh (k, n), the
    largest entry (in absolute value) of each column of U positive."""
    l = k + oversample
    Y = sketch(A, l, seed=seed)
    Q, _ = torch.linalg.qr(Y)
    At = A.t()
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(torch.sparse.mm(At, Q) if A.is_sparse else At @ Q)
        Q, _ = torch.linalg.qr(torch.sparse.mm(A, Z) if A.is_sparse else A @ Z)
    B = (torch.sparse.mm(At, Q) if A.is_sparse else At @ Q).t()
    Uh, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Uh
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    rows = U.abs().argmax(0)
    signs = torch.sign(U[rows, torch.arange(k)])
    signs[signs == 0] = 1
    return U * signs, S, Vh * signs[:, None]
