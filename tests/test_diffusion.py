"""Reverse-diffusion family: every implementation against the DiffRec-style reference, the public
API's modes, gradients, opcheck, compile, the sampling loop and bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffcore
from diffcore.reference import diffusion as ref
from diffcore.reference.random import normal
from tests.utils import DTYPES, assert_close_to_reference, impl_params, strided_rows

SHAPES = [(3, 2810), (7, 1001), (1, 1), (5, 64)]
TRITON_SHAPES = [(3, 37), (2, 1001)]  # the interpreter is slow: small shapes


@pytest.fixture(scope="module")
def schedule():
    return diffcore.Schedule.linear_var(40, 0.1, 0.0005, 0.005)


def shapes_for(name):
    return TRITON_SHAPES if name == "triton" else SHAPES


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]


def timesteps(kind, rows, T, seed=0):
    if kind == "int":
        return 17
    if kind == "zero":
        return 0
    if kind == "row":
        return torch.randint(0, T, (rows,), generator=torch.Generator().manual_seed(seed))
    return torch.tensor([T - 1])


def run_p_step(name, x, m, t, schedule, **kwargs):
    with diffcore.use(name):
        return diffcore.p_step(x, m, t, schedule, **kwargs)


# --- parity: every implementation x dtype x shape x layout x timesteps x mode ------------------
@pytest.mark.parametrize("name", impl_params("diffusion_step"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "row_stride", "column_major"])
@pytest.mark.parametrize("t_kind", ["int", "row", "last", "zero"])
def test_p_step_matches_reference(name, dtype, layout, t_kind, schedule):
    for shape in shapes_for(name):
        x, m, u, z = make(shape, torch.float32)
        t = timesteps(t_kind, shape[0], schedule.num_steps)
        want = ref.p_step(x, m, t, schedule, noise=z)
        low = [v.to(dtype) for v in (x, m, z)]
        same_dtype = ref.p_step(*low[:2], t, schedule, noise=low[2]).to(dtype)
        xs, ms, zs = (strided_rows(v, layout) for v in low)
        got = run_p_step(name, xs, ms, t, schedule, noise=zs)
        assert got.dtype == dtype and got.shape == shape
        assert_close_to_reference(got, want, same_dtype)


@pytest.mark.parametrize("name", impl_params("diffusion_step"))
@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("variance", ["posterior", "beta", "none"])
@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_p_step_modes(name, prediction, variance, guidance, schedule):
    shape = shapes_for(name)[1]
    x, m, u, z = make(shape, torch.float32, seed=1)
    t = timesteps("row", shape[0], schedule.num_steps, seed=2)
    kwargs = dict(prediction=prediction, variance=variance, noise=z)
    if guidance:
        kwargs.update(uncond_out=u, guidance_scale=guidance)
    want = ref.p_step(x, m, t, schedule, **kwargs)
    got = run_p_step(name, x, m, t, schedule, **kwargs)
    # eps folds two float64 coefficients into one (diffusion.py): agreement is to float32 rounding
    # of the largest intermediate, sqrt(1/ab) x.
    scale = schedule.sqrt_recip_alphas_cumprod.max().item() if prediction == "eps" else 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale * (1 + guidance))


@pytest.mark.parametrize("name", impl_params("diffusion_step"))
@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_seeded_p_step_is_the_reference_stream(name, seed, schedule):
    shape = shapes_for(name)[1]
    x, m, _, _ = make(shape, torch.float32, seed=3)
    t = timesteps("row", shape[0], schedule.num_steps, seed=4)
    got = run_p_step(name, x, m, t, schedule, seed=seed, offset=11)
    z = normal(x.numel(), seed, 11).reshape(shape)
    torch.testing.assert_close(got, ref.p_step(x, m, t, schedule, noise=z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", impl_params("diffusion_step"))
@pytest.mark.parametrize("noise", ["given", "seeded"])
def test_rows_without_noise_do_not_read_it(name, noise, schedule):
    """x0 prediction at t = 0 has (a, b, c) = (0, 1, 0): x_0 = x0_hat. Such a row takes no noise, so
    NaN and inf in its row of the noise do not reach it (reference.diffusion.noise_term); a row that
    reads an inf still carries it."""
    x, m, _, z = make((4, 37), torch.float32, seed=7)
    t = torch.tensor([0, 3, 0, 5])
    x[3, 1] = float("inf")
    z[0, 3], z[2, 0] = float("nan"), float("inf")
    kw = {"noise": z} if noise == "given" else {"seed": 5}
    got = run_p_step(name, x, m, t, schedule, **kw)
    torch.testing.assert_close(got[[0, 2]], m[[0, 2]], rtol=0, atol=0)
    assert got[1].isfinite().all() and not got[3].isfinite().all()


@pytest.mark.parametrize("noise", ["given", "seeded"])
def test_large_outputs_are_streamed_alike(noise, schedule):
    """An allocating step whose output passes 32 MiB is written with non-temporal stores, each row's
    head up to its first aligned element plainly (rows of 21,001 floats start at every alignment):
    it equals the in-place step, which stores plainly, bit for bit, and the reference."""
    g = torch.Generator().manual_seed(3)
    x, m, z = (torch.randn(401, 21_001, generator=g) for _ in range(3))
    t = torch.randint(0, schedule.num_steps, (401,), generator=g)
    kw = {"noise": z} if noise == "given" else {"seed": 9}
    got = diffcore.p_step(x, m, t, schedule, **kw)
    torch.testing.assert_close(got, diffcore.p_step_(x.clone(), m, t, schedule, **kw), rtol=0, atol=0)
    zz = z if noise == "given" else normal(x.numel(), 9, 0).reshape(x.shape)
    torch.testing.assert_close(got, ref.p_step(x, m, t, schedule, noise=zz), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", impl_params("diffusion_step"))
def test_q_sample_matches_reference(name, schedule):
    shape = shapes_for(name)[0]
    x, _, _, z = make(shape, torch.float32, seed=5)
    t = timesteps("row", shape[0], schedule.num_steps, seed=6)
    with diffcore.use(name):
        given = diffcore.q_sample(x, t, schedule, noise=z)
        seeded = diffcore.q_sample(x, t, schedule, seed=9)
    torch.testing.assert_close(given, ref.q_sample(x, t, schedule, z), rtol=1e-5, atol=1e-6)
    z9 = normal(x.numel(), 9, 0).reshape(shape)
    torch.testing.assert_close(seeded, ref.q_sample(x, t, schedule, z9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", impl_params("diffusion_step"))
@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [(30, 20), (5, -1), (0, -1)])
def test_ddim_step_matches_reference(name, prediction, eta, steps, schedule):
    shape = shapes_for(name)[1]
    x, m, _, z = make(shape, torch.float64, seed=7)
    t, t_prev = steps
    with diffcore.use(name):
        got = diffcore.ddim_step(x.float(), m.float(), t, t_prev, schedule, eta=eta, prediction=prediction,
                                 noise=z.float())
    # The truth is DDIM in float64 throughout. The reference (guided-diffusion's style, tables
    # gathered then cast to float32) is off by up to ~1e-4 in "x0" mode here: eps = (x - sqrt(ab) x0)
    # / sqrt(1 - ab) amplifies the cast near small t; the fused float64 coefficients do not.
    exact = ddim_float64(x, m, z, t, t_prev, schedule, eta, prediction)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=2e-6 * exact.abs().max().item())
    loose = ref.ddim_step(x.float(), m.float(), t, t_prev, schedule, eta=eta, prediction=prediction, noise=z.float())
    torch.testing.assert_close(got, loose, rtol=1e-3, atol=1e-3)


def ddim_float64(x, m, z, t, t_prev, schedule, eta, prediction):
    ab = schedule.alphas_cumprod[t]
    ab_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    if prediction == "x0":
        x0, eps = m, (x - ab.sqrt() * m) / (1 - ab).sqrt()
    else:
        x0, eps = (x - (1 - ab).sqrt() * m) / ab.sqrt(), m
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    out = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps
    return out + sigma * z if t > 0 else out


def test_ddim_tensor_timesteps_match_ints(schedule):
    x, m, _, z = make((4, 33), torch.float32, seed=8)
    by_int = diffcore.ddim_step(x, m, 12, 8, schedule, eta=0.3, noise=z)
    by_tensor = diffcore.ddim_step(x, m, torch.full((4,), 12), torch.full((4,), 8), schedule, eta=0.3, noise=z)
    torch.testing.assert_close(by_int, by_tensor, rtol=0, atol=0)


# --- in place, out=, dispatch -------------------------------------------------------------------
def test_in_place_and_out_equal_functional(schedule):
    x, m, u, z = make((6, 777), torch.float32, seed=9)
    kwargs = dict(uncond_out=u, guidance_scale=1.5, noise=z)
    want = diffcore.p_step(x, m, 3, schedule, **kwargs)
    out = torch.empty_like(x)
    assert diffcore.p_step(x, m, 3, schedule, out=out, **kwargs) is out
    x_in = x.clone()
    assert diffcore.p_step_(x_in, m, 3, schedule, **kwargs) is x_in
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(x_in, want, rtol=0, atol=0)


def test_in_place_on_strided_rows(schedule):
    x, m, _, z = make((4, 300), torch.float32, seed=10)
    want = diffcore.p_step(x, m, 5, schedule, noise=z)
    for layout in ("row_stride", "column_major"):
        xs = strided_rows(x.clone(), layout)
        diffcore.p_step_(xs, m, 5, schedule, noise=z)
        torch.testing.assert_close(xs, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", impl_params("diffusion_step"))
@pytest.mark.parametrize("step", ["diffusion", "sphere"])
@pytest.mark.parametrize("alias", ["identical", "shifted_rows", "expanded_row"])
@pytest.mark.parametrize("operand", ["model_out", "uncond_out", "noise"])
def test_in_place_operands_that_alias_x_t_are_read_before_it_is_written(name, step, alias, operand, schedule):
    """p_step_ reads an operand that shares x_t's memory as it was before the call: exactly x_t's
    layout, a view of x_t shifted by one row, or x_t's first row expanded (a denoiser that returns
    a view of its input). The result equals the step on copies, for every implementation (the C++
    kernel copies such operands itself; for the others the Python entry does)."""
    B, N = 6, 131
    buf = torch.randn(B + 1, N, generator=torch.Generator().manual_seed(11))
    x = buf[:B]
    if step == "sphere":
        buf /= buf.norm(dim=1, keepdim=True)
    view = {"identical": buf[:B], "shifted_rows": buf[1:], "expanded_row": buf[:1].expand(B, N)}[alias]
    m, u, z = make((B, N), torch.float32, seed=12)[:3]
    kwargs = {"model_out": m, "uncond_out": u, "noise": z}
    kwargs[operand] = view
    copies = {k: v.clone() for k, v in kwargs.items()}
    run = diffcore.sphere.p_step_ if step == "sphere" else diffcore.p_step_
    with diffcore.use(name):
        want = run(x.clone(), copies.pop("model_out"), 7, schedule, guidance_scale=1.5, **copies)
        run(x, kwargs.pop("model_out"), 7, schedule, guidance_scale=1.5, **kwargs)
    torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_outputs_that_repeat_memory_are_refused(schedule):
    """An expanded (stride-0) out or in-place x would have several rows write one location: the
    public API raises ValueError naming it, a direct op call RuntimeError; q_sample (diffusion and
    sphere) in place reads a noise that is a shifted view of x0 as it was before the call."""
    x, m = make((4, 8), torch.float32, seed=15)[:2]
    expanded = torch.zeros(1, 8).expand(4, 8)
    calls = [
        lambda: diffcore.q_sample(x, 5, schedule, seed=3, out=expanded),
        lambda: diffcore.p_step(x, m, 5, schedule, seed=3, out=expanded),
        lambda: diffcore.sphere.q_sample(x, 5, schedule, seed=3, out=expanded),
        lambda: diffcore.sphere.p_step(x, m, 5, schedule, seed=3, out=expanded),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="out: more than one of its elements"):
            call()
    with pytest.raises(ValueError, match="x_t: more than one of its elements"):
        diffcore.p_step_(torch.zeros(1, 8).expand(4, 8), m, 5, schedule)
    table = schedule.p_table("x0", "posterior")
    with pytest.raises(RuntimeError, match="x: more than one of its elements"):
        torch.ops.diffcore.diffusion_step_(expanded, m, None, 0.0, torch.tensor([5]), table, None, 1, 0, False)
    for q_sample in (diffcore.q_sample, diffcore.sphere.q_sample):
        buf = torch.randn(5, 8, generator=torch.Generator().manual_seed(16))
        buf /= buf.norm(dim=1, keepdim=True)
        x0, noise = buf[1:], buf[:4]
        want = q_sample(x0.clone(), 3, schedule, noise=noise.clone())
        q_sample(x0, 3, schedule, noise=noise, out=x0)
        torch.testing.assert_close(x0, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", impl_params("diffusion_step"))
def test_negative_and_large_timesteps_raise_in_every_implementation(name, schedule):
    """Tensor timesteps outside [0, T) raise in every implementation (indexing would wrap -1 to T - 1)."""
    x, m = make((3, 6), torch.float32, seed=21)[:2]
    with diffcore.use(name):
        for t, clamp in ((torch.tensor([-1, 0, 1]), False), (torch.tensor([-1, 0, 1]), True),
                         (torch.tensor([40, 0, 1]), False)):
            with pytest.raises(RuntimeError, match=r"t: every timestep must lie in \[0, 40\), got t\[0\] = "):
                diffcore.p_step(x, m, t, schedule, clamp_t=clamp)
        with pytest.raises(RuntimeError, match=r"got t\[0\] = -1"):
            diffcore.q_sample(x, torch.tensor([-1, 0, 1]), schedule, seed=0)


@pytest.mark.parametrize("name", impl_params("diffusion_step"))
def test_every_implementation_keeps_autograd(name, schedule):
    """diffcore.use(name) runs that implementation with the op's autograd formula."""
    x, m, u, z = (v.requires_grad_() for v in make((3, 6), torch.float32, seed=26))
    t = torch.tensor([1, 4, 9])

    def grads():
        out = diffcore.p_step(x, m, t, schedule, uncond_out=u, guidance_scale=0.5, noise=z)
        return torch.autograd.grad((out * torch.arange(6.0)).sum(), (x, m, u, z))

    want = grads()
    with diffcore.use(name):
        got = grads()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_in_place_and_out_forms_refuse_autograd(schedule):
    """The in-place and out= forms write without recording autograd: under grad mode an operand that
    requires grad raises (as torch's out= functions do) instead of getting a wrong gradient; under
    no_grad they run."""
    x, m, _, z = (v.requires_grad_() for v in make((3, 6), torch.float32, seed=22))
    calls = {
        "x_t": lambda: diffcore.p_step_(x * 1, m.detach(), 2, schedule),
        "model_out": lambda: diffcore.p_step_(x.detach().clone(), m, 2, schedule),
        "out": lambda: diffcore.p_step(x.detach(), m.detach(), 2, schedule, out=torch.empty(3, 6).requires_grad_()),
        "noise": lambda: diffcore.q_sample(x.detach(), 2, schedule, noise=z, out=torch.empty(3, 6)),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"{name}: requires grad, but the in-place and out= forms"):
            call()
        with torch.no_grad():
            call()


