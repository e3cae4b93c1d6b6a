"""The registry of implementations: every op's backends, reachable by name.

Each op (``diffusion_step``, ``random_normal``, ...) has one entry per backend: ``reference``
(pure PyTorch, the meaning), ``cpu`` (C++), ``triton`` and ``cuda``. Tests, the bench and the parity
command enumerate :func:`implementations` instead of hard-coding lists, so a backend is tested the
moment it is registered, and one that cannot run here is reported with its reason.

An implementation's calling convention is the op's *out form*: the op's arguments followed by
``out``, a preallocated tensor it writes (``out`` may be the first input for in-place use).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

__all__ = ["Implementation", "register", "implementations", "get", "forced", "forced_for", "use"]


@dataclass(frozen=True)
class Implementation:
    op: str
    name: str
    fn: Callable[..., None]
    # Returns None when the implementation can run on `device`, else the reason it cannot.
    unavailable: Callable[[torch.device], str | None]
    devices: tuple[str, ...]

    def reason(self, device: torch.device | str = "cpu") -> str | None:
        device = torch.device(device)
        if device.type not in self.devices:
            return f"{self.name} does not run on {device.type} tensors"
        return self.unavailable(device)

    def __call__(self, *args, **kwargs) -> None:
        self.fn(*args, **kwargs)


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# The implementation forced by `use` (process-wide; a plain global so torch.compile can read it).
_forced_name: str | None = None


def register(
    op: str,
    name: str,
    fn: Callable[..., None],
    *,
    devices: tuple[str, ...],
    unavailable: Callable[[torch.device], str | None] = lambda device: None,
) -> None:
    _REGISTRY.setdefault(op, {})[name] = Implementation(op, name, fn, unavailable, devices)


def implementations(op: str) -> dict[str, Implementation]:
    """Every registered implementation of ``op``, by name (live or not: ask ``.reason(device)``)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    return dict(_REGISTRY[op])


def ops() -> list[str]:
    return sorted(_REGISTRY)


def get(op: str, name: str) -> Implementation:
    impls = implementations(op)
    if name not in impls:
        raise KeyError(f"{op} has no implementation {name!r}; it has {sorted(impls)}")
    return impls[name]


def forced() -> str | None:
    """The implementation name forced by :func:`use`, or None (normal dispatch)."""
    return _forced_name


def forced_for(op: str, device: torch.device) -> Implementation | None:
    """The implementation of ``op`` forced by :func:`use`, or None (normal dispatch); raises when
    the forced implementation cannot run on ``device``."""
    if _forced_name is None:
        return None
    impl = get(op, _forced_name)
    reason = impl.reason(device)
    if reason is not None:
        raise RuntimeError(f"{op}: implementation {_forced_name!r} cannot run here: {reason}")
    return impl


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Route diffcore's public functions through the implementation ``name`` instead of the
    dispatcher, e.g. ``with diffcore.use("triton"): diffcore.p_step(...)`` on CPU tensors runs the
    Triton kernel (under ``TRITON_INTERPRET=1``). Used by tests, bench and parity."""
    if name not in {n for impls in _REGISTRY.values() for n in impls}:
        raise ValueError(f"use: unknown implementation {name!r}")
    global _forced_name
    previous, _forced_name = _forced_name, name
    try:
        yield
    finally:
        _forced_name = previous
