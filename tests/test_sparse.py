"""Sparse family: every implementation against the LightGCN-PyTorch reference (graphs with empty
rows, a hub, self-loops, weights, a directed graph, int32 and int64 indices, strided features,
every combine mode and dtype), gradients, opcheck, compile, a dense property test, the
constructors' options, LightGCNPropagation and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import diffcore
from diffcore import sparse
from diffcore.nn import LightGCNPropagation
from diffcore.reference import sparse as ref
from diffcore.sparse import Adjacency
from tests.utils import assert_close_to_reference, impl_params, strided_rows

OPS = ("sparse_spmm", "sparse_propagate")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
COMBINES = ["mean", "sum", "last", [0.5, 0.0, 0.25, 2.0]]


def interactions(n_users, n_items, nnz, seed, hub=False):
    """Random (user, item) pairs using only some ids (so some nodes are isolated), with repeats;
    ``hub``: user 0 interacts with every item."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, max(1, n_users - 2), (nnz,), generator=g)
    items = torch.randint(0, max(1, n_items - 3), (nnz,), generator=g)
    if hub:
        users = torch.cat([users, torch.zeros(n_items, dtype=torch.long)])
        items = torch.cat([items, torch.arange(n_items)])
    return users, items


def directed(n, nnz, seed, index_dtype=None):
    """A non-symmetric weighted graph with empty rows, given as an uncoalesced COO tensor."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n - 2, (nnz,), generator=g)
    cols = torch.randint(0, n, (nnz,), generator=g)
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.rand(nnz, generator=g) + 0.5, (n, n),
                                  check_invariants=True)
    return Adjacency.from_torch(coo, norm="sym", index_dtype=index_dtype)


def make_graph(kind, index_dtype=None):
    it = dict(index_dtype=index_dtype)
    if kind == "bipartite":
        return Adjacency.from_interactions(*interactions(6, 9, 30, 0), 6, 9, **it)
    if kind == "hub":
        return Adjacency.from_interactions(*interactions(5, 13, 12, 1, hub=True), 5, 13, **it)
    if kind == "self_loops_row":
        return Adjacency.from_interactions(*interactions(6, 8, 25, 2), 6, 8, norm="row", self_loops=True, **it)
    if kind == "weighted_eps":
        users, items = interactions(7, 6, 20, 3)
        weights = torch.rand(users.numel(), generator=torch.Generator().manual_seed(3)) + 0.5
        return Adjacency.from_interactions(
            users, items, 7, 6, weights=weights, duplicates="sum", degree_zero="eps", **it
        )
    if kind == "directed":
        return directed(14, 40, 4, index_dtype)
    if kind == "empty":
        return Adjacency.from_interactions([], [], 4, 3, **it)
    raise ValueError(kind)


GRAPHS = ["bipartite", "hub", "self_loops_row", "weighted_eps", "directed", "empty"]
INDEX = [torch.int32, torch.int64]


def features(adj, d, dtype, seed=0, layout="contiguous"):
    x = torch.randn(adj.num_nodes, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return strided_rows(x, layout)


def reference_spmm(adj, x):
    return ref.spmm(adj.to_sparse_coo(x.dtype), x)


def reference_propagate(adj, x, num_layers, combine):
    weights = sparse._layer_weights(combine, num_layers)
    graph = adj.to_sparse_coo(x.dtype)
    return ref.propagate(graph, x, num_layers, None if combine == "mean" else weights)


def check(out, adj, x, fn):
    """Against the reference: float64 tight; float32 to 1e-5; low precision by the 2x rule."""
    if x.dtype == torch.float64:
        torch.testing.assert_close(out, fn(adj, x), rtol=1e-12, atol=1e-12)
        return
    expected = fn(adj, x.float())
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert_close_to_reference(out, expected, fn(adj, x))


# --- parity: every implementation x graph x index dtype x dtype x layout ----------------------
@pytest.mark.parametrize("name", impl_params("sparse_spmm"))
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("index_dtype", INDEX, ids=str)
def test_spmm_matches_reference(name, graph, index_dtype):
    adj = make_graph(graph, index_dtype)
    assert adj.index_dtype == index_dtype
    layouts = ["column_major"] if name == "triton" else ["contiguous", "row_stride", "column_major"]
    dtypes = DTYPES[:2] if name == "triton" else DTYPES
    widths = (5,) if name == "triton" else (37,)
    cases = [(dtype, layout, d) for dtype in dtypes for layout in layouts for d in widths]
    if name != "triton":
        cases += [(torch.float32, "contiguous", 1), (torch.float32, "contiguous", 64)]
    for dtype, layout, d in cases:
        x = features(adj, d, dtype, layout=layout)
        with diffcore.use(name):
            out = sparse.spmm(adj, x)
        check(out, adj, x, reference_spmm)


@pytest.mark.parametrize("name", impl_params("sparse_propagate"))
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("combine", COMBINES, ids=str)
def test_propagate_matches_reference(name, graph, combine):
    adj = make_graph(graph)
    dtypes = DTYPES[:2] if name == "triton" else DTYPES
    for dtype in dtypes:
        for layers in (3,) if name == "triton" else (0, 1, 3):
            x = features(adj, 3 if name == "triton" else 19, dtype, layout="row_stride")
            weights = combine if isinstance(combine, str) else combine[: layers] + [1.5]
            with diffcore.use(name):
                out = sparse.propagate(adj, x, layers, weights)
            check(out, adj, x, lambda a, v: reference_propagate(a, v, layers, weights))


def test_int32_and_int64_indices_agree():
    a32, a64 = make_graph("directed"), make_graph("directed", torch.int64)
    assert a32.col_indices.dtype == torch.int32 and a64.col_indices.dtype == torch.int64
    assert a32.crow_indices.dtype == a64.crow_indices.dtype == torch.int64
    x = features(a32, 40, torch.float32)
    assert torch.equal(sparse.propagate(a32, x, 3), sparse.propagate(a64, x, 3))


def test_large_feature_blocks_and_threads():
    """Feature widths around the vector blocks (8, 4, 2, 1 vectors and a tail) and enough work to
    split rows among threads by nonzeros, a hub included."""
    adj = Adjacency.from_interactions(*interactions(300, 500, 6000, 5, hub=True), 300, 500)
    for d in (16, 63, 64, 65, 129, 200):
        x = features(adj, d, torch.float32)
        expected = reference_propagate(adj, x, 2, "mean")
        torch.testing.assert_close(sparse.propagate(adj, x, 2), expected, rtol=1e-5, atol=1e-6)
    threads = torch.get_num_threads()
    try:  # each row is summed by one thread in a fixed order: the thread count changes nothing
        torch.set_num_threads(1)
        one = sparse.propagate(adj, x, 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, sparse.propagate(adj, x, 3))


def test_kept_layer_buffers_between_and_across_calls():
    """propagate's layer buffers come back to the next call of the same shape from the block pool
    (gather_scratch in csrc/include/diffcore/memory.h): calls on graphs of other sizes in between,
    and calls running at once on several Python threads, each get buffers of their own and the same
    results."""
    import threading

    graphs = [Adjacency.from_interactions(*interactions(n_u, n_i, nnz, seed, hub=True), n_u, n_i)
              for n_u, n_i, nnz, seed in ((300, 500, 6000, 1), (120, 90, 900, 2))]
    inputs = [(adj, features(adj, 64, torch.float32, seed=k)) for k, adj in enumerate(graphs)]
    first = [sparse.propagate(adj, x, 4) for adj, x in inputs]
    for adj, x in inputs[::-1] + inputs:
        assert torch.equal(sparse.propagate(adj, x, 4), first[graphs.index(adj)])
    results, errors = {}, []

    def worker(k):
        try:
            adj, x = inputs[k % 2]
            results[k] = [sparse.propagate(adj, x, 4) for _ in range(5)]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, outs in results.items():
        assert all(torch.equal(out, first[k % 2]) for out in outs)


# --- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", ["directed", "self_loops_row", "weighted_eps"])
def test_gradcheck(graph):
    adj = make_graph(graph)
    x = features(adj, 4, torch.float64).requires_grad_()
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: sparse.spmm(adj, v), (x,))
    assert torch.autograd.gradcheck(lambda v: sparse.propagate(adj, v, 3, [0.3, 0.0, 1.0, 0.5]), (x,))
    assert torch.autograd.gradcheck(lambda v, m: sparse.gcn_layer(adj, v, m, "tanh"), (x, w))
    assert torch.autograd.gradgradcheck(lambda v: sparse.propagate(adj, v, 2, "sum"), (x,))


@pytest.mark.parametrize("name", impl_params("sparse_spmm"))
def test_every_implementation_keeps_autograd(name):
    """diffcore.use(name) runs that implementation with the op's autograd formula: the gradients
    of the dispatcher's (gradchecked above)."""
    adj = make_graph("directed")
    x = features(adj, 4, torch.float64).requires_grad_()
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    calls = (lambda: sparse.spmm(adj, x), lambda: sparse.propagate(adj, x, 3, [0.3, 0.0, 1.0, 0.5]),
             lambda: sparse.gcn_layer(adj, x, w, "tanh"))
    for call in calls:
        want = torch.autograd.grad((call() * torch.arange(1.0, 5.0)[: call().shape[1]]).sum(), (x, w),
                                   allow_unused=True)
        with diffcore.use(name):
            out = call()
            got = torch.autograd.grad((out * torch.arange(1.0, 5.0)[: out.shape[1]]).sum(), (x, w), allow_unused=True)
        for g, v in zip(got, want):
            assert (g is None) == (v is None)
            if g is not None:
                torch.testing.assert_close(g, v)