def test_sample_keeps_gradients_through_the_denoiser(schedule):
    """Under grad mode with a denoiser whose output requires grad, sample() steps out of place, so
    its gradients are those of the step-by-step loop."""
    x = make((3, 6), torch.float32, seed=23)[0]
    w = torch.tensor(0.7, requires_grad=True)
    short = diffcore.Schedule.linear(4)
    got = torch.autograd.grad(diffcore.sample(lambda v, t: w * v, x, short).sum(), w)[0]
    v, w2 = x, w.detach().clone().requires_grad_()
    for i in reversed(range(4)):
        v = ref.p_step(v, w2 * v, torch.full((3,), i), short)
    torch.testing.assert_close(got, torch.autograd.grad(v.sum(), w2)[0])


def test_sample_refuses_a_denoiser_that_returns_none(schedule):
    calls = []

    def denoiser(v, t):
        calls.append(t)
        return None if len(calls) == 2 else v

    with pytest.raises(TypeError, match="model_out: expected a torch.Tensor, got NoneType"):
        diffcore.sample(denoiser, make((3, 6), torch.float32, seed=24)[0], schedule)


def test_one_step_schedule_with_beta_variance():
    x, m = make((2, 5), torch.float32, seed=25)[:2]
    S = diffcore.Schedule.linear(1)
    torch.testing.assert_close(diffcore.p_step(x, m, 0, S, variance="beta", seed=1), diffcore.p_step(x, m, 0, S))


