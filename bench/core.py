"""What a family module declares, and the helpers it builds its providers with.

A family module ``bench/<family>.py`` defines::

    FAMILY = "diffusion"                 # its name for --only
    DESCRIPTION = "one line"
    TARGETS: list[Target]                # speed targets the issues name (may be empty)
    def cases(config: Config) -> list[Case]

A :class:`Case` is one group of providers timed together (interleaved, with their copy roofline):
one op on one workload in one variant (e.g. ``p_step`` on Amazon-book with given noise). Each
:class:`Provider` is one way to compute it (``diffcore:cpu`` in place, the eager reference, ...).
Speed-ups are taken against the providers of the same case that carry a baseline ``role``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import diffcore

ALLOCATING = "allocating"
IN_PLACE = "in-place"

# Baseline roles: speed-up columns are ratios against the case's provider with that role.
EAGER = "eager"  # the reference as people run it (eager, allocating)
COMPILE = "compile"  # torch.compile of that same code (allocating)
COMPILE_IN_PLACE = "compile-in-place"  # its best form: compiled, writing a preallocated tensor
ROOFLINE = "roofline"  # dst.copy_(src) moving the op's bytes, added by the harness to every case
# One plain torch op with the op's reads and a write of the same kind (fresh or in place): its
# speed-ups over the baselines show what that memory traffic alone allows here, against the same
# baselines in the same rounds, and a target's line quotes it. Not a hard ceiling: a kernel with
# other store or prefetch strategies can pass it.
SAME_BYTES = "same-bytes"

SUITES = ("quick", "full")  # "smoke" (tiny shapes, for the test suite) is accepted but not advertised

Inputs = dict[str, object]
Runner = Callable[[], torch.Tensor]  # one call of the op; returns the tensor it produced
Check = Callable[[Inputs, torch.Tensor], "str | None"]  # a description of the mismatch, or None


@dataclass(frozen=True)
class Config:
    suite: str
    dtype: torch.dtype
    threads: int
    repeat: int  # timed samples per provider
    warmup: int  # untimed calls per provider before calibration
    min_sample_s: float  # a sample repeats the call until it lasts at least this long
    compile_backend: str | None  # None: torch.compile providers are listed, not run (--no-compile)
    device: torch.device = torch.device("cpu")
    seed: int = 0
    malloc: str = "default"  # or what machine.steady_malloc applied (--malloc steady)


@dataclass(frozen=True)
class Workload:
    name: str  # targets name workloads by this, with the shape
    shape: tuple[int, ...]
    note: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        return f"{self.name} {' x '.join(f'{s:,}' for s in self.shape)}"


@dataclass
class Provider:
    name: str
    mode: str  # ALLOCATING or IN_PLACE
    setup: Callable[[Inputs], Runner] | None  # builds the timed callable, outside any timed region
    check: Check | None  # run on the provider's first output, before anything is timed
    role: str | None = None
    compiled: bool = False  # the first call compiles: reported as compile time, not timed
    unavailable: str | None = None  # why it cannot run here; listed, never silently dropped


@dataclass
class Case:
    family: str
    op: str
    workload: Workload
    variant: str  # e.g. "given noise", "seeded"
    bytes_moved: int  # bytes the op must read and write: the roofline copy moves as many
    make_inputs: Callable[[], Inputs]  # called once per case, outside timing
    providers: list[Provider]
    reset: Callable[[Inputs], None] = lambda inputs: None  # undoes what an in-place provider wrote
    notes: list[str] = field(default_factory=list)  # shown under the table (e.g. what is not timed)


@dataclass(frozen=True)
class Target:
    """A speed target: ``metric`` of one row must reach ``goal``.

    metric: ``vs_eager``, ``vs_compile``, ``vs_compile_in_place`` (ratios), ``copy_share``, or
    ``vs_provider``: the row's speed-up over the provider named ``baseline`` in the same case (in
    ``baseline_mode``, by default the row's own mode)."""

    family: str
    op: str
    workload: str
    shape: tuple[int, ...]
    variant: str
    mode: str
    provider: str
    metric: str
    goal: float
    dtype: torch.dtype = torch.float32
    threads: int | None = 2  # None: any thread count
    baseline: str | None = None  # metric "vs_provider": the provider compared with
    baseline_mode: str | None = None


# --- providers ----------------------------------------------------------------------------------
INTERPRETED_TRITON_MAX_ELEMENTS = 100_000


# The implementation diffcore's dispatcher runs for tensors of a device type. Its rows call the
# public function with nothing forced: `diffcore.use(name)` routes through the registry's out form,
# which allocates the output in Python, while the op allocates it in C++ (memory.h: from the block
# pool, and with DIFFCORE_HUGE_PAGES=1 advised as huge pages, which the forced path never does).
DISPATCHED = {"cpu": "cpu"}


def dispatched(device: torch.device) -> str:
    """The name of the implementation a public call runs on ``device`` (Triton off the CPU)."""
    return DISPATCHED.get(device.type, "triton")


