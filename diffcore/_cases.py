"""Parity cases and tolerances: the one table ``python -m diffcore.parity`` and the tests share.

Every op family owns one block below: a function decorated with :func:`family` that returns its
fixed, seeded :class:`Case` list. A case says how to run an implementation (a public call on a
device; the caller picks the implementation with ``diffcore.use``), how to compute the pure-PyTorch
reference, and the tolerance rule that judges the result. Tolerances therefore live with the ops,
not in the command or the tests (``tests/utils.py`` imports its rule from here).

Rules (``Close``, ``TwiceReference``; both report ``max |got - ref|`` and ``max |got - ref| /
max |ref|``, the normwise relative error):

- float32: close to the float32 reference, ``|got - ref| <= atol max(1, max |ref|) + rtol |ref|``
  elementwise, ``FP32_TOL = (rtol, atol)``; float64 likewise with ``FP64_TOL`` (float64 reference).
- float16 / bfloat16 (flash-attention's rule): ``max |got - ref32|`` at most
  ``LOW_PRECISION_FACTOR`` times the error of the reference run on the same low-precision inputs,
  both against the float32 reference (plus ``LOW_PRECISION_FLOOR`` for exact references).
- seeded noise: the stream agrees with the reference, and across backends (same seed and offset),
  to ``NOISE_ATOL``: a few ulp of log/sin/cos at ``|z| < 6`` (DESIGN.md "Noise").

A case with ``agreement`` set draws seeded noise; parity also compares its output on every backend
with the ``cpu`` implementation's output on CPU under that rule.

Adding a family is one block at the end of this file: its registered ops, and for each op
seeded cases over ``DTYPES``, odd shapes, ``LAYOUTS`` and the family's edge cases, e.g.::

    @family("sphere", ops=("sphere_expmap",), description="exp map on the unit sphere")
    def _sphere_cases(quick: bool) -> list[Case]:
        shapes = [(3, 2810), (7, 1001)] + ([] if quick else [(1, 1), (0, 64)])
        return [
            reference_case("sphere_expmap", f"expmap {_shape_name(s)}", dtype, randn_operands(s, 2, seed=1),
                           lambda device, x, v: diffcore.sphere.expmap(x, v), ref_sphere.expmap, layout=layout)
            for dtype in DTYPES for s in shapes for layout in LAYOUTS
        ]

``reference_case`` covers the usual pattern; a case whose inputs are not plain float operands
builds its :class:`Case` directly (see the random family).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import diffcore
from diffcore.reference import diffusion as ref_diffusion
from diffcore.reference.random import normal as philox_normal

__all__ = [
    "Case", "Close", "Family", "TwiceReference", "Verdict", "FAMILIES", "DTYPES", "FP32_TOL", "FP64_TOL",
    "LAYOUTS", "NOISE", "NOISE_ATOL", "arrange", "family", "family_of", "randn_operands", "reference_case",
    "rounded_noise", "standard_tolerance", "stream", "truth_dtype",
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_TOL = (1e-5, 1e-5)  # (rtol, atol) of a float32 result; atol scales with max(1, max |ref|)
FP64_TOL = (1e-10, 1e-10)  # the same for float64 (families whose ops take float64)
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-6
NOISE_ATOL = 2e-6  # seeded noise vs the reference and across backends: ~4 ulp of |z| in [4, 8)
LAYOUTS = ("contiguous", "row_stride", "column_major")


# --- tolerance rules ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    passed: bool
    abs_err: float  # max |got - ref| (nan when got has non-finite values where ref has none)
    rel_err: float  # abs_err / max |ref|
    message: str | None = None  # why it failed


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, float, float] | Verdict:
    if tuple(got.shape) != tuple(ref.shape):
        return Verdict(False, math.inf, math.inf, f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    if got.numel() == 0:
        return Verdict(True, 0.0, 0.0)
    g, r = got.detach().cpu().double(), ref.double()
    err = torch.where(g == r, 0.0, (g - r).abs())  # equal infinities are exact
    abs_err = float(err.max()) if not err.isnan().any() else math.nan
    ref_max = _finite_max(r)
    rel_err = abs_err / ref_max if ref_max > 0 else (0.0 if abs_err == 0 else math.inf)
    return err, abs_err, rel_err


def _finite_max(ref: torch.Tensor) -> float:
    """``max |ref|`` over its finite entries (0 when none)."""
    finite = ref.abs()[ref.isfinite()]
    return float(finite.max()) if finite.numel() else 0.0


@dataclass(frozen=True)
class Close:
    """Elementwise ``|got - ref| <= atol * s + rtol * |ref|``, ``s = max(1, max |ref|)`` when
    ``scaled`` (else 1)."""

    rtol: float
    atol: float
    scaled: bool = True
    needs_same_dtype = False

    def check(self, got: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor | None = None) -> Verdict:
        res = _errors(got, ref)
        if isinstance(res, Verdict):
            return res
        err, abs_err, rel_err = res
        ref64 = ref.double()
        scale = max(1.0, _finite_max(ref64)) if self.scaled else 1.0
        bad = ~((err == 0) | (err <= self.atol * scale + self.rtol * ref64.abs()))  # nan counts as bad
        if not bool(bad.any()):
            return Verdict(True, abs_err, rel_err)
        i = int(bad.reshape(-1).nonzero()[0])
        g, r = float(got.reshape(-1)[i]), float(ref64.reshape(-1)[i])
        return Verdict(False, abs_err, rel_err, f"{int(bad.sum())} of {got.numel()} elements outside {self} "
                       f"(first at flat index {i}: {g:.7g} vs {r:.7g})")

    def __str__(self) -> str:
        atol = f"{self.atol:.0e}*max(1,|ref|)" if self.scaled else f"{self.atol:.0e}"
        return f"atol {atol}" + (f", rtol {self.rtol:.0e}" if self.rtol else "")


@dataclass(frozen=True)
class TwiceReference:
    """``max |got - ref32| <= factor * max |same_dtype - ref32| + floor``: ``same_dtype`` is the
    reference run on the inputs rounded to the low-precision dtype, its result in that dtype."""

    factor: float = LOW_PRECISION_FACTOR
    floor: float = LOW_PRECISION_FLOOR
    needs_same_dtype = True

    def check(self, got: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor | None = None) -> Verdict:
        if same_dtype is None:
            raise ValueError("TwiceReference: needs the same-dtype reference")
        res = _errors(got, ref)
        if isinstance(res, Verdict):
            return res
        _, abs_err, rel_err = res
        ref_err = float((same_dtype.double() - ref.double()).abs().max())
        limit = self.factor * ref_err + self.floor
        if abs_err <= limit:
            return Verdict(True, abs_err, rel_err)
        return Verdict(False, abs_err, rel_err, f"error {abs_err:.3g} > {self.factor:g} x same-dtype "
                       f"reference error {ref_err:.3g} + {self.floor:g}")

    def __str__(self) -> str:
        return f"<= {self.factor:g}x same-dtype ref err"


Tolerance = Close | TwiceReference


def standard_tolerance(dtype: torch.dtype) -> Tolerance:
    """float32: ``Close(*FP32_TOL)``; float64: ``Close(*FP64_TOL)``; float16/bfloat16:
    ``TwiceReference()``."""
    if dtype == torch.float64:
        return Close(*FP64_TOL)
    return Close(*FP32_TOL) if dtype == torch.float32 else TwiceReference()


def truth_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference runs in to give the truth for ``dtype`` inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


NOISE = Close(0.0, NOISE_ATOL, scaled=False)


def rounded_noise(dtype: torch.dtype) -> Tolerance:
    """The stream rounded to a low-precision dtype: within one rounding of the float32 stream."""
    return Close(torch.finfo(dtype).eps, 1e-6, scaled=False)


# --- cases and families -------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One seeded check of one op.

    ``run(device)`` makes the inputs on ``device`` and makes the public call (under
    ``diffcore.use(name)``, set by the caller), returning one tensor (an op with several outputs
    gets one case per output); ``reference()`` is the truth on CPU, computed in float32 (float64 for
    float64 cases); ``same_dtype_reference()`` the reference on the inputs rounded to ``dtype`` (for
    ``TwiceReference``); ``agreement``: the bound between backends, for seeded-noise cases."""

    op: str  # the registered op the call exercises, e.g. "diffusion_step"
    name: str  # what it computes, e.g. "p_step t=T-1 7x1001 column_major"
    dtype: torch.dtype  # of the inputs
    run: Callable[[torch.device], torch.Tensor]
    reference: Callable[[], torch.Tensor]
    tolerance: Tolerance
    same_dtype_reference: Callable[[], torch.Tensor] | None = None
    agreement: Tolerance | None = None
    out_dtype: torch.dtype | None = None  # of the output, when it is not ``dtype``

    def check(self, got: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor | None = None) -> Verdict:
        expected = self.out_dtype or self.dtype
        if got.dtype != expected:
            return Verdict(False, math.nan, math.nan, f"dtype {got.dtype}, expected {expected}")
        return self.tolerance.check(got, ref, same_dtype)