def test_backward_matches_reference_autograd():
    """The backward runs over the cached transpose: equal to autograd through the COO stack."""
    adj = make_graph("directed")
    x = features(adj, 8, torch.float32).requires_grad_()
    grad = torch.randn(adj.num_nodes, 8)
    (mine,) = torch.autograd.grad(sparse.propagate(adj, x, 3), x, grad)
    (theirs,) = torch.autograd.grad(reference_propagate(adj, x, 3, "mean"), x, grad)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    x16 = x.detach().bfloat16().requires_grad_()
    sparse.propagate(adj, x16, 2).sum().backward()  # expanded (stride 0) gradient
    assert x16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    adj = make_graph("directed")
    x = features(adj, 6, torch.float32).requires_grad_()
    args = (*adj.operands(), x) + ((2, [0.5, 0.25, 0.25]) if op == "sparse_propagate" else ())
    torch.library.opcheck(getattr(torch.ops.diffcore, op).default, args)


def test_compile_fullgraph():
    """One inductor compile for the family: a LightGCN forward and backward."""
    adj = make_graph("hub")
    x = features(adj, 8, torch.float32).requires_grad_()
    w = torch.randn(8, 8, requires_grad=True)

    def model(v, m):
        return (sparse.propagate(adj, v, 3) * sparse.gcn_layer(adj, v, m, "relu")).sum()

    compiled = torch.compile(model, fullgraph=True)
    got = torch.autograd.grad(compiled(x, w), (x, w))
    want = torch.autograd.grad(model(x, w), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --- property: from_interactions + propagate equals the dense computation ------------------------
def dense_lightgcn(users, items, n_users, n_items, e0, layers, norm="sym", eps=False, self_loops=False):
    """LightGCN-PyTorch's getSparseGraph in dense numpy float64: binary R, A = [[0, R], [R^T, 0]],
    rowsum, d^-1/2 with inf -> 0 (or RecBole's (d + 1e-7)^-1/2), then the mean of the layers."""
    n = n_users + n_items
    R = np.zeros((n_users, n_items))
    R[users, items] = 1.0
    A = np.zeros((n, n))
    A[:n_users, n_users:] = R
    A[n_users:, :n_users] = R.T
    if self_loops:
        A = A + np.eye(n)
    deg = A.sum(axis=1)
    with np.errstate(divide="ignore"):
        if norm == "sym":
            d = np.power(deg + 1e-7, -0.5) if eps else np.power(deg, -0.5)
            d[np.isinf(d)] = 0.0
            A = d[:, None] * A * d[None, :]
        elif norm == "row":
            d = np.power(deg + 1e-7, -1.0) if eps else np.power(deg, -1.0)
            d[np.isinf(d)] = 0.0
            A = d[:, None] * A
    embs = [e0]
    for _ in range(layers):
        embs.append(A @ embs[-1])
    return np.stack(embs, 1).mean(1)


@pytest.mark.parametrize("seed", range(12))
def test_propagate_equals_dense_lightgcn(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    nnz = int(rng.integers(0, 3 * (n_users + n_items)))
    users, items = rng.integers(0, n_users, nnz), rng.integers(0, n_items, nnz)
    layers = int(rng.integers(0, 5))
    norm = ["sym", "row", "none"][seed % 3]
    eps, self_loops = bool(seed % 4 == 1), bool(seed % 5 == 2)
    e0 = rng.standard_normal((n_users + n_items, 6))
    adj = Adjacency.from_interactions(
        torch.from_numpy(users), torch.from_numpy(items), n_users, n_items,
        norm=norm, degree_zero="eps" if eps else "zero", self_loops=self_loops,
    )
    expected = dense_lightgcn(users, items, n_users, n_items, e0, layers, norm, eps, self_loops)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        got = sparse.propagate(adj, torch.from_numpy(e0).to(dtype), layers)
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=tol, atol=tol)


# --- constructors ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_lightgcn_graph_passes_through_from_scipy_and_torch():
    """LightGCN-PyTorch's saved normalised graph, given with norm='none', is used as is."""
    users, items = interactions(5, 7, 20, 6)
    adj = Adjacency.from_interactions(users, items, 5, 7)
    graph = adj.to_sparse_coo()
    dense = graph.to_dense()
    x = features(adj, 4, torch.float32)
    for other in (
        Adjacency.from_torch(graph, norm="none"),
        Adjacency.from_torch(graph.to_sparse_csr(), norm="none"),
        Adjacency.from_scipy(sp.csr_matrix(dense.numpy()), norm="none"),
    ):
        assert other.symmetric and other.norm == "none"
        torch.testing.assert_close(sparse.spmm(other, x), dense @ x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sparse.propagate(other, x, 3), sparse.propagate(adj, x, 3), rtol=1e-5, atol=1e-6)


def test_duplicates():
    users, items = torch.tensor([0, 0, 1, 0]), torch.tensor([1, 1, 0, 1])
    collapsed = Adjacency.from_interactions(users, items, 2, 2)
    summed = Adjacency.from_interactions(users, items, 2, 2, duplicates="sum", norm="none")
    assert collapsed.nnz == summed.nnz == 4 and collapsed.values is None
    assert summed.to_sparse_coo().to_dense()[0, 3].item() == 3.0
    with pytest.raises(ValueError, match=r"duplicates='error': \(user, item\) pair \(0, 1\) appears 3 times"):
        Adjacency.from_interactions(users, items, 2, 2, duplicates="error")
    with pytest.raises(ValueError, match="different values"):
        Adjacency.from_interactions(users, items, 2, 2, weights=[1.0, 2.0, 1.0, 1.0])
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 0, 1], [1, 1, 0]]), torch.tensor([1.0, 2.0, 4.0]), (2, 2),
                                  check_invariants=True)
    assert Adjacency.from_torch(coo, norm="none").to_sparse_coo().to_dense()[0, 1].item() == 3.0
    with pytest.raises(ValueError, match="appears 2 times"):
        Adjacency.from_torch(coo, duplicates="error")


