"""Argument checks shared by every public function: clear errors that name the argument, what
was expected and what came. Checks that need tensor values (timesteps in range) live in the
kernels, so a compiled graph never breaks on them; int arguments are checked here."""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_U64 = 1 << 64


def float_tensor(
    name: str, x: object, ndim: int | None = None, dtypes: tuple[torch.dtype, ...] = FEATURE_DTYPES
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected {dtype_names(dtypes)}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    return x


def is_int(value: object) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value: object, ok: Callable[[int], bool], what: str) -> int:
    """A Python or numpy integer (not a bool) as an int: ValueError naming ``what`` unless it is
    one and ``ok(value)``."""
    if not is_int(value) or not ok(int(value)):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return int(value)


def finite_non_negative(v: float) -> bool:
    """The ``ok`` of :func:`real` for a finite value >= 0."""
    return v >= 0 and math.isfinite(v)


def finite_positive(v: float) -> bool:
    """The ``ok`` of :func:`real` for a finite value > 0."""
    return v > 0 and math.isfinite(v)


def real(name: str, value: object, ok: Callable[[float], bool] = math.isfinite, what: str = "a finite number") -> float:
    """A real number (Python or numpy int or float) as a float: TypeError for anything else (bool,
    str, tensors), ValueError naming ``what`` unless ``ok(value)`` (by default: finite, so NaN and
    inf are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")
    value = float(value)
    if not ok(value):
        raise ValueError(f"{name}: expected {what}, got {value}")
    return value


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """``(float32, float16, bfloat16)`` -> ``"float32, float16 or bfloat16"``."""
    names = [str(dt).removeprefix("torch.") for dt in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def like(name: str, x: object, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """``x`` must be a tensor with ``ref``'s shape, dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {x.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")
    return x


def timesteps(
    name: str, t: object, rows: int, num_steps: int, device: torch.device, clamp: bool = False
) -> torch.Tensor:
    """An int or an integer tensor of shape (rows,), (1,) or (); returned as int64 (rows,) or (1,).

    Ints are range-checked here; tensor values are checked by the kernel."""
    if not (is_int(t) or isinstance(t, torch.Tensor)):
        raise TypeError(f"{name}: expected an int or an int64 tensor, got {type(t).__name__}")
    if is_int(t):
        t = int(t)
        if t < 0 or (t >= num_steps and not clamp):
            raise ValueError(f"{name}: expected a timestep in [0, {num_steps}), got {t}")
        return torch.full((1,), min(t, num_steps - 1), dtype=torch.long, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of x_t), got {t.device}")
    t = t.reshape(-1) if t.dim() == 0 else t
    if t.dim() != 1 or t.shape[0] not in (1, rows):
        raise ValueError(f"{name}: expected shape ({rows},) (one timestep per row) or (1,), got {tuple(t.shape)}")
    return t.long()


def ids_in_range(name: str, x: torch.Tensor, n: int) -> None:
    """Every id in ``x`` lies in [0, n)."""
    if x.numel() == 0:
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < 0:
        raise ValueError(f"{name}: ids must be non-negative, got {lo}")
    if hi >= n:
        raise ValueError(f"{name}: ids must be < {n}, got {hi}")


def csr_row_pointers(name: str, crow: torch.Tensor, n_rows: int, nnz: int) -> None:
    """CSR row pointers: (n_rows + 1,), first entry 0, non-decreasing, last entry nnz."""
    if crow.dim() != 1 or crow.numel() != n_rows + 1:
        raise ValueError(f"{name}: expected shape ({n_rows + 1},) (rows + 1), got {tuple(crow.shape)}")
    first, last = int(crow[0]), int(crow[-1])
    if first != 0:
        raise ValueError(f"{name}: expected a first entry of 0, got {first}")
    drops = torch.nonzero(crow.diff() < 0)
    if drops.numel():
        r = int(drops[0, 0])
        raise ValueError(
            f"{name}: expected non-decreasing row pointers, got entry {r} = {int(crow[r])} > "
            f"entry {r + 1} = {int(crow[r + 1])}"
        )
    if last != nnz:
        raise ValueError(
            f"{name}: expected a last entry equal to the number of stored values ({nnz}), got {last}"
        )


