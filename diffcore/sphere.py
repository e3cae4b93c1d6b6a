"""Geodesic steps on the unit hypersphere: normalize, tangent projection, exp/log maps, geodesic
distance, geodesic noising (``q_sample``) and the reverse step back onto the sphere (``p_step``).

Every function works row-wise on (B, d) tensors, for any d, in one fused op per call
(``torch.ops.diffcore.sphere_*``: one sweep reduces a row, one writes it), with autograd. Inputs
are float32, float16 or bfloat16 (math in float32, result in the input dtype) or float64 (math in
float64, e.g. for ``gradcheck``); rows may be strided.

Choices at the edges, shared by every backend (``diffcore.reference.sphere`` is the meaning):

- **Off-sphere inputs are projected, not rejected.** A point ``x`` is used as ``x^ = x / |x|``
  and a tangent vector ``v`` as ``P_x^ v = v - <x^, v> x^``, so each function is defined and
  differentiable for any nonzero rows (checking ``|x| = 1`` would cost a pass and a sync, and
  would reject every fp16 row). A zero point row has no direction and raises ``ValueError``; every
  backend (the reference too) tests the row's sum of squares in the math dtype, so a row whose
  squares all underflow counts as zero (float32 math: norm below ~1e-23, e.g. a row of 1e-30;
  float64: below ~1e-162), and below ~1e-19 (float64: ~1e-154) the squares lose precision.
  At the other end, a float32/16 row whose sum of squares overflows float32 (norm above ~1.8e19)
  is out of range: its norm is inf and every function returns garbage for it (0 for ``x^``),
  in every backend; such rows need rescaling (or float64) first.
  ``expmap`` reduces ``|P v|^2`` as ``|v|^2 - <x^, v>^2`` in the same sweep: exact for tangent
  ``v``, and it loses precision only when v is nearly normal to the sphere.
- **Near |v| = 0**, ``sin(t) / t`` and ``t / sin(t)`` switch to their Taylor series below
  ``t^2 = 1e-4`` (exact to float64 rounding there): ``expmap(x, 0) = x^`` and every gradient is
  finite at ``v = 0`` and ``y = x``; the backward evaluates its row factors in float64.
- **Angles from chords**, never a clamped ``acos``: ``theta = 2 atan2(|y^ - x^|, |y^ + x^|)``,
  accurate to rounding for nearly identical and for nearly antipodal points. ``logmap`` is
  ``theta n``: n is the tangent part of the chord next to ``y^``, normalised by its own norm, so
  the tangent has length ``geodesic_distance(x, y)`` to rounding however close y^ is to x^ or to
  -x^. Its direction carries what the rounding of x^ and y^ leaves of it: at the angle
  ``pi - delta``, an error of about eps / delta, which no float computation avoids.
- **Antipodal logmap**: where that tangent part is rounding noise (under half the chord; any two
  exact unit points give at least ``cos(pi/4)`` of it), every direction is as good: nearly
  identical points (e.g. ``y = 3 x``) give 0, and antipodal ones (``y = -x``, ``y = -3 x``) take
  the geodesic towards the axis ``e_k``, ``k = 0`` if ``|x_0| <= |x_1|`` else ``1``:
  ``theta (e_k - x^_k x^) / sqrt(1 - x^_k^2)`` (0 when d = 1: S^0 has no tangent directions), so
  ``expmap(x, logmap(x, y)) = y^`` still holds. ``y = -c x`` with c a power of two (``y = -x`` in
  particular) is exactly antipodal, theta = pi, whatever the strides of x and y. The map is not
  differentiable there; its gradient is defined as 0 at these rows (``geodesic_distance``'s
  gradient is 0 at y = x and y = -x, up to rounding, which is also what a central difference
  gives).
- **NaN** anywhere in a row makes that output row NaN, in every backend.

Backends (``diffcore.implementations("sphere_expmap")``, ...): ``cpu`` (C++, csrc/cpu/sphere.cpp),
``triton`` (kernels/sphere.py; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and
``reference``. They agree to a few float32 ulp; zero point rows raise ``ValueError`` in each (the
Triton launcher reads back one flag per row: on CUDA that synchronises). Autograd (all backends)
is the reference's vector-Jacobian products in torch ops; seeded noise is redrawn for it.
"""

from __future__ import annotations

import torch

from diffcore import (
    _checks,
    _library,  # defines the ops
    _registry,
)
from diffcore.diffusion import Schedule, _schedule

__all__ = ["normalize", "project", "expmap", "logmap", "geodesic_distance", "q_sample", "p_step", "p_step_"]

