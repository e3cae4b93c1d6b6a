"""Philox4x32-10 and the normal stream every diffcore op draws from, as Triton device functions.

The stream of DESIGN.md "Noise", the same as ``csrc/include/diffcore/philox.h`` and
``diffcore.reference.random``::

    key      = (seed_lo, seed_hi)          the low and high 32-bit words of the 64-bit seed
    counter  = (c0, c1, 0, 0)              the low and high words of offset + i // 4
    w0..w3   = Philox4x32-10(key, counter)
    u(w)     = ((w >> 8) + 0.5) 2^-24      (log argument, never 0)
    v(w)     = (w >> 8) 2^-24              (angle)
    z0, z1   = sqrt(-2 ln u(w0)) (cos, sin)(2 pi v(w1));   z2, z3 likewise from w2, w3
    element i takes z_(i % 4)

Values equal the C++ ones to a few ulp of log/sin/cos: the integer part is exact, the square root
is the correctly rounded ``tl.sqrt_rn``, and on NVIDIA ``tl.log``/``tl.cos``/``tl.sin`` compile to
libdevice's accurate functions (no ``.approx`` instructions). The launchers pass the seed as its two 32-bit words
(``seed_words``), so the kernels never hold a seed at or above 2^63 in a signed integer.

``round_to`` is the float32 -> output dtype rounding both kernels store with (round to nearest
even, as torch's ``.to``, on GPU and under the interpreter alike).
"""

from __future__ import annotations

import triton
import triton.language as tl

_PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
_PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
_TWO_POW_M24: tl.constexpr = tl.constexpr(5.9604644775390625e-08)  # 2^-24
_TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)  # rounds to the float32 kTwoPi of philox.h

_MASK32 = 0xFFFFFFFF


def seed_words(seed: int) -> tuple[int, int]:
    """The key ``(low, high)`` 32-bit words of ``seed``, an int64 in two's complement (a seed at
    or above 2^63 arrives negative) or a non-negative int below 2^64."""
    return seed & _MASK32, (seed >> 32) & _MASK32


@triton.jit
def philox4x32_10(c0, c1, k0, k1):
    """Philox4x32-10 of the counters ``(c0, c1, 0, 0)`` under the key ``(k0, k1)``.

    c0, c1: uint32 blocks of one shape; k0, k1: uint32 scalars. Returns the words w0..w3 (uint32,
    the shape of c0)."""
    x0 = c0
    x1 = c1
    x2 = tl.zeros_like(c0)
    x3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(x0, _PHILOX_M0)
        lo0 = tl.mul(x0, _PHILOX_M0, sanitize_overflow=False)
        hi1 = tl.umulhi(x2, _PHILOX_M1)
        lo1 = tl.mul(x2, _PHILOX_M1, sanitize_overflow=False)
        x0 = hi1 ^ x1 ^ k0
        x1 = lo1
        x2 = hi0 ^ x3 ^ k1
        x3 = lo0
        k0 = tl.add(k0, _PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_W1, sanitize_overflow=False)
    return x0, x1, x2, x3


@triton.jit
def philox_normal(idx, seed_lo, seed_hi, offset):
    """The normals of the logical elements ``idx`` of the stream ``(seed, offset)``.

    idx: int64 block of non-negative row-major indices; seed_lo, seed_hi: the seed's 32-bit words
    (ints in [0, 2^32)); offset: int in [0, 2^63). Returns a float32 block shaped like idx:
    ``z_(i % 4)`` of the Philox words at counter ``offset + i // 4``."""
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    counter = (idx >> 2).to(tl.uint64) + offset.to(tl.uint64)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, k0, k1)
    lane = idx & 3
    w_log = tl.where(lane < 2, w0, w2)
    w_angle = tl.where(lane < 2, w1, w3)
    u = ((w_log >> 8).to(tl.float32) + 0.5) * _TWO_POW_M24
    angle = _TWO_PI * ((w_angle >> 8).to(tl.float32) * _TWO_POW_M24)
    radius = tl.sqrt_rn(-2.0 * tl.log(u))
    return radius * tl.where((lane & 1) == 0, tl.cos(angle), tl.sin(angle))


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """float32 ``v`` rounded to ``dtype`` (float32, float16 or bfloat16), to nearest even.

    bfloat16 is rounded with integer ops (``w + 0x7FFF + lsb``, NaN kept quiet): the interpreter's
    float32 -> bfloat16 cast truncates, and the tests run the kernels there. On GPU the result is
    the one ``cvt.rn.bf16.f32`` gives."""
    if dtype == tl.bfloat16:
        w = v.to(tl.uint32, bitcast=True)
        rounded = tl.add(w, 0x7FFF + ((w >> 16) & 1), sanitize_overflow=False)
        w = tl.where(v != v, w | 0x400000, rounded)
        return (w >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)
