"""Pure-PyTorch references: the meaning of every diffcore op, one module per family.

Importing this package first resolves oneMKL's VML dispatch (:func:`_resolve_vml_dispatch`), so
that the references' transcendental functions are as accurate on their first call as on every
later one.
"""

import torch

# The ATen unary ops that run on oneMKL VML for contiguous float32 / float64 CPU tensors
# (ATen/cpu/vml.h); erfinv is omitted: it needs arguments in (-1, 1) and no reference uses it.
_VML_OPS = (torch.acos, torch.asin, torch.atan, torch.cos, torch.erf, torch.erfc, torch.exp, torch.log,
            torch.log10, torch.log2, torch.sin, torch.sqrt, torch.tan, torch.tanh, torch.trunc)


def _resolve_vml_dispatch() -> None:
    """Works around pytorch/pytorch#188792: oneMKL 2024.2 (torch's wheels) picks each VML
    function's kernel lazily on its first call, and when that first call runs on several intra-op
    threads at once, one thread can run a low-accuracy kernel over its whole chunk. Here it showed
    as the Philox reference's first ``torch.log`` in a process being off by up to 4e-5 after the
    Box-Muller transform in about 1 process in 6, so a parity test failed at random. A
    single-element call per function and dtype runs on the calling thread alone and settles the
    dispatch before any threaded call (the fix upstream proposes, pytorch/pytorch#188791)."""
    if not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in _VML_OPS:
            op(x)


_resolve_vml_dispatch()

from diffcore.reference import diffusion, linalg, random, retrieval, sde, sparse, sphere, training  # noqa: E402

__all__ = ["diffusion", "linalg", "random", "retrieval", "sde", "sparse", "sphere", "training"]