SPHERE_DTYPES = _checks.FEATURE_DTYPES + (torch.float64,)


def _rows(name: str, x: object) -> torch.Tensor:
    """A 2-D tensor of rows with at least one column, float32/float16/bfloat16/float64."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SPHERE_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (B, d), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: expected rows with at least one column, got shape {tuple(x.shape)}")
    return x


def _run(op: str, inputs: tuple, out: torch.Tensor | None = None, out_shape: tuple | None = None) -> torch.Tensor:
    """Calls ``torch.ops.diffcore.<op>`` (or, in ``diffcore.use(name)``, that implementation);
    ``out`` None: allocate, ``out is inputs[0]``: the in-place op, else the ``_out`` op."""
    x = inputs[0]
    impl = _registry.forced_for(op, x.device)
    if out is x:
        inputs = (x, *_checks.in_place_operands(x, impl, inputs[1:]))
    if impl is not None and out is None:
        return _library.run_forced(op, impl, inputs, lambda: (x.new_empty(out_shape or x.shape),))
    if impl is not None:
        impl(*inputs, out)
        return out
    if out is None:
        return getattr(torch.ops.diffcore, op)(*inputs)
    if out is x:
        getattr(torch.ops.diffcore, f"{op}_")(*inputs)
    else:
        getattr(torch.ops.diffcore, f"{op}_out")(*inputs, out=out)
    return out


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit length: ``x / max(|x|, eps)`` (``torch.nn.functional.normalize``).

    Args:
        x: (B, d).
        eps: floor of the norm, >= 0; a zero row gives a zero row, or raises ``ValueError`` when
            ``eps == 0`` (it has no direction).
    Returns:
        (B, d) in x's dtype.
    """
    _rows("x", x)
    eps = _checks.real("eps", eps, _checks.finite_non_negative, "a finite eps >= 0")
    return _run("sphere_normalize", (x, eps))


def _pair(x: torch.Tensor, v: torch.Tensor, x_name: str, v_name: str) -> None:
    _rows(x_name, x)
    _checks.like(v_name, v, x, x_name)


def project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The tangent part of ``v`` at ``x``: ``v - <x^, v> x^`` with ``x^ = x / |x|``; idempotent.

    Args:
        x: (B, d) points (projected onto the sphere; zero rows raise).
        v: (B, d) like x.
    Returns:
        (B, d) tangent vectors, v's dtype.
    """
    _pair(x, v, "x", "v")
    return _run("sphere_project", (x, v))


def expmap(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The exponential map ``exp_x(v) = cos|u| x^ + sin|u| u / |u|``, ``u = project(x, v)``.

    Args:
        x: (B, d) points (projected onto the sphere; zero rows raise).
        v: (B, d) like x, tangent vectors (their normal part is dropped).
    Returns:
        (B, d) unit rows, x's dtype; ``expmap(x, 0) = x^``.
    """
    _pair(x, v, "x", "v")
    return _run("sphere_expmap", (x, v))


def logmap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The logarithmic map: the tangent vector at ``x`` whose geodesic reaches ``y`` at length
    ``geodesic_distance(x, y)``: ``theta / sin(theta) (y^ - cos(theta) x^)``, formed as theta
    times the unit tangent direction towards y^ (so its length is theta to rounding, for nearly
    antipodal points too).

    Args:
        x, y: (B, d) points, same dtype and device (projected; zero rows raise).
    Returns:
        (B, d) tangent vectors at x, x's dtype. Antipodal rows (and rows whose direction is rounding
        noise): see the module docstring.
    """
    _pair(x, y, "x", "y")
    return _run("sphere_logmap", (x, y))


def geodesic_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The angle between the rows, ``2 atan2(|y^ - x^|, |y^ + x^|)`` in [0, pi].

    Args:
        x, y: (B, d) points, same dtype and device (projected; zero rows raise).
    Returns:
        (B,) in x's dtype.
    """
    _pair(x, y, "x", "y")
    return _run("sphere_geodesic_distance", (x, y), out_shape=(x.shape[0],))


def _noise_operands(
    x: torch.Tensor, noise: torch.Tensor | None, seed: int | None, offset: int, x_name: str
) -> tuple[int | None, int]:
    if noise is not None:
        _checks.like("noise", noise, x, x_name)
        if seed is not None:
            raise ValueError("noise and seed: give one, not both")
    return _checks.seed_offset(seed, offset)


