"""The block pool behind the C++ kernels' outputs and scratch (csrc/include/diffcore/memory.h):
a freed output of 1 MiB or more goes back to the next output of the same size, a live one never
does; the caps, ``empty_cache``, ``DIFFCORE_POOL_MB``, and pooled tensors behaving like any other."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import diffcore
from diffcore import sphere

_reason = diffcore.implementations("sphere_normalize")["cpu"].reason("cpu")
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"the pool serves the C++ kernels: {_reason}")

ROWS, D = 8192, 64  # a 2 MiB float32 output: pooled
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _empty_pool():
    diffcore.empty_cache()
    yield
    diffcore.empty_cache()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return sphere.normalize(x)  # the dispatcher's CPU kernel, which allocates its output


def test_freed_output_serves_the_next_call_and_live_ones_are_never_shared():
    x = torch.randn(ROWS, D)
    expected = torch.nn.functional.normalize(x, dim=1)
    a = _normalize(x)
    address = a.data_ptr()
    b = _normalize(2 * x)  # a is alive: a block of its own
    assert b.data_ptr() != address
    del a
    assert diffcore.pool_stats() == {"blocks": 1, "bytes": ROWS * D * 4}
    c = _normalize(x)
    assert c.data_ptr() == address and diffcore.pool_stats()["blocks"] == 0
    torch.testing.assert_close(c, expected)
    torch.testing.assert_close(b, expected)
    small = _normalize(x[:100])  # under 1 MiB: torch's allocator, never kept
    del small
    assert diffcore.pool_stats()["blocks"] == 0


def test_caps_and_empty_cache():
    x = torch.randn(ROWS, D)
    outs = [_normalize(x) for _ in range(10)]
    del outs
    stats = diffcore.pool_stats()
    assert stats == {"blocks": 8, "bytes": 8 * ROWS * D * 4}  # at most 8 blocks, the oldest freed go
    kept = _normalize(x)
    assert diffcore.empty_cache() == 7 * ROWS * D * 4
    assert diffcore.pool_stats() == {"blocks": 0, "bytes": 0}
    torch.testing.assert_close(kept, torch.nn.functional.normalize(x, dim=1))  # in use: untouched


def test_pooled_output_resizes_and_serialises(tmp_path):
    x = torch.randn(ROWS, D)
    out = _normalize(x)
    first = out.clone()
    out.resize_(2 * ROWS, D)  # the storage grows through the pool's allocator
    torch.testing.assert_close(out[:ROWS], first)
    torch.save(out, tmp_path / "out.pt")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), out)


def _run_with_env(env_value: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DIFFCORE_POOL_MB=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_pool_mb_from_the_environment():
    code = (
        "import torch, diffcore\n"
        f"x = torch.randn({ROWS}, {D})\n"
        "outs = [diffcore.sphere.normalize(x) for _ in range(3)]\n"
        "del outs\n"
        "print(diffcore.pool_stats()['blocks'])\n"
    )
    off = _run_with_env("0", code)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0"]
    capped = _run_with_env("4", code)  # 4 MiB: two 2 MiB blocks
    assert capped.returncode == 0, capped.stderr
    assert capped.stdout.split() == ["2"]
    bad = _run_with_env("lots", code)
    assert bad.returncode != 0
    assert "DIFFCORE_POOL_MB: expected a non-negative integer (MiB), got 'lots'" in bad.stderr