def seed_offset(seed: int | None, offset: int) -> tuple[int | None, int]:
    """A seed in [0, 2^64) as the int64 the schema carries (two's complement), and the offset.

    A negative seed in [-2^63, 0) is taken as its two's complement (seed -1 is seed 2^64 - 1), as
    ``torch.manual_seed`` takes it; that is also the form this function returns, so a normalised
    seed passes through it again unchanged."""
    if seed is not None:
        if not is_int(seed):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        seed = int(seed)
        if not -(1 << 63) <= seed < _U64:
            raise ValueError(f"seed: expected an int in [0, 2**64) (or [-2**63, 0), taken as its two's complement), "
                             f"got {seed}")
        seed = seed - _U64 if seed >= 1 << 63 else seed
    if not is_int(offset):
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}")
    offset = int(offset)
    if not 0 <= offset < 1 << 63:
        raise ValueError(f"offset: expected an int in [0, 2**63), got {offset}")
    return seed, offset


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory (conservatively: any overlap of their spans)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.storage_offset() * t.element_size()
        extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else -1
        return start, start + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def cpu_kernel(device: torch.device, forced: object) -> bool:
    """Whether an op on ``device`` runs diffcore's C++ kernel: the CPU, the extension built (else
    the CPU op falls back to the reference) and no implementation forced by ``diffcore.use``."""
    from diffcore import _library  # the extension's loader; imported late, it imports this module

    return forced is None and device.type == "cpu" and _library._C is not None


def in_place_operands(x: torch.Tensor, forced: object, operands: tuple) -> tuple:
    """The operands of an op that writes ``x`` in place, each copied when it shares ``x``'s memory,
    unless the C++ kernel runs (it reads such operands from copies itself, csrc checks.h
    ``apart_from``): the other backends (Triton) would read rows another block already wrote.
    Not under torch.compile, whose functionalised graph has no aliasing."""
    if cpu_kernel(x.device, forced) or torch.compiler.is_compiling():
        return operands
    return tuple(v.clone() if isinstance(v, torch.Tensor) and v is not x and overlaps(v, x) else v for v in operands)


def _self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory: exact for every layout. Laid out by increasing
    stride, each dimension stepping past the whole extent of the ones below it cannot overlap
    (every dense or sliced layout); any other layout is checked element by element."""
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1)
    extent = 0  # offset of the last element of the dimensions so far
    for st, n in dims:
        if st <= extent:
            break
        extent += (n - 1) * st
    else:
        return False
    offsets = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(n) * st).reshape(-1)
    return offsets.unique().numel() < t.numel()


def writable(name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor an op writes: no two of its elements may share memory (an expanded view, or rows
    strided closer than their length, would have several elements write one location). The C++
    kernels check expanded views for direct op calls (ATen's has_internal_overlap)."""
    if not torch.compiler.is_compiling() and _self_overlapping(t):
        raise ValueError(f"{name}: more than one of its elements refers to the same memory location (strides "
                         f"{tuple(t.stride())} for shape {tuple(t.shape)}); write into a tensor that owns its "
                         "elements, e.g. a .clone()")
    return t


def untracked_write(tensors: dict[str, torch.Tensor | None]) -> None:
    """The in-place and ``out=`` forms write their result without recording it for autograd (as
    torch's ``out=`` functions do): under grad mode an operand that requires grad is refused rather
    than given a wrong gradient."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{name}: requires grad, but the in-place and out= forms do not support autograd; "
                               "call the allocating form, or run under torch.no_grad()")


def out_tensor(out: object, ref: torch.Tensor, others: dict[str, torch.Tensor | None],
               ref_name: str = "x_t", name: str = "out", apart_in_place: bool = False) -> torch.Tensor:
    """An output argument (``name``, e.g. ``out=``) must match ``ref`` (named ``ref_name``); it is
    ``ref`` itself (in place) or shares memory with no input; and nothing requires grad under grad
    mode (:func:`untracked_write`). ``apart_in_place``: in place too, no other input may share
    ``ref``'s memory (the SDE steps, whose kernels do not read such operands from copies)."""
    out = writable(ref_name if out is ref else name, like(name, out, ref, ref_name))
    if not torch.compiler.is_compiling():
        if out is not ref:
            against, note = {ref_name: ref, **others}, f" (only {ref_name} may be written in place)"
        else:
            against, note = (others if apart_in_place else {}), ""
        for other_name, other in against.items():
            if other is not None and overlaps(out, other):
                raise ValueError(f"{name}: must not share memory with {other_name}{note}")
    untracked_write({ref_name: ref, **others, name: out})
    return out


def writable_path(path: str, option: str) -> str | None:
    """None if a command-line tool can write ``path`` (given as ``option``), else a message saying
    why not: checked before a run, so its output is not lost at the end."""
    p = Path(path)
    if p.is_dir():
        return f"{option} {path}: is a directory"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return f"{option} {path}: the directory {parent} does not exist"
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return f"{option} {path}: not writable"
    return None
