"""Retrieval family: ``diffcore.retrieval.topk`` (the op ``retrieval_topk``), every implementation
against the reference and against the tie rule spelled out in Python; bad input, opcheck, compile.

Operands are small integers, so every score is exact in every dtype and summation order: values
and ids must match exactly, ties (many) included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffcore
from diffcore import retrieval
from diffcore.reference import retrieval as ref
from tests.utils import impl_params, strided_rows

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IMPLS = impl_params("retrieval_topk")


def _ints(shape, g, dtype=torch.float32):
    return torch.randint(-4, 5, shape, generator=g).to(dtype)


def _history(B, n, g, max_len=6):
    """Unsorted, with duplicates; row 0 empty."""
    lens = torch.randint(0, max_len + 1, (B,), generator=g)
    lens[0] = 0
    crow = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    return crow, torch.randint(0, n, (int(crow[-1]),), generator=g)


def _topk(name, *args, **kwargs):
    with diffcore.use(name):
        return retrieval.topk(*args, **kwargs)


def _assert_exact(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,n,d,k", [(1, 1, 3, 1), (3, 5, 4, 5), (7, 37, 8, 4), (5, 130, 5, 23), (9, 1100, 16, 7)])
@pytest.mark.parametrize("layout", ["contiguous", "column_major"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "history"])
def test_matches_reference(name, dtype, B, n, d, k, layout, masked):
    if name == "triton" and n > 200:
        pytest.skip("interpreted Triton: small shapes only")
    g = torch.Generator().manual_seed(B * 1000 + n)
    queries, items = _ints((B, d), g, dtype), _ints((n, d), g, dtype)
    crow, col = _history(B, n, g) if masked else (None, None)
    exclude = None if crow is None else (crow, col)
    q, it = strided_rows(queries, layout), strided_rows(items, layout)
    truth = ref.topk(queries.double(), items.double(), k, crow, col)
    expected = (truth[0].to(dtype), truth[1])
    _assert_exact(_topk(name, q, k, items=it, exclude=exclude), expected)
    scores = strided_rows(queries @ items.T, layout)
    _assert_exact(_topk(name, scores, k, exclude=exclude), expected)


def _reference_topk(scores, k, history):
    """Per row: sort by (-score, item id) in Python, the tie rule spelled out."""
    scores = scores.clone()
    for r, items in enumerate(history):
        scores[r, items] = float("-inf")
    values, ids = [], []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        ids.append(order)
        values.append([row[j] for j in order])
    return torch.tensor(values, dtype=scores.dtype), torch.tensor(ids)


def _csr(history, n_items):
    crow = torch.tensor([0] + list(np.cumsum([len(h) for h in history])))
    col = torch.tensor([j for h in history for j in sorted(h)], dtype=torch.long)
    return torch.sparse_csr_tensor(crow, col, torch.ones(col.numel()), (len(history), n_items), check_invariants=True)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("k", [1, 5, 23])
@pytest.mark.parametrize("as_tuple", [False, True], ids=["csr", "tuple"])
def test_tie_rule_and_masked_rows(name, k, as_tuple):
    """Fully masked rows and k above the unmasked items: masked items last, in id order."""
    g = torch.Generator().manual_seed(0)
    B, n_items, d = 5, 23, 4
    queries = torch.randint(-2, 3, (B, d), generator=g).float()
    items = torch.randint(-2, 3, (n_items, d), generator=g).float()
    history = [[0, 3, 4], [], list(range(n_items)), [22, 1], list(range(2, 21))]  # row 2 fully masked
    exclude = _csr(history, n_items)
    if as_tuple:
        exclude = (exclude.crow_indices(), exclude.col_indices())
    scores = queries @ items.T
    expected = _reference_topk(scores, k, history)
    _assert_exact(_topk(name, scores, k, exclude=exclude), expected)
    _assert_exact(_topk(name, queries, k, items=items, exclude=exclude), expected)
    _assert_exact(_topk(name, queries, k, items=items), _reference_topk(scores, k, [[]] * B))


@pytest.mark.parametrize("scores_kind", ["distinct", "bunched", "infinite"])
@pytest.mark.parametrize("k", [1, 7, 64, 300])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "history"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_long_rows_refill_the_candidate_buffer(scores_kind, k, masked, dtype):
    """Rows long enough that the C++ kernel's candidate buffer (2k + 64) fills and is cut back many
    times: distinct scores (the binned cut), scores bunched on a few values (ties across the cut;
    the exact fallback) and +-inf among them; ascending rows make every item a candidate.
    float64 rows are scanned as float64 (half the lanes per vector); bfloat16 rows in chunks of
    4,096 converted items (one buffer per task)."""
    g = torch.Generator().manual_seed(k)
    B, n = 6, 6000
    scores = torch.randn(B, n, generator=g, dtype=torch.float64).to(dtype)
    if scores_kind == "bunched":
        scores = (scores * 2).round() / 2
    elif scores_kind == "infinite":
        scores[:, ::97] = float("inf")
        scores[:, 5::89] = -float("inf")
    scores[-1] = torch.arange(n).to(dtype)  # every item beats the threshold (bfloat16: ties from 256 on)
    crow, col = _history(B, n, g, max_len=400) if masked else (None, None)
    exclude = None if crow is None else (crow, col)
    _assert_exact(_topk("cpu", scores, k, exclude=exclude), ref.topk(scores, None, k, crow, col))


@pytest.mark.parametrize("where", [3, 700, 4095, 5999])
@pytest.mark.parametrize("order", ["random", "ascending"])
def test_a_nan_anywhere_in_a_long_row_raises(where, order):
    """A NaN before, inside and after the buffer's first fill, where the scan appends a vector's
    candidates at once (and in a row where every item is a candidate), is found, not stored."""
    g = torch.Generator().manual_seed(where)
    scores = torch.randn(3, 6000, generator=g)
    if order == "ascending":
        scores[1] = torch.arange(6000, dtype=torch.float32)
    scores[1, where] = float("nan")
    for k in (1, 64):
        with pytest.raises(ValueError, match="NaN"):
            _topk("cpu", scores, k)


@pytest.mark.parametrize("name", IMPLS)
def test_empty_batch_and_infinite_scores(name):
    empty = _topk(name, torch.empty(0, 7), 3)
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3) and empty[1].dtype == torch.long
    scores = torch.tensor([[0.0, float("inf"), -float("inf"), 1.0, float("inf")]])
    _assert_exact(_topk(name, scores, 5), _reference_topk(scores, 5, [[]]))


@pytest.mark.parametrize("name", IMPLS)
def test_nan_scores_raise(name):
    scores = torch.randn(3, 9)
    scores[1, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _topk(name, scores, 2)
    items = torch.randn(9, 4)
    items[2, 0] = float("inf")  # inf * 0 or inf - inf: NaN scores
    queries = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="NaN"):
        _topk(name, queries, 2, items=items)


def test_thread_counts_agree():
    """Random (non-integer) data: the C++ kernel's blocks do not depend on the thread count."""
    if diffcore.implementations("retrieval_topk")["cpu"].reason("cpu"):
        pytest.skip("no C++ kernel")
    g = torch.Generator().manual_seed(3)
    queries, items = torch.randn(300, 32, generator=g), torch.randn(2500, 32, generator=g)
    crow, col = _history(300, 2500, g, max_len=40)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(retrieval.topk(queries, 50, items=items, exclude=(crow, col)))
    finally:
        torch.set_num_threads(threads)
    _assert_exact(results[0], results[1])
    truth = ref.topk(queries, items, 50, crow, col)
    torch.testing.assert_close(results[0][0], truth[0])


