"""The Philox4x32-10 normal stream that every diffcore op draws its noise from.

``randn(shape, seed=s, offset=o)`` returns exactly the noise a seeded op with the same
``(seed, offset)`` adds to its (row-major) output, so seeded results can be reproduced or
inspected with the noise made explicit. The stream is defined in DESIGN.md "Noise" and in
``diffcore.reference.random``; values agree across backends to a few ulp of log/sin/cos and do
not depend on thread count or block size.
"""

from __future__ import annotations

import torch

from diffcore import (
    _checks,
    _library,  # noqa: F401  (defines the ops)
    _registry,
)

__all__ = ["randn", "randn_"]


def _stream(seed: int, offset: int) -> tuple[int, int]:
    """The stream's (seed, offset) as the ops take them; a seed is required."""
    seed, offset = _checks.seed_offset(seed, offset)
    if seed is None:
        raise TypeError("seed: expected an int, got None")
    return seed, offset


def randn_(out: torch.Tensor, *, seed: int, offset: int = 0) -> torch.Tensor:
    """Fills ``out`` (any shape; float32, float16 or bfloat16) with the stream; returns ``out``."""
    _checks.writable("out", _checks.float_tensor("out", out))
    seed, offset = _stream(seed, offset)
    impl = _registry.forced_for("random_normal", out.device)
    if impl is None:
        torch.ops.diffcore.random_normal_(out, seed, offset)
    else:
        impl(out, seed, offset)
    return out


def randn(
    *shape: int,
    seed: int,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A new tensor of ``shape`` holding elements ``0 .. numel-1`` of the stream ``(seed, offset)``."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if not all(_checks.is_int(s) and s >= 0 for s in shape):
        raise ValueError(f"shape: expected non-negative ints, got {shape}")
    shape = tuple(int(s) for s in shape)
    # torch's default device (torch.set_default_device), read off an empty tensor: a compiled graph
    # can trace that, not torch.get_default_device().
    device = torch.empty(0).device if device is None else torch.device(device)
    if _checks.cpu_kernel(device, _registry.forced_for("random_normal", device)):
        # The allocating op: its output comes from diffcore's block pool (csrc/include/diffcore/memory.h).
        if dtype not in _checks.FEATURE_DTYPES:
            raise TypeError(f"dtype: expected {_checks.dtype_names(_checks.FEATURE_DTYPES)}, got {dtype}")
        return torch.ops.diffcore.random_normal(list(shape), *_stream(seed, offset), dtype, device)
    return randn_(torch.empty(shape, dtype=dtype, device=device), seed=seed, offset=offset)
