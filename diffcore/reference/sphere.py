"""Reference of the geodesic sphere family: the meaning of every ``sphere_*`` op, in plain PyTorch.

Rows of a (B, d) tensor are points of (or tangent vectors to) the unit sphere S^(d-1). Math runs
in float32 for float32/float16/bfloat16 inputs and in float64 for float64 inputs; results have the
input dtype. The choices every backend shares (written out in ``diffcore.sphere``):

- Off-sphere points are projected: a base point ``x`` (and ``y`` of ``logmap``) is used as
  ``x / |x|``, and a tangent vector as its projection ``P_x v = v - <x, v> x``, so every op is
  defined (and differentiable) for any nonzero rows. A point row whose norm is 0 in the math dtype
  (all zeros, or so small that its sum of squares underflows: norm below ~1e-23 in float32 math,
  ~1e-162 in float64) has no direction: the ops raise on it (:func:`check_points`, called by the
  registered reference, not by these functions), as the kernels do.
- Rows are made contiguous first (:func:`acc`), so a result does not depend on the strides (a
  reduction's order does): ``y = -x`` is exactly antipodal whatever the layouts of x and y.
- Near ``|v| = 0`` the factors ``sin(t) / t`` (and ``t / sin(t)``) use their series below
  ``t^2 = 1e-4``, exact to the float64 rounding there, so ``v = 0`` gives ``x`` and finite gradients.
- Angles come from the chord lengths ``|x - y|`` and ``|x + y|``: ``theta = 2 atan2(|x - y|,
  |x + y|)``, accurate for nearly identical and for nearly antipodal points (no clamped ``acos``).
- ``logmap`` is ``theta n`` with n the unit tangent direction from x^ towards y^, taken from the
  tangent part of the chord next to y^ (:func:`_log_direction`). Where that part is rounding noise
  (every pair of exact unit points gives at least ``cos(pi/4)`` of the chord; noise only below half
  of it): nearly identical points give 0, and nearly or exactly antipodal points (``y = -x``) take
  the geodesic towards the coordinate axis ``e_k``, ``k = 0`` if ``|x_0| <= |x_1|`` else ``1``:
  ``theta (e_k - x_k x) / sqrt(1 - x_k^2)``, so ``expmap(x, logmap(x, y)) = y`` still holds; for
  ``d = 1`` (a tangent space of dimension 0) it is 0. Its gradient there is defined as 0 (the map
  is not differentiable at antipodal points).
- ``p_step`` ends with ``y / max(|y|, 1e-12)``: a zero ``y`` stays zero.

Eager and readable, no in-place tricks: this is the meaning the kernels are tested against and the
baseline the bench times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffcore.reference import diffusion as _diffusion
from diffcore.reference.random import normal

if TYPE_CHECKING:
    from diffcore.diffusion import Schedule

SERIES_BELOW = 1e-4  # theta^2 under which sin(t)/t and t/sin(t) use their series
P_STEP_EPS = 1e-12  # the floor of |y| in p_step's final normalisation (as in normalize)


def acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous in its math dtype: float64 stays float64, everything else computes in
    float32 (contiguous rows reduce in one order, whatever the strides of the input)."""
    return (x.double() if x.dtype == torch.float64 else x.float()).contiguous()


def sinc(theta: torch.Tensor) -> torch.Tensor:
    """``sin(theta) / theta``, the series ``1 - t^2/6 + t^4/120`` near 0 (1 at 0)."""
    t2 = theta * theta
    small = t2 < SERIES_BELOW
    series = 1 - t2 / 6 + t2 * t2 / 120
    return torch.where(small, series, torch.sin(theta) / torch.where(small, torch.ones_like(theta), theta))


def inv_sinc(theta: torch.Tensor) -> torch.Tensor:
    """``theta / sin(theta)`` for theta in [0, pi), the series ``1 + t^2/6 + 7 t^4/360 + ...``
    near 0."""
    t2 = theta * theta
    small = t2 < SERIES_BELOW
    series = 1 + t2 * (1 / 6 + t2 * (7 / 360 + t2 * (31 / 15120)))
    safe = torch.where(small, torch.ones_like(theta), theta)
    return torch.where(small, series, safe / torch.sin(safe))