@pytest.mark.parametrize("name", IMPLS)
def test_inputs_requiring_grad_on_two_threads(name):
    """Queries and items that require grad, outside no_grad (LightGCN's computer() output): the
    blocks' GEMMs run on worker threads, where the caller's grad mode does not reach. Same result
    as on detached inputs, and not differentiable."""
    g = torch.Generator().manual_seed(4)
    queries, items = _ints((300, 8), g), _ints((1500, 8), g)  # 3 blocks of 128 rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = _topk(name, queries.requires_grad_(), 7, items=items.requires_grad_())
    finally:
        torch.set_num_threads(threads)
    assert not got[0].requires_grad
    _assert_exact(got, ref.topk(queries.detach(), items.detach(), 7, None, None))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_rejects_bad_arguments():
    scores = torch.randn(3, 6)
    assert torch.equal(retrieval.topk(scores, np.int64(2))[1], retrieval.topk(scores, 2)[1])  # numpy ints are ints
    with pytest.raises(ValueError, match="k:"):
        retrieval.topk(scores, 7)
    with pytest.raises(ValueError, match="k:"):
        retrieval.topk(scores, 0)
    with pytest.raises(ValueError, match=r"scores_or_queries: expected at least one item, got shape \(3, 0\)"):
        retrieval.topk(scores[:, :0], 1)
    with pytest.raises(ValueError, match=r"items: expected at least one item, got shape \(0, 4\)"):
        retrieval.topk(torch.randn(3, 4), 1, items=torch.randn(0, 4))
    with pytest.raises(ValueError, match="items"):
        retrieval.topk(torch.randn(3, 4), 2, items=torch.randn(6, 5))
    with pytest.raises(ValueError, match="items"):
        retrieval.topk(torch.randn(3, 4), 2, items=torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="scores_or_queries"):
        retrieval.topk(torch.ones(3, 6, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="scores_or_queries"):
        retrieval.topk(torch.randn(6), 2)
    with pytest.raises(ValueError, match="exclude"):
        retrieval.topk(scores, 2, exclude=_csr([[0], [7], []], 8))
    with pytest.raises(TypeError, match="exclude"):
        retrieval.topk(scores, 2, exclude=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="item ids"):
        retrieval.topk(scores, 2, exclude=(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 99])))
    with pytest.raises(ValueError, match="exclude"):
        retrieval.topk(scores, 2, exclude=(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1])))