def test_duplicate_errors_name_the_user_and_item():
    """A repeated (user, item) pair is reported with the ids the caller gave, not as the graph's node
    ids (user 0, item 0 is the edge between nodes 0 and n_users: it was reported as 'edge (0, 2)')."""
    with pytest.raises(ValueError, match=r"duplicates='error': \(user, item\) pair \(0, 0\) appears 2 times"):
        Adjacency.from_interactions([0, 0], [0, 0], 2, 3, duplicates="error")
    with pytest.raises(ValueError, match=r"\(user, item\) pair \(2, 1\) appears 2 times"):
        Adjacency.from_interactions([2, 1, 2], [1, 0, 1], 3, 2, weights=[1.0, 1.0, 2.0])
    coo = torch.sparse_coo_tensor(torch.tensor([[1, 1], [0, 0]]), torch.ones(2), (2, 2), check_invariants=True)
    with pytest.raises(ValueError, match=r"duplicates='error': edge \(1, 0\) appears 2 times"):
        Adjacency.from_torch(coo, duplicates="error")  # a graph without users and items keeps node ids


def test_degrees_scales_self_loops_and_transpose():
    adj = Adjacency.from_interactions([0, 0, 1], [0, 1, 1], 3, 2, self_loops=True)
    dense = adj.to_sparse_coo(torch.float64).to_dense()
    A = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]],
                     dtype=torch.float64) + torch.eye(5)
    d = A.sum(1).pow(-0.5)
    torch.testing.assert_close(adj.degrees, A.sum(1))
    torch.testing.assert_close(dense, d[:, None] * A * d[None, :], rtol=1e-6, atol=1e-7)
    eps = Adjacency.from_interactions([0], [0], 2, 1, degree_zero="eps")
    assert eps.row_scale[1].item() == pytest.approx(1e-7 ** -0.5, rel=1e-6)
    assert Adjacency.from_interactions([0], [0], 2, 1).row_scale[1].item() == 0.0
    g = make_graph("directed")
    assert not g.symmetric
    t = g.transpose()
    torch.testing.assert_close(t.to_sparse_coo().to_dense(), g.to_sparse_coo().to_dense().t())
    moved = g.to("cpu")
    assert moved.device == torch.device("cpu") and torch.equal(moved.col_indices, g.col_indices)
    assert "n=14" in repr(g)


