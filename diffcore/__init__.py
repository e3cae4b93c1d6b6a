"""diffcore: fused kernels for diffusion-based recommender systems.

Ops are registered with ``torch.library`` under ``torch.ops.diffcore``; CPU tensors run the C++
kernels (``diffcore._C``), CUDA tensors the Triton kernels. :func:`backends` says which
implementations are live here and why the others are not.
"""

from __future__ import annotations

import torch

from diffcore import _library, _registry
from diffcore import compat as compat
from diffcore import linalg as linalg
from diffcore import nn as nn
from diffcore import random as random
from diffcore import retrieval as retrieval
from diffcore import sde as sde
from diffcore import sparse as sparse
from diffcore import sphere as sphere
from diffcore import training as training
from diffcore._registry import implementations, use
from diffcore.diffusion import Schedule, ddim_step, p_step, p_step_, q_sample, sample

__version__ = "0.1.0"

__all__ = [
    "Schedule",
    "backends",
    "ddim_step",
    "empty_cache",
    "implementations",
    "p_step",
    "p_step_",
    "pool_stats",
    "q_sample",
    "random",
    "sample",
    "use",
]


def backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Each implementation name mapped to ``"live"`` or the reason it cannot run on ``device``.

    A backend is live when every op it registers can run; e.g.
    ``{'reference': 'live', 'cpu': 'live (AVX512)', 'triton': 'Triton runs CPU tensors only under
    TRITON_INTERPRET=1 ...', 'cuda': 'the CUDA binding ...'}``."""
    device = torch.device(device)
    status: dict[str, str] = {}
    for op in _registry.ops():
        for name, impl in implementations(op).items():
            reason = impl.reason(device)
            if reason is not None:
                status[name] = reason
            else:
                status.setdefault(name, "live")
    if status.get("cpu") == "live":
        status["cpu"] = f"live ({_library.cpu_isa()})"
    return status


def pool_stats() -> dict[str, int]:
    """What the block pool keeps now: ``{"blocks": n, "bytes": b}``.

    The C++ kernels take every output and scratch tensor of 1 MiB or more from blocks that earlier
    diffcore tensors of the same size freed (the most recently freed first), so a loop that
    allocates the same large outputs every step gets mapped, cache-warm memory back instead of
    fresh pages. The pool keeps at most 8 freed blocks and ``DIFFCORE_POOL_MB`` MiB (default 1024;
    ``0`` turns it off), the oldest freed first beyond that."""
    blocks, nbytes = _library._C.pool_kept() if _library._C is not None else (0, 0)
    return {"blocks": blocks, "bytes": nbytes}


def empty_cache() -> int:
    """Frees every block the pool keeps (see :func:`pool_stats`); returns the bytes freed. Tensors
    still in use are not affected."""
    return _library._C.release_pool() if _library._C is not None else 0