def _out_operand(
    out: torch.Tensor | None, x: torch.Tensor, others: dict[str, torch.Tensor | None], x_name: str
) -> torch.Tensor | None:
    return None if out is None else _checks.out_tensor(out, x, others, x_name)


def q_sample(
    x0: torch.Tensor,
    t: int | torch.Tensor,
    schedule: Schedule,
    *,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Geodesic forward noising (DimeRec): ``exp_x0(sqrt(1 - ab[t]) P_x0(z))``.

    ``sqrt(1 - ab[t])`` is gathered from the schedule's float64 table and cast to float32 per row.

    Args:
        x0: (B, d) points (projected onto the sphere; zero rows raise).
        t: int, or int64 tensor (B,) or (1,), in [0, T).
        noise: (B, d) like x0; or ``seed``/``offset`` for the in-kernel Philox stream (element
            ``r * d + j``, as ``diffcore.random.randn``); neither: ``torch.randn_like(x0)``.
        out: (B, d) like x0; may be x0 itself (in place).
    Returns:
        (B, d) unit rows in x0's dtype. Differentiable in x0 (and noise).
    """
    _rows("x0", x0)
    seed, offset = _noise_operands(x0, noise, seed, offset, "x0")
    out = _out_operand(out, x0, {"noise": noise}, "x0")
    schedule = _schedule(schedule, x0)
    t = _checks.timesteps("t", t, x0.shape[0], schedule.num_steps, x0.device)
    if noise is None and seed is None:
        noise = torch.randn_like(x0)
    return _run("sphere_q_sample", (x0, t, schedule.sqrt_one_minus_alphas_cumprod, noise, seed, offset), out)


def p_step(
    x_t: torch.Tensor,
    model_out: torch.Tensor,
    t: int | torch.Tensor,
    schedule: Schedule,
    *,
    prediction: str = "x0",
    variance: str = "posterior",
    uncond_out: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    clamp_t: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reverse step, then back onto the sphere: ``y / max(|y|, 1e-12)`` with
    ``y = c1[t] x0_hat + c2[t] x_t + [t > 0] sigma_t z``, the step of :func:`diffcore.p_step`.

    Args:
        x_t: (B, d), float32/float16/bfloat16 (math in float32) or float64; rows may be strided.
        model_out: (B, d), the model's x0 (``prediction="x0"``) or eps (``"eps"``) prediction.
        t: int, or int64 tensor (B,) or (1,); outside [0, T) raises unless ``clamp_t``
            (t >= T uses T - 1).
        variance: ``"posterior"``, ``"beta"`` or ``"none"``, as in :func:`diffcore.p_step`.
        uncond_out, guidance_scale: classifier-free guidance ``(1 + w) model_out - w uncond_out``.
        noise: (B, d) like x_t, or ``seed``/``offset`` for the in-kernel Philox stream; neither:
            no noise.
        out: (B, d) like x_t, sharing memory with no other input; ``out=x_t`` is :func:`p_step_`.
    Returns:
        (B, d) unit rows in x_t's dtype (a zero y stays zero). Differentiable in x_t, model_out,
        uncond_out and noise.
    """
    _rows("x_t", x_t)
    _checks.like("model_out", model_out, x_t, "x_t")
    if uncond_out is not None:
        _checks.like("uncond_out", uncond_out, x_t, "x_t")
    if _checks.real("guidance_scale", guidance_scale) != 0.0 and uncond_out is None:
        raise ValueError("guidance_scale: a non-zero scale needs uncond_out (the unconditional model output)")
    seed, offset = _noise_operands(x_t, noise, seed, offset, "x_t")
    out = _out_operand(out, x_t, {"model_out": model_out, "uncond_out": uncond_out, "noise": noise}, "x_t")
    schedule = _schedule(schedule, x_t)
    t = _checks.timesteps("t", t, x_t.shape[0], schedule.num_steps, x_t.device, clamp=clamp_t)
    table = schedule.p_table(prediction, variance)
    args = (x_t, model_out, uncond_out, float(guidance_scale), t, table, noise, seed, offset, bool(clamp_t))
    return _run("sphere_p_step", args, out)


def p_step_(
    x_t: torch.Tensor, model_out: torch.Tensor, t: int | torch.Tensor, schedule: Schedule, **kwargs
) -> torch.Tensor:
    """:func:`p_step` written into ``x_t`` (no allocation); returns ``x_t``."""
    if "out" in kwargs:
        raise TypeError("p_step_: writes x_t in place and takes no out=")
    return p_step(x_t, model_out, t, schedule, out=x_t, **kwargs)
