"""Retrieval, Triton (kernels/retrieval.py under the interpreter): ``retrieval_topk_out`` against
``diffcore.reference.retrieval.topk`` with EXACT ids and values. Operands are small integers (d <=
16, entries in [-4, 4]), so every score is exact in every dtype and the many ties must fall to the
lower id. Covers both paths, all four dtypes, odd shapes with small blocks (several blocks and a
partial last one, so the candidate merge runs), every layout, histories with duplicates and
unsorted ids, a row with every item masked, k = n_items, k above a row's unmasked items, infinite
scores, B = 0, NaN, and the public API under ``diffcore.use("triton")``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import diffcore  # noqa: E402
from diffcore.kernels import retrieval as kr  # noqa: E402
from diffcore.reference import retrieval as ref  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "column_major", "padded")


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values: contiguous, column-major, or rows with a padded stride."""
    if layout == "column_major":
        out = t.t().contiguous().t()
    elif layout == "padded":
        wide = torch.full((t.shape[0], t.shape[1] + 3), 99.0, dtype=t.dtype)
        wide[:, : t.shape[1]] = t
        out = wide[:, : t.shape[1]]
    else:
        return t
    assert torch.equal(out, t)
    return out


def integers(shape, dtype, gen) -> torch.Tensor:
    return torch.randint(-4, 5, shape, generator=gen).to(dtype)