def test_empty_batch(schedule):
    x = torch.empty(0, 10)
    assert diffcore.p_step(x, x.clone(), 3, schedule, seed=1).shape == (0, 10)


# --- gradients, opcheck, compile ----------------------------------------------------------------
def test_q_sample_gradient_through_x0(schedule):
    x, _, _, z = make((3, 50), torch.float32, seed=11)
    t = torch.tensor([0, 7, 39])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(3, 50)
    (diffcore.q_sample(x1, t, schedule, noise=z) * g).sum().backward()
    (ref.q_sample(x2, t, schedule, z) * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_p_step_gradients(prediction, schedule):
    x, m, u, z = make((3, 20), torch.float32, seed=12)
    t = torch.tensor([0, 7, 39])
    ours = [v.clone().requires_grad_() for v in (x, m, u, z)]
    theirs = [v.clone().requires_grad_() for v in (x, m, u, z)]
    kw = dict(prediction=prediction, guidance_scale=0.5)
    g = torch.randn(3, 20)
    a, b, c, d = ours
    (diffcore.p_step(a, b, t, schedule, uncond_out=c, noise=d, **kw) * g).sum().backward()
    a, b, c, d = theirs
    (ref.p_step(a, b, t, schedule, uncond_out=c, noise=d, **kw) * g).sum().backward()
    for mine, want in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, want.grad, rtol=1e-5, atol=1e-5)


