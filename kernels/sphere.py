"""sphere family, Triton: normalize, tangent projection, exp/log maps, geodesic distance, geodesic
q_sample and the sphere p_step, row by row over (B, d).

    x^ = x / |x|   (off-sphere points are projected; a zero point row raises ValueError)
    normalize   out = x / max(|x|, eps)
    project     out = v - <x^, v> x^
    expmap      out = cos(th) x^ + sinc(th) u,      u = v - <x^, v> x^, th = |u|
    logmap      out = th w / |w|,                   w = P_x^ c, c = y^ -+ x^ (the chord next to y^)
    distance    out = th
    q_sample    expmap(x0, s z),    s = float32(table[t[r]]), z = noise or Philox(seed, offset)
    p_step      y / max(|y|, 1e-12),  y = a x + b ((1 + w) f - w u) + c z

The meaning is ``diffcore.reference.sphere``; the CPU twin is csrc/cpu/sphere.cpp (the same
formulas, edge cases and Philox indices ``r * d + j``). One program per ROWS rows; each sweeps its
rows in BLOCK-column chunks: one sweep reduces, one writes (logmap and distance add a sweep for
the chords, and logmap forms its chord with the same fma in both; p_step and seeded q_sample
recompute y and z in the writing sweep instead of storing them). float64 rows compute in float64,
the others in float32. Triton has no atan2 on every backend (not in the interpreter), so the angle
is refined from a rough guess by Newton steps on ``|y| sin(phi) - |x| cos(phi)``, exact to
rounding in float32 and float64. A NaN in a row makes the row NaN (maxima propagate NaN; the
guards of zero rows test ``== 0``).

Checks that need values cannot raise inside a kernel: each program writes a per-row flag (zero
point rows; zero rows of normalize with eps = 0) and the launcher reads them back and raises, as
the timestep check reads t back: on CUDA both synchronise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_like, check_noise, check_rows, device_guard, finish, scratch, unit_cols
from .diffusion import _coefficients, guided_operands
from .philox import philox_normal, seed_words

SPHERE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Columns per chunk at most; the values do not depend on it. 1024 spilled up to 488 bytes of registers a
# thread on sm_90 (tests/test_triton_compile.py).
_MAX_BLOCK = 512
_ELEMENTS = 4096  # elements per program and chunk: ROWS * BLOCK
_SERIES_BELOW: tl.constexpr = tl.constexpr(1e-4)  # th^2 under which sin(th) / th uses its series
_P_STEP_EPS: tl.constexpr = tl.constexpr(1e-12)
_HALF_PI: tl.constexpr = tl.constexpr(1.5707963267948966)
_QUARTER_PI: tl.constexpr = tl.constexpr(0.7853981633974483)

# the maps (constexpr: a compiled kernel reads no other global)
NORMALIZE, PROJECT, EXPMAP, LOGMAP, DISTANCE = (tl.constexpr(i) for i in range(5))
_NAMES = ("sphere_normalize", "sphere_project", "sphere_expmap", "sphere_logmap", "sphere_geodesic_distance")


@triton.jit
def _rounded(v, DTYPE: tl.constexpr):
    """``v`` as DTYPE, rounded to nearest even. For bfloat16 the rounding is spelled out on the
    bits (what a GPU's cvt.rn does): Triton's interpreter truncates float32 to bfloat16."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _sinc(theta):
    """sin(th) / th, its series below th^2 = 1e-4."""
    t2 = theta * theta
    small = t2 < _SERIES_BELOW
    safe = tl.where(small, 1.0, theta)
    return tl.where(small, 1.0 - t2 / 6.0 + t2 * t2 / 120.0, tl.sin(safe) / safe)


@triton.jit
def _atan2_nonneg(y, x):
    """atan2(y, x) in [0, pi/2] for y, x >= 0, not both 0: a guess within 2e-3 (a rational fit
    of atan on [0, 1], mirrored above 1) and two Newton steps on f = x sin(phi) - y cos(phi),
    whose error contracts as e -> e^3 / 3."""
    swap = y > x
    r = tl.where(swap, x, y) / tl.where(swap, y, x)
    guess = _QUARTER_PI * r - r * (r - 1.0) * (0.2447 + 0.0663 * r)
    phi = tl.where(swap, _HALF_PI - guess, guess)
    for _ in tl.static_range(2):
        s = tl.sin(phi)
        c = tl.cos(phi)
        phi = phi - (x * s - y * c) / (x * c + y * s)
    return phi


@triton.jit
def _sphere_map_kernel(
    out_ptr,  # (B, d) rows, or (B,) for the distance; unit column stride
    out_stride,  # row stride (element stride of the distance)
    x_ptr,  # (B, d) points, unit column stride
    x_row_stride,
    v_ptr,  # (B, d) v (project, expmap) or y (logmap, distance); None for normalize
    v_row_stride,
    bad_ptr,  # (B,) int8 flags: 1 x's row is zero, 2 y's row is zero
    n_rows,
    n_cols,
    eps: tl.float64,  # normalize's floor (float arguments: see kernels/_launch.py's F64_SCALARS)
    MAP: tl.constexpr,  # NORMALIZE, PROJECT, EXPMAP, LOGMAP or DISTANCE
    F64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    xs = x_ptr + rows[:, None] * x_row_stride
    if MAP != NORMALIZE:
        vs = v_ptr + rows[:, None] * v_row_stride
    xx = tl.zeros([ROWS], ACC)
    xv = tl.zeros([ROWS], ACC)
    vv = tl.zeros([ROWS], ACC)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(xs + cols[None, :], mask=m, other=0.0).to(ACC)
        xx += tl.sum(x * x, axis=1)
        if MAP != NORMALIZE:
            v = tl.load(vs + cols[None, :], mask=m, other=0.0).to(ACC)
            xv += tl.sum(x * v, axis=1)
            vv += tl.sum(v * v, axis=1)
    if MAP == NORMALIZE:
        tl.store(bad_ptr + rows, ((xx == 0.0) & (eps == 0.0)).to(tl.int8), mask=row_ok)
    elif MAP == LOGMAP or MAP == DISTANCE:
        tl.store(bad_ptr + rows, tl.where(xx == 0.0, 1, tl.where(vv == 0.0, 2, 0)).to(tl.int8), mask=row_ok)
    else:
        tl.store(bad_ptr + rows, (xx == 0.0).to(tl.int8), mask=row_ok)
    xx = tl.where(xx == 0.0, 1.0, xx)  # zero rows raise; keep their arithmetic finite (NaN stays)
    vv_safe = tl.where(vv == 0.0, 1.0, vv)
    nx = tl.sqrt(xx)

    # per-row coefficients: out = alpha x + beta v
    alpha = 1.0 / nx
    beta = tl.zeros([ROWS], ACC)
    if MAP == NORMALIZE:
        alpha = 1.0 / tl.maximum(nx, tl.full([], eps, ACC), propagate_nan=tl.PropagateNan.ALL)
    if MAP == PROJECT:
        alpha = -xv / xx
        beta = beta + 1.0
    if MAP == EXPMAP:
        lam = xv / xx
        theta = tl.sqrt(tl.maximum(vv - xv * lam, 0.0, propagate_nan=tl.PropagateNan.ALL))
        beta = _sinc(theta)
        alpha = tl.cos(theta) / nx - beta * lam
    if MAP == LOGMAP or MAP == DISTANCE:
        # chords at a common scale, c-+ = rho y -+ x: rho = |x| / |y| is exactly 1 for y = +-x
        rho = nx / tl.sqrt(vv_safe)
        p = tl.zeros([ROWS], ACC)
        q = tl.zeros([ROWS], ACC)
        dm = tl.zeros([ROWS], ACC)  # <c-, x>
        dp = tl.zeros([ROWS], ACC)  # <c+, x>
        for c0 in range(0, n_cols, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            m = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(xs + cols[None, :], mask=m, other=0.0).to(ACC)
            y = tl.load(vs + cols[None, :], mask=m, other=0.0).to(ACC)
            cm = tl.fma(rho[:, None], y, -x)
            cp = tl.fma(rho[:, None], y, x)
            p += tl.sum(cm * cm, axis=1)
            q += tl.sum(cp * cp, axis=1)
            if MAP == LOGMAP:
                dm += tl.sum(cm * x, axis=1)
                dp += tl.sum(cp * x, axis=1)
        theta = 2.0 * _atan2_nonneg(tl.sqrt(p), tl.where((p == 0.0) & (q == 0.0), 1.0, tl.sqrt(q)))
        if MAP == DISTANCE:
            tl.store(out_ptr + rows * out_stride, _rounded(theta, out_ptr.dtype.element_ty), mask=row_ok)
        else:
            # w = c - (<c, x> / |x|^2) x, the tangent part of the chord next to y, scaled to length
            # theta: |w|^2 = |c|^2 - <c, x>^2 / |x|^2 is accurate to a few ulp wherever it is used
            near = p <= q
            sigma = tl.where(near, -1.0, 1.0)
            cc = tl.where(near, p, q)
            cx = tl.where(near, dm, dp)
            nbeta = -cx / xx
            ww = cc - cx * (cx / xx)
            # |w| <= |c| / 2 (exact unit points give >= cos(pi/4) |c|; d = 1 always, but NaN rows):
            # the chord is rounding noise. 0 next to x^; next to -x^ the axis direction
            # theta (e_k - x_k x^) / sqrt(1 - x_k^2), k = 0 if |x_0| <= |x_1| else 1
            noise = 4.0 * ww <= cc
            r = theta / tl.sqrt(tl.where(noise, 1.0, ww))
            has_tangent = tl.full([ROWS], 1, tl.int64) < n_cols  # d > 1 (S^0 has no tangents)
            anti = noise & (p > q) & has_tangent
            x0 = tl.load(x_ptr + rows * x_row_stride, mask=row_ok, other=0.0).to(ACC)
            x1 = tl.load(x_ptr + rows * x_row_stride + 1, mask=row_ok & has_tangent, other=0.0).to(ACC)
            k = tl.where(tl.abs(x0) <= tl.abs(x1), 0, 1)
            xk = tl.where(k == 0, x0, x1) / nx
            anti_scale = theta / tl.sqrt(tl.where(anti, 1.0 - xk * xk, 1.0))
            alpha = -anti_scale * xk / nx

    if MAP != DISTANCE:
        for c0 in range(0, n_cols, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            m = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(xs + cols[None, :], mask=m, other=0.0).to(ACC)
            if MAP == NORMALIZE:
                res = alpha[:, None] * x
            elif MAP == LOGMAP:
                y = tl.load(vs + cols[None, :], mask=m, other=0.0).to(ACC)
                res = r[:, None] * tl.fma(nbeta[:, None], x, tl.fma(rho[:, None], y, sigma[:, None] * x))
                at_k = tl.where(cols[None, :] == k[:, None], anti_scale[:, None], 0.0)
                res = tl.where(anti[:, None], alpha[:, None] * x + at_k, tl.where(noise[:, None], 0.0, res))
            else:
                v = tl.load(vs + cols[None, :], mask=m, other=0.0).to(ACC)
                res = alpha[:, None] * x + beta[:, None] * v
            res = _rounded(res, out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], res, mask=m)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
def _sphere_q_sample_kernel(
    out_ptr,  # (B, d), unit column stride (the same memory as x when in place)
    out_row_stride,
    x_ptr,  # (B, d) points x0, unit column stride
    x_row_stride,
    z_ptr,  # (B, d) given noise, or None (seeded)
    z_row_stride,
    scale_ptr,  # (B,) float32 s = sqrt(1 - ab[t])
    bad_ptr,  # (B,) int8: 1 where x0's row is zero
    n_rows,
    n_cols,
    seed_lo,
    seed_hi,
    offset,
    F64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``exp_x^(s P z)``: ``cos(th) x^ + sinc(th) s (z - <x^, z> x^)``, ``th = s |P z|``."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    xs = x_ptr + rows[:, None] * x_row_stride
    if z_ptr is not None:
        zs = z_ptr + rows[:, None] * z_row_stride
    xx = tl.zeros([ROWS], ACC)
    xz = tl.zeros([ROWS], ACC)
    zz = tl.zeros([ROWS], ACC)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(xs + cols[None, :], mask=m, other=0.0).to(ACC)
        if z_ptr is not None:
            z = tl.load(zs + cols[None, :], mask=m, other=0.0).to(ACC)
        else:
            z = tl.where(m, philox_normal(rows[:, None] * n_cols + cols[None, :], seed_lo, seed_hi, offset), 0.0)
            z = z.to(ACC)
        xx += tl.sum(x * x, axis=1)
        xz += tl.sum(x * z, axis=1)
        zz += tl.sum(z * z, axis=1)
    tl.store(bad_ptr + rows, (xx == 0.0).to(tl.int8), mask=row_ok)
    xx = tl.where(xx == 0.0, 1.0, xx)
    s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    lam = xz / xx
    theta = s * tl.sqrt(tl.maximum(zz - xz * lam, 0.0, propagate_nan=tl.PropagateNan.ALL))
    beta = _sinc(theta) * s
    alpha = tl.cos(theta) / tl.sqrt(xx) - beta * lam
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(xs + cols[None, :], mask=m, other=0.0).to(ACC)
        if z_ptr is not None:
            z = tl.load(zs + cols[None, :], mask=m, other=0.0).to(ACC)
        else:
            z = philox_normal(rows[:, None] * n_cols + cols[None, :], seed_lo, seed_hi, offset).to(ACC)
        res = alpha[:, None] * x + beta[:, None] * z
        res = _rounded(res, out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :], res, mask=m)


@triton.jit
def _p_step_y(x_ptr, x_row_stride, f_ptr, f_row_stride, u_ptr, u_row_stride, z_ptr, z_row_stride,
              rows, cols, m, n_cols, a, b, c, guidance, seed_lo, seed_hi, offset,
              SEEDED: tl.constexpr, ACC: tl.constexpr):
    """``y = a x + b ((1 + w) f - w u) + c z`` on one chunk of rows x cols (zero outside m)."""
    r = rows[:, None]
    y = a[:, None] * tl.load(x_ptr + r * x_row_stride + cols[None, :], mask=m, other=0.0).to(ACC)
    f = tl.load(f_ptr + r * f_row_stride + cols[None, :], mask=m, other=0.0).to(ACC)
    if u_ptr is not None:
        u = tl.load(u_ptr + r * u_row_stride + cols[None, :], mask=m, other=0.0).to(ACC)
        f = (1.0 + guidance) * f - guidance * u
    y += b[:, None] * f
    if z_ptr is not None:  # a row whose c is 0 takes no noise (reference.diffusion.noise_term)
        z = tl.load(z_ptr + r * z_row_stride + cols[None, :], mask=m & (c[:, None] != 0.0), other=0.0)
        y += c[:, None] * z.to(ACC)
    elif SEEDED:
        z = philox_normal(r * n_cols + cols[None, :], seed_lo, seed_hi, offset)
        y += c[:, None] * tl.where(m & (c[:, None] != 0.0), z, 0.0).to(ACC)
    return y


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
def _sphere_p_step_kernel(
    out_ptr,  # (B, d), unit column stride (the same memory as x when in place)
    out_row_stride,
    x_ptr,  # (B, d) x_t
    x_row_stride,
    f_ptr,  # (B, d) model output
    f_row_stride,
    u_ptr,  # (B, d) unconditional model output, or None
    u_row_stride,
    z_ptr,  # (B, d) given noise, or None
    z_row_stride,
    coef_ptr,  # (B, 3) float32 rows (a, b, c), contiguous
    n_rows,
    n_cols,
    guidance: tl.float64,  # float arguments: see kernels/_launch.py's F64_SCALARS
    seed_lo,
    seed_hi,
    offset,
    SEEDED: tl.constexpr,
    F64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``y / max(|y|, 1e-12)``; y is formed twice (reduce, then write) rather than stored."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    guidance = tl.full([], guidance, ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    a = tl.load(coef_ptr + 3 * rows, mask=row_ok, other=0.0).to(ACC)
    b = tl.load(coef_ptr + 3 * rows + 1, mask=row_ok, other=0.0).to(ACC)
    c = tl.load(coef_ptr + 3 * rows + 2, mask=row_ok, other=0.0).to(ACC)
    yy = tl.zeros([ROWS], ACC)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = row_ok[:, None] & (cols[None, :] < n_cols)
        y = _p_step_y(x_ptr, x_row_stride, f_ptr, f_row_stride, u_ptr, u_row_stride, z_ptr, z_row_stride,
                      rows, cols, m, n_cols, a, b, c, guidance, seed_lo, seed_hi, offset, SEEDED, ACC)
        yy += tl.sum(y * y, axis=1)
    scale = 1.0 / tl.maximum(tl.sqrt(yy), _P_STEP_EPS, propagate_nan=tl.PropagateNan.ALL)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = row_ok[:, None] & (cols[None, :] < n_cols)
        y = _p_step_y(x_ptr, x_row_stride, f_ptr, f_row_stride, u_ptr, u_row_stride, z_ptr, z_row_stride,
                      rows, cols, m, n_cols, a, b, c, guidance, seed_lo, seed_hi, offset, SEEDED, ACC)
        res = scale[:, None] * y
        res = _rounded(res, out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :], res, mask=m)


# --- launchers (the ops' out form) ---------------------------------------------------------------
def _blocks(rows: int, cols: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, programs): BLOCK columns per chunk, ROWS rows per program."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(cols, 1)))
    rows_per = max(1, min(_ELEMENTS // block, triton.next_power_of_2(max(rows, 1))))
    return rows_per, block, triton.cdiv(rows, rows_per)


def _raise_flagged(bad: torch.Tensor, op: str, names: tuple[str, str], normalize: bool = False) -> None:
    """Raises for the first flagged row (a host read: on CUDA this synchronises)."""
    if not bool(bad.any()):
        return
    r = int(bad.nonzero()[0, 0])
    if normalize:
        raise ValueError(
            f"{op}: x: row {r} is zero and eps = 0, so it has no direction; pass eps > 0 to map zero rows to zero"
        )
    name = names[int(bad[r]) - 1]
    raise ValueError(f"{op}: {name}: row {r} is zero; a point on the sphere needs a nonzero row")


def _map_out(kind: tl.constexpr, x: torch.Tensor, v: torch.Tensor | None, eps: float, out: torch.Tensor) -> None:
    op = _NAMES[kind]
    second = "y" if kind in (LOGMAP, DISTANCE) else "v"
    check_rows(x, "x", SPHERE_DTYPES)
    if v is not None:
        check_like(v, x, second)
    rows, cols = x.shape
    if kind == DISTANCE:
        if out.shape != (rows,) or out.dtype != x.dtype or out.device != x.device:
            raise RuntimeError(f"out: expected a ({rows},) {x.dtype} tensor on {x.device}, got {tuple(out.shape)}")
    else:
        check_like(out, x, "out")
    if rows == 0 or cols == 0:
        return
    xs, vs, dst = unit_cols(x), unit_cols(v), scratch(out)  # distance: out is (B,)
    bad = torch.empty(rows, dtype=torch.int8, device=x.device)
    rows_per, block, programs = _blocks(rows, cols)
    with device_guard(x):
        _sphere_map_kernel[(programs,)](
            dst, dst.stride(0), xs, xs.stride(0), vs, 0 if vs is None else vs.stride(0), bad,
            rows, cols, float(eps), MAP=kind, F64=x.dtype == torch.float64, ROWS=rows_per, BLOCK=block,
        )
    _raise_flagged(bad, op, ("x", second), normalize=kind == NORMALIZE)
    finish(dst, out)


def sphere_normalize_out(x: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """``out = x / max(|x|, eps)``; x, out: (B, d). eps = 0 and a zero row raise ValueError."""
    if eps < 0:
        raise RuntimeError(f"sphere_normalize: eps must be >= 0, got {eps}")
    _map_out(NORMALIZE, x, None, eps, out)


def sphere_project_out(x: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    """``out = v - <x^, v> x^``; x, v, out: (B, d)."""
    _map_out(PROJECT, x, v, 0.0, out)


def sphere_expmap_out(x: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    """``out = cos|u| x^ + sinc|u| u``, ``u = P_x^ v``; x, v, out: (B, d)."""
    _map_out(EXPMAP, x, v, 0.0, out)


def sphere_logmap_out(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
    """``out = th / sin(th) (y^ - cos(th) x^)``; x, y, out: (B, d)."""
    _map_out(LOGMAP, x, y, 0.0, out)


def sphere_geodesic_distance_out(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
    """``out = 2 atan2(|y^ - x^|, |y^ + x^|)``; x, y: (B, d); out: (B,)."""
    _map_out(DISTANCE, x, y, 0.0, out)


def _scales(table: torch.Tensor, t: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """float32(table[t[r]]) per row, (B,) contiguous; t's values are checked on the host."""
    if table.dim() != 1 or table.dtype not in (torch.float64, torch.float32) or table.numel() == 0:
        raise RuntimeError(
            f"sphere_q_sample: table must be a non-empty (K,) float64/float32 tensor, got {tuple(table.shape)} "
            f"{table.dtype}"
        )
    # the (K, 3) gather of the diffusion step, on the one column: the same checks of t
    return _coefficients(table[:, None].expand(-1, 3), t, rows, False, device)[:, 0].contiguous()


def sphere_q_sample_out(
    x0: torch.Tensor,  # (B, d)
    t: torch.Tensor,  # (B,) or (1,) int64
    table: torch.Tensor,  # (K,) float64/float32: sqrt(1 - ab)
    noise: torch.Tensor | None,  # (B, d) x0's dtype
    seed: int | None,
    offset: int,
    out: torch.Tensor,  # (B, d) x0's dtype; may be x0 itself
) -> None:
    """Writes ``exp_x0(s P_x0(z))``, ``s = float32(table[t[r]])``, z the given noise or the Philox
    stream ``(seed, offset)`` at index ``r * d + j``. A zero row of x0 raises ValueError."""
    check_rows(x0, "x0", SPHERE_DTYPES)
    if (noise is None) == (seed is None):
        raise RuntimeError("sphere_q_sample: give exactly one of noise and seed")
    check_noise(x0, noise, seed, offset)
    check_like(out, x0, "out")
    rows, cols = x0.shape
    if table.device != x0.device:
        raise RuntimeError(f"table: expected a tensor on {x0.device} (the device of x0), got {table.device}")
    scale = _scales(table, t, rows, x0.device)
    if rows == 0 or cols == 0:
        return
    xs, zs, dst = unit_cols(x0), unit_cols(noise), scratch(out)
    bad = torch.empty(rows, dtype=torch.int8, device=x0.device)
    seed_lo, seed_hi = seed_words(seed) if seed is not None else (0, 0)
    rows_per, block, programs = _blocks(rows, cols)
    with device_guard(x0):
        _sphere_q_sample_kernel[(programs,)](
            dst, dst.stride(0), xs, xs.stride(0), zs, 0 if zs is None else zs.stride(0), scale, bad,
            rows, cols, seed_lo, seed_hi, offset, F64=x0.dtype == torch.float64, ROWS=rows_per, BLOCK=block,
        )
    _raise_flagged(bad, "sphere_q_sample", ("x0", "x0"))
    finish(dst, out)


def sphere_p_step_out(
    x: torch.Tensor,  # (B, d) x_t
    f: torch.Tensor,  # (B, d) model output, x's dtype
    f_uncond: torch.Tensor | None,  # (B, d) unconditional model output
    guidance: float,
    t: torch.Tensor,  # (B,) or (1,) int64
    table: torch.Tensor,  # (K, 3) float64/float32 rows (a, b, c)
    noise: torch.Tensor | None,  # (B, d) x's dtype
    seed: int | None,
    offset: int,
    clamp_t: bool,
    out: torch.Tensor,  # (B, d) x's dtype; may be x itself
) -> None:
    """Writes ``y / max(|y|, 1e-12)``, ``y = a x + b ((1 + w) f - w f_uncond) + c z`` with
    ``(a, b, c) = float32(table[t[r]])`` (``clamp_t``: t >= K uses K - 1) and z the given noise or
    the Philox stream at ``r * d + j`` (skipped where c == 0), math in float32 (float64 rows:
    float64)."""
    check_rows(x, "x_t", SPHERE_DTYPES)
    op = guided_operands(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out)
    if op is None:
        return
    rows, cols = x.shape
    rows_per, block, programs = _blocks(rows, cols)
    with device_guard(x):
        _sphere_p_step_kernel[(programs,)](
            op.dst, op.dst.stride(0), op.x, op.x.stride(0), op.f, op.f.stride(0),
            op.u, 0 if op.u is None else op.u.stride(0), op.z, 0 if op.z is None else op.z.stride(0),
            op.coef, rows, cols, float(guidance), op.seed_lo, op.seed_hi, offset,
            SEEDED=seed is not None, F64=x.dtype == torch.float64, ROWS=rows_per, BLOCK=block,
        )
    finish(op.dst, out)