@dataclass(frozen=True)
class Family:
    name: str  # what --only takes
    ops: tuple[str, ...]  # the registered ops its cases exercise
    description: str
    make_cases: Callable[[bool], list[Case]]

    def cases(self, quick: bool = False) -> list[Case]:
        cases = self.make_cases(quick)
        stray = {c.op for c in cases} - set(self.ops)
        if stray:
            raise ValueError(f"family {self.name}: cases for ops it does not declare: {sorted(stray)}")
        return cases


FAMILIES: dict[str, Family] = {}


def family(name: str, *, ops: Sequence[str], description: str):
    """Registers the decorated ``cases(quick: bool) -> list[Case]`` as the family ``name``."""

    def register(make_cases: Callable[[bool], list[Case]]) -> Callable[[bool], list[Case]]:
        FAMILIES[name] = Family(name, tuple(ops), description, make_cases)
        return make_cases

    return register


def family_of(op: str) -> Family | None:
    return next((f for f in FAMILIES.values() if op in f.ops), None)


# --- helpers for family blocks ------------------------------------------------------------------
def arrange(x: torch.Tensor, layout: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The values of the 2-D ``x`` on ``device`` laid out as ``contiguous``, ``row_stride`` (rows
    padded by 5 elements) or ``column_major``."""
    x = x.to(device) if device is not None else x
    if layout == "contiguous":
        return x.clone()
    if layout == "row_stride":
        wide = torch.zeros(x.shape[0], x.shape[1] + 5, dtype=x.dtype, device=x.device)
        wide[:, : x.shape[1]] = x
        return wide[:, : x.shape[1]]
    if layout == "column_major":
        return x.t().contiguous().t()
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def randn_operands(shape: tuple[int, ...], count: int, seed: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    """``count`` float32 standard-normal CPU tensors of ``shape`` from ``torch.Generator(seed)``."""

    @functools.cache
    def make() -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(shape, generator=g) for _ in range(count))

    return make


def reference_case(
    op: str,
    name: str,
    dtype: torch.dtype,
    operands: Callable[[], Sequence[torch.Tensor | None]],
    call: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    *,
    layout: str = "contiguous",
    tolerance: Tolerance | None = None,
    agreement: Tolerance | None = None,
    out_dtype: torch.dtype | None = None,
) -> Case:
    """The usual case: ``call(device, *ops)`` with the float32 ``operands()`` cast to ``dtype``,
    laid out as ``layout`` on ``device``, against ``reference(*operands())`` on CPU in
    ``truth_dtype(dtype)`` (the truth); for ``TwiceReference``, also ``reference`` on the operands
    rounded to ``dtype``, its result rounded to ``dtype``.

    ``operands()``: the float tensors (2-D unless ``layout`` is ``contiguous``; None: absent).
    Other arguments (timesteps, schedules, graphs) live in the closures of ``call``, which moves
    them to ``device``, and ``reference``, which takes them on CPU."""
    tolerance = standard_tolerance(dtype) if tolerance is None else tolerance

    def run(device: torch.device) -> torch.Tensor:
        return call(device, *(None if v is None else arrange(v.to(dtype), layout, device) for v in operands()))

    def truth() -> torch.Tensor:
        return reference(*(None if v is None else v.to(truth_dtype(dtype), copy=True) for v in operands()))

    def same_dtype() -> torch.Tensor:
        return reference(*(None if v is None else v.to(dtype, copy=True) for v in operands())).to(dtype)

    return Case(op, f"{name} {layout}", dtype, run, truth, tolerance,
                same_dtype if tolerance.needs_same_dtype else None, agreement, out_dtype)


@functools.lru_cache(maxsize=64)
def stream(n: int, seed: int, offset: int) -> torch.Tensor:
    """Elements ``0 .. n-1`` of the reference Philox stream ``(seed, offset)`` (cached: the reference
    generator is slow; callers must not modify the result)."""
    return philox_normal(n, seed, offset)


def _shape_name(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


# === family: random ==============================================================================
@family("random", ops=("random_normal",), description="the Philox normal stream (diffcore.random.randn_)")
def _random_cases(quick: bool) -> list[Case]:
    seeds = [(0, 0), (2**63 + 99, 3), (2**64 - 1, 2**32 - 2)]  # the last crosses the 2^32 counter
    if not quick:
        seeds += [(1234, 0), (1234, 3), (0, 2**32 - 2), (2**64 - 1, 0)]
    n = 1037 if quick else 10_007  # odd: a partial group of 4 at the end
    draws = [((n,), "contiguous", s, o) for s, o in seeds]
    draws += [
        ((3, 2810), "column_major", 11, 0),  # element i is the row-major index, not memory order
        ((7, 1001), "row_stride", 5, 7),
        ((1,), "contiguous", 3, 1),
        ((0,), "contiguous", 3, 1),
    ]
    cases = []
    for dtype in DTYPES:
        for shape, layout, seed, offset in draws if dtype == torch.float32 else draws[-4:-1]:
            cases.append(_random_case(shape, layout, seed, offset, dtype))
    return cases


def _random_case(shape: tuple[int, ...], layout: str, seed: int, offset: int, dtype: torch.dtype) -> Case:
    def run(device: torch.device) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        if len(shape) == 2:
            out = arrange(out, layout)
        return diffcore.random.randn_(out, seed=seed, offset=offset)

    def reference() -> torch.Tensor:
        return stream(math.prod(shape), seed, offset).reshape(shape)

    fp32 = dtype == torch.float32
    tol = NOISE if fp32 else rounded_noise(dtype)
    name = f"randn_ {_shape_name(shape)} {layout} seed={seed} offset={offset}"
    return Case("random_normal", name, dtype, run, reference, tol, agreement=NOISE if fp32 else None)


# === family: diffusion ===========================================================================
T_DIFFREC = 40  # DiffRec's ML-1M setting: linear-var, 40 steps, float64 tables


_SCHEDULES = {
    "diffrec": lambda: diffcore.Schedule.linear_var(T_DIFFREC, 0.1, 0.0005, 0.005),
    "dreamrec": lambda: diffcore.Schedule.linear(50, dtype=torch.float32),  # DreamRec's float32 tables
}


@functools.cache
def _schedule(name: str, device: str = "cpu") -> diffcore.Schedule:
    return _SCHEDULES[name]() if device == "cpu" else _schedule(name).to(device)


def _timesteps(kind: str, rows: int, T: int) -> int | torch.Tensor:
    if kind == "0":
        return 0
    if kind == "T-1":
        return T - 1
    if kind == "17":
        return 17
    if kind == "(1,)":
        return torch.tensor([T - 1])
    if kind == "clamp":  # DDRM: t >= T maps to T - 1
        return torch.arange(rows) % 3 + T - 1
    g = torch.Generator().manual_seed(rows)  # "row": one timestep per row, 0 and T-1 included
    t = torch.randint(0, T, (rows,), generator=g)
    t[: min(rows, 2)] = torch.tensor([0, T - 1])[: min(rows, 2)]
    return t


def _t_on(t: int | torch.Tensor, device: torch.device) -> int | torch.Tensor:
    return t.to(device) if isinstance(t, torch.Tensor) else t


@family("diffusion", ops=("diffusion_step",), description="q_sample, p_step, p_step_, ddim_step; given, seeded noise")
def _diffusion_cases(quick: bool) -> list[Case]:
    layouts = [("contiguous", "row_stride", "column_major")[i % 3] for i in range(20)]
    shaped = [((3, 2810), "column_major"), ((7, 1001), "row_stride"), ((1, 1), "contiguous")]
    if not quick:
        shaped = [(s, lay) for s in ((3, 2810), (7, 1001), (1, 1)) for lay in LAYOUTS]
        shaped.append(((400, 2810), "row_stride"))  # DiffRec's ML-1M batch
    wide = (5, 257) if quick else (7, 1001)  # the edge and mode cases
    cases = []
    for dtype in DTYPES:
        for shape, layout in shaped:
            cases.append(_p_step_case(dtype, shape, layout, "row"))
        edge = [
            _p_step_case(dtype, wide, layouts[0], "0"),
            _p_step_case(dtype, wide, layouts[1], "T-1"),
            _p_step_case(dtype, wide, layouts[2], "(1,)"),
            _p_step_case(dtype, wide, layouts[3], "clamp", clamp_t=True),
            _p_step_case(dtype, wide, layouts[4], "row", prediction="eps", variance="beta", guidance=2.5),
            _p_step_case(dtype, (5, 64), layouts[5], "row", variance="none", guidance=2.5, dreamrec=True),
            _p_step_case(dtype, wide, layouts[6], "17", in_place=True),
            _p_step_case(dtype, (0, 10), "contiguous", "17"),  # empty batch
            _p_step_case(dtype, (3, 0), "contiguous", "17"),  # rows without items
            _q_sample_case(dtype, wide, layouts[7]),
            _ddim_case(dtype, wide, layouts[8], 30, 20, eta=0.7, prediction="eps"),
            _ddim_case(dtype, wide, layouts[9], 30, 20, eta=0.7, prediction="x0"),
            _ddim_case(dtype, wide, layouts[14], 5, -1, eta=0.0, prediction="eps"),  # to the data
            # seeded noise at offsets (the last crosses the 2^32 boundary of the counter)
            _p_step_case(dtype, wide, layouts[10], "row", seed=0, offset=0),
            _p_step_case(dtype, wide, layouts[11], "row", seed=2**64 - 1, offset=2**32 - 2),
            _q_sample_case(dtype, wide, layouts[12], seed=9, offset=11),
            _ddim_case(dtype, wide, layouts[13], 30, 20, eta=0.7, prediction="eps", seed=5, offset=3),
            _p_step_case(dtype, (0, 10), "contiguous", "17", seed=1, offset=0),
        ]
        cases += edge
    return cases


def _seed_name(seed: int | None, offset: int) -> str:
    return "" if seed is None else f" seed={seed} offset={offset}"


def _diffusion_case(dtype, name, shape, layout, operands, call, reference, seed, tolerance=None) -> Case:
    fp32_seeded = seed is not None and dtype == torch.float32
    agreement = Close(0.0, NOISE_ATOL) if fp32_seeded else None  # c z differs by c * NOISE_ATOL at most
    return reference_case("diffusion_step", f"{name} {_shape_name(shape)}", dtype, operands, call, reference,
                          layout=layout, tolerance=tolerance, agreement=agreement)


def _p_step_case(
    dtype: torch.dtype,
    shape: tuple[int, int],
    layout: str,
    t_kind: str,
    *,
    prediction: str = "x0",
    variance: str = "posterior",
    guidance: float = 0.0,
    clamp_t: bool = False,
    dreamrec: bool = False,
    in_place: bool = False,
    seed: int | None = None,
    offset: int = 0,
) -> Case:
    """``p_step`` (``p_step_`` when ``in_place``) with given noise, or seeded noise when ``seed``."""
    which = "dreamrec" if dreamrec else "diffrec"
    schedule = _schedule(which)
    t = _timesteps(t_kind, shape[0], schedule.num_steps)
    operands = randn_operands(shape, 4 if seed is None else 3, seed=zlib.crc32(f"{shape} {t_kind} {guidance}".encode()))
    kwargs = dict(prediction=prediction, variance=variance, clamp_t=clamp_t)

    def call(device, x, m, u, z=None):
        fn = diffcore.p_step_ if in_place else diffcore.p_step
        return fn(x, m, _t_on(t, device), _schedule(which, str(device)), uncond_out=u if guidance else None,
                  guidance_scale=guidance, noise=z, seed=seed, offset=offset, **kwargs)

    def reference(x, m, u, z=None):
        if seed is not None:
            z = stream(x.numel(), seed, offset).reshape(x.shape)
        return ref_diffusion.p_step(x, m, t, schedule, uncond_out=u if guidance else None, guidance_scale=guidance,
                                    noise=z, **kwargs)

    name = "p_step_" if in_place else "p_step"
    name += f" t={t_kind}" + ("" if prediction == "x0" else f" {prediction}")
    name += "" if variance == "posterior" else f" var={variance}"
    name += f" w={guidance:g}" if guidance else ""
    name += " dreamrec-fp32-tables" if dreamrec else ""
    return _diffusion_case(dtype, name + _seed_name(seed, offset), shape, layout, operands, call, reference, seed)


def _q_sample_case(dtype, shape, layout, *, seed=None, offset=0) -> Case:
    schedule = _schedule("diffrec")
    t = _timesteps("row", shape[0], schedule.num_steps)
    operands = randn_operands(shape, 2 if seed is None else 1, seed=17 + (seed or 0))

    def call(device, x, z=None):
        schedule_here = _schedule("diffrec", str(device))
        return diffcore.q_sample(x, _t_on(t, device), schedule_here, noise=z, seed=seed, offset=offset)

    def reference(x, z=None):
        if seed is not None:
            z = stream(x.numel(), seed, offset).reshape(x.shape)
        return ref_diffusion.q_sample(x, t, schedule, z)

    return _diffusion_case(dtype, "q_sample t=row" + _seed_name(seed, offset), shape, layout, operands, call,
                           reference, seed)


def _ddim_case(dtype, shape, layout, t, t_prev, *, eta, prediction, seed=None, offset=0) -> Case:
    schedule = _schedule("diffrec")
    operands = randn_operands(shape, 3 if seed is None else 2, seed=23 + t)

    def call(device, x, m, z=None):
        return diffcore.ddim_step(x, m, t, t_prev, _schedule("diffrec", str(device)), eta=eta, prediction=prediction,
                                  noise=z, seed=seed, offset=offset)

    def reference(x, m, z=None):
        if seed is not None:
            z = stream(x.numel(), seed, offset).reshape(x.shape)
        return ref_diffusion.ddim_step(x, m, t, t_prev, schedule, eta=eta, prediction=prediction, noise=z)

    tolerance = None
    if prediction == "x0" and dtype == torch.float32:
        # The reference gathers the tables as float32 before eps = (x - sqrt(ab) x0) / sqrt(1 - ab)
        # amplifies that rounding (4e-4 at t = 30 here, 3e-3 at t = 1); the fused float64
        # coefficients do not (tests/test_diffusion.py checks them against DDIM in float64 to 2e-6).
        tolerance = Close(1e-3, 1e-3)
    name = f"ddim_step {t}->{t_prev} {prediction} eta={eta:g}" + _seed_name(seed, offset)
    return _diffusion_case(dtype, name, shape, layout, operands, call, reference, seed, tolerance)


# === family: sparse ==============================================================================
@functools.cache
def _sparse_graph(kind: str) -> diffcore.sparse.Adjacency:
    """``bipartite``: LightGCN's graph with isolated users and items and a hub user (every item);
    ``directed``: a weighted non-symmetric graph with empty rows (its backward needs the transpose)."""
    g = torch.Generator().manual_seed(31)
    if kind == "bipartite":
        users = torch.cat([torch.randint(1, 9, (40,), generator=g), torch.zeros(15, dtype=torch.long)])
        items = torch.cat([torch.randint(0, 12, (40,), generator=g), torch.arange(15)])
        return diffcore.sparse.Adjacency.from_interactions(users, items, 11, 15)
    rows, cols = torch.randint(0, 20, (70,), generator=g), torch.randint(0, 23, (70,), generator=g)
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.rand(70, generator=g) + 0.5, (23, 23),
                                  check_invariants=True)
    return diffcore.sparse.Adjacency.from_torch(coo, norm="sym", index_dtype=torch.int64)


@family("sparse", ops=("sparse_spmm", "sparse_propagate"),
        description="normalised CSR SpMM and LightGCN stacks (diffcore.sparse.spmm, propagate)")
def _sparse_cases(quick: bool) -> list[Case]:
    from diffcore.reference import sparse as ref_sparse

    graphs = ["bipartite"] if quick else ["bipartite", "directed"]
    layouts = ["column_major"] if quick else list(LAYOUTS)
    width = 5 if quick else 37
    combines = [("mean", 3)] if quick else [("mean", 3), ("last", 2), ((0.5, 0.0, 2.0), 2)]
    cases = []
    for kind in graphs:
        adj = _sparse_graph(kind)
        operands = randn_operands((adj.num_nodes, width), 1, seed=41)
        for dtype in DTYPES:
            for layout in layouts:
                cases.append(reference_case(
                    "sparse_spmm", f"spmm {kind}", dtype, operands,
                    lambda device, x, adj=adj: diffcore.sparse.spmm(adj.to(device), x),
                    lambda x, adj=adj: ref_sparse.spmm(adj.to_sparse_coo(x.dtype), x), layout=layout,
                ))
                for combine, layers in combines:
                    weights = None if combine == "mean" else diffcore.sparse._layer_weights(combine, layers)
                    cases.append(reference_case(
                        "sparse_propagate", f"propagate {kind} L={layers} {combine}", dtype, operands,
                        lambda device, x, adj=adj, c=combine, k=layers: diffcore.sparse.propagate(
                            adj.to(device), x, k, list(c) if isinstance(c, tuple) else c),
                        lambda x, adj=adj, w=weights, k=layers: ref_sparse.propagate(
                            adj.to_sparse_coo(x.dtype), x, k, w),
                        layout=layout,
                    ))
    return cases


# === family: sphere ==============================================================================
@functools.cache
def _sphere_operands(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, ...]:
    """Points x, vectors v and points y (float32, off the sphere) with the family's edge rows:
    v = 0, y = x, y = -x (antipodal), y next to x, y = 2x."""
    g = torch.Generator().manual_seed(seed)
    x, v, y = (torch.randn(shape, generator=g) for _ in range(3))
    for row, edit in enumerate((lambda: v[0].zero_(), lambda: y[1].copy_(x[1]), lambda: y[2].copy_(-x[2]),
                                lambda: y[3].copy_(x[3] + 1e-3 * v[3]), lambda: y[4].copy_(2 * x[4]))):
        if row < shape[0]:
            edit()
    return x, v, y


@family("sphere", ops=("sphere_normalize", "sphere_project", "sphere_expmap", "sphere_logmap",
                       "sphere_geodesic_distance", "sphere_q_sample", "sphere_p_step"),
        description="normalize, project, expmap, logmap, geodesic_distance, q_sample, p_step; edge rows")
def _sphere_cases(quick: bool) -> list[Case]:
    from diffcore import sphere
    from diffcore.reference import sphere as ref_sphere

    shapes = [(6, 63)] if quick else [(6, 63), (7, 257), (5, 1), (6, 3)]
    layouts = ["column_major"] if quick else list(LAYOUTS)
    maps = {  # op: (public call, reference, operands picked from (x, v, y))
        "normalize": (sphere.normalize, ref_sphere.normalize, (0,)),
        "project": (sphere.project, ref_sphere.project, (0, 1)),
        "expmap": (sphere.expmap, ref_sphere.expmap, (0, 1)),
        "logmap": (sphere.logmap, ref_sphere.logmap, (0, 2)),
        "geodesic_distance": (sphere.geodesic_distance, ref_sphere.geodesic_distance, (0, 2)),
    }
    schedule = diffcore.Schedule.linear(50)
    cases = []
    for dtype in DTYPES:
        for shape in shapes:
            t = torch.arange(shape[0]) * 7 % 50
            for layout in layouts:
                for op, (call, reference, picks) in maps.items():
                    cases.append(reference_case(
                        f"sphere_{op}", f"{op} {_shape_name(shape)}", dtype,
                        lambda s=shape, p=picks: tuple(_sphere_operands(s, 51)[i] for i in p),
                        lambda device, *a, call=call: call(*a), reference, layout=layout,
                    ))
                for seed in (None, 2**63 + 3):
                    cases += _sphere_step_cases(dtype, shape, layout, t, schedule, seed)
    return cases


def _sphere_step_cases(dtype, shape, layout, t, schedule, seed) -> list[Case]:
    """q_sample and p_step (eps prediction, guidance) with given noise, or seeded noise at an offset."""
    from diffcore import sphere
    from diffcore.reference import sphere as ref_sphere

    offset = 5
    seeded = seed is not None
    operands = (lambda: _sphere_operands(shape, 52)[:2]) if seeded else (lambda: _sphere_operands(shape, 52))

    def noise(z: torch.Tensor | None) -> torch.Tensor:  # the given z, or the stream (float32, as drawn)
        return stream(math.prod(shape), seed, offset).reshape(shape) if seeded else z

    def kwargs() -> dict:
        return {"seed": seed, "offset": offset} if seeded else {}

    def q_call(device, x, v, z=None):
        return sphere.q_sample(x, t.to(device), schedule.to(device), noise=z, **kwargs())

    def q_ref(x, v, z=None):
        return ref_sphere.q_sample(x, t, schedule, noise(z))

    def p_call(device, x, m, z=None):
        return sphere.p_step(x, m, t.to(device), schedule.to(device), prediction="eps", uncond_out=x,
                             guidance_scale=0.5, noise=z, **kwargs())

    def p_ref(x, m, z=None):
        return ref_sphere.p_step(x, m, t, schedule, prediction="eps", uncond_out=x, guidance_scale=0.5,
                                 noise=noise(z))

    agreement = Close(0.0, NOISE_ATOL) if seeded and dtype == torch.float32 else None
    name = _shape_name(shape) + _seed_name(seed, offset)
    return [
        reference_case("sphere_q_sample", f"q_sample {name}", dtype, operands, q_call, q_ref, layout=layout,
                       agreement=agreement),
        reference_case("sphere_p_step", f"p_step {name}", dtype, operands, p_call, p_ref, layout=layout,
                       agreement=agreement),
    ]


# === family: sde =================================================================================
_SDE_SNR = 0.16


@functools.cache
def _sde(kind: str, device: str = "cpu"):
    """score_sde's default VE (0.01, 50, 1000), VP and sub-VP (0.1, 20, 1000) SDEs."""
    from diffcore import sde

    if device != "cpu":
        return _sde(kind).to(device)
    return {"ve": sde.VESDE, "vp": sde.VPSDE, "subvp": sde.subVPSDE}[kind]()


def _sde_time(kind: str, rows: int) -> float | torch.Tensor:
    """``float``: one time for every row; ``row``: one per row, the ends 0 and 1 included."""
    if kind == "float":
        return 0.37
    t = torch.rand(rows, generator=torch.Generator().manual_seed(rows)) * 0.98 + 0.01
    t[: min(rows, 2)] = torch.tensor([0.0, 1.0])[: min(rows, 2)]
    return t


@family("sde", ops=("sde_step",),
        description="langevin_step, reverse_diffusion_step, euler_maruyama_step (x and x_mean); VE, VP, sub-VP")
def _sde_cases(quick: bool) -> list[Case]:
    shaped = [((5, 128), "column_major")]
    if not quick:
        shaped += [((7, 1001), "row_stride"), ((1, 1), "contiguous"), ((3, 67), "contiguous")]
    steps = ("langevin", "reverse_diffusion", "euler_maruyama")
    cases = []
    for dtype in DTYPES:
        for shape, layout in shaped:
            for i, (kind, step) in enumerate((k, s) for k in ("ve", "vp", "subvp") for s in steps):
                outputs = (i % 2,) if quick else (0, 1)
                for output in outputs:
                    cases.append(_sde_step_case(dtype, shape, layout, kind, step, output, ("float", "row")[i % 2]))
        wide = shaped[0]
        cases += [  # seeded noise at offsets (the last crosses the 2^32 boundary of the counter)
            _sde_step_case(dtype, *wide, "vp", "langevin", 0, "row", seed=0, offset=0),
            _sde_step_case(dtype, *wide, "ve", "reverse_diffusion", 0, "float", seed=2**64 - 1, offset=2**32 - 2),
        ]
    return cases


def _sde_step_case(dtype, shape, layout, kind, step, output, t_kind, *, seed=None, offset=0) -> Case:
    """``output`` 0 (x) or 1 (x_mean) of the public ``step`` with given noise, or seeded noise."""
    from diffcore import sde
    from diffcore.reference import sde as ref_sde

    t = _sde_time(t_kind, shape[0])
    dt = -1e-3
    operands = randn_operands(shape, 3 if seed is None else 2, seed=zlib.crc32(f"sde {shape} {kind} {step}".encode()))

    def call(device, x, s, z=None):
        the_sde, t_here = _sde(kind, str(device)), _t_on(t, device)
        kw = dict(noise=z, seed=seed, offset=offset)
        if step == "langevin":
            return sde.langevin_step(x, s, _SDE_SNR, the_sde, t=t_here, **kw)[output]
        if step == "reverse_diffusion":
            return sde.reverse_diffusion_step(x, s, t_here, the_sde, **kw)[output]
        return sde.euler_maruyama_step(x, s, t_here, dt, the_sde, **kw)[output]

    def reference(x, s, z=None):
        if seed is not None:
            z = stream(x.numel(), seed, offset).reshape(x.shape)
        if step == "langevin":
            return ref_sde.langevin_step(x, s, _SDE_SNR, _sde(kind), t, z)[output]
        if step == "reverse_diffusion":
            return ref_sde.reverse_diffusion_step(x, s, t, _sde(kind), z)[output]
        return ref_sde.euler_maruyama_step(x, s, t, dt, _sde(kind), z)[output]

    # seeded, float32: the backends agree to the stream's few ulp (the corrector's batch factor too)
    agreement = Close(1e-6, NOISE_ATOL) if seed is not None and dtype == torch.float32 else None
    name = f"{step} {kind} t={t_kind} {('x', 'x_mean')[output]} {_shape_name(shape)}" + _seed_name(seed, offset)
    return reference_case("sde_step", name, dtype, operands, call, reference, layout=layout, agreement=agreement)


# === family: training ============================================================================
# DiffRec's diffusion loss (its float64 weights, t = 0 cases, pt) and Lt_history, LightGCN's BPR
# loss (index and rows forms, the L2 term), SGL's InfoNCE: each against the transcription of the
# code people run (diffcore.reference.training), values and gradients (the ``*_backward`` ops;
# a gradient case returns d/d operands of ``sum(loss * weights)`` through the public call).
from diffcore.reference import training as ref_training  # noqa: E402

TRAINING_OPS = (
    "training_diffusion_loss", "training_diffusion_loss_backward", "training_history_update",
    "training_bpr_loss", "training_bpr_loss_backward", "training_info_nce", "training_info_nce_backward",
)


@family("training", ops=TRAINING_OPS,
        description="diffusion_loss, TimestepSampler.update, bpr_loss, info_nce; values and gradients")
def _training_cases(quick: bool) -> list[Case]:
    cases = []
    loss_shapes = [((5, 257), "row_stride"), ((3, 2810), "column_major")]
    if not quick:
        loss_shapes += [((7, 1001), lay) for lay in LAYOUTS] + [((1, 1), "contiguous"), ((0, 10), "contiguous")]
    for dtype in DTYPES:
        for shape, layout in loss_shapes:
            if shape != (1, 1) or dtype == torch.float32:  # one element in low precision: the rule would
                cases.append(_loss_case(dtype, shape, layout, "x0", True, True))  # compare rounding luck
        cases += [
            _loss_case(dtype, (5, 257), "contiguous", "eps", True, True),  # the t = 0 likelihood row
            _loss_case(dtype, (5, 257), "column_major", "eps", False, False),
            _loss_case(dtype, (4, 99), "contiguous", "x0", False, False),
            _loss_case(dtype, (5, 257), "row_stride", "x0", True, True, grad=True),
            _loss_case(dtype, (5, 257), "column_major", "eps", True, False, grad=True),
        ]
        cases += [
            _bpr_case(dtype, "indices", True, 1e-2, "mean", "contiguous"),
            _bpr_case(dtype, "indices", False, 1e-1, "none", "row_stride"),
            _bpr_case(dtype, "rows", True, 1e-2, "sum", "column_major"),
            _bpr_case(dtype, "indices", True, 1e-2, "mean", "row_stride", grad=True),
            _bpr_case(dtype, "rows", False, 1e-1, "none", "contiguous", grad=True),
            _nce_case(dtype, (37, 64), "cosine", False, "mean", "contiguous"),
            _nce_case(dtype, (19, 5), "dot", True, "none", "column_major", temperature=0.5),
            _nce_case(dtype, (37, 64), "cosine", False, "mean", "row_stride", grad=True),
            _nce_case(dtype, (19, 5), "dot", True, "sum", "contiguous", grad=True, temperature=0.5),
        ]
        if not quick:
            cases += [
                _bpr_case(dtype, "indices", False, 0.0, "sum", "column_major", grad=True),
                _bpr_case(dtype, "rows", True, 1e-2, "mean", "row_stride", grad=True),
                _nce_case(dtype, (100, 64), "cosine", True, "mean", "column_major", temperature=0.05),
                _nce_case(dtype, (1, 3), "cosine", False, "none", "contiguous", grad=True),
            ]
    cases += [_history_case(s) for s in ((0, 1) if quick else (0, 1, 2, 3))]
    return cases


def _weights(n: int, seed: int) -> torch.Tensor:
    """Upstream gradient weights of a gradient case: ``sum(loss * w)``."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loss_case(dtype, shape, layout, prediction, reweight, with_pt, *, grad=False) -> Case:
    schedule = _schedule("diffrec")
    rows = shape[0]
    t = _timesteps("row", rows, schedule.num_steps)
    g = torch.Generator().manual_seed(rows + 3)
    pt = torch.rand(rows, generator=g, dtype=torch.float64) + 0.05 if with_pt else None
    w = _weights(rows, 7)
    operands = randn_operands(shape, 3, seed=zlib.crc32(f"loss {shape} {prediction}".encode()))
    kwargs = dict(prediction=prediction, reweight=reweight)

    def call(device, m, x, z):
        sched = _schedule("diffrec", str(device))
        pt_here = None if pt is None else pt.to(device)
        if grad:
            m = m.detach().requires_grad_()
        loss = diffcore.training.diffusion_loss(m, x, z, _t_on(t, device), sched, pt=pt_here, **kwargs)
        if not grad:
            return loss
        (loss * w.to(device)).sum().backward()
        return m.grad

    def reference(m, x, z):
        m = m.detach().requires_grad_(grad)
        loss = ref_training.training_losses(m, x, z, t, schedule, **kwargs).double()
        loss = loss if pt is None else loss / pt
        if not grad:
            return loss
        (g_m,) = torch.autograd.grad((loss * w).sum(), m)
        return g_m

    op = "training_diffusion_loss" + ("_backward" if grad else "")
    name = f"{'d/dm ' if grad else ''}diffusion_loss {prediction}{'' if reweight else ' no-reweight'}"
    name += f"{' pt' if with_pt else ''} {_shape_name(shape)}"
    return reference_case(op, name, dtype, operands, call, reference, layout=layout,
                          out_dtype=None if grad else torch.float64)


_BPR_SIZES = (13, 17, 29, 8)  # users, items, batch, d (odd: a partial vector at the end)


def _bpr_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    n_users, n_items, batch, _ = _BPR_SIZES
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users, (batch,), generator=g)
    pos = torch.randint(0, n_items, (batch,), generator=g)
    neg = torch.randint(0, n_items, (batch,), generator=g)
    neg[:2] = pos[:2]  # a row whose positive is its negative
    return users, pos, neg


def _bpr_case(dtype, form, ego, weight_decay, reduction, layout, *, grad=False) -> Case:
    """LightGCN's ``bpr_loss`` (+ ``weight_decay * reg_loss``): index form over (user, item)
    tables, or rows form over gathered (B, d) rows; gradients of every table."""
    n_users, n_items, batch, d = _BPR_SIZES
    users, pos, neg = _bpr_inputs(31)
    w = _weights(batch, 9)[: batch if reduction == "none" else 1].reshape(-1 if reduction == "none" else ())

    @functools.cache
    def make() -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(5)
        tables = [torch.randn(n, d, generator=g) for n in (n_users, n_items, n_users, n_items)]
        if form == "indices":
            return tuple(tables)
        U, I, U0, I0 = tables
        return U[users], I[pos], I[neg], U0[users], I0[pos], I0[neg]

    def call(device, *ops):
        ops = [v.detach().requires_grad_(grad) for v in ops]
        if form == "indices":
            U, I, U0, I0 = ops
            idx = [v.to(device) for v in (users, pos, neg)]
            loss = diffcore.training.bpr_loss((U, I), *idx, ego=(U0, I0) if ego else None, weight_decay=weight_decay,
                                              reduction=reduction)
        else:
            loss = diffcore.training.bpr_loss(*ops[:3], ego=tuple(ops[3:]) if ego else None, weight_decay=weight_decay,
                                              reduction=reduction)
        return _loss_or_grads(loss, ops if ego else ops[: 2 if form == "indices" else 3], w, grad)

    def reference(*ops):
        ops = [v.detach().requires_grad_(grad) for v in ops]
        if form == "indices":
            U, I, U0, I0 = ops
            rows = ref_training.get_embedding(U, I, U0 if ego else U, I0 if ego else I, users, pos, neg)
        else:
            rows = ops if ego else ops[:3] * 2
        if reduction == "mean":  # LightGCN: loss + weight_decay * reg_loss
            loss, reg_loss = ref_training.bpr_loss(*rows)
            loss = loss + weight_decay * reg_loss
        else:
            u, p, n, u0, p0, n0 = rows
            rows_loss = torch.nn.functional.softplus((u * n).sum(1) - (u * p).sum(1))
            rows_loss = rows_loss + weight_decay * 0.5 * (u0.pow(2).sum(1) + p0.pow(2).sum(1) + n0.pow(2).sum(1))
            loss = rows_loss if reduction == "none" else rows_loss.sum()
        return _loss_or_grads(loss, ops if ego else ops[: 2 if form == "indices" else 3], w, grad)

    op = "training_bpr_loss" + ("_backward" if grad else "")
    name = f"{'grads ' if grad else ''}bpr_loss {form}{' ego' if ego else ''} wd={weight_decay:g} {reduction} "
    name += f"{n_users}x{n_items} B={batch} d={d}"
    return reference_case(op, name, dtype, make, call, reference, layout=layout)


def _loss_or_grads(loss: torch.Tensor, leaves: Sequence[torch.Tensor], w: torch.Tensor, grad: bool) -> torch.Tensor:
    """The loss, or the flattened gradients of ``sum(loss * w)`` w.r.t. the leaves."""
    if not grad:
        return loss
    grads = torch.autograd.grad((loss * w.to(loss.device, loss.dtype)).sum(), leaves)
    return torch.cat([g.reshape(-1) for g in grads])


def _nce_case(dtype, shape, similarity, symmetric, reduction, layout, *, grad=False, temperature=0.2) -> Case:
    """SELFRec's ``InfoNCE`` (``symmetric``: the mean of both directions)."""
    w = _weights(shape[0], 11)[: shape[0] if reduction == "none" else 1].reshape(-1 if reduction == "none" else ())
    operands = randn_operands(shape, 2, seed=zlib.crc32(f"nce {shape}".encode()))
    cosine = similarity == "cosine"

    def call(device, a, b):
        a, b = a.detach().requires_grad_(grad), b.detach().requires_grad_(grad)
        loss = diffcore.training.info_nce(a, b, temperature, similarity=similarity, symmetric=symmetric,
                                          reduction=reduction)
        return _loss_or_grads(loss, (a, b), w, grad)

    def reference(a, b):
        a, b = a.detach().requires_grad_(grad), b.detach().requires_grad_(grad)

        def one(x, y):
            if reduction == "mean":
                return ref_training.info_nce(x, y, temperature, b_cos=cosine)
            return ref_training.info_nce_op(x, y, temperature, cosine, reduction)

        loss = 0.5 * (one(a, b) + one(b, a)) if symmetric else one(a, b)
        return _loss_or_grads(loss, (a, b), w, grad)

    op = "training_info_nce" + ("_backward" if grad else "")
    name = f"{'grads ' if grad else ''}info_nce {similarity}{' symmetric' if symmetric else ''} {reduction} "
    name += f"tau={temperature:g} {_shape_name(shape)}"
    return reference_case(op, name, dtype, operands, call, reference, layout=layout)


def _history_case(seed: int) -> Case:
    """``TimestepSampler.update`` over batches with repeated timesteps (one batch repeats a
    timestep more often than the history holds), against DiffRec's loop: history and counts."""
    steps, history = (5, 3) if seed % 2 == 0 else (7, 4)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(5):
        t = torch.randint(0, steps, (9,), generator=g)
        if k == 2:
            t[:6] = 1  # six rows of one timestep in one batch
        batches.append((t, torch.rand(9, generator=g, dtype=torch.float64)))

    def run(device: torch.device) -> torch.Tensor:
        sampler = diffcore.training.TimestepSampler(steps, "importance", history, device=device)
        for t, losses in batches:
            sampler.update(t.to(device), losses.to(device))
        return torch.cat([sampler.history.reshape(-1), sampler.count.double()])

    def reference() -> torch.Tensor:
        lt_history = torch.zeros(steps, history, dtype=torch.float64)
        lt_count = torch.zeros(steps, dtype=torch.int64)
        for t, losses in batches:
            ref_training.update_lt_history(lt_history, lt_count, t, losses)
        return torch.cat([lt_history.reshape(-1), lt_count.double()])

    name = f"update T={steps} H={history} 5 batches of 9, repeated t, seed={seed}"
    return Case("training_history_update", name, torch.float64, run, reference, Close(0.0, 0.0, scaled=False))


# === family: linalg ==============================================================================
def _linalg_tolerance(dtype: torch.dtype, kind: str) -> Tolerance:
    """float32: the standard rule. float64: exact-sign Omegas (rademacher, sparse) to FP64_TOL;
    a Gaussian Omega's normals are float32 values that differ across backends by a few ulp of
    log/sin/cos, so float64 sketches agree to the noise's NOISE_ATOL (relative to max |ref|)."""
    if dtype == torch.float64 and kind == "gaussian":
        return Close(0.0, NOISE_ATOL)
    return standard_tolerance(dtype)


def _projection_scale(k: int, kind: str, density: float | None) -> float:
    return 1.0 / math.sqrt(k * ((density or 1 / 3) if kind == "sparse" else 1.0))


@functools.cache
def _linalg_sparse(kind: str) -> tuple[torch.Tensor | diffcore.sparse.Adjacency, tuple[int, int]]:
    """``interactions``: a binary (23 x 41) user-item matrix with empty rows and columns and a hub
    row, as an uncoalesced COO tensor; ``weighted``: float weights in CSR; ``adjacency``: the
    normalised graph of the interactions (its scalings applied by the kernel)."""
    g = torch.Generator().manual_seed(61)
    users = torch.cat([torch.randint(2, 20, (90,), generator=g), torch.zeros(30, dtype=torch.long)])
    items = torch.cat([torch.randint(0, 37, (90,), generator=g), torch.arange(30)])
    if kind == "adjacency":
        adj = diffcore.sparse.Adjacency.from_interactions(users, items, 23, 41)
        return adj, adj.shape
    coo = torch.sparse_coo_tensor(torch.stack([users, items]), torch.ones(users.numel()), (23, 41))
    if kind == "interactions":
        return coo, (23, 41)
    weighted = torch.sparse_coo_tensor(coo.coalesce().indices(), torch.rand(coo.coalesce().values().numel(),
                                                                            generator=g) + 0.25, (23, 41))
    return weighted.to_sparse_csr(), (23, 41)


@family("linalg", ops=("linalg_sketch", "linalg_sketch_csr"),
        description="sketches A @ Omega with Omega generated in the kernel (gaussian, rademacher, sparse), "
        "dense and CSR")
def _linalg_cases(quick: bool) -> list[Case]:
    from diffcore import linalg
    from diffcore.reference import linalg as ref_linalg

    shapes = [((37, 53), 7), ((5, 301), 70)] if quick else [((37, 53), 7), ((5, 301), 70), ((1, 1), 1),
                                                                ((64, 2000), 33)]
    layouts = ["column_major"] if quick else list(LAYOUTS)
    draws = [("gaussian", None, 0, 0), ("rademacher", None, 2**64 - 1, 2**32 - 2), ("sparse", 0.1, 5, 3)]
    if not quick:
        draws += [("gaussian", None, 2**63 + 7, 2**32 - 3), ("sparse", None, 11, 0)]
    cases = []
    for dtype in (torch.float32, torch.float64):
        for (shape, k), layout in ((s, lay) for s in shapes for lay in layouts):
            for kind, density, seed, offset in draws:
                scale = _projection_scale(k, kind, density)

                def call(device, A, k=k, kind=kind, density=density, seed=seed, offset=offset):
                    return linalg.random_projection(A, k, kind, seed, density=density, offset=offset)

                def reference(A, k=k, kind=kind, density=density, scale=scale, seed=seed, offset=offset):
                    return ref_linalg.sketch(A, k, kind, density or 1 / 3, scale, seed, offset)

                tol = _linalg_tolerance(dtype, kind)
                name = f"random_projection {kind} {_shape_name(shape)} k={k}" + _seed_name(seed, offset)
                cases.append(reference_case("linalg_sketch", name, dtype, randn_operands(shape, 1, seed=71),
                                            call, reference, layout=layout, tolerance=tol, agreement=tol))
        sparse_kinds = ["interactions", "adjacency"] if quick else ["interactions", "weighted", "adjacency"]
        for matrix in sparse_kinds:
            if matrix == "adjacency" and dtype == torch.float64:
                continue  # an Adjacency is a float32 operator
            for kind, density, seed, offset in draws[: 2 if quick else None]:
                for k in (5,) if quick else (5, 70):
                    cases.append(_linalg_csr_case(matrix, dtype, k, kind, density, seed, offset))
    return cases


def _linalg_csr_case(matrix: str, dtype: torch.dtype, k: int, kind: str, density: float | None, seed: int,
                     offset: int) -> Case:
    from diffcore import linalg
    from diffcore.reference import linalg as ref_linalg

    A, shape = _linalg_sparse(matrix)
    adjacency = isinstance(A, diffcore.sparse.Adjacency)

    def run(device: torch.device) -> torch.Tensor:
        operand = A.to(device) if adjacency else A.to(dtype).to(device)
        return linalg.random_projection(operand, k, kind, seed, density=density, offset=offset)

    def reference() -> torch.Tensor:
        truth = A.to_sparse_coo(dtype) if adjacency else A.to(dtype).to_sparse_coo()
        return ref_linalg.sketch(truth, k, kind, density or 1 / 3, _projection_scale(k, kind, density), seed, offset)

    tol = _linalg_tolerance(dtype, kind)
    name = f"random_projection {kind} {matrix} {_shape_name(shape)} k={k}" + _seed_name(seed, offset)
    return Case("linalg_sketch_csr", name, dtype, run, reference, tol, agreement=tol)


@family("retrieval", ops=("retrieval_topk",),
        description="top-k from scores and from queries x items, history masked, ties to the lower id")
def _retrieval_cases(quick: bool) -> list[Case]:
    shapes = [(7, 37, 8, 4), (3, 1100, 16, 23)] + ([] if quick else [(1, 1, 3, 1), (9, 130, 5, 130)])
    layouts = ["column_major"] if quick else list(LAYOUTS)
    return [
        _retrieval_case(dtype, shape, layout, source, output)
        for dtype in DTYPES + (torch.float64,) for shape in shapes for layout in layouts
        for source in ("queries", "scores") for output in ("values", "ids")
    ]


def _retrieval_case(dtype: torch.dtype, shape: tuple[int, int, int, int], layout: str, source: str,
                    output: str) -> Case:
    """Integer operands: every score is exact in every dtype, so values and ids (ties included)
    must equal the reference's exactly."""
    from diffcore import retrieval
    from diffcore.reference import retrieval as ref_retrieval

    B, n, d, k = shape

    @functools.cache
    def operands() -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(B * 7919 + n)
        queries = torch.randint(-4, 5, (B, d), generator=g).float()
        items = torch.randint(-4, 5, (n, d), generator=g).float()
        lens = torch.randint(0, 6, (B,), generator=g)
        crow = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        return queries, items, crow, torch.randint(0, n, (int(crow[-1]),), generator=g)

    pick = 0 if output == "values" else 1

    def run(device: torch.device) -> torch.Tensor:
        queries, items, crow, col = operands()
        exclude = (crow.to(device), col.to(device))
        if source == "scores":
            scores = arrange((queries @ items.T).to(dtype), layout, device)
            return retrieval.topk(scores, k, exclude=exclude)[pick]
        q, e = (arrange(v.to(dtype), layout, device) for v in (queries, items))
        return retrieval.topk(q, k, items=e, exclude=exclude)[pick]

    def reference() -> torch.Tensor:
        queries, items, crow, col = operands()
        return ref_retrieval.topk(queries.to(truth_dtype(dtype)), items.to(truth_dtype(dtype)), k, crow, col)[pick]

    name = f"topk {output} from {source} {B}x{n} d={d} k={k} {layout}"
    return Case("retrieval_topk", name, dtype, run, reference, Close(0.0, 0.0, scaled=False),
                out_dtype=None if output == "values" else torch.long)
