"""Randomized SVD and random projections, with the test matrix generated inside the kernel.

:func:`sketch` forms ``A @ Omega`` and :func:`random_projection` a scaled ``A @ Omega``, with Omega
(n x k) drawn from diffcore's Philox stream by the kernel itself, a tile at a time: Omega is never
stored, so sketching a matrix with a million columns into 256 columns costs the output, not a
1 GB test matrix. Omega's element (i, j) is element ``i * k + j`` of the stream ``(seed,
offset)`` (DESIGN.md "Noise"; ``diffcore.reference.linalg.omega`` materialises it)::

    gaussian     z_(i k + j)                               standard normal
    rademacher   +1 or -1 from bit 31 of the Philox word   (probability 1/2 each)
    sparse       Achlioptas: +1 or -1 with probability density / 2 each, else 0 (density 1/3 by
                 default); random_projection's scale 1 / sqrt(density k) makes the entries
                 +-sqrt(1 / density) / sqrt(k)

:func:`randomized_svd` is Halko–Martinsson–Tropp's subspace iteration::

    Y = A Omega (Omega: n x l, l = k + oversample)           the sketch, in the kernel
    Q = orth(Y);  n_iter times:  Q = orth(A orth(A^T Q))     power iterations
    B = Q^T A;  B = X S W^T;  U = Q X, V = W                  the small SVD, via (l x l) factors

for dense tensors, torch sparse COO/CSR tensors, scipy.sparse matrices and
:class:`diffcore.sparse.Adjacency` (whose ``A^T Q`` runs over its cached transpose). Sparse
products run ``diffcore.sparse``'s CSR kernel (torch's CSR matmul for float64 values that are
not exactly float32); dense products and the factorisations run ``torch.linalg`` (MKL here).
The iterates are kept l columns wide inside buffers padded with zero columns to whole 64-byte
vectors (74 -> 80 float32 columns at k = 64), which the SpMM and the GEMMs run much faster on.
``orth`` is the ``normalizer``:

- ``"cholqr2"`` (default): CholeskyQR2 (:func:`cholqr2`) for the basis B is made from: two
  Gram-Cholesky passes, two tall-skinny GEMMs and an (l x l) Cholesky per pass instead of
  Householder QR's sequence of reflections; the second pass's Gram matrix is accumulated in
  float64 (so is the first's, unless the iterate is well-conditioned enough for float32), and
  its ``Q1 R2^-1`` is folded into the small SVD's (l x l) factors instead of formed. A Gram
  matrix too ill-conditioned for Cholesky is shifted (shifted CholeskyQR3, Fukaya et al. 2020); a
  numerically rank-deficient one falls back to Householder QR: the basis is always orthonormal,
  never NaN. The power iterations' iterates need only a well-conditioned basis of their span:
  one pass, with a float32 Gram matrix when the iterate is well-conditioned enough for its
  rounding, and only once the products since the last one would spread its singular values by
  more than 100x (every third product on interaction matrices, whose spectra are flat; every
  product on fast decaying ones).
- ``"qr"``: Householder QR (``torch.linalg.qr``) after every product, as ``torch.svd_lowrank``.
- ``"lu"``: the power iterations keep ``P L`` of an LU factorisation (scikit-learn's default),
  the last step is Householder QR.
- ``"none"``: the power iterations only rescale (so nothing overflows), the last step is
  Householder QR; the small singular directions drown in rounding after a few iterations
  (scikit-learn uses it for n_iter <= 2).

The result does not depend on A's scale: A whose largest entry lies beyond 2^+-32 (float32;
2^+-256 for float64) is iterated as ``2^-e A`` (e that entry's exponent: exact) and S is scaled back,
so its Gram matrices and R^-1 neither under- nor overflow; a sparse A's values are scaled once, a
dense A's products after they are formed (a pass over the l-column iterate, never over A). Between
normalisations, the power iterations' iterates are kept within 2^+-32 (float32) of a basis's
magnitude, in both directions. Only A whose largest singular value (or a dense A's product with the
sketch's vectors) exceeds the dtype's largest value raises: a ValueError naming A.

Rank deficiency is never silent: when A's numerical rank is below k (numpy's ``matrix_rank`` rule on
the singular values found), a :class:`RankDeficiencyWarning` says which triplets are rounding noise;
U and V stay orthonormal. (``normalizer="none"`` is the exception above: what it loses to rounding
in the power iterations is lost without a warning.) Results are reproducible for a seed at a given
thread count, and follow one sign convention: the entry of largest magnitude of each column of U is
positive (scikit-learn's ``svd_flip``), with V's rows flipped to match. Across thread counts the
sketches, the sparse products and the (l x l) factorisations (on one thread) give the same bits, but
MKL splits the sums of large tall-skinny GEMMs (Y^T Y; A^T Y for a dense A) by thread count: on a
3,000 x 500 matrix at k = 20, float32, U, S and Vh at 1 and 2 threads differed by up to 1e-5.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from diffcore import (
    _checks,
    _library,  # defines the ops
    _registry,
)
from diffcore.sparse import Adjacency, _torch_sparse_entries

__all__ = ["RankDeficiencyWarning", "cholqr2", "randomized_svd", "random_projection", "sketch"]

DTYPES = (torch.float32, torch.float64)
KINDS = ("gaussian", "rademacher", "sparse")
NORMALIZERS = ("cholqr2", "qr", "lu", "none")
ACHLIOPTAS_DENSITY = 1 / 3
# CholeskyQR trusts a Cholesky factor of the float64 Gram matrix up to this condition number
# (the Gram's rounding, 1e-16 relative, must stay well below its smallest eigenvalue).
_CHOL_MAX_COND = 1e7
# A CholeskyQR pass whose factor is this well-conditioned started from a nearly orthonormal
# matrix: its result is orthonormal to working precision, and no further pass is needed.
_NEAR_ORTHONORMAL = 10.0
_MAX_EXTRA_PASSES = 3
# A float32 Gram matrix gives a good enough factor for a power iteration's iterate (a
# well-conditioned basis of its span, not an orthonormal one) when its factor is this
# well-conditioned: its rounding, about 2e-7 of ||Y||^2 measured over 40,000 rows (1e-5 at worst),
# moves the smallest eigenvalue ||Y||^2 / cond^2 by 2% (by up to 90% at worst: the basis is then
# still within a factor 3 of orthonormal).
_FLOAT32_GRAM_MAX_COND = 300.0
# Power iterations normalise an iterate only when the next product would make it more
# ill-conditioned than this (well inside what one float32-Gram pass handles, as the spread per
# product is only estimated).
_SKIP_COND = 100.0
# The SVD of B = Q^T A comes from B B^T's eigenvectors when its top k singular values span at
# most this factor (V = B^T X S^-1 then loses at most this many ulps), else from CholeskyQR2.
_GRAM_SVD_MAX_COND = 10.0
_INT32_MAX = 2**31 - 1


class RankDeficiencyWarning(UserWarning):
    """A sketch or a matrix had lower numerical rank than the columns asked of it; the result is
    still orthonormal, and the warning says which directions are arbitrary."""


# --- sparse operands ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Csr:
    """A sparse (m x n) operator in CSR: ``A[r, c] = rs[r] v[e] cs[c]`` (column indices sorted
    within each row, no repeats). The CSR arrays of A^T are built when a product with A^T first
    needs them (a sketch never does: building them took longer than the sketch itself).

    ``values``: float32 (also for a float64 matrix whose values are exactly float32, e.g. a binary
    or count matrix) or float64 (otherwise), None for ones. The CSR SpMM kernel takes float32
    values: with float64 values the products run torch's CSR matmul instead."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor | None
    row_scale: torch.Tensor | None
    col_scale: torch.Tensor | None
    shape: tuple[int, int]
    dtype: torch.dtype  # of the results
    make_transpose: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(repr=False)

    @property
    def device(self) -> torch.device:
        return self.crow.device

    @functools.cached_property
    def transpose_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(crow, col, values)`` of A^T, built on first use and kept."""
        return self.make_transpose()

    def matmul(self, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``A X`` (or ``A^T X``, over the transpose's arrays)."""
        arrays = (self.crow, self.col, self.values)
        t_arrays = self.transpose_arrays
        if transpose:
            arrays, t_arrays = t_arrays, arrays
        if self.values is None or self.values.dtype == torch.float32:
            rs, cs = (self.col_scale, self.row_scale) if transpose else (self.row_scale, self.col_scale)
            return _spmm(*arrays, rs, cs, *t_arrays, X)
        crow, col, values = arrays
        shape = self.shape[::-1] if transpose else self.shape
        return torch.sparse_csr_tensor(crow, col.long(), values, shape, check_invariants=False) @ X

    @functools.cached_property
    def max_abs(self) -> float:
        """An upper bound of ``max |A[r, c]|``: ``max |v| max |rs| max |cs|`` (exact when there are
        no scalings, as for a scipy or torch matrix); one pass over each array, on first use."""
        bound = 1.0
        for x in (self.values, self.row_scale, self.col_scale):
            if x is not None and x.numel():
                low, high = torch.aminmax(x)
                bound *= max(-float(low), float(high))
        return bound

    def scaled(self, factor: float) -> _Csr:
        """``factor A`` (factor a power of two: exact, unless an entry underflows) with its values,
        and those of its transpose, scaled once (a binary A gets values): no product, the sketch
        included, then ever meets A's own magnitude."""

        def scale(values: torch.Tensor | None, nnz: int) -> torch.Tensor:
            if values is None:  # a binary A: its values are ones
                values = torch.ones(nnz, dtype=torch.float32, device=self.device)
            # in the results' dtype: float32 values of a float64 A may take a factor beyond float32's range
            return (values.to(self.dtype) * factor).to(values.dtype)

        def transpose() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            crow, col, values = self.transpose_arrays
            return crow, col, scale(values, col.numel())

        return replace(self, values=scale(self.values, self.col.numel()), make_transpose=transpose)

    def sketch(self, k: int, kind: str, density: float, scale: float, seed: int, offset: int) -> torch.Tensor:
        args = (self.crow, self.col, self.values, self.row_scale, self.col_scale, self.shape[1], k, kind, density,
                scale, seed, offset, self.dtype)
        impl = _registry.forced_for("linalg_sketch_csr", self.device)
        if impl is None:
            return torch.ops.diffcore.linalg_sketch_csr(*args)
        out = torch.empty((self.shape[0], k), dtype=self.dtype, device=self.device)
        impl(*args, out)
        return out