# --- gcn_layer and the nn module -------------------------------------------------------------------
def test_gcn_layer():
    adj = make_graph("bipartite")
    x = features(adj, 6, torch.float32)
    for d_out in (3, 9):
        w = torch.randn(6, d_out)
        dense = adj.to_sparse_coo().to_dense()
        for act, fn in (("relu", torch.relu), (torch.sin, torch.sin)):
            torch.testing.assert_close(sparse.gcn_layer(adj, x, w, act), fn(dense @ x @ w), rtol=1e-5, atol=1e-5)


def test_lightgcn_propagation_module():
    users, items = interactions(6, 9, 30, 7)
    adj = Adjacency.from_interactions(users, items, 6, 9)
    user_emb, item_emb = torch.nn.Embedding(6, 8), torch.nn.Embedding(9, 8)
    module = LightGCNPropagation(adj, num_layers=3).to("cpu")
    u, i = module(user_emb.weight, item_emb.weight)
    graph = adj.to_sparse_coo()
    light_out = ref.propagate(graph, torch.cat([user_emb.weight, item_emb.weight]), 3)
    ru, ri = torch.split(light_out, [6, 9])
    torch.testing.assert_close(u, ru)
    torch.testing.assert_close(i, ri)
    (u.sum() + i.sum()).backward()
    assert user_emb.weight.grad is not None and item_emb.weight.grad is not None
    torch.testing.assert_close(module(torch.cat([user_emb.weight, item_emb.weight])), light_out)
    assert "num_layers=3" in repr(module)
    with pytest.raises(ValueError, match="expected 6 and 9 rows"):
        module(item_emb.weight, user_emb.weight)