def implementation_providers(
    op: str,
    config: Config,
    calls: dict[str, Callable[[Inputs], Runner]],
    checks: dict[str, Check],
    numel: int,
) -> tuple[list[Provider], list[str]]:
    """One provider per registered implementation of ``op`` and per mode in ``calls``, each run
    through ``diffcore.use(name)``, except the implementation the dispatcher itself runs on
    ``config.device`` (:data:`DISPATCHED`), whose rows make the public call exactly as users do;
    the registry's ``reference`` is skipped (the family times the reference directly, as people
    call it). Returns the providers and a note about the skip.

    Triton on CPU tensors runs in its interpreter (``TRITON_INTERPRET=1``), a correctness tool far
    too slow for real sizes: it runs only on workloads of at most
    :data:`INTERPRETED_TRITON_MAX_ELEMENTS` elements (the smoke suite)."""
    providers, notes = [], []
    for name, impl in diffcore.implementations(op).items():
        if name == "reference":
            notes.append(f"{op}: the registry's `reference` is not timed through the registry; "
                         "the eager reference rows run the same code as people call it")
            continue
        reason = impl.reason(config.device)
        if reason is None and name == "triton" and config.device.type == "cpu" \
                and numel > INTERPRETED_TRITON_MAX_ELEMENTS:
            reason = (f"Triton on CPU tensors runs interpreted (TRITON_INTERPRET=1), a correctness tool: "
                      f"run only up to {INTERPRETED_TRITON_MAX_ELEMENTS:,} elements (--suite smoke)")
        # Only DISPATCHED's entries make the public call: off the CPU the dispatcher may run the CUDA
        # binding rather than Triton (dispatched() names Triton there), so those rows force theirs.
        public = DISPATCHED.get(config.device.type) == name
        for mode, call in calls.items():
            providers.append(Provider(
                f"diffcore:{name}", mode, setup=call if public else _forced(name, call), check=checks[mode],
                unavailable=reason,
            ))
    return providers, notes


def _forced(name: str, call: Callable[[Inputs], Runner]) -> Callable[[Inputs], Runner]:
    def setup(inputs: Inputs) -> Runner:
        run = call(inputs)

        def forced() -> torch.Tensor:
            with diffcore.use(name):
                return run()

        return forced

    return setup


def compiled_provider(
    name: str,
    mode: str,
    fn: Callable,
    args: Callable[[Inputs], tuple],
    config: Config,
    *,
    role: str | None,
    check: Check | None,
    result: Callable[[Inputs, object], torch.Tensor] = lambda inputs, out: out,
) -> Provider:
    """``torch.compile(fn)`` called on ``args(inputs)``; compiled once per case (its first call,
    reported as compile time). ``result`` picks the tensor to check (e.g. the one written in place)."""
    backend = config.compile_backend
    label = name if backend in (None, "inductor") else name.replace("torch.compile", f"torch.compile[{backend}]")
    if backend is None:
        return Provider(label, mode, setup=None, check=None, role=role, unavailable="skipped (--no-compile)")

    def setup(inputs: Inputs) -> Runner:
        compiled = torch.compile(fn, backend=backend, dynamic=False)
        call_args = args(inputs)

        def run() -> torch.Tensor:
            return result(inputs, compiled(*call_args))

        return run

    return Provider(label, mode, setup=setup, check=check, role=role, compiled=True)


# --- correctness --------------------------------------------------------------------------------
TOLERANCES = {  # (rtol, atol) of an output against the float32 reference
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def mismatch(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "output") -> str | None:
    """None if ``got`` matches ``expected`` within ``dtype``'s tolerance, else what differs."""
    if tuple(got.shape) != tuple(expected.shape):
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    rtol, atol = TOLERANCES[dtype]
    got, expected = got.float(), expected.float()
    if not bool(torch.isfinite(got).all()):
        return f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values"
    err = (got - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        return (f"{what}: {int(bad.sum())} of {got.numel()} elements differ (max abs err {float(err.max()):.3g}; "
                f"first at flat index {i}: {float(got.reshape(-1)[i]):.7g} vs {float(expected.reshape(-1)[i]):.7g})")
    return None


def not_standard_normal(z: torch.Tensor, what: str = "noise", slack: float = 0.0) -> str | None:
    """None if ``z`` looks like standard normals (mean and standard deviation within 6 standard
    errors, plus ``slack``: the rounding of a low-precision output), else what is off. For providers
    whose noise comes from another generator, so values cannot be compared."""
    z = z.float().reshape(-1)
    n = z.numel()
    if n < 1000:
        return None  # too few values to say anything
    if not bool(torch.isfinite(z).all()):
        return f"{what}: non-finite values"
    mean, std = float(z.mean()), float(z.std())
    if abs(mean) > 6 / math.sqrt(n) + slack or abs(std - 1) > 6 / math.sqrt(2 * n) + 2e-3 + slack:
        return f"{what}: mean {mean:.4g}, std {std:.4g} over {n} values; expected standard normal"
    return None