def _step_args(schedule, **overrides):
    x, m, u, z = make((3, 33), torch.float32, seed=13)
    args = dict(f=m, f_uncond=u, guidance=0.5, t=torch.tensor([1, 5, 9]), table=schedule.p_table(),
                noise=z, seed=None, offset=0, clamp_t=False)
    args.update(overrides)
    return x, args


@pytest.mark.parametrize(
    "overrides",
    [{}, {"noise": None, "seed": 7, "offset": 3}, {"f_uncond": None, "guidance": 0.0},
     {"f": None, "f_uncond": None, "guidance": 0.0}, {"t": None, "table": torch.ones(1, 3, dtype=torch.float64)},
     {"t": torch.tensor([50]), "clamp_t": True}],
    ids=["guided_noise", "seeded", "plain", "q_sample", "no_t", "clamped"],
)
def test_opcheck(overrides, schedule):
    x, args = _step_args(schedule, **overrides)
    ordered = tuple(args[k] for k in ("f", "f_uncond", "guidance", "t", "table", "noise", "seed", "offset", "clamp_t"))
    ops = torch.ops.diffcore
    torch.library.opcheck(ops.diffusion_step.default, (x.requires_grad_(), *ordered))
    torch.library.opcheck(ops.diffusion_step_.default, (x.detach().clone(), *ordered))
    torch.library.opcheck(ops.diffusion_step_out.default, (x.detach(), *ordered), {"out": torch.empty_like(x)})


def test_compile_fullgraph(schedule):
    torch._dynamo.reset()

    def step(x, m, t, z):
        return diffcore.p_step(x, m, t, schedule, prediction="eps", noise=z) * 2

    compiled = torch.compile(step, fullgraph=True)
    x, m, _, z = make((4, 100), torch.float32, seed=14)
    t = torch.tensor([0, 1, 2, 39])
    torch.testing.assert_close(compiled(x, m, t, z), step(x, m, t, z), rtol=0, atol=0)