# --- bad input ---------------------------------------------------------------------------------------
def test_bad_construction():
    for bad in (torch.float64, 3.0, True):
        with pytest.raises(TypeError, match="device: expected a torch.device"):
            Adjacency.from_interactions([0], [0], 1, 1).to(bad)
    with pytest.raises(ValueError, match="users: ids must be < 3, got 3"):
        Adjacency.from_interactions([0, 3], [0, 1], 3, 2)
    with pytest.raises(ValueError, match="items: ids must be non-negative, got -1"):
        Adjacency.from_interactions([0, 1], [0, -1], 3, 2)
    with pytest.raises(ValueError, match="same length, got 2 users and 1 items"):
        Adjacency.from_interactions([0, 1], [0], 3, 2)
    with pytest.raises(TypeError, match="users: expected integer ids"):
        Adjacency.from_interactions(torch.tensor([0.0]), [0], 3, 2)
    with pytest.raises(ValueError, match="n_items: expected a non-negative int"):
        Adjacency.from_interactions([0], [0], 3, -2)
    with pytest.raises(ValueError, match="must be square"):
        Adjacency.from_scipy(sp.random(4, 5, density=0.5, format="csr"))
    with pytest.raises(ValueError, match="must be square"):
        Adjacency.from_torch(torch.eye(3, 4).to_sparse())
    with pytest.raises(TypeError, match="sparse COO or CSR"):
        Adjacency.from_torch(torch.eye(3))
    with pytest.raises(TypeError, match="scipy.sparse matrix"):
        Adjacency.from_scipy(np.eye(3))
    with pytest.raises(ValueError, match="norm: expected one of"):
        Adjacency.from_interactions([0], [0], 1, 1, norm="left")
    with pytest.raises(ValueError, match="degree_zero: expected one of"):
        Adjacency.from_interactions([0], [0], 1, 1, degree_zero="inf")
    with pytest.raises(ValueError, match="weights: expected shape \\(1,\\)"):
        Adjacency.from_interactions([0], [0], 1, 1, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="edge values are constants"):
        Adjacency.from_interactions([0], [0], 1, 1, weights=torch.ones(1, requires_grad=True))
    with pytest.raises(TypeError, match=r"values: expected real edge values \(floating point, integer or bool\), got "
                       "torch.complex64"):
        Adjacency.from_torch(torch.eye(3, dtype=torch.complex64).to_sparse())
    with pytest.raises(ValueError, match="negative degree"):
        Adjacency.from_interactions([0], [0], 1, 1, weights=[-1.0])
    with pytest.raises(ValueError, match="int32 cannot index"):
        sparse._index_dtype(torch.int32, 2**31)
    big = Adjacency.from_interactions(torch.tensor([0]), torch.tensor([0]), 1, 1, index_dtype=torch.int64)
    assert big.index_dtype == torch.int64


