"""The block pool behind the C++ kernels' outputs and scratch (csrc/include/diffcore/memory.h):
a freed output of 1 MiB or more goes back to the next output of the same size, a live one never
does; the caps, ``empty_cache``, ``DIFFCORE_POOL_MB``, and pooled tensors behaving like any other."""

from __future__ import annotations

import pytest
import torch

import diffcore
from diffcore import sphere
from tests.utils import run_python

_reason = diffcore.implementations("sphere_normalize")["cpu"].reason("cpu")
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"the pool serves the C++ kernels: {_reason}")

ROWS, D = 8192, 64  # a 2 MiB float32 output: pooled
BLOCK = ROWS * D * 4  # bytes


@pytest.fixture(autouse=True)
def _empty_pool():
    diffcore.empty_cache()
    yield
    diffcore.empty_cache()


def test_freed_output_serves_the_next_call_and_live_ones_are_never_shared():
    x = torch.randn(ROWS, D)
    expected = torch.nn.functional.normalize(x, dim=1)
    a = sphere.normalize(x)  # the dispatcher's CPU kernel, which allocates its output
    address = a.data_ptr()
    b = sphere.normalize(2 * x)  # a is alive: a block of its own
    assert b.data_ptr() != address
    del a
    assert diffcore.pool_stats() == {"blocks": 1, "bytes": BLOCK}
    c = sphere.normalize(x)
    assert c.data_ptr() == address and diffcore.pool_stats()["blocks"] == 0
    torch.testing.assert_close(c, expected)
    torch.testing.assert_close(b, expected)
    small = sphere.normalize(x[:100])  # under 1 MiB: torch's allocator, never kept
    del small
    assert diffcore.pool_stats()["blocks"] == 0


def test_caps_and_empty_cache():
    x = torch.randn(ROWS, D)
    outs = [sphere.normalize(x) for _ in range(10)]
    del outs
    stats = diffcore.pool_stats()
    assert stats == {"blocks": 8, "bytes": 8 * BLOCK}  # at most 8 blocks, the oldest freed go
    kept = sphere.normalize(x)
    assert diffcore.empty_cache() == 7 * BLOCK
    assert diffcore.pool_stats() == {"blocks": 0, "bytes": 0}
    torch.testing.assert_close(kept, torch.nn.functional.normalize(x, dim=1))  # in use: untouched


def test_pooled_output_resizes_and_serialises(tmp_path):
    x = torch.randn(ROWS, D)
    out = sphere.normalize(x)
    first = out.clone()
    out.resize_(2 * ROWS, D)  # the storage grows through the pool's allocator
    torch.testing.assert_close(out[:ROWS], first)
    torch.save(out, tmp_path / "out.pt")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), out)


def test_pool_mb_from_the_environment():
    code = (
        "import torch, diffcore\n"
        f"x = torch.randn({ROWS}, {D})\n"
        "outs = [diffcore.sphere.normalize(x) for _ in range(3)]\n"
        "del outs\n"
        "print(diffcore.pool_stats()['blocks'])\n"
    )
    off = run_python(code, DIFFCORE_POOL_MB="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0"]
    capped = run_python(code, DIFFCORE_POOL_MB="4")  # 4 MiB: two 2 MiB blocks
    assert capped.returncode == 0, capped.stderr
    assert capped.stdout.split() == ["2"]
    bad = run_python(code, DIFFCORE_POOL_MB="lots")
    assert bad.returncode != 0
    assert "DIFFCORE_POOL_MB: expected a non-negative integer (MiB), got 'lots'" in bad.stderr