def test_compile_in_place_and_seeded_aot_eager(schedule):
    torch._dynamo.reset()

    def step(x, m, t):
        diffcore.p_step_(x, m, t, schedule, seed=3, offset=5)
        return x

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, m, _, _ = make((4, 100), torch.float32, seed=15)
    t = torch.tensor([0, 1, 2, 39])
    torch.testing.assert_close(compiled(x.clone(), m, t), step(x.clone(), m, t), rtol=0, atol=0)


# --- the sampling loop --------------------------------------------------------------------------
class Denoiser(torch.nn.Module):
    """A small DiffRec-style DNN: x and a timestep embedding in, x0 (or eps) out."""

    def __init__(self, n_items: int, emb: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = emb
        self.w1 = torch.nn.Parameter(torch.randn(n_items + emb, 32, generator=g) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(32, n_items, generator=g) * 0.1)

    def forward(self, x, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(self.emb // 2, dtype=torch.float32) / (self.emb // 2))
        args = t[:, None].float() * freqs[None]
        h = torch.cat([x, torch.cos(args), torch.sin(args)], dim=-1)
        return torch.tanh(h @ self.w1) @ self.w2


@pytest.mark.parametrize("steps", [0, 5])
@pytest.mark.parametrize("noise", [False, True])
def test_sample_equals_diffrec_loop(steps, noise, schedule):
    model = Denoiser(97)
    x_start = torch.rand(6, 97)
    with torch.no_grad():
        want = ref.sample(model, x_start, schedule, steps=steps, noise=noise,
                          generator=torch.Generator().manual_seed(1))
        got = diffcore.sample(model, x_start, schedule, steps=steps, noise=noise,
                              generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sample_follows_the_global_rng_like_randn_like(schedule):
    model = Denoiser(31)
    x_start = torch.rand(3, 31)
    with torch.no_grad():
        torch.manual_seed(5)
        want = ref.sample(model, x_start, schedule, steps=3, noise=True)
        torch.manual_seed(5)
        got = diffcore.sample(model, x_start, schedule, steps=3, noise=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_seeded_sample_step_k_is_a_seeded_step_at_its_offset(schedule):
    model = Denoiser(23)
    x_start = torch.rand(4, 23)
    stride = (x_start.numel() + 3) // 4
    with torch.no_grad():
        got = diffcore.sample(model, x_start, schedule, steps=2, noise=True, seed=77, offset=10)
        x = diffcore.q_sample(x_start, 1, schedule, seed=77, offset=10)
        for k, i in enumerate(reversed(range(schedule.num_steps)), start=1):
            x = diffcore.p_step(x, model(x, torch.full((4,), i)), i, schedule, seed=77, offset=10 + k * stride)
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    assert x_start.isfinite().all()


def test_sample_with_guidance_equals_dreamrec_loop():
    schedule = diffcore.Schedule.linear(50, dtype=torch.float32)  # DreamRec keeps float32 tables
    g = torch.Generator().manual_seed(3)
    w_c, w_u = torch.randn(16, 16, generator=g) * 0.2, torch.randn(16, 16, generator=g) * 0.2

    def denoiser(x, t):
        return torch.tanh(x @ w_c), torch.tanh(x @ w_u)

    x_T = torch.randn(5, 16, generator=g)
    torch.manual_seed(9)
    got = diffcore.sample(denoiser, x_T, schedule, noise=True, guidance_scale=2.0)
    # DreamRec's loop: x0 = (1 + w) f_c - w f_u; posterior mean; sqrt(pv[t]) z for t > 0.
    torch.manual_seed(9)
    x = x_T
    for i in reversed(range(50)):
        t = torch.full((5,), i)
        fc, fu = denoiser(x, t)
        x0 = (1 + 2.0) * fc - 2.0 * fu
        mean = (ref.extract(schedule.posterior_mean_coef1, t, x.shape) * x0
                + ref.extract(schedule.posterior_mean_coef2, t, x.shape) * x)
        noise = torch.randn_like(x)
        x = mean if i == 0 else mean + torch.sqrt(ref.extract(schedule.posterior_variance, t, x.shape)) * noise
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-5)


def test_sample_without_noise_scale_only_applies_the_denoiser():
    schedule = diffcore.Schedule.linear_var(5, 0.0, 0.001, 0.02)
    calls = []

    def denoiser(x, t):
        calls.append(int(t[0]))
        return x + 1

    out = diffcore.sample(denoiser, torch.zeros(2, 3), schedule)
    assert calls == [4, 3, 2, 1, 0] and torch.equal(out, torch.full((2, 3), 5.0))
    with pytest.raises(ValueError, match="noise_scale == 0"):
        diffcore.p_step(torch.zeros(2, 3), torch.zeros(2, 3), 1, schedule)


# --- schedules ----------------------------------------------------------------------------------
def test_linear_var_is_diffrecs():
    s = diffcore.Schedule.linear_var(1000, 0.1, 0.0005, 0.005)
    var = np.linspace(0.1 * 0.0005, 0.1 * 0.005, 1000, dtype=np.float64)
    alpha_bar = 1 - var
    betas = [1 - alpha_bar[0]] + [min(1 - alpha_bar[i] / alpha_bar[i - 1], 0.999) for i in range(1, 1000)]
    betas[0] = 0.00001
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12)
    assert s.betas.dtype == torch.float64 and s.noise_scale == 0.1
    pv = s.posterior_variance
    torch.testing.assert_close(s.posterior_log_variance_clipped, torch.log(torch.cat([pv[1:2], pv[1:]])))


def test_cosine_is_diffrecs_and_dreamrecs():
    T = 100
    s = diffcore.Schedule.cosine(T)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    want = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    np.testing.assert_allclose(s.betas.numpy(), want, rtol=1e-12)
    clipped = diffcore.Schedule.cosine(T, clip=(1e-4, 0.9999), dtype=torch.float32)
    assert clipped.betas.dtype == torch.float32 and clipped.betas.min() >= 1e-4


def test_exp_is_dreamrecs():
    T = 200
    x = torch.linspace(1, 2 * T + 1, T)
    want = 1 - torch.exp(-0.1 / T - x * 0.5 * (10 - 0.1) / (T * T))
    torch.testing.assert_close(diffcore.Schedule.exp(T).betas.float(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("betas", "match"),
    [([0.1, float("nan")], "finite"), ([0.1, 1.5], r"\(0, 1\]"), ([0.0, 0.1], r"\(0, 1\]"), ([], "non-empty")],
)
def test_bad_schedules(betas, match):
    with pytest.raises(ValueError, match=match):
        diffcore.Schedule.from_betas(betas)


def test_zero_terminal_snr_schedule():
    """A beta of exactly 1 zeroes alphas_cumprod from its step on: x0-prediction ancestral steps
    stay defined (and match the reference); every step that divides by sqrt(ab) or by ratios of ab
    raises instead of returning inf or nan."""
    schedule = diffcore.Schedule.from_betas([0.1, 0.2, 1.0, 0.3])
    assert schedule.first_zero_alpha_bar == 2
    assert diffcore.Schedule.from_betas([0.1, 0.2]).first_zero_alpha_bar is None
    g = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(3, 8, generator=g) for _ in range(3))
    for t in range(4):
        got = diffcore.p_step(x, m, t, schedule, noise=z)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref.p_step(x, m, torch.full((3,), t), schedule, noise=z))
    match = r"alphas_cumprod is 0 from t = 2 on \(a beta of exactly 1\)"
    with pytest.raises(ValueError, match="prediction='eps': the schedule's " + match):
        diffcore.p_step(x, m, 1, schedule, prediction="eps")
    with pytest.raises(ValueError, match="ddim_step: the schedule's " + match):
        diffcore.ddim_step(x, m, 3, 1, schedule)
    with pytest.raises(ValueError, match="prediction='eps'"):
        diffcore.sphere.p_step(x, m, 1, schedule, prediction="eps")
    with pytest.raises(ValueError, match="prediction='eps' with reweight"):
        diffcore.training.diffusion_loss(m, x, z, 1, schedule, prediction="eps")
    plain = diffcore.training.diffusion_loss(m, x, z, 1, schedule, prediction="eps", reweight=False)
    torch.testing.assert_close(plain, ((z - m).double() ** 2).mean(1))


@pytest.mark.parametrize(("build", "error", "match"), [
    (lambda: diffcore.Schedule.from_betas([0.1], noise_scale=float("nan")), ValueError, "noise_scale: expected a"),
    (lambda: diffcore.Schedule.from_betas([0.1], noise_scale=-1), ValueError, "noise_scale: expected a finite"),
    (lambda: diffcore.Schedule.from_betas([0.1], noise_scale="a"), TypeError, "noise_scale: expected"),
    (lambda: diffcore.Schedule.cosine(10, clip=(0.5, 0.1)), ValueError, r"clip: expected min <= max"),
    (lambda: diffcore.Schedule.cosine(10, clip=(0.0, 0.1)), ValueError, r"clip\[0\]: expected a beta in \(0, 1\]"),
    (lambda: diffcore.Schedule.cosine(10, clip=0.5), TypeError, r"clip: expected a \(min, max\) pair"),
    (lambda: diffcore.Schedule.cosine(10, max_beta=5), ValueError, r"max_beta: expected a beta in \(0, 1\]"),
    (lambda: diffcore.Schedule.cosine(10, s=-0.1), ValueError, "s: expected a finite offset"),
], ids=["scale_nan", "scale_negative", "scale_str", "clip_order", "clip_zero", "clip_scalar", "max_beta", "s"])
def test_bad_schedule_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_numpy_scalars_are_numbers(schedule):
    x, m, u = make((3, 7), torch.float32, seed=18)[:3]
    want = diffcore.p_step(x, m, 4, schedule, uncond_out=u, guidance_scale=1.5, seed=2)
    got = diffcore.p_step(x, m, 4, schedule, uncond_out=u, guidance_scale=np.float32(1.5), seed=2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="guidance_scale: expected a finite number, got Tensor"):
        diffcore.p_step(x, m, 4, schedule, uncond_out=u, guidance_scale=torch.tensor(1.5))


# --- bad input ----------------------------------------------------------------------------------
def bad_cases(schedule):
    x, m, u, z = make((4, 10), torch.float32, seed=16)
    return [
        (lambda: diffcore.p_step(x, m[:3], 1, schedule), ValueError, "model_out: expected shape"),
        (lambda: diffcore.p_step(x, m, 1, schedule, noise=z[:, :5]), ValueError, "noise: expected shape"),
        (lambda: diffcore.p_step(x, m, 1, schedule, uncond_out=u.double()), TypeError, "uncond_out: expected dtype"),
        (lambda: diffcore.p_step(x, m, torch.tensor([1, 2]), schedule), ValueError, r"t: expected shape \(4,\)"),
        (lambda: diffcore.p_step(x, m, 40, schedule), ValueError, r"t: expected a timestep in \[0, 40\)"),
        (lambda: diffcore.p_step(x, m, -1, schedule), ValueError, "t: expected a timestep"),
        (lambda: diffcore.p_step(x, m, torch.tensor([0, 1, 40, 2]), schedule), RuntimeError, r"t\[2\] = 40"),
        (lambda: diffcore.p_step(x, m, torch.tensor([0, -3, 1, 2]), schedule), RuntimeError, r"t\[1\] = -3"),
        (lambda: diffcore.p_step(x, m, torch.tensor([0, 1, 39, 40]), schedule), RuntimeError, r"t\[3\] = 40"),
        (lambda: diffcore.p_step(x, m, torch.tensor([1.0] * 4), schedule), TypeError, "t: expected an integer tensor"),
        (lambda: diffcore.p_step(x.long(), m, 1, schedule), TypeError, "x_t: expected float32"),
        (lambda: diffcore.p_step(x.to(torch.complex64), m, 1, schedule), TypeError, "x_t: expected float32"),
        (lambda: diffcore.p_step(x[0], m[0], 1, schedule), ValueError, "x_t: expected a 2-D tensor"),
        (lambda: diffcore.p_step(x, m, 1, schedule, guidance_scale=2.0), ValueError, "needs uncond_out"),
        (lambda: diffcore.p_step(x, m, 1, schedule, noise=z, seed=1), ValueError, "give one, not both"),
        (lambda: diffcore.p_step(x, m, 1, schedule, out=m), ValueError, "out: must not share memory with model_out"),
        (lambda: diffcore.p_step(x, m, 1, schedule, noise=z, out=z[:, :]), ValueError, "with noise"),
        (lambda: diffcore.p_step(x, m, 1, schedule, out=torch.empty(4, 9)), ValueError, "out: expected shape"),
        (lambda: diffcore.p_step(x, m, 1, "linear"), TypeError, "schedule: expected a diffcore.Schedule"),
        (lambda: diffcore.p_step(x, m, 1, schedule, prediction="v"), ValueError, "prediction: expected one of"),
        (lambda: diffcore.p_step(x, m, 1, schedule, variance="learned"), ValueError, "variance: expected one of"),
        (lambda: diffcore.p_step(x, m, 1, schedule, uncond_out=u, guidance_scale=float("nan")), ValueError,
         "guidance_scale: expected a finite number"),
        (lambda: diffcore.ddim_step(x, m, 7, 5, schedule, eta=-1.0), ValueError, "eta"),
        (lambda: diffcore.ddim_step(x, m, 7, 5, schedule, eta=float("nan")), ValueError, "eta: expected a finite"),
        (lambda: diffcore.ddim_step(x, m, 5, 40, schedule), ValueError, "t_prev"),
        (lambda: diffcore.ddim_step(x, m, 5, 7, schedule, eta=1.0), ValueError, "t_prev: expected t_prev < t"),
        (lambda: diffcore.ddim_step(x, m, 5, True, schedule), TypeError, "t_prev: expected an int"),
        (lambda: diffcore.ddim_step(x, m, torch.tensor([-1] * 4), -1, schedule), RuntimeError,
         r"t: every timestep must lie in \[0, 40\)"),
        (lambda: diffcore.ddim_step(x, m, 5, torch.tensor([-5] * 4), schedule), RuntimeError, "t_prev: every"),
        (lambda: diffcore.ddim_step(x, m, torch.tensor([5] * 4), torch.tensor([4, 6, -1, 0]), schedule),
         RuntimeError, r"t_prev: every t_prev must lie in \[-1, t\)"),
        (lambda: diffcore.sample(lambda x, t: x, x, schedule, steps=41), ValueError, "steps"),
        (lambda: diffcore.q_sample(x, 1, schedule, seed=2**64), ValueError, "seed"),
        (lambda: diffcore.q_sample(x.long(), 1, schedule), TypeError, "x0: expected float32"),
        (lambda: diffcore.q_sample(x, 1, schedule, out=torch.empty(4, 9)), ValueError,
         r"out: expected shape \(4, 10\) \(the shape of x0\)"),
        (lambda: diffcore.q_sample(e := x[:1].expand(4, -1), 1, schedule, out=e, seed=0), ValueError,
         "x0: more than one of its elements refers to the same memory location"),
        (lambda: diffcore.p_step(x, m, 1, schedule, out=torch.zeros(40).as_strided((4, 10), (5, 1))), ValueError,
         r"out: more than one of its elements .*strides \(5, 1\)"),
        (lambda: diffcore.ddim_step(x, m, 5, 2, schedule, eta=4.0, noise=z), RuntimeError,
         r"eta: 4.0 makes sigma\^2 exceed 1 - ab\[t_prev\]"),
        (lambda: diffcore.Schedule.linear(10, 1e-8, 1e-8, dtype=torch.float32), ValueError,
         r"betas: 1 - betas\[0\] rounds to 1 in torch.float32"),
        (lambda: diffcore.Schedule.from_betas([1e-17, 0.1]), ValueError, r"betas: 1 - betas\[0\] rounds to 1"),
    ]


def test_numpy_integers_are_ints(schedule):
    """Timesteps, steps, seeds and offsets given as numpy integers act as the Python ints."""
    x, m, _, _ = make((4, 10), torch.float32, seed=3)
    torch.testing.assert_close(diffcore.ddim_step(x, m, np.int64(7), np.int64(-1), schedule),
                               diffcore.ddim_step(x, m, 7, -1, schedule), rtol=0, atol=0)
    with pytest.raises(ValueError, match="t_prev: expected t_prev < t"):
        diffcore.ddim_step(x, m, np.int64(3), 5, schedule)
    assert diffcore.Schedule.linear(np.int64(5)).num_steps == 5
    torch.testing.assert_close(diffcore.p_step(x, m, np.int64(7), schedule, seed=np.uint64(5), offset=np.int32(2)),
                               diffcore.p_step(x, m, 7, schedule, seed=5, offset=2), rtol=0, atol=0)
    torch.testing.assert_close(diffcore.sample(lambda x, t: m, x, schedule, steps=np.int64(3), seed=np.int64(1)),
                               diffcore.sample(lambda x, t: m, x, schedule, steps=3, seed=1), rtol=0, atol=0)


def test_bad_input_gives_clear_errors(schedule):
    for call, error, match in bad_cases(schedule):
        with pytest.raises(error, match=match):
            call()


def test_kernel_level_operand_checks_name_the_operand(schedule):
    """Called directly (as the registry does), the Triton launcher checks its operands itself and
    raises RuntimeError, as the C++ kernel's TORCH_CHECKs do, with the public API's message."""
    if diffcore.implementations("diffusion_step")["triton"].reason("cpu") is not None:
        pytest.skip("no Triton here")
    from diffcore.kernels.diffusion import diffusion_step_out

    x, m, _, z = make((2, 8), torch.float32)
    table = schedule.p_table("x0", "posterior")
    t = torch.tensor([1, 2])
    for kw, match in (
        (dict(f=m.double()), r"model_out: expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
        (dict(noise=z[:1]), r"noise: expected shape \(2, 8\) \(the shape of x\), got \(1, 8\)"),
    ):
        args = dict(f=m, noise=None) | kw
        with pytest.raises(RuntimeError, match=match):
            diffusion_step_out(x, args["f"], None, 0.0, t, table, args["noise"], None, 0, False, torch.empty_like(x))


def test_mixed_devices_are_refused(schedule):
    x, m, _, _ = make((2, 4), torch.float32)
    with pytest.raises(ValueError, match="device"):
        diffcore.p_step(x, m.to("meta"), 1, schedule)


def test_clamp_t_maps_large_timesteps_to_the_last(schedule):
    x, m, _, z = make((3, 8), torch.float32, seed=17)
    big = torch.tensor([40, 45, 39])
    got = diffcore.p_step(x, m, big, schedule, noise=z, clamp_t=True)
    torch.testing.assert_close(got, ref.p_step(x, m, big, schedule, noise=z, clamp_t=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, diffcore.p_step(x, m, 39, schedule, noise=z), rtol=0, atol=0)


# --- builds -------------------------------------------------------------------------------------
def test_pure_python_install_falls_back_to_the_reference_with_one_warning():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import diffcore\n"
        "    s = diffcore.Schedule.linear(10)\n"
        "    x = torch.randn(2, 5)\n"
        "    y = diffcore.p_step(x, x, 3, s, seed=1)\n"
        "print(sum('DIFFCORE_NO_EXT' in str(w.message) for w in caught), diffcore.backends()['cpu'])\n"
    )
    env = {**os.environ, "DIFFCORE_NO_EXT": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.split()[0] == "1" and "DIFFCORE_NO_EXT" in res.stdout
    if diffcore._library._C is not None:  # 0 (or empty) leaves the extension on
        env["DIFFCORE_NO_EXT"] = "0"
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert res.stdout.split()[0] == "0" and "live" in res.stdout