def unchecked_csr(crow: list[int], col: list[int], n: int = 3) -> torch.Tensor:
    """An (n, n) torch CSR tensor that torch did not check (broken row pointers, column indices
    outside the shape)."""
    values = torch.ones(len(col))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(col), values, (n, n), check_invariants=False)


def test_from_torch_bad_indices():
    """Indices outside the shape or broken CSR row pointers: a ValueError naming the array, raised
    before anything reads them (a decreasing crow gave 'RuntimeError: repeats can not be negative';
    a crow ending past the number of stored values blamed the values: 'values: expected shape (5,)')."""
    coo = torch.sparse_coo_tensor(torch.tensor([[0, -1], [1, 0]]), torch.ones(2), (3, 3), check_invariants=False)
    with pytest.raises(ValueError, match="tensor: row indices: ids must be non-negative, got -1"):
        Adjacency.from_torch(coo)
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 3]]), torch.ones(2), (3, 3), check_invariants=False)
    with pytest.raises(ValueError, match="tensor: column indices: ids must be < 3, got 3"):
        Adjacency.from_torch(coo)
    with pytest.raises(ValueError, match=r"tensor: crow_indices: expected non-decreasing row pointers, got entry 1 = 2 "
                       r"> entry 2 = 1"):
        Adjacency.from_torch(unchecked_csr([0, 2, 1, 2], [0, 1]))
    with pytest.raises(ValueError, match=r"tensor: crow_indices: expected a last entry equal to the number of stored "
                       r"values \(2\), got 5"):
        Adjacency.from_torch(unchecked_csr([0, 1, 2, 5], [0, 1]))
    with pytest.raises(ValueError, match="tensor: crow_indices: expected a first entry of 0, got 1"):
        Adjacency.from_torch(unchecked_csr([1, 1, 2, 2], [0, 1]))
    with pytest.raises(ValueError, match=r"tensor: crow_indices: expected shape \(4,\) \(rows \+ 1\), got \(3,\)"):
        Adjacency.from_torch(unchecked_csr([0, 1, 2], [0, 1]))
    with pytest.raises(ValueError, match="tensor: col_indices: ids must be < 3, got 9"):
        Adjacency.from_torch(unchecked_csr([0, 1, 1, 2], [0, 9]))
    with pytest.raises(ValueError, match="tensor: col_indices: ids must be non-negative, got -1"):
        Adjacency.from_torch(unchecked_csr([0, 1, 1, 2], [0, -1]))
    good = Adjacency.from_torch(unchecked_csr([0, 1, 1, 2], [2, 0]), norm="none")  # a valid unchecked tensor
    assert torch.equal(good.to_sparse_coo().to_dense(), torch.tensor([[0.0, 0, 1], [0, 0, 0], [1, 0, 0]]))


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.uint64], ids=lambda d: np.dtype(d).name)
def test_integer_edge_values(dtype):
    """Edge values of every integer dtype (and bool) are real values, through every constructor
    (int8, uint8 and int16 raised 'expected real edge values' while int32 and int64 were taken)."""
    dense = np.array([[0, 2, 0], [2, 0, 2], [0, 2, 2]]).astype(dtype)  # bool: True, taken as 1
    expected = torch.tensor(dense.astype(np.float32))
    rows, cols = np.nonzero(dense)
    values = torch.from_numpy(dense[rows, cols])
    coo = torch.sparse_coo_tensor(torch.tensor(np.stack([rows, cols])), values, (3, 3), check_invariants=True)
    for adj in (Adjacency.from_scipy(sp.csr_matrix(dense), norm="none"), Adjacency.from_torch(coo, norm="none")):
        torch.testing.assert_close(adj.to_sparse_coo().to_dense(), expected, rtol=0, atol=0)
    bipartite = Adjacency.from_interactions(rows, cols, 3, 3, weights=values, norm="none")
    torch.testing.assert_close(bipartite.to_sparse_coo().to_dense()[:3, 3:], expected, rtol=0, atol=0)