def _spmm(*args) -> torch.Tensor:
    """``torch.ops.diffcore.sparse_spmm``, or the implementation ``diffcore.use`` forces (when the
    sparse family has one of that name)."""
    name = _registry.forced()
    x = args[-1]
    if name is None or name not in _registry.implementations("sparse_spmm"):
        return torch.ops.diffcore.sparse_spmm(*args)
    out = torch.empty((args[0].numel() - 1, x.shape[1]), dtype=x.dtype, device=x.device)
    _registry.forced_for("sparse_spmm", x.device)(*args, out)
    return out


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n <= _INT32_MAX else torch.int64


def _real_dtype(name: str, dtype: torch.dtype, hint: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise TypeError(f"{name}: expected float32 or float64 values, got {dtype}{hint}")
    return dtype


def _csr(crow, col, values, transpose: Callable[[], tuple], shape, dtype) -> _Csr:
    """A :class:`_Csr` from CSR arrays of A (column indices sorted within each row, no repeats) and
    a function giving those of A^T: values checked, and stored as None for a binary matrix, float32
    when exactly float32 (A^T's the same way)."""
    m, n = shape
    # one pass with no temporary (NaN propagates): (values == 1).all() took as long as half a sketch
    low, high = (float(x) for x in torch.aminmax(values)) if values.numel() else (1.0, 1.0)
    if low == high == 1:
        stored = None  # a binary matrix: the kernels skip the value loads
    elif not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("A: expected finite values, found NaN or Inf in its stored entries")
    elif torch.equal(values.float().to(values.dtype), values):
        stored = torch.float32
    else:
        stored = values.dtype

    def arrays(crow, col, values, n_cols):
        return (crow.long().contiguous(), col.to(_index_dtype(n_cols)).contiguous(),
                None if stored is None else values.to(stored).contiguous())

    return _Csr(*arrays(crow, col, values, n), None, None, (m, n), dtype, lambda: arrays(*transpose(), m))


def _from_torch_sparse(A: torch.Tensor) -> _Csr:
    """COO (coalesced here: repeats summed) or CSR (coalesced when its column indices are not
    sorted within rows or repeat); the transpose's arrays are A's CSC arrays. The indices are
    checked first (torch's conversions crash the process on out-of-range ones)."""
    if A.dim() != 2:
        raise ValueError(f"A: expected a 2-D matrix, got a {A.dim()}-D sparse tensor of shape {tuple(A.shape)}")
    dtype = _real_dtype("A", A.dtype, "; convert with A.to(torch.float32)")
    if A.layout not in (torch.sparse_coo, torch.sparse_csr):
        raise TypeError(f"A: expected a strided, sparse COO or sparse CSR tensor, got layout {A.layout}")
    _check_nonempty(tuple(A.shape), f"a torch {str(A.layout).removeprefix('torch.')} tensor")
    rows, cols, values = _torch_sparse_entries("A", A)
    key = rows * A.shape[1] + cols
    if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):
        # unsorted or repeated entries: a fresh COO tensor, so that coalesce() sorts and sums them even
        # when A claims to be coalesced (torch trusts that flag and would return A as it is)
        A = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, tuple(A.shape), check_invariants=False)
    if A.layout == torch.sparse_coo:
        A = A.coalesce().to_sparse_csr()

    def transpose():
        At = A.to_sparse_csc()
        return At.ccol_indices(), At.row_indices(), At.values()

    return _csr(A.crow_indices(), A.col_indices(), A.values(), transpose, tuple(A.shape), dtype)