def test_exclude_indices_must_be_int32_or_int64():
    """Bool col ids were read as 0/1 and a complex or floating crow was accepted: the CSR index
    tensors of ``exclude`` are int64 or int32, anything else is a TypeError naming the tensor."""
    scores = torch.randn(3, 6)
    crow, col = torch.tensor([0, 1, 1, 2]), torch.tensor([4, 5])
    bad = [
        ((crow, torch.tensor([True, True])), "col_indices", "torch.bool"),
        ((crow.to(torch.complex64), col), "crow_indices", "torch.complex64"),
        ((crow.double(), col), "crow_indices", "torch.float64"),
        ((crow, col.float()), "col_indices", "torch.float32"),
        ((crow.to(torch.int16), col), "crow_indices", "torch.int16"),
        ((crow, col.to(torch.uint8)), "col_indices", "torch.uint8"),
        ((crow.bool(), col), "crow_indices", "torch.bool"),
    ]
    for exclude, name, dtype in bad:
        with pytest.raises(TypeError, match=f"exclude: expected {name} of dtype int64 or int32, got {dtype}"):
            retrieval.topk(scores, 2, exclude=exclude)
    want = retrieval.topk(scores, 2, exclude=(crow, col))
    numpy_pair = (crow.numpy(), col.numpy().astype(np.int32))
    for exclude in ((crow.int(), col.int()), (crow.tolist(), col.tolist()), numpy_pair):
        _assert_exact(retrieval.topk(scores, 2, exclude=exclude), want)
    _assert_exact(retrieval.topk(scores, 2, exclude=([0, 0, 0, 0], [])), retrieval.topk(scores, 2))  # no history


def test_op_rejects_bad_arguments():
    """Direct ``torch.ops`` calls are checked in the kernel too."""
    if diffcore.implementations("retrieval_topk")["cpu"].reason("cpu"):
        pytest.skip("no C++ kernel")
    op = torch.ops.diffcore.retrieval_topk
    x = torch.randn(3, 6)
    with pytest.raises(RuntimeError, match="k:"):
        op(x, None, 7, None, None)
    with pytest.raises(RuntimeError, match="crow"):
        op(x, None, 2, torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="col"):
        op(x, None, 2, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 6]))
    # the ids are checked where each row is sorted, unsorted rows through a sorted copy
    for col, bad in (([0, 4, 6, 1], "6"), ([0, 4, -2, 1], "-2"), ([0, 9, 2, 1], "9")):
        with pytest.raises(RuntimeError, match=f"col: expected item ids in \\[0, 6\\), got {bad}"):
            op(x, None, 2, torch.tensor([0, 1, 3, 4]), torch.tensor(col))
    col = torch.tensor([[0, 9], [5, 9], [1, 9], [3, 9]])[:, 0]  # strided, row 1 unsorted
    want = ref.topk(x, None, 2, torch.tensor([0, 1, 3, 4]), col)
    _assert_exact(op(x, None, 2, torch.tensor([0, 1, 3, 4]), col), want)
    assert col.tolist() == [0, 5, 1, 3]  # sorted on a copy
    with pytest.raises(RuntimeError, match="both or neither"):
        op(x, None, 2, torch.tensor([0, 1, 1, 2]), None)
    with pytest.raises(RuntimeError, match="items"):
        op(x, torch.randn(4, 5), 2, None, None)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    crow, col = _history(4, 30, g)
    for args in ((torch.randn(4, 8), torch.randn(30, 8), 5, crow, col), (torch.randn(4, 30), None, 30, None, None)):
        torch.library.opcheck(torch.ops.diffcore.retrieval_topk.default, args)


def test_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    queries, items = torch.randn(6, 8, generator=g), torch.randn(50, 8, generator=g)
    crow, col = _history(6, 50, g)

    def recommend(q, e, crow, col):
        return retrieval.topk(q * 2.0, 10, items=e, exclude=(crow, col))

    compiled = torch.compile(recommend, fullgraph=True, backend="eager")
    _assert_exact(compiled(queries, items, crow, col), recommend(queries, items, crow, col))
