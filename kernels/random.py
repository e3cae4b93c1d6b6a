"""random family, Triton: the Philox normal stream written into a tensor (``diffcore.random.randn``).

``out.view(-1)[i] = z_i``, element i of the stream ``(seed, offset)`` (kernels/philox.py), i the
row-major index in ``out``'s shape, whatever its strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FEATURE_DTYPES, device_guard, finish, scratch
from .philox import philox_normal, round_to, seed_words

_BLOCK = 1024  # elements per program; the values do not depend on it


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
def _random_normal_kernel(
    out_ptr,  # (n,) contiguous, float32/float16/bfloat16
    n,  # number of elements
    seed_lo,  # low 32 bits of the seed
    seed_hi,  # high 32 bits of the seed
    offset,  # first Philox counter, in [0, 2^63)
    BLOCK: tl.constexpr,
):
    """``out[i] = z_i`` of the stream ``(seed, offset)`` for i in this program's block."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    z = philox_normal(idx, seed_lo, seed_hi, offset)
    tl.store(out_ptr + idx, round_to(z, out_ptr.dtype.element_ty), mask=idx < n)


def random_normal_(out: torch.Tensor, seed: int, offset: int) -> None:
    """Fills ``out`` with the Philox normal stream ``(seed, offset)``.

    Args:
        out: any shape, float32/float16/bfloat16, any strides; element i (row-major) gets ``z_i``.
        seed: the 64-bit key as an int64 (two's complement: a seed at or above 2^63 arrives
            negative) or a non-negative int below 2^64.
        offset: the first Philox counter, in [0, 2^63); the fill consumes ``ceil(numel / 4)``.
    """
    if out.dtype not in FEATURE_DTYPES:
        raise RuntimeError(f"randn: out: expected float32, float16 or bfloat16, got {out.dtype}")
    if offset < 0:
        raise RuntimeError(f"randn: offset must be non-negative, got {offset}")
    n = out.numel()
    if n == 0:
        return
    dst = scratch(out, contiguous=True)
    seed_lo, seed_hi = seed_words(seed)
    with device_guard(out):
        _random_normal_kernel[(triton.cdiv(n, _BLOCK),)](dst, n, seed_lo, seed_hi, offset, BLOCK=_BLOCK)
    finish(dst, out)