def _from_scipy(A) -> _Csr:
    import numpy as np
    import scipy.sparse as sp

    if A.ndim != 2:
        raise ValueError(f"A: expected a 2-D matrix, got shape {A.shape}")
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}.get(A.dtype)
    if dtype is None:
        raise TypeError(f"A: expected float32 or float64 values, got {A.dtype}; convert with A.astype(np.float32)")
    _check_nonempty(A.shape, f"a scipy.sparse {type(A).__name__}")
    if A.format == "csr" and A.has_canonical_format and A.data.flags.writeable and A.indices.flags.writeable:
        csr = A  # sorted column indices, no repeats (scipy caches the check): only read, never written
    else:
        csr = sp.csr_matrix(A, copy=True)  # A itself stays untouched
        csr.sum_duplicates()  # sorts the column indices within rows, sums repeats

    def arrays(M):
        return torch.from_numpy(M.indptr.astype(np.int64)), torch.from_numpy(M.indices), torch.from_numpy(M.data)

    return _csr(*arrays(csr), lambda: arrays(csr.tocsc()), tuple(A.shape), dtype)  # CSC of A: CSR of A^T


def _from_adjacency(adj: Adjacency) -> _Csr:
    return _Csr(adj.crow_indices, adj.col_indices, adj.values, adj.row_scale, adj.col_scale, adj.shape, torch.float32,
                lambda: adj._transpose_csr)


def _operand(A: object) -> torch.Tensor | _Csr:
    """A dense 2-D float32/float64 tensor as it is, or a sparse matrix as :class:`_Csr`; raises
    for anything else (TypeError: not a matrix type diffcore takes, or integer/half values;
    ValueError: not 2-D, no rows or no columns, NaN or Inf in a sparse matrix's values)."""
    if isinstance(A, Adjacency):
        _check_nonempty(A.shape, "a diffcore.sparse.Adjacency")
        return _from_adjacency(A)
    if isinstance(A, torch.Tensor):
        if A.layout != torch.strided:
            return _from_torch_sparse(A)
        if A.dim() != 2:
            raise ValueError(f"A: expected a 2-D matrix, got a {A.dim()}-D tensor of shape {tuple(A.shape)}")
        _real_dtype("A", A.dtype, "; convert with A.to(torch.float32)")
        _check_nonempty(tuple(A.shape), "a dense tensor")
        return A
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy is a test dependency
        sp = None
    if sp is not None and sp.issparse(A):
        return _from_scipy(A)
    raise TypeError(
        f"A: expected a torch.Tensor (dense or sparse), a scipy.sparse matrix or a diffcore.sparse.Adjacency, "
        f"got {type(A).__name__}"
    )


def _check_nonempty(shape: tuple[int, ...], what: str) -> None:
    """An (m, n) matrix with m = 0 or n = 0 has no singular triplets and nothing to sketch."""
    m, n = shape
    if m == 0 or n == 0:
        raise ValueError(
            f"A: expected a non-empty matrix (at least 1 row and 1 column), got {what} of shape {(m, n)}"
        )


def _no_grad_needed(name: str, x: object, what: str, instead: str) -> None:
    """Raises when x requires grad under grad mode: ``what`` has no backward, and its outputs would
    otherwise carry none (or a wrong one) without a word."""
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: {what} is not differentiable, and {name} requires grad; pass {name}.detach() "
                         f"(or call it under torch.no_grad()){instead}")


# --- sketches -------------------------------------------------------------------------------------
def _seed_offset(seed: object, offset: object) -> tuple[int, int]:
    if seed is None:
        raise TypeError("seed: expected an int, got None")
    return _checks.seed_offset(seed, offset)


def _apply_sketch(A: torch.Tensor | _Csr, k: int, kind: str, density: float, scale: float, seed: int,
                  offset: int) -> torch.Tensor:
    if isinstance(A, _Csr):
        return A.sketch(k, kind, density, scale, seed, offset)
    impl = _registry.forced_for("linalg_sketch", A.device)
    if impl is None:
        return torch.ops.diffcore.linalg_sketch(A, k, kind, density, scale, seed, offset)
    return _library.run_forced("linalg_sketch", impl, (A, k, kind, density, scale, seed, offset),
                               lambda: (torch.empty((A.shape[0], k), dtype=A.dtype, device=A.device),))