def history(rows: int, n: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR history, unsorted with duplicates: row 0 masks every item, row 1 all but two (so k may
    exceed its unmasked items), row 2 none, the others a few random ids."""
    cols = []
    for r in range(rows):
        if r == 0:
            c = torch.cat([torch.randperm(n, generator=gen), torch.randint(0, n, (2,), generator=gen)])
        elif r == 1:
            c = torch.randperm(n, generator=gen)[: max(n - 2, 0)].repeat(2)
        elif r == 2:
            c = torch.empty(0, dtype=torch.long)
        else:
            c = torch.randint(0, n, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen)
        cols.append(c)
    crow = torch.tensor([0] + [len(c) for c in cols]).cumsum(0)
    return crow, torch.cat(cols) if cols else torch.empty(0, dtype=torch.long)


def run(x, items, k, crow=None, col=None, **kw):
    values = x.new_empty((x.shape[0], k))
    ids = torch.empty((x.shape[0], k), dtype=torch.long)
    kr.retrieval_topk_out(x, items, k, crow, col, values, ids, **kw)
    return values, ids


def assert_exact(got, expected):
    (v, i), (rv, ri) = got, expected
    assert v.dtype == rv.dtype and i.dtype == torch.long and v.shape == rv.shape
    torch.testing.assert_close(i, ri, rtol=0, atol=0)
    torch.testing.assert_close(v, rv, rtol=0, atol=0)


# (B, n_items, k, block_n scores, block_n queries, with history): one block, k = n_items over two
# blocks (partial, then full: n_blocks * KB = k), many blocks with a partial last one, the
# launcher's own block size (one block).
SHAPES = [
    (1, 1, 1, 4, 4, False),
    (3, 5, 5, 4, 4, True),
    (3, 8, 8, 4, 4, True),
    (7, 37, 4, 8, 16, True),
    (3, 130, 10, 32, 32, True),
    (7, 37, 30, 16, 16, True),
    (7, 37, 6, None, None, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("path", ("scores", "queries"))
def test_matches_reference(path, dtype):
    gen = torch.Generator().manual_seed(DTYPES.index(dtype) * 10 + (path == "queries"))
    for case, (rows, n, k, bn_scores, bn_queries, hist) in enumerate(SHAPES):
        layout = LAYOUTS[case % len(LAYOUTS)]
        crow, col = history(rows, n, gen) if hist else (None, None)
        if path == "scores":
            x, items, bn = laid_out(integers((rows, n), dtype, gen), layout), None, bn_scores
        else:
            d = (1, 7, 16)[case % 3]
            x = laid_out(integers((rows, d), dtype, gen), layout)
            items = laid_out(integers((n, d), dtype, gen), LAYOUTS[(case + 1) % len(LAYOUTS)])
            bn = bn_queries
        assert_exact(run(x, items, k, crow, col, block_n=bn), ref.topk(x, items, k, crow, col))


def test_queries_dot_and_broadcast_paths_agree():
    """float32 queries scored by tl.dot (block_n 16) and by the broadcast product (block_n 4)."""
    gen = torch.Generator().manual_seed(7)
    x, items = integers((5, 16), torch.float32, gen), integers((37, 16), torch.float32, gen)
    crow, col = history(5, 37, gen)
    expected = ref.topk(x, items, 7, crow, col)
    for bn in (4, 16):
        assert_exact(run(x, items, 7, crow, col, block_n=bn), expected)


def test_infinite_scores_and_signed_zeros():
    """+-inf scores (unmasked -inf ties with masked items in id order) and zeros of both signs."""
    gen = torch.Generator().manual_seed(3)
    x = integers((4, 37), torch.float32, gen)
    x[x == 3] = float("inf")
    x[x == -4] = float("-inf")
    x[x == 1] = -0.0
    crow, col = history(4, 37, gen)
    for k in (5, 37):
        assert_exact(run(x, None, k, crow, col, block_n=8), ref.topk(x, None, k, crow, col))


def test_empty_batch():
    for items in (None, torch.ones(6, 3)):
        x = torch.empty((0, 6 if items is None else 3))
        v, i = run(x, items, 2, torch.zeros(1, dtype=torch.long), torch.empty(0, dtype=torch.long))
        assert v.shape == (0, 2) and i.shape == (0, 2)


def test_nan_raises():
    x = torch.arange(20.0).reshape(2, 10)
    x[1, 7] = float("nan")
    with pytest.raises(ValueError, match="expected no NaN"):
        run(x, None, 3, block_n=4)
    # a NaN at a masked position is ignored, as in the reference (its score is -inf)
    crow, col = torch.tensor([0, 0, 1]), torch.tensor([7])
    assert_exact(run(x, None, 3, crow, col, block_n=4), ref.topk(x, None, 3, crow, col))
    q, items = torch.ones(2, 3), torch.ones(9, 3)
    q[0, 1] = float("nan")
    with pytest.raises(ValueError, match="expected no NaN"):
        run(q, items, 2)
    q, items = torch.tensor([[1.0, 0.0]]), torch.ones(9, 2)
    items[4, 1] = float("inf")  # 0 * inf: a NaN score
    with pytest.raises(ValueError, match="expected no NaN"):
        run(q, items, 2)
    items[4] = float("inf")  # 1 * inf + 0 * inf: NaN too
    with pytest.raises(ValueError, match="expected no NaN"):
        run(q, items, 2)
    items = torch.ones(9, 2)
    items[4, 0] = float("inf")  # a +inf score, valid
    assert_exact(run(q, items, 2), ref.topk(q, items, 2, None, None))


def test_bad_arguments():
    x = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="k: expected"):
        run(x, None, 6)
    with pytest.raises(RuntimeError, match="block_n"):
        run(x, None, 2, block_n=6)
    with pytest.raises(RuntimeError, match="col"):
        run(x, None, 2, torch.tensor([0, 1, 1]), torch.tensor([5]))


def test_public_api():
    gen = torch.Generator().manual_seed(11)
    x = integers((4, 37), torch.bfloat16, gen)
    q, items = integers((4, 8), torch.float16, gen), integers((37, 8), torch.float16, gen)
    crow, col = history(4, 37, gen)
    csr = torch.sparse_csr_tensor(crow, col, torch.ones(col.numel()), (4, 37))
    with diffcore.use("triton"):
        got_scores = diffcore.retrieval.topk(x, 9, exclude=csr)
        got_queries = diffcore.retrieval.topk(q, 9, items=items, exclude=(crow, col))
        got_plain = diffcore.retrieval.topk(x.t().contiguous().t(), 37)
    assert_exact(got_scores, ref.topk(x, None, 9, crow, col))
    assert_exact(got_queries, ref.topk(q, items, 9, crow, col))
    assert_exact(got_plain, ref.topk(x, None, 37, None, None))
