"""Geodesic sphere family: every implementation against the reference, gradients (float64
gradcheck at v = 0, y = x and y = -x, and next to -x), identities, nearly antipodal logmap, NaN and
underflowing rows, opcheck, compile (torch.compile; Triton for a GPU), seeded noise and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import diffcore
from diffcore import sphere
from diffcore.reference import sphere as ref
from diffcore.reference.random import normal
from tests.utils import DTYPES, assert_close_to_reference, impl_params, strided_rows

DIMS = (1, 3, 63, 65, 257)
ROWS = 6
LAYOUTS = ("contiguous", "row_stride", "column_major")
MAPS = ("normalize", "project", "expmap", "logmap", "geodesic_distance")
SCHEDULE = diffcore.Schedule.linear(10)  # for the bad-input table


@pytest.fixture(scope="module")
def schedule():
    return diffcore.Schedule.linear(50)


def op_impls(ops):
    """(op, implementation) pairs as pytest params, unavailable implementations skipped with
    their reason."""
    params = []
    for op in ops:
        for p in impl_params(f"sphere_{op}"):
            params.append(pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.id}"))
    return params


def rows(d, rows=ROWS, seed=0):
    """Points x, tangent-ish v and points y (float32, off the sphere), with the edge rows:
    v = 0, y = x, y = -x, y next to x, y = 2x."""
    g = torch.Generator().manual_seed(seed + d)
    x, v, y = (torch.randn(max(rows, 5), d, generator=g) for _ in range(3))
    v[0] = 0.0
    y[1] = x[1]
    y[2] = -x[2]
    y[3] = x[3] + 1e-3 * v[3]
    y[4] = 2 * x[4]
    return x[:rows], v[:rows], y[:rows]


def call(name, fn, *args, **kwargs):
    with diffcore.use(name):
        return fn(*args, **kwargs)


def map_args(op, x, v, y):
    return {"normalize": (x,), "project": (x, v), "expmap": (x, v)}.get(op, (x, y))


# --- parity: every implementation x dtype x d x layout -----------------------------------------
@pytest.mark.parametrize("op,name", op_impls(MAPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_maps_match_reference(op, name, dtype, layout):
    fn, ref_fn = getattr(sphere, op), getattr(ref, op)
    for d in DIMS:
        args = map_args(op, *rows(d))
        want = ref_fn(*args)
        low = [a.to(dtype) for a in args]
        same_dtype = ref_fn(*low)
        got = call(name, fn, *(strided_rows(a, layout) for a in low))
        assert got.dtype == dtype and got.shape == want.shape
        assert_close_to_reference(got, want, same_dtype)


@pytest.mark.parametrize("name", impl_params("sphere_q_sample"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_q_sample_matches_reference(name, dtype, layout, schedule):
    for d in DIMS:
        x, z, _ = rows(d)
        t = torch.randint(0, schedule.num_steps, (ROWS,), generator=torch.Generator().manual_seed(d))
        want = ref.q_sample(x, t, schedule, z)
        xl, zl = x.to(dtype), z.to(dtype)
        same_dtype = ref.q_sample(xl, t, schedule, zl)
        got = call(name, sphere.q_sample, strided_rows(xl, layout), t, schedule, noise=strided_rows(zl, layout))
        assert got.dtype == dtype
        assert_close_to_reference(got, want, same_dtype)


@pytest.mark.parametrize("name", impl_params("sphere_p_step"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_p_step_matches_reference(name, dtype, layout, schedule):
    for d in DIMS:
        x, m, z = rows(d, seed=1)
        u = torch.randn(ROWS, d, generator=torch.Generator().manual_seed(d))
        t = torch.tensor([0, 1, 7, 49, 20, 3])
        kw = dict(prediction="eps", uncond_out=u, guidance_scale=1.5, noise=z)
        want = ref.p_step(x, m, t, schedule, **kw)
        low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        same_dtype = ref.p_step(x.to(dtype), m.to(dtype), t, schedule, **low)
        low = {k: (strided_rows(v, layout) if isinstance(v, torch.Tensor) else v) for k, v in low.items()}
        got = call(name, sphere.p_step, strided_rows(x.to(dtype), layout), strided_rows(m.to(dtype), layout),
                   t, schedule, **low)
        assert got.dtype == dtype
        assert_close_to_reference(got, want, same_dtype)


@pytest.mark.parametrize("name", impl_params("sphere_p_step"))
@pytest.mark.parametrize("noise", ["given", "seeded"])
def test_p_step_rows_without_noise_do_not_read_it(name, noise, schedule):
    """At t = 0 the step is (a, b, c) = (0, 1, 0): the row is normalize(x0_hat) and takes no noise
    (NaN and inf in its row of the noise do not reach it); a row that reads an inf still carries it."""
    g = torch.Generator().manual_seed(7)
    x, m = (sphere.normalize(torch.randn(4, 37, generator=g)) for _ in range(2))
    z = torch.randn(4, 37, generator=g)
    t = torch.tensor([0, 3, 0, 5])
    x[3, 1] = float("inf")
    z[0, 3], z[2, 0] = float("nan"), float("inf")
    kw = {"noise": z} if noise == "given" else {"seed": 5}
    with diffcore.use(name):
        got = sphere.p_step(x, m, t, schedule, **kw)
    torch.testing.assert_close(got[[0, 2]], m[[0, 2]], rtol=1e-6, atol=1e-7)
    assert got[1].isfinite().all() and not got[3].isfinite().all()


@pytest.mark.parametrize("name", impl_params("sphere_p_step"))
@pytest.mark.parametrize("variance", ["posterior", "beta", "none"])
def test_p_step_modes(name, variance, schedule):
    x, m, z = rows(65, seed=2)
    for kw in (dict(prediction="x0"), dict(prediction="eps", clamp_t=True)):
        t = torch.tensor([0, 5, 49, 60 if kw.get("clamp_t") else 10, 2, 30])
        want = ref.p_step(x, m, t, schedule, variance=variance, noise=z, **kw)
        got = call(name, sphere.p_step, x, m, t, schedule, variance=variance, noise=z, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forms_agree(schedule):
    """Functional, out= and in place give the same rows; in place works on strided rows."""
    x, m, z = rows(63, seed=3)
    t = torch.tensor([4])
    want = sphere.p_step(x, m, t, schedule, noise=z)
    out = torch.empty_like(x)
    assert sphere.p_step(x, m, t, schedule, noise=z, out=out) is out
    strided = strided_rows(x.clone(), "column_major")
    assert sphere.p_step_(strided, m, t, schedule, noise=z) is strided
    for got in (out, strided):  # the kernels agree exactly; the reference up to its reduction order
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    want = sphere.q_sample(x, t, schedule, seed=5)
    inplace = x.clone()
    sphere.q_sample(inplace, t, schedule, seed=5, out=inplace)
    torch.testing.assert_close(inplace, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", impl_params("sphere_expmap"))
def test_long_rows_and_empty_batch(name, schedule):
    """Rows longer than a Triton chunk (and than a C++ row block); a batch of no rows."""
    x, v, y = rows(2100, rows=3, seed=14)
    t = torch.tensor([3, 9, 40])
    with diffcore.use(name):
        got = [sphere.expmap(x, v), sphere.logmap(x, y), sphere.q_sample(x, t, schedule, seed=2),
               sphere.p_step(x, v, t, schedule, noise=y)]
        empty = torch.empty(0, 5)
        assert sphere.expmap(empty, empty).shape == (0, 5)
        assert sphere.geodesic_distance(empty, empty).shape == (0,)
    z = normal(x.numel(), 2, 0).reshape(x.shape)
    want = [ref.expmap(x, v), ref.logmap(x, y), ref.q_sample(x, t, schedule, z),
            ref.p_step(x, v, t, schedule, noise=y)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- seeded noise --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", impl_params("sphere_q_sample"))
def test_seeded_q_sample_is_the_reference_stream(name, schedule):
    x, _, _ = rows(65, seed=4)
    t = torch.arange(ROWS) * 7
    z = normal(x.numel(), 2**63 + 5, 9).reshape(x.shape)
    got = call(name, sphere.q_sample, x, t, schedule, seed=2**63 + 5, offset=9)
    torch.testing.assert_close(got, ref.q_sample(x, t, schedule, z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", impl_params("sphere_p_step"))
def test_seeded_p_step_is_the_reference_stream(name, schedule):
    x, m, _ = rows(63, seed=5)
    t = torch.tensor([0, 1, 2, 30, 40, 49])
    z = normal(x.numel(), 77, 3).reshape(x.shape)
    got = call(name, sphere.p_step, x, m, t, schedule, seed=77, offset=3)
    torch.testing.assert_close(got, ref.p_step(x, m, t, schedule, noise=z), rtol=1e-5, atol=1e-5)


def test_seeded_noise_ignores_thread_count_and_backend(schedule):
    x, m, _ = rows(257, rows=64, seed=6)
    t = torch.randint(1, 50, (64,), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((sphere.q_sample(x, t, schedule, seed=3), sphere.p_step(x, m, t, schedule, seed=3)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    triton = diffcore.implementations("sphere_q_sample")["triton"]
    if triton.reason("cpu") is not None:
        pytest.skip(f"triton: {triton.reason('cpu')}")
    with diffcore.use("triton"):
        triton_results = (sphere.q_sample(x, t, schedule, seed=3), sphere.p_step(x, m, t, schedule, seed=3))
    for a, b in zip(results[0], triton_results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --- edge cases and identities -------------------------------------------------------------------
@pytest.mark.parametrize("name", impl_params("sphere_expmap"))
def test_identities(name):
    for d in DIMS[1:]:
        x, v, _ = rows(d, seed=7)
        x = sphere.normalize(x)
        v = 0.8 * sphere.project(x, v) / sphere.project(x, v).norm(dim=1, keepdim=True).clamp_min(1e-30)
        v[0] = 0.0
        with diffcore.use(name):
            y = sphere.expmap(x, v)
            back = sphere.logmap(x, y)
            tangent = sphere.project(x, v)
            again = sphere.project(x, tangent)
            dist = sphere.geodesic_distance(x, y)
        torch.testing.assert_close(back, v, rtol=1e-5, atol=2e-6)  # expmap then logmap returns v
        torch.testing.assert_close(again, tangent, rtol=1e-6, atol=1e-6)  # project is idempotent
        torch.testing.assert_close(dist, v.norm(dim=1), rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(y[0], x[0], rtol=0, atol=2e-7)  # expmap(x, 0) = x


@pytest.mark.parametrize("name", impl_params("sphere_q_sample"))
def test_results_have_unit_norm(name, schedule):
    for d in DIMS:
        x, v, y = rows(d, seed=8)
        t = torch.randint(0, 50, (ROWS,), generator=torch.Generator().manual_seed(d))
        with diffcore.use(name):
            outs = [sphere.normalize(x), sphere.expmap(x, v), sphere.q_sample(x, t, schedule, seed=1),
                    sphere.p_step(x, v, t, schedule, seed=1)]
        for out in outs:
            torch.testing.assert_close(out.norm(dim=1), torch.ones(ROWS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", impl_params("sphere_logmap"))
def test_logmap_edges(name):
    """y = x gives 0; y = -x the documented geodesic of length pi towards e_k, which exp maps
    back to y; nearly identical points keep their angle to rounding (no clamped acos)."""
    x = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [-0.28, 0.96, 0.0], [1.0, 0.0, 0.0]])
    with diffcore.use(name):
        assert torch.equal(sphere.logmap(x, x), torch.zeros_like(x))
        anti = sphere.logmap(x, -x)
        assert torch.equal(sphere.geodesic_distance(x, x), torch.zeros(4))
        torch.testing.assert_close(sphere.geodesic_distance(x, -x), torch.full((4,), math.pi))
        torch.testing.assert_close(sphere.expmap(x, anti), -x, rtol=0, atol=1e-6)
        # the axis e_k, k = 0 if |x_0| <= |x_1| else 1
        e = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        want = math.pi * sphere.project(x, e) / sphere.project(x, e).norm(dim=1, keepdim=True)
        torch.testing.assert_close(anti, want, rtol=1e-6, atol=1e-6)
        s0 = torch.tensor([[2.0], [-3.0]])
        assert torch.equal(sphere.logmap(s0, -s0), torch.zeros(2, 1))  # S^0 has no tangent directions
        angle = 3e-4
        y = torch.tensor([[math.cos(angle), math.sin(angle), 0.0]])
        torch.testing.assert_close(sphere.geodesic_distance(x[3:], y), torch.tensor([angle]), rtol=1e-6, atol=0)
        torch.testing.assert_close(sphere.logmap(x[3:], y), torch.tensor([[0.0, angle, 0.0]]), rtol=1e-6, atol=5e-8)


def near_antipodal_pair(delta, dtype, d=9, rows=4, seed=15):
    """Unit rows x and y at the angle pi - delta (built in float64, then rounded to dtype), and the
    float64 logmap ``(pi - delta) u`` of the float64 pair (u: the unit tangent towards y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64))
    u = torch.randn(rows, d, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(u - (u * x).sum(1, keepdim=True) * x)
    angle = math.pi - delta
    y = math.cos(angle) * x + math.sin(angle) * u
    return x.to(dtype), y.to(dtype), angle * u


@pytest.mark.parametrize("name", impl_params("sphere_logmap"))
def test_logmap_nearly_antipodal_has_length_theta(name):
    """Nearly (not exactly) antipodal points: the tangent's direction may be off by ~eps / delta,
    but it is tangent at x, its length is the angle (to rounding) and exp maps it back to y^."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(4, 9, generator=g)
    opposite = [(x, -3.0 * x),  # opposite up to the rounding of y^ (3 is not a power of two)
                (torch.tensor([[3.0, 0.0, 0.0], [0.0, -5.0, 0.0]]), torch.tensor([[-9.0, 0.0, 0.0], [0.0, 15.0, 0.0]]))]
    for dtype, deltas, atol in ((torch.float32, (1e-2, 1e-4, 1e-6), 2e-6), (torch.float64, (1e-4, 1e-8, 1e-12), 1e-14)):
        pairs = [(a.to(dtype), b.to(dtype)) for a, b in opposite] + [near_antipodal_pair(d, dtype)[:2] for d in deltas]
        for xs, ys in pairs:
            with diffcore.use(name):
                log = sphere.logmap(xs, ys)
                dist = sphere.geodesic_distance(xs, ys)
                back = sphere.expmap(xs, log)
            torch.testing.assert_close(log.norm(dim=1), dist, rtol=0, atol=atol)
            assert float((log * sphere.normalize(xs)).sum(1).abs().max()) <= atol  # tangent at x
            torch.testing.assert_close(back, sphere.normalize(ys), rtol=0, atol=3 * atol)
    for delta in (1e-2, 1e-4):  # and the direction is right to ~eps / delta
        x, y, want = near_antipodal_pair(delta, torch.float32)
        with diffcore.use(name):
            got = sphere.logmap(x, y)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 / delta)


@pytest.mark.parametrize("name", impl_params("sphere_logmap"))
def test_logmap_antipodal_ignores_strides(name):
    """y = -x counts as exactly antipodal whatever the layouts of x and y (the reference reduces
    strided rows in another order): the documented geodesic towards e_k, of length pi."""
    x = torch.randn(8, 34, generator=torch.Generator().manual_seed(1))[:, ::2]
    with diffcore.use(name):
        got = sphere.logmap(x, -x)
        want = sphere.logmap(x.contiguous(), -x)
        column_major = sphere.logmap(strided_rows(x.contiguous(), "column_major"), -x)
    xu = x / x.norm(dim=1, keepdim=True)
    k = (xu[:, 0].abs() > xu[:, 1].abs()).long()
    xk = xu.gather(1, k[:, None])
    axis = math.pi * (torch.nn.functional.one_hot(k, 17).float() - xk * xu) / torch.sqrt(1 - xk * xk)
    for out in (got, want, column_major):
        torch.testing.assert_close(out, axis, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op,name", op_impls(MAPS + ("q_sample", "p_step")))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_nan_rows_stay_nan(op, name, dtype, schedule):
    """A NaN in a row makes the whole output row NaN, in every implementation (d = 1 too); other
    rows are untouched."""
    t = torch.full((ROWS,), 3)
    for d in (1, 5):
        x, v, y = (a.to(dtype) for a in rows(d, seed=18))
        x[0, -1] = float("nan")
        calls = {"q_sample": lambda: sphere.q_sample(x, t, schedule, noise=v),
                 "p_step": lambda: sphere.p_step(x, v, t, schedule),
                 "normalize": lambda: sphere.normalize(x, eps=0.0)}
        with diffcore.use(name):
            got = calls[op]() if op in calls else getattr(sphere, op)(*map_args(op, x, v, y))
        assert bool(got[0].isnan().all()), (d, got[0])
        assert bool(got[1:].isfinite().all())


@pytest.mark.parametrize("name", impl_params("sphere_expmap"))
def test_rows_whose_norm_underflows_are_zero(name, schedule):
    """A nonzero row whose sum of squares underflows in the math dtype (float32 for float32 rows,
    float64 for float64 rows) has no direction: every implementation raises as for a zero row."""
    for dtype, tiny, fine in ((torch.float32, 1e-30, 1e-15), (torch.float64, 1e-170, 1e-30)):
        x = torch.randn(4, 3, dtype=dtype)
        x[2] = tiny
        ok = torch.randn(4, 3, dtype=dtype)
        with diffcore.use(name):
            for call, match in ((lambda: sphere.project(x, ok), "x: row 2 is zero"),
                                (lambda: sphere.expmap(x, ok), "x: row 2 is zero"),
                                (lambda: sphere.logmap(x, ok), "x: row 2 is zero"),
                                (lambda: sphere.logmap(ok, x), "y: row 2 is zero"),
                                (lambda: sphere.geodesic_distance(ok, x), "y: row 2 is zero"),
                                (lambda: sphere.q_sample(x, 3, schedule, seed=0), "x0: row 2 is zero"),
                                (lambda: sphere.normalize(x, eps=0.0), "row 2 is zero and eps = 0")):
                with pytest.raises(ValueError, match=match):
                    call()
            x[2] = fine  # small, but its norm is representable: an ordinary point
            got = sphere.expmap(x, ok)
        torch.testing.assert_close(got[2:3], ref.expmap(x[2:3] / fine, ok[2:3]))


# --- gradients ----------------------------------------------------------------------------------
def grad_rows():
    """float64 rows with v = 0, y = x and y = -x exactly (gradcheck's perturbations leave the
    sphere: the projections are part of every op)."""
    g = torch.Generator().manual_seed(9)
    x, v, y = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    v[1] = 0.0
    y[2] = -x[2]
    y[3] = x[3]
    return [a.requires_grad_() for a in (x, v, y)]


def test_gradcheck_maps():
    x, v, y = grad_rows()
    assert torch.autograd.gradcheck(lambda x: sphere.normalize(x), (x,))
    assert torch.autograd.gradcheck(sphere.project, (x, v))
    assert torch.autograd.gradcheck(sphere.expmap, (x, v))
    assert torch.autograd.gradcheck(sphere.geodesic_distance, (x, y))
    keep = [0, 1, 3]  # logmap is not differentiable at y = -x (row 2): checked finite below
    assert torch.autograd.gradcheck(lambda a, b: sphere.logmap(a[keep], b[keep]), (x, y))
    for fn, args in ((sphere.logmap, (x, y)), (sphere.expmap, (x, v)), (sphere.geodesic_distance, (x, y))):
        grads = torch.autograd.grad(fn(*args).sum(), args)
        assert all(bool(torch.isfinite(g).all()) for g in grads)
    grads = torch.autograd.grad(sphere.expmap(x, torch.zeros_like(v, requires_grad=True)).sum(), (x,))
    assert bool(torch.isfinite(grads[0]).all())


@pytest.mark.parametrize("name", impl_params("sphere_p_step"))
def test_every_implementation_keeps_autograd(name, schedule):
    """diffcore.use(name) runs that implementation with the op's autograd formula: the gradients
    of the dispatcher's (gradchecked here); the in-place and out= forms refuse autograd."""
    x, v, y = grad_rows()
    m = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 49, 7])
    calls = (
        (lambda: sphere.normalize(v + x), (x, v)), (lambda: sphere.project(x, v), (x, v)),
        (lambda: sphere.expmap(x, v), (x, v)), (lambda: sphere.logmap(x[[0, 1, 3]], y[[0, 1, 3]]), (x, y)),
        (lambda: sphere.geodesic_distance(x, y), (x, y)),
        (lambda: sphere.q_sample(x, t, schedule, noise=v), (x, v)),
        (lambda: sphere.p_step(x, m, t, schedule, noise=v), (x, m, v)),
    )
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    for call, inputs in calls:
        want = torch.autograd.grad((call() * weights[: call().shape[-1]]).sum(), inputs, allow_unused=True)
        with diffcore.use(name):
            out = call()
            got = torch.autograd.grad((out * weights[: out.shape[-1]]).sum(), inputs, allow_unused=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    with pytest.raises(RuntimeError, match="model_out: requires grad, but the in-place and out= forms"):
        sphere.p_step_(x.detach().clone(), m, t, schedule)


@pytest.mark.parametrize("name", impl_params("sphere_p_step"))
def test_float64_scalars_are_exact(name, schedule):
    """float64 rows use guidance_scale as given: 0.3 is not a float32 value, and a kernel that
    rounded it would be off by ~1e-8 (kernels/_launch.py, F64_SCALARS)."""
    x, v, _ = (a.detach() for a in grad_rows())
    m, u = (torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    t = torch.tensor([0, 3, 49, 7])
    with diffcore.use("reference"):
        want = sphere.p_step(x, m, t, schedule, uncond_out=u, guidance_scale=0.3, noise=v)
    with diffcore.use(name):
        got = sphere.p_step(x, m, t, schedule, uncond_out=u, guidance_scale=0.3, noise=v)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


def test_gradcheck_diffusion(schedule):
    x, z, _ = grad_rows()
    m, u = (torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t = torch.tensor([0, 3, 49, 7])
    assert torch.autograd.gradcheck(lambda x, z: sphere.q_sample(x, t, schedule, noise=z), (x, z))
    assert torch.autograd.gradcheck(lambda x: sphere.q_sample(x, t, schedule, seed=3), (x,))
    assert torch.autograd.gradcheck(
        lambda x, m, u, z: sphere.p_step(x, m, t, schedule, prediction="eps", uncond_out=u,
                                         guidance_scale=0.5, noise=z), (x, m, u, z))
    assert torch.autograd.gradcheck(lambda x, m: sphere.p_step(x, m, t, schedule, seed=5), (x, m))


def test_float32_gradients_match_float64():
    """The backward in float32 (series in float64) agrees with float64 near |v| = 0."""
    x, v, y = (a.detach() for a in grad_rows())
    v = 1e-3 * v
    out = {}
    for dt in (torch.float32, torch.float64):
        xs, vs, ys = (a.to(dt).requires_grad_() for a in (x, v, y))
        loss = (sphere.expmap(xs, vs) ** 2 * torch.arange(5, dtype=dt)).sum() + sphere.logmap(xs, ys)[[0, 1, 3]].sum()
        out[dt] = torch.autograd.grad(loss, (xs, vs, ys))
    for a, b in zip(out[torch.float32], out[torch.float64]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_logmap_gradients_near_antipodal():
    """Next to antipodal points the float32 backward agrees with float64 (cos and sin come from the
    chords: the sine of a float32 angle near pi is off by ~eps / delta), and gradcheck holds."""
    g = torch.Generator().manual_seed(19)
    for delta in (1e-2, 1e-3):
        x, y, _ = near_antipodal_pair(delta, torch.float32)
        grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        out = {}
        for dt in (torch.float32, torch.float64):
            xs, ys = (a.to(dt).requires_grad_() for a in (x, y))
            out[dt] = torch.autograd.grad(sphere.logmap(xs, ys), (xs, ys), grad_out.to(dt))
        for a, b in zip(out[torch.float32], out[torch.float64]):
            assert float((a.double() - b).norm() / b.norm()) <= 2e-5
    x, y, _ = near_antipodal_pair(1e-2, torch.float64)
    assert torch.autograd.gradcheck(sphere.logmap, (x.requires_grad_(), y.requires_grad_()))


# --- opcheck and compile -------------------------------------------------------------------------
def opcheck_cases(schedule):
    g = torch.Generator().manual_seed(10)

    def r(grad=True):
        return torch.randn(3, 5, generator=g).requires_grad_(grad)

    ops = torch.ops.diffcore
    t, q_table, p_table = torch.tensor([0, 4, 9]), schedule.sqrt_one_minus_alphas_cumprod, schedule.p_table("eps")
    return [
        (ops.sphere_normalize.default, (r(), 1e-12), {}),
        (ops.sphere_project.default, (r(), r()), {}),
        (ops.sphere_expmap.default, (r(), r()), {}),
        (ops.sphere_logmap.default, (r(), r()), {}),
        (ops.sphere_geodesic_distance.default, (r(), r()), {}),
        (ops.sphere_q_sample.default, (r(), t, q_table, r(), None, 0), {}),
        (ops.sphere_q_sample.default, (r(), t, q_table, None, 5, 2), {}),
        (ops.sphere_q_sample_.default, (r(False), t, q_table, None, 5, 2), {}),
        (ops.sphere_q_sample_out.default, (r(False), t, q_table, r(False), None, 0), {"out": r(False)}),
        (ops.sphere_p_step.default, (r(), r(), r(), 0.5, t, p_table, r(), None, 0, False), {}),
        (ops.sphere_p_step.default, (r(), r(), None, 0.0, t, p_table, None, 3, 1, True), {}),
        (ops.sphere_p_step_.default, (r(False), r(False), None, 0.0, t, p_table, None, 3, 1, False), {}),
        (ops.sphere_p_step_out.default, (r(False), r(False), None, 0.0, t, p_table, r(False), None, 0, False),
         {"out": r(False)}),
    ]


def test_opcheck(schedule):
    for op, args, kwargs in opcheck_cases(schedule):
        torch.library.opcheck(op, args, kwargs)


def test_compile_fullgraph(schedule):
    """The family in one inductor graph: normalize, project, expmap, logmap, distance, q_sample,
    p_step (seeded and given noise) and the in-place step; no graph break, same values."""
    x, v, y = rows(64, seed=11)
    t = torch.tensor([3])

    def chain(x, v, y):
        x = sphere.normalize(x)
        y = sphere.expmap(x, sphere.project(x, v))
        back = sphere.logmap(x, y)
        xt = sphere.q_sample(x, t, schedule, seed=1)
        step = sphere.p_step(xt, back, t, schedule, noise=v)
        inplace = xt.clone()
        sphere.p_step_(inplace, step, t, schedule, seed=2)
        return sphere.geodesic_distance(step, inplace), inplace

    compiled = torch.compile(chain, fullgraph=True)
    for a, b in zip(compiled(x, v, y), chain(x, v, y)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_backward_aot_eager(schedule):
    x, v, y = (a.requires_grad_() for a in rows(33, seed=12))
    t = torch.tensor([1, 2, 3, 4, 5, 6])

    def loss(x, v, y):
        out = sphere.logmap(x, sphere.expmap(x, v)) + sphere.q_sample(x, t, schedule, noise=y)
        return out.sum() + sphere.geodesic_distance(x, y).sum() + sphere.p_step(x, v, t, schedule, seed=4).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, v, y), (x, v, y))
    want = torch.autograd.grad(loss(x, v, y), (x, v, y))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", impl_params("sphere_normalize"))
def test_zero_rows(name, schedule):
    x = torch.randn(4, 3)
    x[2] = 0.0
    ok = torch.randn(4, 3)
    with diffcore.use(name):
        assert torch.equal(sphere.normalize(x)[2], torch.zeros(3))  # eps > 0: a zero row stays zero
        with pytest.raises(ValueError, match="row 2 is zero and eps = 0"):
            sphere.normalize(x, eps=0.0)
        with pytest.raises(ValueError, match="x: row 2 is zero"):
            sphere.expmap(x, ok)
        with pytest.raises(ValueError, match="y: row 2 is zero"):
            sphere.logmap(ok, x)
        with pytest.raises(ValueError, match="x: row 2 is zero"):
            sphere.geodesic_distance(x, ok)
        with pytest.raises(ValueError, match="x0: row 2 is zero"):
            sphere.q_sample(x, 3, schedule, seed=0)


@pytest.mark.parametrize("name", impl_params("sphere_p_step"))
def test_timesteps_out_of_range_raise(name, schedule):
    x, m, _ = rows(5)
    with diffcore.use(name), pytest.raises(RuntimeError, match=r"t: every timestep must lie in \[0, 50\)"):
        sphere.p_step(x, m, torch.tensor([0, 1, 50, 2, 3, 4]), schedule)
    with pytest.raises(ValueError, match=r"t: expected a timestep in \[0, 50\)"):
        sphere.q_sample(x, 50, schedule, seed=0)


@pytest.mark.parametrize("call_it, error, match", [
    (lambda x: sphere.normalize(x[0]), ValueError, "x: expected a 2-D tensor"),
    (lambda x: sphere.normalize(x.long()), TypeError, "x: expected float32, float16, bfloat16 or float64, got"),
    (lambda x: sphere.normalize(x[:, :0]), ValueError, "at least one column"),
    (lambda x: sphere.normalize(x, eps=-1.0), ValueError, "eps: expected a finite eps >= 0"),
    (lambda x: sphere.normalize(x, eps="a"), TypeError, "eps: expected a finite eps >= 0, got str"),
    (lambda x: sphere.expmap(x, x[:, :2]), ValueError, r"v: expected shape \(4, 3\)"),
    (lambda x: sphere.logmap(x, x.double()), TypeError, "y: expected dtype torch.float32"),
    (lambda x: sphere.logmap(x, torch.empty(4, 3, device="meta")), ValueError, "y: expected a tensor on cpu"),
    (lambda x: sphere.project(x.to(torch.complex64), x), TypeError, "got torch.complex64"),
    (lambda x: sphere.q_sample(x, 1, "linear", seed=0), TypeError, "schedule: expected a diffcore.Schedule"),
    (lambda x: sphere.q_sample(x, 1, SCHEDULE, noise=x, seed=0), ValueError, "noise and seed: give one"),
    (lambda x: sphere.q_sample(x, 1, SCHEDULE, noise=x.half()), TypeError, "noise: expected dtype"),
    (lambda x: sphere.p_step(x, x[:2], 1, SCHEDULE), ValueError, "model_out: expected shape"),
    (lambda x: sphere.p_step(x, x, 1, SCHEDULE, guidance_scale=1.0), ValueError, "needs uncond_out"),
    (lambda x: sphere.p_step(x, x, torch.tensor([1, 2]), SCHEDULE), ValueError, r"t: expected shape \(4,\)"),
    (lambda x: sphere.p_step(x, x, 1, SCHEDULE, out=x[:, :2]), ValueError, "out: expected shape"),
    (lambda x: sphere.p_step(x, x.clone(), 1, SCHEDULE, noise=x.clone(), out=None, prediction="v"), ValueError,
     "prediction: expected one of"),
    (lambda x: sphere.p_step_(x, x.clone(), 1, SCHEDULE, out=x), TypeError, "takes no out="),
    (lambda x: sphere.q_sample(x, 1, SCHEDULE, seed=-1 - 2**63), ValueError, "seed: expected an int in"),
    (lambda x: sphere.q_sample(e := x[:1].expand(4, -1), 1, SCHEDULE, seed=0, out=e), ValueError,
     "x0: more than one of its elements refers to the same memory location"),
])
def test_bad_input(call_it, error, match):
    with pytest.raises(error, match=match):
        call_it(torch.randn(4, 3))


def test_geoopt_agrees():
    geoopt = pytest.importorskip("geoopt")
    manifold = geoopt.Sphere()
    x, v, y = rows(16, seed=13)
    x, y = sphere.normalize(x.double()), sphere.normalize(y.double())
    v = sphere.project(x, v.double())
    keep = [0, 5]  # geoopt's clamped acos loses precision at (and next to) y = x and y = -x
    torch.testing.assert_close(sphere.expmap(x, v), manifold.expmap(x, v))
    torch.testing.assert_close(sphere.logmap(x[keep], y[keep]), manifold.logmap(x[keep], y[keep]))
    torch.testing.assert_close(sphere.geodesic_distance(x[keep], y[keep]), manifold.dist(x[keep], y[keep]))
    torch.testing.assert_close(sphere.project(x, v), manifold.proju(x, v))