def test_from_scipy_bad_index_pointers():
    """A CSR, CSC or BSR matrix whose indptr was replaced after scipy built it (scipy checks it only
    then, and never its order): a ValueError naming it, as from_torch raises for the same arrays (a
    decreasing indptr built another graph without a word)."""
    def broken(fmt: str, indptr: list[int]):
        matrix = sp.csr_matrix(np.eye(4)).asformat(fmt) if fmt != "bsr" else sp.bsr_matrix(np.eye(4), blocksize=(2, 2))
        matrix.indptr = np.array(indptr, dtype=matrix.indptr.dtype)
        return matrix

    with pytest.raises(ValueError, match=r"^matrix: indptr: expected non-decreasing row pointers, got entry 1 = 2 > "
                       r"entry 2 = 1$"):
        Adjacency.from_scipy(broken("csr", [0, 2, 1, 3, 4]))
    with pytest.raises(ValueError, match=r"^matrix: indptr \(a CSC matrix's: the row pointers of its transpose\): "
                       r"expected non-decreasing row pointers, got entry 2 = 3 > entry 3 = 2"):
        Adjacency.from_scipy(broken("csc", [0, 1, 3, 2, 4]))
    with pytest.raises(ValueError, match=r"^matrix: indptr: expected non-decreasing row pointers, got entry 1 = 2 > "
                       r"entry 2 = 1$"):
        Adjacency.from_scipy(broken("bsr", [0, 2, 1]))
    with pytest.raises(ValueError, match=r"^matrix: indptr: expected a last entry equal to the number of stored values "
                       r"\(4\), got 3$"):
        Adjacency.from_scipy(broken("csr", [0, 1, 2, 3, 3]))


def test_from_torch_values_that_require_grad_raise():
    """A sparse tensor built from values that require grad raises as from_interactions' weights do
    (its values() never require grad: from_torch took them and dropped the gradient without a word)."""
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 1]]), v, (2, 2), check_invariants=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = coo.to_sparse_csr()
    for tensor in (coo, csr):
        with pytest.raises(ValueError, match=r"tensor: edge values are constants .*; pass tensor.detach\(\)"):
            Adjacency.from_torch(tensor)
    assert torch.equal(Adjacency.from_torch(coo.detach(), norm="none").values, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"weights: edge values are constants .*; pass weights.detach\(\)"):
        Adjacency.from_interactions([0, 1], [0, 1], 2, 2, weights=v)