def check_points(name: str, x: torch.Tensor) -> None:
    """Raises if a row of ``x`` has norm 0 in the math dtype (it has no direction on the sphere):
    a zero row, or one whose sum of squares underflows, as in the kernels."""
    zero = acc(x).norm(dim=1) == 0
    if bool(zero.any()):
        r = int(zero.nonzero()[0, 0])
        raise ValueError(f"{name}: row {r} is zero; a point on the sphere needs a nonzero row")


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(|x|, eps)`` per row (``torch.nn.functional.normalize``). x: (B, d)."""
    xa = acc(x)
    norm = xa.norm(dim=1, keepdim=True)
    if eps == 0.0 and bool((norm == 0).any()):
        r = int((norm[:, 0] == 0).nonzero()[0, 0])
        raise ValueError(f"x: row {r} is zero and eps = 0, so it has no direction; pass eps > 0")
    return (xa / norm.clamp_min(eps)).to(x.dtype)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1, keepdim=True)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _tangent(x_unit: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``P_x v = v - <x, v> x`` for unit rows x."""
    return v - (x_unit * v).sum(dim=1, keepdim=True) * x_unit


def project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The tangent part ``v - <x^, v> x^`` of v at ``x^ = x / |x|``. x, v: (B, d)."""
    return _tangent(_unit(acc(x)), acc(v)).to(v.dtype)


def _exp(x_unit: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``cos|u| x + sinc|u| u`` for unit x and tangent u (float rows)."""
    theta = u.norm(dim=1, keepdim=True)
    return torch.cos(theta) * x_unit + sinc(theta) * u