def sketch(A: object, k: int, seed: int = 0, *, offset: int = 0) -> torch.Tensor:
    """``A @ Omega`` with Omega (n x k) standard normal from the Philox stream ``(seed, offset)``,
    generated inside the kernel and never stored.

    Args:
        A: (m, n) float32/float64: a dense tensor (any strides; differentiable), a torch sparse
            COO/CSR tensor, a scipy.sparse matrix or a :class:`~diffcore.sparse.Adjacency`
            (its normalised operator).
        k: columns of the sketch, >= 1.
        seed, offset: the stream; Omega[i, j] is its element ``i * k + j``.
    Returns:
        (m, k) in A's dtype (float32 for an Adjacency); k may exceed m and n. A sparse A without
        nonzeros gives zeros.
    Raises:
        ValueError: A is not 2-D, or empty (no rows or no columns: m == 0 or n == 0); k < 1;
            NaN or Inf in a sparse A's values; a sparse A that requires grad under grad mode
            (only a dense A's sketch is differentiable).
        RuntimeError: NaN or Inf in a dense A (found by the kernel, so a compiled graph does
            not break).
        TypeError: A is not one of the types above, or its values are not float32/float64
            (integer, bool, half: convert first).
    """
    return random_projection(A, k, "gaussian", seed, offset=offset, _scaled=False)


def random_projection(
    A: object,
    k: int,
    kind: str = "gaussian",
    seed: int = 0,
    *,
    density: float | None = None,
    offset: int = 0,
    _scaled: bool = True,
) -> torch.Tensor:
    """A Johnson–Lindenstrauss projection of A's rows: ``A @ Omega * c`` with ``c`` chosen so that
    ``E ||x Omega c||^2 = ||x||^2`` for every row x; Omega generated inside the kernel.

    Args:
        A: (m, n), as for :func:`sketch`.
        k: the projected dimension, >= 1.
        kind: ``"gaussian"`` (N(0, 1) entries, c = 1/sqrt(k)), ``"rademacher"`` (+-1 from bit 31 of
            the Philox word, c = 1/sqrt(k)) or ``"sparse"`` (Achlioptas: +-1 with probability
            density / 2 each, else 0; c = 1/sqrt(density k)).
        density: the fraction of nonzeros of a sparse Omega, in (0, 1] (default 1/3). Its
            threshold is taken on 24 bits, so the density is ``floor(density 2^24) / 2^24``.
        seed, offset: the stream; Omega[i, j] comes from its element ``i * k + j``.
    Returns:
        (m, k) in A's dtype.
    Raises:
        As :func:`sketch` (A not 2-D, empty, non-finite or not float32/float64; k < 1), and
        ValueError for an unknown kind or a density outside (0, 1] or given with another kind.
    """
    k = _checks.integer("k", k, lambda v: v >= 1, "a positive int")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if density is None:
        density = ACHLIOPTAS_DENSITY
    elif kind != "sparse":
        raise ValueError(f"density: only kind='sparse' takes a density, got kind={kind!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density: expected a number in (0, 1], got {density!r}")
    if int(density * 2**24) == 0:
        raise ValueError(f"density: {density!r} is below 2^-24, the resolution of the sparse draw")
    seed, offset = _seed_offset(seed, offset)
    operand = _operand(A)
    if isinstance(operand, _Csr):
        _no_grad_needed("A", A, "the sketch of a sparse A", "; a dense A's sketch is differentiable")
    scale = 1.0
    if _scaled:
        scale = 1.0 / math.sqrt(k * (density if kind == "sparse" else 1.0))
    return _apply_sketch(operand, k, kind, float(density), scale, seed, offset)


