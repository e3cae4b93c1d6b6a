"""The Philox normal stream: every backend against the reference, determinism, statistics."""

from __future__ import annotations

import pytest
import torch

import diffcore
from diffcore.reference.random import normal
from tests.utils import impl_params

SEEDS = [0, 1234, 2**63 + 99, 2**64 - 1]


def draw(name: str, shape, seed: int, offset: int, dtype=torch.float32, out=None) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype) if out is None else out
    with diffcore.use(name):
        return diffcore.random.randn_(out, seed=seed, offset=offset)


@pytest.mark.parametrize("name", impl_params("random_normal"))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 3, 2**32 - 2])
def test_matches_reference(name, seed, offset):
    n = 1037 if name == "triton" else 10_007  # odd: a partial group of 4 at the end
    got = draw(name, (n,), seed, offset)
    torch.testing.assert_close(got, normal(n, seed, offset), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", impl_params("random_normal"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_the_stream_rounded(name, dtype):
    got = draw(name, (3, 37), 7, 1, dtype=dtype)
    assert got.dtype == dtype
    ref = normal(111, 7, 1).reshape(3, 37)
    torch.testing.assert_close(got.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("name", impl_params("random_normal"))
def test_logical_index_not_memory_order(name):
    out = torch.empty(37, 5).t()  # (5, 37), column-major in memory
    got = draw(name, None, 11, 0, out=out)
    torch.testing.assert_close(got, normal(185, 11, 0).reshape(5, 37), rtol=0, atol=2e-6)


def test_offset_continues_the_stream():
    whole = diffcore.random.randn(4 * 1000, seed=5)
    tail = diffcore.random.randn(4 * 600, seed=5, offset=400)
    assert torch.equal(whole[1600:], tail)


def test_thread_count_does_not_change_values():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = diffcore.random.randn(300_001, seed=3, offset=9)
        torch.set_num_threads(2)
        two = diffcore.random.randn(300_001, seed=3, offset=9)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_standard_normal_statistics():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = diffcore.random.randn(2_000_000, seed=42).double()
    assert abs(x.mean().item()) < 5 * 2_000_000**-0.5
    assert abs(x.var().item() - 1.0) < 0.005
    assert scipy_stats.kstest(x[:200_000].numpy(), "norm").pvalue > 1e-3


def test_opcheck():
    torch.library.opcheck(torch.ops.diffcore.random_normal_.default, (torch.empty(4, 9), 3, 2))
    torch.library.opcheck(torch.ops.diffcore.random_normal.default, ([4, 9], 3, 2, torch.float32, torch.device("cpu")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (3, 1001), (2, 3, 5)])
def test_randn_equals_randn_into_a_new_tensor(shape, dtype):
    """randn allocates with the op random_normal (from the block pool on the CPU); the values are
    randn_'s into a fresh tensor."""
    want = diffcore.random.randn_(torch.empty(shape, dtype=dtype), seed=9, offset=5)
    got = diffcore.random.randn(*shape, seed=9, offset=5, dtype=dtype)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_randn_compiles_fullgraph():
    torch._dynamo.reset()
    compiled = torch.compile(lambda: diffcore.random.randn(3, 1001, seed=9, offset=5) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(), diffcore.random.randn(3, 1001, seed=9, offset=5) * 2, rtol=0, atol=0)


def test_randn_follows_the_default_device():
    with torch.device("meta"):
        assert diffcore.random.randn(2, 3, seed=1).device.type == "meta"


def test_a_freed_randn_output_serves_the_next_call():
    first = diffcore.random.randn(512, 1024, seed=1)  # 2 MiB: pooled
    address = first.data_ptr()
    del first
    second = diffcore.random.randn(512, 1024, seed=2)
    assert second.data_ptr() == address
    torch.testing.assert_close(second, diffcore.random.randn_(torch.empty(512, 1024), seed=2), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": 2**64}, ValueError, "seed"),
        ({"seed": -(2**63) - 1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": 1, "offset": -1}, ValueError, "offset"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        diffcore.random.randn(4, **kwargs)


def test_numpy_integers_are_ints():
    import numpy as np

    assert torch.equal(diffcore.random.randn(np.int64(3), 5, seed=np.int64(7), offset=np.uint8(1)),
                       diffcore.random.randn(3, 5, seed=7, offset=1))


def test_bad_dtype():
    with pytest.raises(TypeError, match="dtype: expected float32, float16 or bfloat16, got torch.float64"):
        diffcore.random.randn(3, seed=1, dtype=torch.float64)
    with pytest.raises(TypeError, match="out: expected float32"):
        diffcore.random.randn_(torch.empty(3, dtype=torch.int32), seed=1)
    with pytest.raises(TypeError, match="out: expected float32"):
        diffcore.random.randn_(torch.empty(3, dtype=torch.float64), seed=1)
    with pytest.raises(ValueError, match="out: more than one of its elements refers to the same memory location"):
        diffcore.random.randn_(torch.empty(1, 4).expand(3, 4), seed=1)