def expmap(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``exp_x(v) = cos|u| x^ + sin|u| u / |u|`` with ``x^ = x / |x|``, ``u = P_x^ v``. x, v: (B, d)."""
    x_unit = _unit(acc(x))
    return _exp(x_unit, _tangent(x_unit, acc(v))).to(x.dtype)


def _chords(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Unit rows x^, y^ and the squared chords ``p = |y^ - x^|^2``, ``q = |y^ + x^|^2`` (B, 1)."""
    xu, yu = _unit(acc(x)), _unit(acc(y))
    p = ((yu - xu) ** 2).sum(dim=1, keepdim=True)
    q = ((yu + xu) ** 2).sum(dim=1, keepdim=True)
    return xu, yu, p, q


def geodesic_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The angle ``2 atan2(|y^ - x^|, |y^ + x^|)`` in [0, pi] between the rows. x, y: (B, d);
    returns (B,)."""
    _, _, p, q = _chords(x, y)
    return (2 * torch.atan2(p.sqrt(), q.sqrt()))[:, 0].to(x.dtype)


def _log_direction(xu: torch.Tensor, yu: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The unit tangent direction n from x^ towards y^ (B, d), 0 where it is rounding noise, and
    the mask (B, 1) of the antipodal such rows (y^ next to -x^), whose direction the caller picks.

    n is the tangent part ``w = c - <c, x^> x^`` of the chord next to y^ (``c = y^ - x^`` when
    ``p <= q``, else ``y^ + x^``; ``P c = P y^`` exactly, but c carries no rounding of the far
    point), normalised by its own norm. For exact unit points ``|w| >= cos(pi/4) |c|``; below
    ``|c| / 2`` the chord is rounding noise (e.g. ``y = -3 x``, or ``y = -x`` itself) and w is not."""
    near = p <= q
    chord = torch.where(near, yu - xu, yu + xu)
    w = chord - _rowdot(chord, xu) * xu
    ww = _rowdot(w, w)
    noise = 4 * ww <= torch.where(near, p, q)
    n = torch.where(noise, 0.0, w / torch.where(noise, 1.0, ww.sqrt()))
    return n, noise & ~near


def _axis_direction(xu: torch.Tensor) -> torch.Tensor:
    """The unit tangent direction at x^ towards the axis e_k, ``k = 0`` if ``|x_0| <= |x_1|`` else
    1: ``(e_k - x_k x^) / sqrt(1 - x_k^2)``; 0 when d = 1 (S^0 has no tangent directions)."""
    d = xu.shape[1]
    if d == 1:
        return torch.zeros_like(xu)
    k = (xu[:, 0].abs() > xu[:, 1].abs()).long()
    xk = xu.gather(1, k[:, None])
    e_k = torch.nn.functional.one_hot(k, d).to(xu.dtype)
    return (e_k - xk * xu) / torch.sqrt(1 - xk * xk)


def logmap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log_x(y) = theta n``: the unit tangent direction n from x^ towards y^ (the tangent part of
    the chord next to y^, :func:`_log_direction`) at length theta, exactly, so for nearly antipodal
    points too. Where the chord is rounding noise: 0 for nearly identical points, the axis
    direction (:func:`_axis_direction`) for nearly or exactly antipodal ones."""
    xu, yu, p, q = _chords(x, y)
    theta = 2 * torch.atan2(p.sqrt(), q.sqrt())
    n, antipodal = _log_direction(xu, yu, p, q)
    if bool(antipodal.any()):
        n = torch.where(antipodal, _axis_direction(xu), n)
    return (theta * n).to(x.dtype)


# --- diffusion on the sphere ---------------------------------------------------------------------
def q_sample(x0: torch.Tensor, t: int | torch.Tensor, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """Geodesic noising ``exp_x0(sqrt(1 - ab[t]) P_x0(noise))`` (DimeRec). x0, noise: (B, d)."""
    t = _diffusion._timesteps(t, x0, schedule, False)
    scale = _diffusion.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape)
    x_unit = _unit(acc(x0))
    return _exp(x_unit, scale * _tangent(x_unit, acc(noise))).to(x0.dtype)


def p_step(
    x_t: torch.Tensor, model_out: torch.Tensor, t: int | torch.Tensor, schedule: Schedule, **kwargs
) -> torch.Tensor:
    """``diffcore.reference.diffusion.p_step`` (same arguments), then back onto the sphere:
    ``y / max(|y|, 1e-12)``. x_t, model_out: (B, d)."""
    for name in ("uncond_out", "noise"):
        if kwargs.get(name) is not None:
            kwargs[name] = acc(kwargs[name])
    y = _diffusion.p_step(acc(x_t), acc(model_out), t, schedule, **kwargs)
    return (y / y.norm(dim=1, keepdim=True).clamp_min(P_STEP_EPS)).to(x_t.dtype)


# --- the ops' own forms (tables gathered at t; noise given or seeded) ----------------------------
def _noise(x: torch.Tensor, noise: torch.Tensor | None, seed: int | None, offset: int) -> torch.Tensor | None:
    if noise is not None:
        return acc(noise)
    if seed is not None:
        return acc(normal(x.numel(), seed, offset).reshape(x.shape))
    return None


def q_sample_op(
    x0: torch.Tensor,
    t: torch.Tensor,
    table: torch.Tensor,
    noise: torch.Tensor | None,
    seed: int | None,
    offset: int,
) -> torch.Tensor:
    """The op ``sphere_q_sample``: ``exp_x0(s P_x0(z))`` with ``s = float32(table[t])`` (table:
    (K,), ``sqrt(1 - ab)``), z the given noise or the Philox stream ``(seed, offset)`` over the
    (B, d) output."""
    scale = table[t.expand(x0.shape[0])].float()[:, None]
    x_unit = _unit(acc(x0))
    return _exp(x_unit, scale * _tangent(x_unit, _noise(x0, noise, seed, offset))).to(x0.dtype)


def p_step_op(
    x: torch.Tensor,
    f: torch.Tensor,
    f_uncond: torch.Tensor | None,
    guidance: float,
    t: torch.Tensor,
    table: torch.Tensor,
    noise: torch.Tensor | None,
    seed: int | None,
    offset: int,
    clamp_t: bool,
) -> torch.Tensor:
    """The op ``sphere_p_step``: ``y / max(|y|, 1e-12)`` with ``y = a x + b f + c z`` the fused
    diffusion step of ``diffcore.reference.diffusion.step`` (table (K, 3) rows (a, b, c) gathered
    at t and cast to float32; f with guidance ``(1 + w) f - w f_uncond``), in the math dtype."""
    z = _noise(x, noise, seed, offset)
    y = _p_step_y(x, f, f_uncond, guidance, t, table, z, clamp_t)[3]
    return (y / y.norm(dim=1, keepdim=True).clamp_min(P_STEP_EPS)).to(x.dtype)


def _p_step_y(
    x: torch.Tensor,
    f: torch.Tensor,
    f_uncond: torch.Tensor | None,
    guidance: float,
    t: torch.Tensor,
    table: torch.Tensor,
    z: torch.Tensor | None,
    clamp_t: bool,
) -> tuple[torch.Tensor, ...]:
    """The per-row coefficients (a, b, c) (B, 1) and ``y = a x + b f + c z`` in the math dtype (a row
    whose c is 0 takes no noise: ``diffcore.reference.diffusion.noise_term``)."""
    t = t.expand(x.shape[0])
    if clamp_t:
        t = t.clamp(max=table.shape[0] - 1)
    coef = table[t].float()
    a, b, c = (coef[:, k : k + 1] for k in range(3))
    y = a * acc(x) + b * _diffusion.guide(acc(f), None if f_uncond is None else acc(f_uncond), guidance)
    if z is not None:
        y = y + _diffusion.noise_term(c, acc(z))
    return a, b, c, y


# --- gradients: vector-Jacobian products of the ops (their backward), finite everywhere ----------
# Row scalars that lose precision near 0 (cancellation in the closed forms) are evaluated in
# float64 with series below theta = 0.1.
def _unit_backward(x_unit: torch.Tensor, norm: torch.Tensor, grad_unit: torch.Tensor) -> torch.Tensor:
    """The gradient at x of ``x / |x|`` given the gradient at the unit row: ``P_x grad / |x|``."""
    return (grad_unit - x_unit * _rowdot(x_unit, grad_unit)) / norm


def _sinc_derivative_over_theta(theta: torch.Tensor) -> torch.Tensor:
    """``sinc'(t) / t = (t cos t - sin t) / t^3``; series ``-1/3 + t^2/30 - ...`` below 0.1."""
    t = theta.double()
    t2 = t * t
    small = t2 < 1e-2
    series = -1 / 3 + t2 * (1 / 30 + t2 * (-1 / 840 + t2 * (1 / 45360 - t2 / 3991680)))
    safe = torch.where(small, torch.ones_like(t), t)
    return torch.where(small, series, (safe * torch.cos(safe) - torch.sin(safe)) / safe**3).to(theta.dtype)


def _log_factors(theta: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """logmap's row factors ``r = t / sin t``, ``m = (sin t - t cos t) / sin t`` and ``a = sin t - t
    cos t`` (cos and sin from the chords, accurate near pi, where sin(theta) of a rounded theta is
    not). Below t = 0.1 (cancellation) the series of ``(sin t - t cos t) / sin^3 t = 1/3 + 2 t^2/15
    + ...``; up to pi/2 that closed form in t, in float64 (r, m and a are infinite or meaningless
    at pi: only used where the direction is not rounding noise)."""
    t, c, s = theta.double(), cos.double(), sin.double()
    t2 = t * t
    small = t2 < 1e-2
    series = 1 / 3 + t2 * (2 / 15 + t2 * (2 / 63 + t2 * (4 / 675 + t2 * 2 / 2079)))
    safe = torch.where(small, torch.ones_like(t), t)
    closed = (torch.sin(safe) - safe * torch.cos(safe)) / torch.sin(safe) ** 3
    over_sin3 = torch.where(small, series, closed)
    a = torch.where(c < 0, s - t * c, over_sin3 * s**3)
    m = torch.where(c < 0, a / s, over_sin3 * s**2)
    r = torch.where(t2 < SERIES_BELOW, inv_sinc(t), t / s)
    return r.to(theta.dtype), m.to(theta.dtype), a.to(theta.dtype)


def normalize_backward(x: torch.Tensor, eps: float, grad: torch.Tensor) -> torch.Tensor:
    """``|x| > eps``: ``(g - y <y, g>) / |x|``; else ``g / eps``."""
    xa, ga = acc(x), acc(grad)
    norm = xa.norm(dim=1, keepdim=True)
    m = norm.clamp_min(eps)
    y = xa / m
    return torch.where(norm > eps, (ga - y * _rowdot(y, ga)) / m, ga / m).to(x.dtype)


def project_backward(x: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xa, va, ga = acc(x), acc(v), acc(grad)
    norm = xa.norm(dim=1, keepdim=True)
    xu = xa / norm
    k, gk = _rowdot(xu, va), _rowdot(xu, ga)
    grad_v = ga - gk * xu
    grad_x = _unit_backward(xu, norm, -gk * va - k * ga)
    return grad_x.to(x.dtype), grad_v.to(v.dtype)


def _expmap_backward(xa: torch.Tensor, va: torch.Tensor, ga: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Math-dtype gradients of ``cos|u| x^ + sinc|u| u``, ``u = P_x^ v``, at x and v."""
    norm = xa.norm(dim=1, keepdim=True)
    xu = xa / norm
    lam = _rowdot(xu, va)
    u = va - lam * xu
    theta = u.norm(dim=1, keepdim=True)
    s = sinc(theta)
    alpha = -s * _rowdot(ga, xu) + _sinc_derivative_over_theta(theta) * _rowdot(ga, u)
    grad_u = alpha * u + s * ga
    gux = _rowdot(grad_u, xu)
    grad_v = grad_u - gux * xu
    grad_xu = torch.cos(theta) * ga - gux * va - lam * grad_u
    return _unit_backward(xu, norm, grad_xu), grad_v


def expmap_backward(x: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_v = _expmap_backward(acc(x), acc(v), acc(grad))
    return grad_x.to(x.dtype), grad_v.to(v.dtype)


def _log_parts(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Unit rows, norms, angle, cos, sin (from the chords), the unit tangent direction n from x^
    towards y^ (0 where it is rounding noise) and the antipodal mask of :func:`_log_direction`."""
    xa, ya = acc(x), acc(y)
    nx, ny = xa.norm(dim=1, keepdim=True), ya.norm(dim=1, keepdim=True)
    xu, yu = xa / nx, ya / ny
    p = ((yu - xu) ** 2).sum(dim=1, keepdim=True)
    q = ((yu + xu) ** 2).sum(dim=1, keepdim=True)
    theta = 2 * torch.atan2(p.sqrt(), q.sqrt())
    cos, sin = (q - p) / (p + q), 2 * (p * q).sqrt() / (p + q)
    n, antipodal = _log_direction(xu, yu, p, q)
    return xu, yu, nx, ny, theta, cos, sin, n, antipodal


def logmap_backward(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``theta n = theta / sin(theta) (y^ - cos(theta) x^)``. Finite at y = x (the
    series); at antipodal rows (those of :func:`logmap`'s axis direction), where the map is not
    differentiable, the gradient is defined as 0."""
    xu, yu, nx, ny, theta, cos, sin, n, antipodal = _log_parts(x, y)
    ga = acc(grad)
    gn = _rowdot(ga, n)
    r, m, a = _log_factors(theta, cos, sin)
    h = m * cos * gn * n + r * ga
    e = -a * gn - _rowdot(h, xu)
    grad_yu = torch.where(antipodal, torch.zeros_like(h), h + e * xu)
    grad_xu = torch.where(antipodal, torch.zeros_like(h), -cos * h + e * yu)
    return _unit_backward(xu, nx, grad_xu).to(x.dtype), _unit_backward(yu, ny, grad_yu).to(y.dtype)


def geodesic_distance_backward(
    x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the angle; 0 where it is not differentiable (y = x and y = -x, up to rounding),
    which is also what a central difference gives there."""
    xu, yu, nx, ny, theta, cos, sin, n, _ = _log_parts(x, y)
    g = acc(grad)[:, None]
    h = g * cos * n
    e = -g * sin - _rowdot(h, xu)
    grad_yu, grad_xu = h + e * xu, -cos * h + e * yu
    return _unit_backward(xu, nx, grad_xu).to(x.dtype), _unit_backward(yu, ny, grad_yu).to(y.dtype)


def q_sample_backward(
    x0: torch.Tensor, t: torch.Tensor, table: torch.Tensor, noise: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`q_sample_op` at x0 and at the noise (given, or the drawn stream)."""
    scale = table[t.expand(x0.shape[0])].float()[:, None]
    za = acc(noise)
    grad_x, grad_v = _expmap_backward(acc(x0), scale * za, acc(grad))
    return grad_x.to(x0.dtype), (scale * grad_v).to(noise.dtype)


def p_step_backward(
    x: torch.Tensor,
    f: torch.Tensor,
    f_uncond: torch.Tensor | None,
    guidance: float,
    t: torch.Tensor,
    table: torch.Tensor,
    noise: torch.Tensor | None,
    clamp_t: bool,
    grad: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`p_step_op` at x, f, f_uncond and the noise (given, or the drawn stream;
    None when the step has none): ``g_y = (g - o <o, g>) / |y|`` then the linear step's."""
    a, b, c, y = _p_step_y(x, f, f_uncond, guidance, t, table, noise, clamp_t)
    ga = acc(grad)
    norm = y.norm(dim=1, keepdim=True)
    m = norm.clamp_min(P_STEP_EPS)
    o = y / m
    grad_y = torch.where(norm > P_STEP_EPS, (ga - o * _rowdot(o, ga)), ga) / m
    grad_f = (b * (1 + guidance) if f_uncond is not None else b) * grad_y
    grad_u = None if f_uncond is None else (-b * guidance * grad_y).to(f_uncond.dtype)
    grad_z = None if noise is None else (c * grad_y).to(noise.dtype)
    return (a * grad_y).to(x.dtype), grad_f.to(f.dtype), grad_u, grad_z
