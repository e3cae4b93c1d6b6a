"""Sparse adjacency propagation: ``A_hat X`` over a user-item graph and whole LightGCN stacks.

:class:`Adjacency` holds a square graph in CSR (int64 row pointers, int32 column indices when they
fit) with its degrees, the normalisation as per-row scalings and a cached transpose. The kernels
apply the normalisation on the fly; no normalised value array exists::

    A_hat[r, c] = rs[r] * v[e] * cs[c]       sym:  rs = cs = D^-1/2   (LightGCN, RecBole)
                                             row:  rs = D^-1, cs = 1  (random walk)
                                             none: rs = cs = 1        (the values as given)

with ``D`` the row sums of ``A`` (self-loops included) and ``v`` the edge values (ones for a binary
graph). A degree of zero gives a scaling of zero (``degree_zero="zero"``, LightGCN-PyTorch) or
``(deg + 1e-7)^-1/2`` (``"eps"``, RecBole).

:func:`propagate` computes ``sum_k w_k A_hat^k E0`` (LightGCN's ``computer()``) in one call that
never stacks the layers; its backward is the same propagation over the transpose. :func:`spmm`
and :func:`gcn_layer` are single layers. Each call goes to ``torch.ops.diffcore.sparse_spmm`` or
``sparse_propagate`` (C++ on CPU, Triton on CUDA), or to the implementation forced by
``diffcore.use``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from diffcore import (
    _checks,
    _library,  # defines the ops
    _registry,
)
from diffcore.reference.sparse import csr_rows

__all__ = ["Adjacency", "spmm", "propagate", "gcn_layer"]

NORMS = ("sym", "row", "none")
DEGREE_ZERO = ("zero", "eps")
DUPLICATES = ("collapse", "sum", "error")
COMBINES = ("mean", "sum", "last")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
FEATURES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# edge values taken besides floating point ones (as real numbers: bool True is 1)
INTEGER_VALUES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                  torch.uint32, torch.uint64)
RECBOLE_EPS = 1e-7
_INT32_MAX = 2**31 - 1


class Adjacency:
    """A square graph operator ``A_hat`` (n x n) in CSR, normalised on the fly by the kernels.

    Build it with :meth:`from_interactions`, :meth:`from_scipy` or :meth:`from_torch`.

    Attributes:
        crow_indices: (n + 1,) int64 row pointers.
        col_indices: (nnz,) int32 when n fits in int32 (int64 otherwise or when asked), sorted
            within each row, no duplicates.
        values: (nnz,) float32 edge values, or None for a binary graph (every value 1).
        degrees: (n,) float64 row sums of A (self-loops included).
        row_scale, col_scale: (n,) float32 or None (ones): ``A_hat[r, c] = row_scale[r] *
            values[e] * col_scale[c]``.
        n_users, n_items: the split of :meth:`from_interactions` (None otherwise).
        symmetric: whether A equals A^T, values included (then the cached transpose is the graph's
            own arrays; otherwise it is built once, at construction).

    Edge values are constants: no gradient flows to them.
    """

    def __init__(
        self,
        crow: torch.Tensor,
        col: torch.Tensor,
        values: torch.Tensor | None,
        transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
        *,
        norm: str,
        degree_zero: str,
        degrees: torch.Tensor,
        n_users: int | None = None,
    ) -> None:
        """Internal: the checked arrays. Use the ``from_*`` constructors. ``transpose`` None: the
        graph is symmetric (values included), its own transpose."""
        self.crow_indices = crow
        self.col_indices = col
        self.values = values
        self.degrees = degrees
        self.norm = norm
        self.degree_zero = degree_zero
        self.n_users = n_users
        self.n_items = None if n_users is None else crow.numel() - 1 - n_users
        self.row_scale, self.col_scale = _scales(degrees, norm, degree_zero)
        self.symmetric = transpose is None
        self._transpose_csr = (crow, col, values) if transpose is None else transpose

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_interactions(
        cls,
        users: torch.Tensor | Sequence[int],
        items: torch.Tensor | Sequence[int],
        n_users: int,
        n_items: int,
        *,
        weights: torch.Tensor | Sequence[float] | None = None,
        norm: str = "sym",
        degree_zero: str = "zero",
        duplicates: str = "collapse",
        self_loops: bool = False,
        index_dtype: torch.dtype | None = None,
    ) -> Adjacency:
        """The symmetric bipartite graph ``[[0, R], [R^T, 0]]`` of (n_users + n_items) nodes:
        user u is node u, item i is node n_users + i (LightGCN-PyTorch's layout).

        Args:
            users, items: (nnz,) integer ids, ``0 <= users < n_users``, ``0 <= items < n_items``.
            weights: (nnz,) edge values of R (default ones).
            duplicates: a repeated (user, item) pair becomes one edge (``"collapse"``: LightGCN's
                binary R; repeats must carry equal weights), one edge with the summed weight
                (``"sum"``), or raises (``"error"``).
            self_loops: use ``A + I`` (degrees included).
            index_dtype: torch.int64 forces int64 column indices.
        """
        n_users = _count("n_users", n_users)
        n_items = _count("n_items", n_items)
        users = _index_tensor("users", users)
        items = _index_tensor("items", items)
        if users.device != items.device:
            raise ValueError(f"items: expected a tensor on {users.device} (the device of users), got {items.device}")
        if users.numel() != items.numel():
            raise ValueError(
                f"users, items: expected the same length, got {users.numel()} users and {items.numel()} items"
            )
        _checks.ids_in_range("users", users, n_users)
        _checks.ids_in_range("items", items, n_items)
        weights = _edge_values("weights", weights, users.numel(), users.device)
        n = n_users + n_items
        rows = torch.cat([users, items + n_users])
        cols = torch.cat([items + n_users, users])
        values = None if weights is None else torch.cat([weights, weights])
        return cls._build(
            rows, cols, values, n, norm=norm, degree_zero=degree_zero, duplicates=duplicates,
            self_loops=self_loops, index_dtype=index_dtype, symmetric=True, n_users=n_users,
        )

    @classmethod
    def from_scipy(
        cls,
        matrix: object,
        *,
        norm: str = "sym",
        degree_zero: str = "zero",
        duplicates: str = "sum",
        self_loops: bool = False,
        index_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> Adjacency:
        """A square scipy.sparse matrix or array (any format), e.g. LightGCN-PyTorch's saved
        ``s_pre_adj_mat.npz`` with ``norm="none"`` (it is already normalised). Explicit entries
        are edges with their values (floating point, integer or bool); repeated entries are summed
        (``duplicates="sum"``, scipy's own rule), collapsed (equal values only) or rejected
        (``"error"``). A CSR, CSC or BSR matrix's ``indptr`` is checked (scipy checks it only when
        it builds the matrix): a broken one raises ValueError."""
        try:
            import scipy.sparse as sp
        except ImportError as exc:  # pragma: no cover - scipy is a test dependency
            raise ImportError("Adjacency.from_scipy needs scipy") from exc
        if not sp.issparse(matrix):
            raise TypeError(f"matrix: expected a scipy.sparse matrix, got {type(matrix).__name__}")
        _square(matrix.shape)
        if matrix.format in ("csr", "csc", "bsr"):
            _scipy_index_pointers(matrix)
        coo = matrix.tocoo()
        rows = torch.as_tensor(coo.row.astype("int64"), device=device)
        cols = torch.as_tensor(coo.col.astype("int64"), device=device)
        values = torch.as_tensor(coo.data, device=device)
        n = matrix.shape[0]
        return cls._from_values(rows, cols, values, n, norm, degree_zero, duplicates, self_loops, index_dtype)

    @classmethod
    def from_torch(
        cls,
        tensor: torch.Tensor,
        *,
        norm: str = "sym",
        degree_zero: str = "zero",
        duplicates: str = "sum",
        self_loops: bool = False,
        index_dtype: torch.dtype | None = None,
    ) -> Adjacency:
        """A square torch sparse tensor, COO (coalesced or not) or CSR, e.g. LightGCN-PyTorch's
        ``Graph`` with ``norm="none"`` (it is already normalised). Repeated COO entries are summed
        (``duplicates="sum"``, what ``coalesce()`` does), collapsed (equal values only) or
        rejected (``"error"``). A tensor that requires grad raises ValueError (edge values are
        constants)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor: expected a torch sparse tensor, got {type(tensor).__name__}")
        if tensor.layout not in (torch.sparse_coo, torch.sparse_csr):
            raise TypeError(f"tensor: expected a sparse COO or CSR tensor, got layout {tensor.layout}")
        _square(tuple(tensor.shape))
        _constant("tensor", tensor)  # its values() never require grad: the tensor itself does
        rows, cols, values = _torch_sparse_entries("tensor", tensor)
        n = tensor.shape[0]
        return cls._from_values(rows, cols, values, n, norm, degree_zero, duplicates, self_loops, index_dtype)

    @classmethod
    def _from_values(cls, rows, cols, values, n, norm, degree_zero, duplicates, self_loops, index_dtype) -> Adjacency:
        rows, cols = rows.long(), cols.long()
        _checks.ids_in_range("row indices", rows, n)
        _checks.ids_in_range("column indices", cols, n)
        values = _edge_values("values", values, rows.numel(), rows.device)
        return cls._build(
            rows, cols, values, n, norm=norm, degree_zero=degree_zero, duplicates=duplicates,
            self_loops=self_loops, index_dtype=index_dtype, symmetric=False,
        )

    @classmethod
    def _build(
        cls,
        rows: torch.Tensor,
        cols: torch.Tensor,
        values: torch.Tensor | None,
        n: int,
        *,
        norm: str,
        degree_zero: str,
        duplicates: str,
        self_loops: bool,
        index_dtype: torch.dtype | None,
        symmetric: bool,
        n_users: int | None = None,
    ) -> Adjacency:
        """CSR from checked (row, col, value) triples: duplicates resolved, self-loops added."""
        _choice("norm", norm, NORMS)
        _choice("degree_zero", degree_zero, DEGREE_ZERO)
        _choice("duplicates", duplicates, DUPLICATES)
        if not isinstance(self_loops, bool):
            raise TypeError(f"self_loops: expected a bool, got {type(self_loops).__name__}")
        index_dtype = _index_dtype(index_dtype, n)
        key, values = _coalesce(rows * n + cols, values, duplicates, n, n_users)
        if self_loops:  # A + I: an existing loop gains 1
            diag = torch.arange(n, device=key.device) * (n + 1)
            base = values if values is not None else torch.ones(key.numel(), dtype=torch.float64, device=key.device)
            ones = torch.ones(n, dtype=torch.float64, device=key.device)
            key, values = _coalesce(torch.cat([key, diag]), torch.cat([base, ones]), "sum", n)
        rows, cols = key // n, key % n
        crow = torch.zeros(n + 1, dtype=torch.long, device=key.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        degrees = torch.zeros(n, dtype=torch.float64, device=key.device)
        edge_values = values if values is not None else torch.ones_like(rows, dtype=torch.float64)
        degrees.index_add_(0, rows, edge_values.double())
        if norm != "none" and bool((degrees < 0).any()):
            raise ValueError(
                f"norm={norm!r}: a node has a negative degree (the sum of its edge values); use norm='none'"
            )
        values = None if values is None or bool((values == 1).all()) else values.float().contiguous()
        transpose = None
        if not symmetric:
            transpose = _transpose(rows, cols, values, n, index_dtype)
            if torch.equal(transpose[0], crow) and torch.equal(transpose[1], cols.to(index_dtype)) and (
                values is None or torch.equal(transpose[2], values)
            ):
                transpose = None
        return cls(
            crow, cols.to(index_dtype).contiguous(), values, transpose,
            norm=norm, degree_zero=degree_zero, degrees=degrees, n_users=n_users,
        )

    # --- properties -----------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.crow_indices.numel() - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_nodes, self.num_nodes)

    @property
    def nnz(self) -> int:
        return self.col_indices.numel()

    @property
    def device(self) -> torch.device:
        return self.crow_indices.device

    @property
    def index_dtype(self) -> torch.dtype:
        return self.col_indices.dtype

    def __repr__(self) -> str:
        split = "" if self.n_users is None else f", n_users={self.n_users}, n_items={self.n_items}"
        weighted = "binary" if self.values is None else "weighted"
        return (
            f"Adjacency(n={self.num_nodes}, nnz={self.nnz}{split}, norm={self.norm!r}, "
            f"degree_zero={self.degree_zero!r}, {weighted}, index_dtype={self.index_dtype}, device={self.device})"
        )

    def operands(self) -> tuple[torch.Tensor | None, ...]:
        """The arrays the ops take: ``(crow, col, values, row_scale, col_scale, t_crow, t_col,
        t_values)``; the last three are the transpose's CSR (for the backward)."""
        return (self.crow_indices, self.col_indices, self.values, self.row_scale, self.col_scale, *self._transpose_csr)

    def transpose(self) -> Adjacency:
        """``A_hat^T`` (its arrays are the cached transpose; the scalings swap sides; its
        ``degrees`` are None: they are the row sums of A, not of A^T)."""
        t = Adjacency.__new__(Adjacency)
        vars(t).update(vars(self))
        t.crow_indices, t.col_indices, t.values = self._transpose_csr
        t._transpose_csr = (self.crow_indices, self.col_indices, self.values)
        t.row_scale, t.col_scale = self.col_scale, self.row_scale
        t.degrees = None
        return t

    def to(self, device: torch.device | str) -> Adjacency:
        """A copy on ``device`` (every array moved, the transpose included)."""
        if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
            raise TypeError(f"device: expected a torch.device, a device string or index, got {type(device).__name__} "
                            "(an Adjacency's edge values are float32, its indices int64/int32: no dtype to change)")
        device = torch.device(device)
        moved = Adjacency.__new__(Adjacency)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif isinstance(value, tuple):
                value = tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in value)
            setattr(moved, name, value)
        return moved

    def to_sparse_coo(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The normalised graph as a coalesced COO tensor (LightGCN-PyTorch's ``Graph``)."""
        from diffcore.reference.sparse import normalized_coo

        return normalized_coo(*self.operands()[:5], self.num_nodes, dtype)


# --- ops ------------------------------------------------------------------------------------------
def spmm(adj: Adjacency, X: torch.Tensor) -> torch.Tensor:
    """One propagation ``A_hat X``.

    Args:
        adj: the graph (n nodes).
        X: (n, d) float32, bfloat16, float16 (float32 accumulation) or float64; rows may be strided.
    Returns:
        (n, d) in X's dtype. Differentiable in X (the backward is ``A_hat^T grad``).
    """
    X = _features("X", X, adj)
    impl = _registry.forced_for("sparse_spmm", X.device)
    if impl is None:
        return torch.ops.diffcore.sparse_spmm(*adj.operands(), X)
    return _library.run_forced("sparse_spmm", impl, (*adj.operands(), X),
                               lambda: (torch.empty(X.shape, dtype=X.dtype, device=X.device),))


def propagate(
    adj: Adjacency,
    E0: torch.Tensor,
    num_layers: int,
    combine: str | Sequence[float] | torch.Tensor = "mean",
) -> torch.Tensor:
    """LightGCN's propagation ``sum_k w_k A_hat^k E0`` for k = 0 .. num_layers, in one call that
    never stacks the layers.

    Args:
        adj: the graph (n nodes).
        E0: (n, d) layer-0 embeddings (LightGCN: ``cat([user_emb, item_emb])``); float32,
            bfloat16, float16 (float32 accumulation and float32 layers) or float64.
        num_layers: L >= 0.
        combine: ``"mean"`` (w_k = 1 / (L + 1), LightGCN), ``"sum"`` (w_k = 1), ``"last"``
            (E_L only) or L + 1 floats (constants: no gradient flows to them).
    Returns:
        (n, d) in E0's dtype. Differentiable in E0 (the backward propagates over ``A_hat^T``).
    """
    E0 = _features("E0", E0, adj)
    num_layers = _checks.integer("num_layers", num_layers, lambda v: v >= 0, "a non-negative int")
    weights = _layer_weights(combine, num_layers)
    impl = _registry.forced_for("sparse_propagate", E0.device)
    if impl is None:
        return torch.ops.diffcore.sparse_propagate(*adj.operands(), E0, num_layers, weights)
    return _library.run_forced("sparse_propagate", impl, (*adj.operands(), E0, num_layers, weights),
                               lambda: (torch.empty(E0.shape, dtype=E0.dtype, device=E0.device),))


def gcn_layer(
    adj: Adjacency,
    X: torch.Tensor,
    W: torch.Tensor,
    activation: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A graph convolution ``activation(A_hat X W)``, multiplied in the cheaper order
    (``A_hat (X W)`` when W does not widen the features, else ``(A_hat X) W``).

    Args:
        X: (n, d_in), dtype and device as for :func:`spmm`.
        W: (d_in, d_out), X's dtype and device.
        activation: None, a name in :data:`ACTIVATIONS` or a callable.
    Returns:
        (n, d_out). Differentiable in X and W.
    """
    X = _features("X", X, adj)
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
    _strided("W", W)
    if W.dim() != 2 or W.shape[0] != X.shape[1]:
        raise ValueError(f"W: expected shape ({X.shape[1]}, d_out) (d_in = X.shape[1]), got {tuple(W.shape)}")
    if W.device != X.device:
        raise ValueError(f"W: expected a tensor on {X.device} (the device of X), got {W.device}")
    if W.dtype != X.dtype:
        raise TypeError(f"W: expected dtype {X.dtype} (the dtype of X), got {W.dtype}")
    if activation is None:
        act = None
    elif callable(activation):
        act = activation
    elif activation in ACTIVATIONS:
        act = ACTIVATIONS[activation]
    else:
        raise ValueError(f"activation: expected None, a callable or one of {tuple(ACTIVATIONS)}, got {activation!r}")
    out = spmm(adj, X @ W) if W.shape[1] <= W.shape[0] else spmm(adj, X) @ W
    return out if act is None else act(out)


# --- helpers --------------------------------------------------------------------------------------
def _choice(name: str, value: object, options: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def _count(name: str, n: object) -> int:
    return _checks.integer(name, n, lambda v: v >= 0, "a non-negative int")


def _square(shape: tuple[int, ...]) -> None:
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"matrix: an adjacency must be square (n x n), got shape {tuple(shape)}; for a user-item "
            "matrix R use Adjacency.from_interactions(*R.nonzero(), n_users, n_items)"
        )


def _index_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
        if x.numel() == 0:
            x = x.long()
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer ids, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of ids, got shape {tuple(x.shape)}")
    return x.long()


def _torch_sparse_entries(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of a 2-D torch sparse COO (repeats kept) or CSR tensor ``name``, int64
    indices, every index checked before anything reads it: torch checks nothing for a tensor built
    with ``check_invariants=False``, and its ``coalesce()``, ``to_sparse_csc()`` or
    ``repeat_interleave`` then crash the process or fail with an internal error.

    COO: row and column indices within the shape. CSR: ``crow_indices`` of n_rows + 1 entries,
    starting at 0, non-decreasing, ending at the number of stored values (one per column index),
    and ``col_indices`` within the shape. Raises ValueError naming ``name`` and the array."""
    n_rows, n_cols = tensor.shape
    values = tensor._values() if tensor.layout == torch.sparse_coo else tensor.values()
    if values.dim() != 1:
        raise ValueError(
            f"{name}: expected scalar values (a 2-D sparse tensor), got values of shape {tuple(values.shape)}"
        )
    if tensor.layout == torch.sparse_coo:
        index = tensor._indices()
        rows, cols = index[0].long(), index[1].long()
        _checks.ids_in_range(f"{name}: row indices", rows, n_rows)
        _checks.ids_in_range(f"{name}: column indices", cols, n_cols)
        return rows, cols, values
    crow, cols = tensor.crow_indices().long(), tensor.col_indices().long()
    if values.numel() != cols.numel():
        raise ValueError(
            f"{name}: values: expected shape ({cols.numel()},) (one per column index), got {tuple(values.shape)}"
        )
    _checks.csr_row_pointers(f"{name}: crow_indices", crow, n_rows, cols.numel())
    _checks.ids_in_range(f"{name}: col_indices", cols, n_cols)
    return csr_rows(crow), cols, values


def _scipy_index_pointers(matrix: object) -> None:
    """A compressed scipy matrix's ``indptr`` (CSR, BSR: the rows', CSC: the columns'), checked as
    CSR row pointers: scipy checks its length and ends when the matrix is built, never its order,
    nor arrays assigned afterwards, and ``tocoo()`` reads it as it is (a decreasing indptr gave
    other edges without a word)."""
    if matrix.format == "csc":
        name, major = "matrix: indptr (a CSC matrix's: the row pointers of its transpose)", matrix.shape[1]
    else:
        name, major = "matrix: indptr", matrix.shape[0] // (matrix.blocksize[0] if matrix.format == "bsr" else 1)
    _checks.csr_row_pointers(name, torch.tensor(matrix.indptr, dtype=torch.int64), major, len(matrix.indices))


def _edge_values(name: str, values: object, nnz: int, device: torch.device) -> torch.Tensor | None:
    if values is None:
        return None
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values, dtype=torch.float64, device=device)
    if not (values.dtype.is_floating_point or values.dtype in INTEGER_VALUES):
        raise TypeError(f"{name}: expected real edge values (floating point, integer or bool), got {values.dtype}")
    _constant(name, values)
    if values.dim() != 1 or values.numel() != nnz:
        raise ValueError(f"{name}: expected shape ({nnz},) (one value per edge), got {tuple(values.shape)}")
    if values.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the indices), got {values.device}")
    if values.numel() and not bool(torch.isfinite(values.double()).all()):
        raise ValueError(f"{name}: every edge value must be finite")
    return values.double()


def _constant(name: str, values: torch.Tensor) -> None:
    """Edge values that require grad: a ValueError (no gradient would flow to them)."""
    if values.requires_grad:
        raise ValueError(
            f"{name}: edge values are constants of the graph (no gradient flows to them); pass {name}.detach()"
        )


def _index_dtype(index_dtype: torch.dtype | None, n: int) -> torch.dtype:
    if index_dtype is None:
        return torch.int32 if n <= _INT32_MAX else torch.int64
    if index_dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index_dtype: expected torch.int32, torch.int64 or None, got {index_dtype}")
    if index_dtype == torch.int32 and n > _INT32_MAX:
        raise ValueError(f"index_dtype: int32 cannot index {n} nodes")
    return index_dtype


def _coalesce(
    key: torch.Tensor, values: torch.Tensor | None, duplicates: str, n: int, n_users: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sorted unique keys (row * n + col) and their values under the duplicates rule. ``n_users``:
    the keys are :meth:`Adjacency.from_interactions`'s bipartite graph, and a repeat is reported
    as the (user, item) pair the caller gave, not as node ids."""
    unique, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    if unique.numel() == key.numel():
        if values is None:
            return unique, None
        out = torch.empty_like(values)
        out[inverse] = values
        return unique, out
    first = int(torch.nonzero(counts > 1)[0, 0])
    row, col = divmod(int(unique[first]), n)
    if n_users is None:
        edge = f"edge ({row}, {col})"
    else:  # user u is node u, item i node n_users + i; each pair is stored as (u, i) and (i, u)
        user, item = (row, col - n_users) if row < n_users else (col, row - n_users)
        edge = f"(user, item) pair ({user}, {item})"
    where = f"{edge} appears {int(counts[first])} times"
    if duplicates == "error":
        raise ValueError(f"duplicates='error': {where}")
    if values is None:
        if duplicates == "sum":
            return unique, counts.double()
        return unique, None
    if duplicates == "sum":
        summed = torch.zeros(unique.numel(), dtype=values.dtype, device=values.device)
        return unique, summed.index_add_(0, inverse, values)
    lo = torch.full((unique.numel(),), float("inf"), dtype=values.dtype, device=values.device)
    hi = torch.full((unique.numel(),), float("-inf"), dtype=values.dtype, device=values.device)
    lo.scatter_reduce_(0, inverse, values, "amin")
    hi.scatter_reduce_(0, inverse, values, "amax")
    if not torch.equal(lo, hi):
        raise ValueError(
            f"duplicates='collapse': repeated edges carry different values ({where}); "
            "choose duplicates='sum' or 'error'"
        )
    return unique, lo


def _transpose(rows, cols, values, n, index_dtype):
    """The CSR arrays of A^T from A's (row-sorted) triples."""
    order = torch.sort(cols, stable=True).indices
    t_crow = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    t_crow[1:] = torch.cumsum(torch.bincount(cols, minlength=n), 0)
    t_values = None if values is None else values[order].contiguous()
    return t_crow, rows[order].to(index_dtype).contiguous(), t_values


def _scales(degrees: torch.Tensor, norm: str, degree_zero: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if norm == "none":
        return None, None
    power = -0.5 if norm == "sym" else -1.0
    if degree_zero == "eps":  # RecBole: (deg + 1e-7)^p
        scale = torch.pow(degrees + RECBOLE_EPS, power)
    else:  # LightGCN-PyTorch: deg^p with inf (degree 0) set to 0
        scale = torch.pow(degrees, power)
        scale[torch.isinf(scale)] = 0.0
    scale = scale.float()
    return (scale, scale) if norm == "sym" else (scale, None)


def _features(name: str, X: object, adj: object) -> torch.Tensor:
    if not isinstance(adj, Adjacency):
        raise TypeError(f"adj: expected a diffcore.sparse.Adjacency, got {type(adj).__name__}")
    _strided(name, X)
    X = _checks.float_tensor(name, X, ndim=2, dtypes=FEATURES)
    if X.device != adj.device:
        raise ValueError(
            f"{name}: expected a tensor on {adj.device} (the device of adj), got {X.device}; use adj.to(device)"
        )
    if X.shape[0] != adj.num_nodes:
        raise ValueError(f"{name}: expected {adj.num_nodes} rows (one per node of adj), got shape {tuple(X.shape)}")
    return X


def _strided(name: str, x: object) -> None:
    """A tensor of another layout than strided (sparse COO, CSR, ...): a TypeError naming it, where
    the ops' dispatcher would find no kernel for it."""
    if isinstance(x, torch.Tensor) and x.layout != torch.strided:
        raise TypeError(
            f"{name}: expected a dense (strided) tensor, got layout {x.layout}; convert with {name}.to_dense()"
        )


def _layer_weights(combine: object, num_layers: int) -> list[float]:
    if isinstance(combine, str):
        _choice("combine", combine, COMBINES)
        if combine == "mean":
            return [1.0 / (num_layers + 1)] * (num_layers + 1)
        if combine == "sum":
            return [1.0] * (num_layers + 1)
        return [0.0] * num_layers + [1.0]
    if isinstance(combine, torch.Tensor):
        if combine.requires_grad:
            raise ValueError("combine: layer weights are constants (no gradient flows to them); pass weights.detach()")
        combine = combine.tolist()
    numbers = isinstance(combine, Sequence) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in combine
    )
    if not numbers:
        raise ValueError(f"combine: expected one of {COMBINES} or a sequence of num_layers + 1 floats, got {combine!r}")
    if len(combine) != num_layers + 1:
        raise ValueError(f"combine: expected {num_layers + 1} layer weights (num_layers + 1), got {len(combine)}")
    return [_checks.real(f"combine[{i}]", w) for i, w in enumerate(combine)]