def test_sparse_features_raise():
    """Sparse X, E0 or W: a TypeError naming the argument and the layout (an internal
    NotImplementedError from the dispatcher before: no kernel for the SparseCPU backend)."""
    adj = make_graph("bipartite")
    x = features(adj, 4, torch.float32)
    W = torch.randn(4, 2)
    for layout, convert in ((torch.sparse_coo, torch.Tensor.to_sparse), (torch.sparse_csr, torch.Tensor.to_sparse_csr)):
        message = f"expected a dense \\(strided\\) tensor, got layout {layout}"
        with pytest.raises(TypeError, match=f"X: {message}"):
            sparse.spmm(adj, convert(x))
        with pytest.raises(TypeError, match=f"E0: {message}"):
            sparse.propagate(adj, convert(x), 2)
        with pytest.raises(TypeError, match=f"X: {message}"):
            sparse.gcn_layer(adj, convert(x), W)
        with pytest.raises(TypeError, match=f"W: {message}"):
            sparse.gcn_layer(adj, x, convert(W))


def test_bad_calls():
    adj = make_graph("bipartite")
    x = features(adj, 4, torch.float32)
    with pytest.raises(ValueError, match=f"X: expected {adj.num_nodes} rows"):
        sparse.spmm(adj, x[:-1])
    with pytest.raises(ValueError, match="E0: expected a 2-D tensor"):
        sparse.propagate(adj, x[:, 0], 2)
    with pytest.raises(TypeError, match="E0: expected float32, float64, float16 or bfloat16, got torch.int64"):
        sparse.propagate(adj, x.long(), 2)
    with pytest.raises(ValueError, match="expected a tensor on cpu"):
        sparse.spmm(adj, x.to("meta"))
    with pytest.raises(TypeError, match="adj: expected a diffcore.sparse.Adjacency"):
        sparse.spmm(adj.to_sparse_coo(), x)
    with pytest.raises(ValueError, match="num_layers: expected a non-negative int"):
        sparse.propagate(adj, x, -1)
    assert torch.equal(sparse.propagate(adj, x, np.int64(2)), sparse.propagate(adj, x, 2))  # numpy ints are ints
    with pytest.raises(ValueError, match="combine: expected 3 layer weights"):
        sparse.propagate(adj, x, 2, [1.0, 2.0])
    with pytest.raises(ValueError, match="combine: expected one of"):
        sparse.propagate(adj, x, 2, "max")
    for w in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="combine\\[1\\]: expected a finite number"):
            sparse.propagate(adj, x, 2, [1.0, w, 1.0])
    with pytest.raises(ValueError, match="W: expected shape \\(4, d_out\\)"):
        sparse.gcn_layer(adj, x, torch.randn(5, 2))
    with pytest.raises(TypeError, match="W: expected dtype torch.float32"):
        sparse.gcn_layer(adj, x, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation: expected None"):
        sparse.gcn_layer(adj, x, torch.randn(4, 2), "swish")


@pytest.mark.parametrize("name", impl_params("sparse_spmm"))
def test_kernels_reject_bad_arrays(name):
    """Direct calls with broken CSR arrays raise a clear error, never crash."""
    if name == "reference":
        pytest.skip("the reference trusts its input (torch.sparse checks it)")
    adj = make_graph("bipartite")
    x = features(adj, 4, torch.float32)
    crow, col, *rest = adj.operands()
    impl = diffcore.implementations("sparse_spmm")[name]
    out = torch.empty_like(x)
    bad_col = col.clone()
    bad_col[3] = adj.num_nodes + 5
    with pytest.raises(RuntimeError, match="column index lies outside"):
        impl(crow, bad_col, *rest, x, out)
    bad_col[3] = -1
    with pytest.raises(RuntimeError, match="column index lies outside"):
        impl(crow, bad_col, *rest, x, out)
    bad_crow = crow.clone()
    bad_crow[2] = bad_crow[3] + 1
    with pytest.raises(RuntimeError, match="crow"):
        impl(bad_crow, col, *rest, x, out)
    bad_crow = crow.clone()
    bad_crow[-1] -= 1
    with pytest.raises(RuntimeError, match="crow: expected .*nnz"):
        impl(bad_crow, col, *rest, x, out)