# --- orthonormalisation ---------------------------------------------------------------------------
# The tall-skinny products (Gram matrices Y^T Y, Y R^-1) run in torch on torch's threads; the
# small (l x l) float64 factorisations and products run in torch on the CPU on one thread
# (_one_thread): LAPACK on a matrix this small needs no threads (a parallel region would cost
# more than the work), one thread gives the same last bits for any torch.get_num_threads, and
# numpy (OpenBLAS) would start threads of its own that keep spinning after the call: on a
# 2-core machine, the torch operations of the next ~50 ms then ran 5 to 20 times slower. The
# tall-skinny GEMMs are MKL's on torch's threads: once a product is large enough for MKL to split
# its sum over the long dimension (Y^T Y, and A^T Y for a dense A), the split follows the thread
# count, so results at different thread counts differ in the last bits (module docstring).
@contextlib.contextmanager
def _one_thread():
    """Runs small LAPACK calls and a tall Householder QR on one thread (LAPACK blocks the QR by
    thread count)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _small(X: torch.Tensor) -> torch.Tensor:
    """A small matrix as float64 on the CPU."""
    return X.detach().to("cpu", torch.float64)


def _mm(*factors: torch.Tensor) -> torch.Tensor:
    """The product of small float64 matrices, on one thread."""
    with _one_thread():
        out = factors[0]
        for f in factors[1:]:
            out = out @ f
        return out


def _svdvals(X: torch.Tensor) -> torch.Tensor:
    with _one_thread():
        return torch.linalg.svdvals(X)


def _inverse_upper(R: torch.Tensor) -> torch.Tensor:
    """R^-1 of an upper triangular float64 R (a triangular solve), on one thread."""
    with _one_thread():
        return torch.linalg.solve_triangular(R, torch.eye(R.shape[0], dtype=R.dtype), upper=True)


def _cholesky_factor(G: torch.Tensor) -> tuple[torch.Tensor, float, float] | None:
    """The upper Cholesky factor R (G = R^T R) of a float64 Gram matrix, its condition number and
    its norm (Y's, for G = Y^T Y), or None when Cholesky fails or R is too ill-conditioned to trust."""
    with _one_thread():
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            return None
        sv = torch.linalg.svdvals(L)
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf
    return (L.mT, cond, float(sv[0])) if cond <= _CHOL_MAX_COND else None


def _gram(Y: torch.Tensor, n: int | None = None, float64: bool = True) -> torch.Tensor:
    """The Gram matrix of Y's first n columns (all by default), accumulated in float64 (or in Y's
    dtype when not ``float64``), as float64 on the CPU. Y's other columns must be zero (a
    :func:`_pad` buffer): the product runs over the whole buffer, whose contiguous rows make a
    faster GEMM."""
    Y = Y.double() if float64 else Y
    G = _small(Y.mT @ Y)
    return G if n is None else G[:n, :n]


def _apply_inverse(Y: torch.Tensor, R: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """``Y R^-1`` (R upper triangular, n x n), in Y's dtype: Y's first n columns times R^-1 (its
    other columns must be zero), as a (rows x width) buffer whose columns past n are zero
    (width n by default; :func:`_pad`)."""
    n, w = R.shape[0], Y.shape[1]
    R_inv = torch.zeros((w, n if width is None else width), dtype=torch.float64)
    R_inv[:n, :n] = _inverse_upper(R)
    return Y @ R_inv.to(device=Y.device, dtype=Y.dtype)


def _pad(Y: torch.Tensor, width: int | None) -> torch.Tensor:
    """Y (rows x n) as the left part of a (rows x width) buffer whose other columns are zero.

    randomized_svd keeps its iterates in such buffers: ``diffcore.sparse``'s SpMM vectorises a
    row over whole SIMD vectors and finishes with a scalar loop, so with a CSR operand an iterate
    of l = 74 columns (4 float32 vectors of 16 and 10 scalars per nonzero) takes about twice as
    long as one of 80 (5 vectors); MKL's GEMMs (a dense operand's products, the Gram matrices, the
    ``Y R^-1``) are 10-25% faster on 80 contiguous columns than on 74 as well. The zero columns
    stay zero through every product and enter no factorisation: they change no result."""
    if width is None or width == Y.shape[1]:
        return Y
    out = Y.new_zeros((Y.shape[0], width))
    out[:, : Y.shape[1]] = Y
    return out


def _padded_width(dtype: torch.dtype, columns: int) -> int:
    """The width of randomized_svd's iterate buffers: ``columns`` rounded up to whole 64-byte
    vectors (:func:`_pad`)."""
    lanes = 64 // (torch.finfo(dtype).bits // 8)  # elements per 64-byte vector
    return -(-columns // lanes) * lanes


def _householder(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    with _one_thread():
        Q, R = torch.linalg.qr(Y)
    R = _small(R)
    return (Q, R, *_cond_norm(R))


def _cholqr2(Y: torch.Tensor, final: bool = True, width: int | None = None, n: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Q (m x n, Y's dtype), R (n x n, float64, upper triangular) with Y = Q R, cond(Y), ||Y||_2:
    CholeskyQR2, shifted CholeskyQR3 or Householder QR, whichever first succeeds.

    Pass 1 factors Y's float64 Gram matrix, shifted by s I when that is too ill-conditioned to
    trust (s = 11 (m n + n (n + 1)) u ||Y||_F^2, Fukaya et al. 2020); each further pass re-factors
    the result, until a pass's factor is within _NEAR_ORTHONORMAL of the identity's conditioning:
    2 passes for a well-conditioned Y (CholeskyQR2), 3 after a shift (CholeskyQR3). When no factor
    can be trusted, Y is numerically rank-deficient and Householder QR completes its range.

    ``final=False`` asks only for a well-conditioned basis of Y's span (a power iteration's
    iterate): one pass, from a float32 Gram matrix when Y is float32 and well-conditioned enough
    (cond <= _FLOAT32_GRAM_MAX_COND) for its rounding not to matter.

    ``n``: Y is a zero-padded buffer (:func:`_pad`) of n columns (all of Y's by default);
    ``width``: Q comes as a zero-padded (m x width) buffer (width n by default)."""
    n = Y.shape[1] if n is None else n
    if n == 0:  # no columns: the empty factors, as torch.linalg.qr gives them (Q m x 0, R 0 x 0)
        return _pad(Y.new_zeros((Y.shape[0], 0)), width), torch.zeros((0, 0), dtype=torch.float64), 1.0, 0.0

    def householder():
        Q, R, cond, norm = _householder(Y[:, :n])
        return _pad(Q, width), R, cond, norm

    if not final and Y.dtype == torch.float32:
        factor = _cholesky_factor(_gram(Y, n, float64=False))
        if factor is not None and factor[1] <= _FLOAT32_GRAM_MAX_COND:
            return _apply_inverse(Y, factor[0], width), *factor
    G = _gram(Y, n)
    factor = _cholesky_factor(G)
    shifted = factor is None
    if shifted:
        m = Y.shape[0]
        shift = 11 * (m * n + n * (n + 1)) * torch.finfo(torch.float64).eps * float(G.trace())
        factor = _cholesky_factor(G + shift * torch.eye(n, dtype=torch.float64)) if shift > 0 else None
        if factor is None:
            return householder()
    R = factor[0]
    Q = _apply_inverse(Y, R, width)
    if not final and not shifted:
        return Q, *factor
    for _ in range(_MAX_EXTRA_PASSES):
        factor = _cholesky_factor(_gram(Q, n))
        if factor is None:  # the damped directions of a rank-deficient Y: nothing to complete them
            return householder()
        Q = _apply_inverse(Q, factor[0], width)
        R = _mm(factor[0], R)
        if factor[1] <= _NEAR_ORTHONORMAL:
            return Q, R, *_cond_norm(R)
    return householder()


def _cond_norm(R: torch.Tensor) -> tuple[float, float]:
    sv = _svdvals(R)
    return (float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf), float(sv[0])


def _numerical_rank(sv: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> tuple[int, float]:
    """numpy's ``matrix_rank`` rule: singular values above ``max(sv) max(m, n) eps(dtype)``."""
    tol = float(sv.max()) * max(shape) * torch.finfo(dtype).eps if sv.numel() else 0.0
    return int((sv > tol).sum()), tol


def cholqr2(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis Q (m x n, Y's dtype) of the columns of the tall matrix Y (m x n,
    m >= n, float32/float64) by CholeskyQR2: ``R = chol(Y^T Y)``, ``Q = Y R^-1``, twice, the Gram
    matrix accumulated in float64 (so float32 Y up to cond 1e7 needs no shift).

    More ill-conditioned Y gets a shifted first pass and a third pass (shifted CholeskyQR3); Y that
    no Cholesky factor can handle falls back to Householder QR. The columns of Q are orthonormal to
    working precision and span Y's columns; never NaN for finite Y. When Y's numerical rank r is
    below n (numpy's ``matrix_rank`` rule), Q's other n - r columns complete its range arbitrarily,
    and a :class:`RankDeficiencyWarning` says so. Not differentiable: Y that requires grad under
    grad mode raises ValueError.
    """
    if not isinstance(Y, torch.Tensor) or Y.layout != torch.strided:
        raise TypeError(f"Y: expected a dense torch.Tensor, got {type(Y).__name__}")
    if Y.dim() != 2 or Y.shape[0] < Y.shape[1]:
        raise ValueError(f"Y: expected a tall 2-D matrix (m >= n), got shape {tuple(Y.shape)}")
    _real_dtype("Y", Y.dtype, "")
    _no_grad_needed("Y", Y, "cholqr2", "; torch.linalg.qr gives gradients")
    if not bool(torch.isfinite(Y).all()):
        raise ValueError("Y: expected finite values, found NaN or Inf")
    Q, R, _, _ = _cholqr2(Y)
    rank, tol = _numerical_rank(_svdvals(R), tuple(Y.shape), Y.dtype)
    if rank < Y.shape[1]:
        warnings.warn(
            f"cholqr2: Y ({Y.shape[0]} x {Y.shape[1]}) is numerically rank-deficient (rank {rank}: singular values "
            f"above {tol:.3g}); the last {Y.shape[1] - rank} directions of Q are an arbitrary orthonormal "
            "completion of its range",
            RankDeficiencyWarning, stacklevel=2,
        )
    return Q


def _lu_basis(Y: torch.Tensor) -> torch.Tensor:
    """``P L`` of ``Y = P L U`` (scikit-learn's ``lu(..., permute_l=True)``), without P (m x m)."""
    LU, pivots, _ = torch.linalg.lu_factor_ex(Y)  # a zero pivot (rank-deficient Y) is fine: only P L is used
    L = torch.tril(LU, -1) + torch.eye(*LU.shape, dtype=LU.dtype, device=LU.device)
    perm = list(range(Y.shape[0]))
    for i, p in enumerate(pivots.tolist()):  # LAPACK: row i was swapped with row p - 1, in order
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    out = torch.empty_like(L)
    out[torch.tensor(perm, device=Y.device)] = L
    return out


def _normalize(Y: torch.Tensor, normalizer: str, width: int, n: int) -> tuple[torch.Tensor, float, float]:
    """A power iteration's next iterate from Y (its first n columns; the others zero), as a
    zero-padded (rows x width) buffer (:func:`_pad`), and, for cholqr2, Y's condition number and
    norm (the normalizers that do not measure them give inf)."""
    if normalizer == "cholqr2":
        Q, _, cond, norm = _cholqr2(Y, False, width, n)
        return Q, cond, norm
    Y = Y[:, :n]
    if normalizer == "qr":
        return _pad(_householder(Y)[0], width), math.inf, math.inf
    if normalizer == "lu":
        return _pad(_lu_basis(Y), width), math.inf, math.inf
    top = float(Y.abs().max())  # "none": a power-of-two rescaling (exact), so nothing overflows
    return _pad(Y * 2.0 ** -math.frexp(top)[1] if top > 0 else Y, width), math.inf, math.inf


def _flip_signs(U: torch.Tensor) -> torch.Tensor:
    """Flips U's columns in place so that the entry of largest magnitude of each is positive (the
    first such entry: scikit-learn's ``svd_flip``), and returns the signs (1 or -1).

    From U's column minima and maxima (two fast reductions; torch's aminmax and argmax along
    the columns are ten times slower); only a column whose largest positive and negative
    entries tie in magnitude looks for the first one (argmax)."""
    low, high = U.amin(0), U.amax(0)
    signs = torch.where(high > -low, 1.0, -1.0).to(U.dtype)
    tied = (high == -low).nonzero().flatten()
    if tied.numel():
        cols = U[:, tied]
        first = cols[cols.abs().argmax(0), torch.arange(tied.numel(), device=U.device)]
        signs[tied] = torch.where(first < 0, -1.0, 1.0).to(U.dtype)
    U.mul_(signs)
    return signs


def _final_basis(Y: torch.Tensor, normalizer: str, width: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An orthonormal basis of the span of Y's first n columns (the others zero; the basis B is
    made from) as ``P[:, :n] M``: P a zero-padded (m x width) buffer (:func:`_pad`), M (n x n,
    float64) or None (the identity).

    Householder QR for every normalizer but cholqr2. For cholqr2, CholeskyQR2 with its second
    product left to the (n x n) factors that follow: pass 1 takes a float32 Gram matrix when Y
    is float32 and well-conditioned enough for it (as a power iteration's iterate), else the
    float64 one; pass 2 factors the Gram matrix of P = Y R1^-1 (in Y's dtype: P is near
    orthonormal, so a float32 Gram matrix's rounding, about 2e-7 at 40,000 rows, is all that is
    left of its loss of orthogonality, below what the float32 products round to: U's columns
    were orthonormal to 4.7e-7 on Gowalla, 4.4e-7 with a float64 Gram matrix), and when that is
    near-orthonormal (cond <= _NEAR_ORTHONORMAL), M = R2^-1 is returned instead of applied.
    Anything else runs :func:`_cholqr2` (float64 Gram matrices, shifts, more passes,
    Householder QR)."""
    if normalizer != "cholqr2":
        return _pad(_householder(Y[:, :n])[0], width), None
    factor = None
    if Y.dtype == torch.float32:
        factor = _cholesky_factor(_gram(Y, n, float64=False))
        if factor is not None and factor[1] > _FLOAT32_GRAM_MAX_COND:
            factor = None
    if factor is None:
        factor = _cholesky_factor(_gram(Y, n))
    if factor is not None:
        P = _apply_inverse(Y, factor[0], width)
        second = _cholesky_factor(_gram(P, n, float64=Y.dtype != torch.float32))
        if second is not None and second[1] <= _NEAR_ORTHONORMAL:
            return P, _inverse_upper(second[0])
    return _cholqr2(Y, True, width, n)[0], None


def _small_svd(W: torch.Tensor, Y: torch.Tensor, M: torch.Tensor | None, n_cols: int, k: int, dtype: torch.dtype):
    """U (m x k), S (k,), V (n x k) of B = Q^T A, Q = Y[:, :l] M orthonormal (l = n_cols;
    :func:`_final_basis`; Y's other columns zero), from B^T = A^T Q = W M (W = A^T Y, n x width,
    zero past column l), with U's signs fixed (:func:`_flip_signs`) and V's to match.

    When the top k singular values span at most _GRAM_SVD_MAX_COND, from the eigenvectors X of
    the float64 Gram matrix B B^T = M^T (W^T W) M = X S^2 X^T: U = Q X, V = B^T X S^-1 (V's
    rounding grows with S_0 / S_k, so only then). Otherwise B^T = Qb Rb by CholeskyQR2 and
    Rb = W S X^T: U = Q X, V = Qb W. M, the signs and S^-1 are applied to the (l x k) factors
    before the products with the tall matrices (padded with zero rows to Y's width)."""
    M = torch.eye(n_cols, dtype=torch.float64) if M is None else M
    G = _gram(W, n_cols)
    with _one_thread():
        evals, X = torch.linalg.eigh(M.mT @ G @ M)
    evals, X = evals.flip(0).clamp_min(0.0), X.flip(1)
    S = evals.sqrt()

    def tensor(x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """x (float64) in the results' dtype and device, with zero rows appended up to ``rows``."""
        if rows is not None and rows > x.shape[0]:
            x = torch.cat([x, x.new_zeros((rows - x.shape[0], x.shape[1]))])
        return x.to(device=Y.device, dtype=dtype).contiguous()

    width = Y.shape[1]
    if S[k - 1] > 0 and S[0] <= _GRAM_SVD_MAX_COND * S[k - 1]:
        MX = tensor(_mm(M, X[:, :k]), width)
        U = Y @ MX
        signs = _flip_signs(U)
        return U, tensor(S[:k]), W @ (MX * (signs / tensor(S[:k])))
    Qb, Rb, _, _ = _cholqr2(W @ tensor(M, width), n=n_cols)
    with _one_thread():
        Wb, S, Xh = torch.linalg.svd(Rb)
    U = Y @ tensor(_mm(M, Xh[:k].mT), width)
    signs = _flip_signs(U)
    return U, tensor(S[:k]), Qb @ (tensor(Wb[:, :k]) * signs)


# --- randomized SVD -------------------------------------------------------------------------------
def _n_iter(n_iter: object, k: int, m: int, n: int) -> int:
    if n_iter == "auto":  # scikit-learn's rule (7 was found a good compromise for PCA)
        return 7 if k < 0.1 * min(m, n) else 4
    return _checks.integer("n_iter", n_iter, lambda v: v >= 0, "'auto' or a non-negative int")


def _matmul(A: torch.Tensor | _Csr, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``A X`` or ``A^T X``; a zero-padded X (:func:`_pad`) gives a zero-padded product."""
    if isinstance(A, _Csr):
        return A.matmul(X, transpose)
    return (A.mT if transpose else A) @ X


def _log2_max(dtype: torch.dtype) -> int:
    """``log2`` of the dtype's largest value, rounded up: 128 (float32), 1024 (float64)."""
    return math.frexp(torch.finfo(dtype).max)[1]


def _scale_exponent(A: torch.Tensor | _Csr) -> int:
    """The e for which randomized_svd iterates with ``2^-e A``: 0 while A's largest entry magnitude
    lies within ``2^+-(L / 4)`` (L = :func:`_log2_max`: 2^+-32 for float32, 2^+-256 for float64),
    else that magnitude's exponent (``2^(e-1) <= max |A| < 2^e``: 2^-e A's largest entry lies in
    [1/2, 1)), kept within the normal range so that 2^e and 2^-e are exact. Raises ValueError for
    NaN or Inf in a dense A, found in the same pass (a sparse A's values were checked when its CSR
    arrays were built; an Adjacency checks its own)."""
    if isinstance(A, _Csr):
        top = A.max_abs
    else:
        # NaN propagates; one pass with no temporary (isfinite(A).all() is 20x slower)
        low, high = (float(x) for x in torch.aminmax(A))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("A: expected finite values, found NaN or Inf")
        top = max(-low, high)
    exponent = math.frexp(top)[1]
    if abs(exponent) <= _log2_max(A.dtype) // 4:
        return 0
    limit = -math.frexp(torch.finfo(A.dtype).tiny)[1]  # 125 (float32), 1021 (float64)
    return max(-limit, min(limit, exponent))


def _too_large(dtype: torch.dtype) -> ValueError:
    name = str(dtype).removeprefix("torch.")
    hint = "convert it to float64 or scale it down" if dtype == torch.float32 else "scale it down"
    return ValueError(
        f"A: too large for {name}: its products with the sketch's vectors, or its largest singular value, exceed "
        f"{name}'s largest value {torch.finfo(dtype).max:.3g}; {hint}"
    )


def _rescale(Y: torch.Tensor, exponent: int) -> torch.Tensor:
    """``2^-exponent Y`` in place (exact): a product of a dense A, formed at A's own magnitude, as
    the product of ``2^-exponent A``. Raises ValueError when the product overflowed (only possible
    for exponent > 0: 2^-exponent Y is then smaller than Y)."""
    if exponent == 0:
        return Y
    Y.mul_(2.0 ** -exponent)
    if exponent > 0:
        low, high = (float(x) for x in torch.aminmax(Y))  # Inf, or NaN from Inf - Inf
        if not (math.isfinite(low) and math.isfinite(high)):
            raise _too_large(Y.dtype)
    return Y


def _normalise_now(spread: float, growth: float, since: int, bound: int, unscaled: int) -> bool:
    """Whether a power iteration's iterate, ``since`` products after the last normalisation, is
    normalised before the next product: that product would spread its singular values by more than
    _SKIP_COND (``spread^(since + 1)``), or take its magnitude (``growth^(since + 1)`` times the
    last basis's) beyond ``2^+-bound``, where a Gram matrix in the iterate's dtype (its square) nears
    under- or overflow, or the product as formed (``2^unscaled`` times larger: :func:`_rescale`)
    beyond ``2^+-(2 bound)``. In log2, so that no Python float overflows."""
    if (since + 1) * math.log2(spread) > math.log2(_SKIP_COND):
        return True
    magnitude = (since + 1) * (math.log2(growth) if growth > 0 else -math.inf)
    return abs(magnitude) > bound or abs(magnitude + unscaled) > 2 * bound


def randomized_svd(
    A: object,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int | str = "auto",
    normalizer: str = "cholqr2",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k leading singular triplets of A by randomized subspace iteration (Halko, Martinsson
    and Tropp 2011), sketched with a Gaussian Omega generated inside the kernel.

    Args:
        A: (m, n) float32/float64: a dense tensor (any strides), a torch sparse COO/CSR tensor, a
            scipy.sparse matrix or a :class:`~diffcore.sparse.Adjacency` (its normalised operator,
            in float32).
        k: singular triplets wanted, 1 <= k <= min(m, n).
        oversample: extra sketch columns p >= 0; the sketch has l = min(k + p, min(m, n)) columns.
        n_iter: power iterations q >= 0; ``"auto"`` is scikit-learn's rule, 7 when
            k < 0.1 min(m, n) else 4.
        normalizer: how the iterates are orthonormalised: ``"cholqr2"``, ``"qr"``, ``"lu"`` or
            ``"none"`` (module docstring).
        seed: the Philox stream of Omega (offset 0); the same seed gives the same result.
    Returns:
        ``U (m, k), S (k,), Vh (k, n)`` like ``torch.linalg.svd`` (S descending), in A's dtype,
        with U's columns and Vh's rows orthonormal and the largest-magnitude entry of each column
        of U positive. A :class:`RankDeficiencyWarning` says when A's numerical rank is below k
        (``S <= S[0] max(m, n) eps``: those triplets are rounding noise) or when an
        orthonormalisation fell back to Householder QR.
    Raises:
        ValueError: A is not 2-D, or empty (m == 0 or n == 0); k is not an int in
            [1, min(m, n)]; NaN or Inf in A; a bad oversample, n_iter or normalizer; A requires
            grad under grad mode (not differentiable: its factorisations run on detached copies);
            A too large for its dtype (its largest singular value, or a dense A's product with the
            sketch's vectors such as ``A @ Omega``, exceeds the dtype's largest value: for float32,
            about 3.4e38; convert to float64). Any smaller scale gives the relative accuracy of
            scale 1 (as far as A's own entries hold it: subnormal ones have lost bits).
        TypeError: A is not one of the types above, or its values are not float32/float64
            (integer, bool, half: convert first).
    """
    operand = _operand(A)
    _no_grad_needed("A", A, "randomized_svd", "; torch.svd_lowrank gives gradients")
    m, n = operand.shape
    dtype = operand.dtype
    k = _checks.integer("k", k, lambda v: 1 <= v <= min(m, n),
                        f"an int in [1, min(m, n)] = [1, {min(m, n)}] for A of shape {(m, n)}")
    oversample = _checks.integer("oversample", oversample, lambda v: v >= 0, "a non-negative int")
    if not isinstance(normalizer, str) or normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer: expected one of {NORMALIZERS}, got {normalizer!r}")
    q = _n_iter(n_iter, k, m, n)
    seed, _ = _seed_offset(seed, 0)
    l = min(k + oversample, min(m, n))

    # The iterations run on 2^-exponent A (exact), whose largest entry lies in [1/2, 1) when A's
    # lies beyond 2^+-(L / 4) (_scale_exponent): its Gram matrices and R^-1 neither under- nor
    # overflow at any scale, and S is scaled back at the end. A sparse A's values are scaled once;
    # a dense A's products are formed 2^unscaled times larger than those of 2^-exponent A and
    # scaled after (_rescale: a pass over the iterate, never over A).
    exponent = _scale_exponent(operand)
    unscaled = exponent
    if exponent and isinstance(operand, _Csr):
        operand, unscaled = operand.scaled(2.0 ** -exponent), 0

    def product(Y: torch.Tensor, transpose: bool) -> torch.Tensor:
        return _rescale(_matmul(operand, Y, transpose), unscaled)

    # Y's condition number grows by about `spread` per product with A or A^T, its norm by about
    # `growth` (both measured at the last normalisation); with cholqr2, an iterate is normalised
    # only when the next product would take it past what one float32-Gram pass handles
    # (_SKIP_COND) or towards under- or overflow (_normalise_now), and always after the last product.
    # The iterates live in the left l columns of zero-padded buffers of `width` columns (_pad).
    width = _padded_width(dtype, l)
    Y = _rescale(_apply_sketch(operand, l, "gaussian", ACHLIOPTAS_DENSITY, 1.0, seed, 0), unscaled)
    M = None  # the basis B is made from: Y[:, :l] M (_final_basis)
    if q == 0:
        Y, M = _final_basis(Y, normalizer, width, l)
    else:
        Y, cond, norm = _normalize(Y, normalizer, width, l)
        spread, growth, since = cond, norm, 0
    bound = _log2_max(dtype) // 4
    for j in range(2 * q):
        Y = product(Y, transpose=j % 2 == 0)
        since += 1
        if j == 2 * q - 1:
            Y, M = _final_basis(Y, normalizer, width, l)
        elif _normalise_now(spread, growth, since, bound, unscaled):
            Y, cond, norm = _normalize(Y, normalizer, width, l)
            spread, growth, since = cond ** (1 / since), norm ** (1 / since), 0
    U, S, V = _small_svd(product(Y, transpose=True), Y, M, l, k, dtype)
    if exponent:
        S.mul_(2.0 ** exponent)
        if not bool(torch.isfinite(S[0])):
            raise _too_large(dtype)
    _warn_rank(S, m, n, dtype, k)
    return U, S, V.mT


def _warn_rank(S: torch.Tensor, m: int, n: int, dtype: torch.dtype, k: int) -> None:
    rank, tol = _numerical_rank(_small(S), (m, n), dtype)
    if rank < k:
        warnings.warn(
            f"randomized_svd: A has numerical rank {rank} < k = {k} in {str(dtype).removeprefix('torch.')} (singular "
            f"values above S[0] max(m, n) eps = {tol:.3g}): the last {k - rank} triplets are rounding noise, their "
            "singular vectors an arbitrary orthonormal completion",
            RankDeficiencyWarning, stacklevel=3,
        )
