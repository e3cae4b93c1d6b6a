"""Reference of the Philox4x32-10 normal stream, in plain PyTorch integer ops.

The stream (DESIGN.md "Noise"; the same in csrc/include/diffcore/philox.h and kernels/philox.py):
key ``(seed & 0xffffffff, seed >> 32)``; element ``i`` of an op's logical (row-major) output uses
counter ``offset + i // 4`` split into its low and high words, with ``c2 = c3 = 0``; the words
``w0..w3`` give ``z0, z1 = sqrt(-2 ln u(w0)) (cos, sin)(2 pi v(w1))`` and ``z2, z3`` likewise from
``w2, w3``, with ``u(w) = ((w >> 8) + 0.5) 2^-24`` and ``v(w) = (w >> 8) 2^-24``; element ``i``
takes ``z_(i % 4)``.

Unsigned 32-bit words are held in int64 tensors; products are split into 16-bit halves so nothing
overflows int64.
"""

from __future__ import annotations

import math

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and the words ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_lo = b * a_lo  # < 2^48
    t_hi = b * a_hi  # < 2^48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & MASK32
    return hi, lo


def philox4x32_10(
    counter: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of the 64-bit counters ``counter`` (int64, (n,)) under key ``seed``.

    Returns the four 32-bit output words as int64 tensors of shape (n,)."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & MASK32, seed >> 32
    x0 = counter & MASK32
    x1 = (counter >> 32) & MASK32
    x2 = torch.zeros_like(x0)
    x3 = torch.zeros_like(x0)
    for _ in range(10):
        hi0, lo0 = _mulhilo(M0, x0)
        hi1, lo1 = _mulhilo(M1, x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return x0, x1, x2, x3


def normal(n: int, seed: int, offset: int = 0) -> torch.Tensor:
    """Elements ``0 .. n-1`` of the stream ``(seed, offset)``: a float32 tensor of shape (n,)."""
    groups = (n + 3) // 4
    counter = torch.arange(groups, dtype=torch.int64) + offset
    w0, w1, w2, w3 = philox4x32_10(counter, seed)
    scale = 2.0**-24

    def log_arg(w: torch.Tensor) -> torch.Tensor:
        return ((w >> 8).to(torch.float32) + 0.5) * scale

    def angle(w: torch.Tensor) -> torch.Tensor:
        return (w >> 8).to(torch.float32) * scale * (2 * math.pi)

    r01 = torch.sqrt(-2.0 * torch.log(log_arg(w0)))
    r23 = torch.sqrt(-2.0 * torch.log(log_arg(w2)))
    a1, a3 = angle(w1), angle(w3)
    z = torch.stack([r01 * torch.cos(a1), r01 * torch.sin(a1), r23 * torch.cos(a3), r23 * torch.sin(a3)], 1)
    return z.reshape(-1)[:n]


def random_normal_(out: torch.Tensor, seed: int, offset: int) -> None:
    """Fills ``out`` (any shape, float dtype) with the stream, element ``i`` in row-major order."""
    out.copy_(normal(out.numel(), seed, offset).reshape(out.shape))
