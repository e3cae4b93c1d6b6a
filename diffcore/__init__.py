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
    "implementations",
    "p_step",
    "p_step_",
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
