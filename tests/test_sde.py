"""Score-SDE family: every implementation against the score_sde-style reference, the SDE tables and
marginals against their closed forms, the sampler on a Gaussian toy problem, the corrector's
thread-count independence, gradients, opcheck, compile and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffcore
from diffcore import sde as S
from diffcore.reference import sde as ref
from diffcore.reference.random import normal
from tests.utils import DTYPES, assert_close_to_reference, impl_params, strided_rows

SHAPES = [(7, 1001), (3, 128), (1, 1), (5, 67)]
TRITON_SHAPES = [(3, 37)]  # the interpreter is slow: small shapes
STEPS = ("euler_maruyama", "reverse_diffusion", "langevin", "probability_flow", "sde_forward")
SNR = 0.16


def make_sde(kind: str, N: int = 1000) -> S.SDE:
    if kind == "ve":
        return S.VESDE(0.01, 50.0, N)
    return (S.VPSDE if kind == "vp" else S.subVPSDE)(0.1, min(20.0, N / 2), N)


def shapes_for(name):
    return TRITON_SHAPES if name == "triton" else SHAPES


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


def times(kind: str, rows: int, seed: int = 0):
    """A float, a per-row tensor, or a one-element tensor."""
    if kind == "float":
        return 0.37
    if kind == "row":
        return torch.rand(rows, generator=torch.Generator().manual_seed(seed)) * 0.98 + 0.01
    return torch.tensor([0.81])


def run_step(step, x, s, z, t, sde, **kw):
    """The public step ``step`` and its reference, each as ``(x, x_mean)``."""
    dt = -1.0 / sde.N
    if step == "euler_maruyama":
        return S.euler_maruyama_step(x, s, t, dt, sde, noise=z, **kw)
    if step == "reverse_diffusion":
        return S.reverse_diffusion_step(x, s, t, sde, noise=z, **kw)
    if step == "langevin":
        return S.langevin_step(x, s, SNR, sde, t=t, noise=z, **kw)
    if step == "probability_flow":
        out = S.probability_flow_step(x, s, t, dt, sde, **kw)
        return out, out
    out = S.sde_forward(x, t, sde, noise=z, **kw)
    return out, out


def run_reference(step, x, s, z, t, sde):
    dt = -1.0 / sde.N
    if step == "euler_maruyama":
        return ref.euler_maruyama_step(x, s, t, dt, sde, z)
    if step == "reverse_diffusion":
        return ref.reverse_diffusion_step(x, s, t, sde, z)
    if step == "langevin":
        return ref.langevin_step(x, s, SNR, sde, t, z)
    if step == "probability_flow":
        out = ref.probability_flow_step(x, s, t, dt, sde)
        return out, out
    out = ref.sde_forward(x, t, sde, z)
    return out, out


# --- parity: every implementation x dtype x shape x layout x SDE x step ------------------------
@pytest.mark.parametrize("name", impl_params("sde_step"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("layout", "t_kind"), [("contiguous", "float"), ("row_stride", "row"), ("column_major", "one")]
)
@pytest.mark.parametrize("kind", ["ve", "vp", "subvp"])
def test_steps_match_reference(name, dtype, layout, t_kind, kind):
    sde = make_sde(kind)
    for shape in shapes_for(name):
        x, s, z = make(shape)
        t = times(t_kind, shape[0])
        low = [v.to(dtype) for v in (x, s, z)]
        xs, ss, zs = (strided_rows(v, layout) for v in low)
        for step in STEPS:
            want = run_reference(step, x, s, z, t, sde)
            same_dtype = run_reference(step, *low, t, sde)
            with diffcore.use(name):
                got = run_step(step, xs, ss, zs, t, sde)
            for g, w, sd in zip(got, want, same_dtype):
                assert g.dtype == dtype and g.shape == shape, step
                assert_close_to_reference(g, w, sd)


@pytest.mark.parametrize("name", impl_params("sde_step"))
@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_seeded_steps_are_the_reference_stream(name, seed):
    sde = make_sde("vp")
    shape = shapes_for(name)[-1]
    x, s, _ = make(shape, seed=1)
    z = normal(x.numel(), seed, 11).reshape(shape)
    for step in ("euler_maruyama", "reverse_diffusion", "langevin", "sde_forward"):
        with diffcore.use(name):
            got = run_step(step, x, s, None, 0.6, sde, seed=seed, offset=11)
        for g, w in zip(got, run_reference(step, x, s, z, 0.6, sde)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", impl_params("sde_step"))
@pytest.mark.parametrize("seeded", [False, True], ids=["given", "seeded"])
def test_rows_without_noise_do_not_read_it(name, seeded):
    """A row whose noise coefficient c is 0 takes no noise (reference.diffusion.noise_term): NaN or inf in
    its row of the given noise do not reach it; out equals x_mean there."""
    x, s, z = make((3, 37), seed=4)
    z[0, 1], z[2, 5] = float("nan"), float("inf")
    coef = torch.tensor([[0.9, 0.1, 0.0, 1.0], [0.9, 0.1, 0.5, 1.0], [0.9, 0.1, 0.0, 1.0]], dtype=torch.float64)
    noise, seed = (None, 3) if seeded else (z, None)
    want, want_mean = ref.step(x, s, coef, noise, seed, 0, None)
    out, mean = torch.empty_like(x), torch.empty_like(x)
    diffcore.implementations("sde_step")[name](x, s, coef, noise, seed, 0, None, out, mean)
    assert want[[0, 2]].isfinite().all()
    torch.testing.assert_close(out[[0, 2]], mean[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", ["reverse_diffusion", "langevin"])
def test_large_outputs_are_streamed_alike(step):
    """Allocating steps whose x and x_mean pass 32 MiB are written with non-temporal stores, each
    row's head up to its first aligned element plainly (rows of 8,193 floats start at every
    alignment): they equal the in-place step, which stores plainly, and the reference."""
    sde = make_sde("vp")
    x, s, z = make((1_025, 8_193), seed=6)
    got = run_step(step, x, s, z, 0.6, sde)
    xi, mean = x.clone(), torch.empty_like(x)
    if step == "langevin":
        S.langevin_step_(xi, s, SNR, sde, t=0.6, noise=z, mean_out=mean)
    else:
        S.reverse_diffusion_step_(xi, s, 0.6, sde, noise=z, mean_out=mean)
    for g, w in zip(got, (xi, mean)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for g, w in zip(got, run_reference(step, x, s, z, 0.6, sde)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", impl_params("sde_step"))
def test_eps_prediction_is_the_converted_score(name):
    sde = make_sde("vp")
    x, eps, z = make(shapes_for(name)[0], seed=2)
    t = times("row", x.shape[0], seed=3)
    std = ref.marginal_prob(sde, x, t)[1]
    score = ref.score_from_eps(eps, std)
    with diffcore.use(name):
        for step in STEPS[:4]:
            got = run_step(step, x, eps, z, t, sde, prediction="eps")
            for g, w in zip(got, run_reference(step, x, score, z, t, sde)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        given = S.reverse_diffusion_step(x, eps, t, sde, noise=z, prediction="eps", std=torch.full_like(t, 0.5))
    for g, w in zip(given, ref.reverse_diffusion_step(x, -eps / 0.5, t, sde, z)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# --- SDE descriptions against the closed forms of score_sde -------------------------------------
T_GRID = np.array([0.0, 1e-3, 0.1, 0.37, 0.5, 0.999, 1.0])


def test_ve_tables_and_marginal():
    sde = S.VESDE(0.01, 50.0, 1000)
    sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 1000))
    np.testing.assert_allclose(sde.discrete_sigmas.numpy(), sigmas, rtol=1e-13)
    assert sde.discrete_sigmas.dtype == torch.float64
    t = torch.tensor(T_GRID, dtype=torch.float64)
    sigma = 0.01 * (50.0 / 0.01) ** T_GRID
    mean, std = sde.marginal(t)
    np.testing.assert_allclose(mean.numpy(), 1.0)
    np.testing.assert_allclose(std.numpy(), sigma, rtol=1e-13)
    np.testing.assert_allclose(sde.diffusion(t).numpy(), sigma * np.sqrt(2 * np.log(50.0 / 0.01)), rtol=1e-13)
    np.testing.assert_allclose(sde.drift_coeff(t).numpy(), 0.0)
    i = np.floor(T_GRID * 999).astype(int)
    sig = sde.discrete_sigmas.numpy()
    G2 = sig[i] ** 2 - np.where(i == 0, 0.0, sig[np.maximum(i - 1, 0)]) ** 2
    a, b, c = sde.reverse_diffusion_coefficients(t)
    np.testing.assert_allclose(a.numpy(), 1.0)
    np.testing.assert_allclose(b.numpy(), G2, rtol=1e-12)
    np.testing.assert_allclose(c.numpy(), np.sqrt(G2), rtol=1e-12)
    np.testing.assert_allclose(sde.langevin_alpha(t).numpy(), 1.0)


@pytest.mark.parametrize("cls", [S.VPSDE, S.subVPSDE])
def test_vp_tables_and_marginal(cls):
    sde = cls(0.1, 20.0, 1000)
    betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
    alphas = 1 - betas
    np.testing.assert_allclose(sde.discrete_betas.numpy(), betas, rtol=1e-13)
    np.testing.assert_allclose(sde.alphas_cumprod.numpy(), np.cumprod(alphas), rtol=1e-12)
    np.testing.assert_allclose(sde.sqrt_1m_alphas_cumprod.numpy(), np.sqrt(1 - np.cumprod(alphas)), rtol=1e-12)
    assert sde.alphas.dtype == torch.float64
    t = torch.tensor(T_GRID, dtype=torch.float64)
    integral = 0.1 * T_GRID + 0.5 * (20.0 - 0.1) * T_GRID**2  # int_0^t beta(s) ds
    mean, std = sde.marginal(t)
    np.testing.assert_allclose(mean.numpy(), np.exp(-0.5 * integral), rtol=1e-13)
    var = 1 - np.exp(-integral)
    np.testing.assert_allclose(std.numpy(), np.sqrt(var) if cls is S.VPSDE else var, rtol=1e-12, atol=1e-15)
    beta_t = 0.1 + T_GRID * (20.0 - 0.1)
    np.testing.assert_allclose(sde.drift_coeff(t).numpy(), -0.5 * beta_t, rtol=1e-13)
    g2 = beta_t if cls is S.VPSDE else beta_t * (1 - np.exp(-2 * integral))
    np.testing.assert_allclose(sde.diffusion(t).numpy() ** 2, g2, rtol=1e-12, atol=1e-15)
    i = np.floor(T_GRID * 999).astype(int)
    a, b, c = sde.reverse_diffusion_coefficients(t)
    if cls is S.VPSDE:  # DDPM: x_mean = (2 - sqrt(alpha_i)) x + beta_i s
        np.testing.assert_allclose(a.numpy(), 2 - np.sqrt(alphas[i]), rtol=1e-13)
        np.testing.assert_allclose(b.numpy(), betas[i], rtol=1e-13)
    else:  # Euler-Maruyama with dt = 1 / N
        np.testing.assert_allclose(a.numpy(), 1 + 0.5 * beta_t / 1000, rtol=1e-13)
        np.testing.assert_allclose(b.numpy(), g2 / 1000, rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(c.numpy() ** 2, b.numpy(), rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(sde.langevin_alpha(t).numpy(), alphas[i], rtol=1e-13)


@pytest.mark.parametrize("kind", ["ve", "vp", "subvp"])
def test_marginal_solves_the_sde(kind):
    """d mean/dt = f mean and d var/dt = 2 f var + g^2: the marginals belong to the drift and
    diffusion (VE: score_sde's std ignores sigma_min^2, so its variance starts at sigma_min^2)."""
    sde = make_sde(kind)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    (m1, s1), (m0, s0) = sde.marginal(t + h), sde.marginal(t - h)
    m, _ = sde.marginal(t)
    var = sde.marginal(t)[1] ** 2
    f, g = sde.drift_coeff(t), sde.diffusion(t)
    torch.testing.assert_close((m1 - m0) / (2 * h), f * m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close((s1**2 - s0**2) / (2 * h), 2 * f * var + g**2, rtol=1e-6, atol=1e-9)


def test_sde_and_marginal_prob_follow_score_sde():
    sde = make_sde("vp")
    x, _, _ = make((4, 6))
    t = torch.tensor([0.1, 0.2, 0.5, 0.9])
    drift, diffusion = sde.sde(x, t)
    want_drift, want_diffusion = ref.sde_fn(sde, x, t.double())
    torch.testing.assert_close(drift, want_drift)
    torch.testing.assert_close(diffusion, want_diffusion)
    mean, std = sde.marginal_prob(x, t)
    want_mean, want_std = ref.marginal_prob(sde, x, t)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std, want_std)


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_sde_forward_has_the_marginal_mean_and_std(kind):
    sde = make_sde(kind)
    x0 = torch.linspace(-2, 2, 8).unsqueeze(1).expand(8, 20000).contiguous()
    out = S.sde_forward(x0, 0.3, sde, seed=5)
    mean, std = sde.marginal(0.3)
    z = (out.double() - float(mean) * x0.double()) / float(std)
    n = z.shape[1]
    assert z.mean(1).abs().max() < 5 / math.sqrt(n)
    assert (z.std(1) - 1).abs().max() < 5 / math.sqrt(2 * n)


def test_prior_sampling():
    ve = make_sde("ve")
    torch.testing.assert_close(ve.prior_sampling((3, 5), seed=4), 50.0 * normal(15, 4, 0).reshape(3, 5))
    assert make_sde("vp").prior_sampling((2, 3), generator=torch.Generator().manual_seed(0)).shape == (2, 3)


# --- the sampler --------------------------------------------------------------------------------
def gaussian_score(sde, mu, cov):
    """The exact score of p_t for data N(mu, cov): -(m^2 cov + std^2 I)^-1 (x - m mu), with
    cov = Q diag(lam) Q^T."""
    lam, Q = torch.linalg.eigh(cov)
    Q32 = Q.float()

    def score_fn(x, t):
        m, std = (float(v) for v in sde.marginal(float(t[0])))
        scale = (1.0 / (m * m * lam + std * std)).float()
        return -(((x - m * mu.float()) @ Q32) * scale) @ Q32.T

    return score_fn


@pytest.fixture
def one_thread():
    """Small (B, 3) steps: one thread, so a loaded machine's thread stalls do not cost minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("kind", "predictor"), [("ve", "reverse_diffusion"), ("vp", "reverse_diffusion"),
                                                 ("vp", "euler_maruyama"), ("subvp", "reverse_diffusion")])
def test_pc_sample_recovers_a_gaussian(kind, predictor, one_thread):
    sde = make_sde(kind, N=300)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    L = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]], dtype=torch.float64)
    cov = L @ L.T
    B = 6000
    x_init = sde.prior_sampling((B, 3), seed=1)
    x = pc_sample = S.pc_sample(gaussian_score(sde, mu, cov), x_init, sde, predictor=predictor, snr=0.16, seed=2)
    assert pc_sample.isfinite().all()
    x = x.double()
    torch.testing.assert_close(x.mean(0), mu, rtol=0, atol=0.06)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.08)


def test_pc_sample_equals_score_sde_loop():
    sde = make_sde("vp", N=30)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 9, generator=g) * 0.3

    def score_fn(x, t):
        return torch.tanh(x @ w) - x * t[:, None]

    x_init = torch.randn(5, 9, generator=g)
    for predictor in ("reverse_diffusion", "euler_maruyama", "probability_flow"):
        got = S.pc_sample(score_fn, x_init, sde, predictor=predictor, corrector_steps=2,
                          generator=torch.Generator().manual_seed(7))
        draws = torch.Generator().manual_seed(7)
        want = ref.pc_sample(score_fn, x_init, sde, predictor=predictor, corrector_steps=2,
                             noise_fn=lambda x: torch.randn(x.shape, generator=draws))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_seeded_pc_sample_step_k_is_a_seeded_step_at_its_offset():
    sde = make_sde("ve", N=12)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(7, 7, generator=g) * 0.3

    def score_fn(x, t):
        return torch.tanh(x @ w) * t[:, None]

    x_init = sde.prior_sampling((6, 7), seed=9)
    got = S.pc_sample(score_fn, x_init, sde, corrector_steps=2, seed=77, offset=10)
    stride = (x_init.numel() + 3) // 4
    x, k = x_init.clone(), 0
    for i, t in enumerate(torch.linspace(1, 1e-3, 12)):
        vec_t = torch.full((6,), float(t))
        for _ in range(2):
            S.langevin_step_(x, score_fn(x, vec_t), 0.16, sde, t=vec_t, seed=77, offset=10 + k * stride)
            k += 1
        if i < 11:
            S.reverse_diffusion_step_(x, score_fn(x, vec_t), vec_t, sde, seed=77, offset=10 + k * stride)
        else:
            x = S.reverse_diffusion_step(x, score_fn(x, vec_t), vec_t, sde, seed=77, offset=10 + k * stride)[1]
        k += 1
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    assert torch.equal(x_init, sde.prior_sampling((6, 7), seed=9))


def test_pc_sample_with_eps_prediction_and_without_predictor():
    sde = make_sde("vp", N=20)
    x_init = sde.prior_sampling((4, 5), seed=3)

    def eps_fn(x, t):
        return 0.5 * x

    def score_fn(x, t):
        return -0.5 * x / sde.marginal(t.double())[1].float()[:, None]

    for predictor in ("reverse_diffusion", "none"):
        got = S.pc_sample(eps_fn, x_init, sde, prediction="eps", predictor=predictor, seed=1)
        want = S.pc_sample(score_fn, x_init, sde, predictor=predictor, seed=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- the corrector's reduction, in place, out= --------------------------------------------------
def test_langevin_does_not_depend_on_the_thread_count():
    sde = make_sde("vp")
    x, s, z = make((4096, 128), seed=6)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            given = S.langevin_step(x, s, SNR, sde, t=0.4, noise=z)
            results.append(given + S.langevin_step(x, s, SNR, sde, t=0.4, seed=3))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_in_place_and_out_equal_functional():
    sde = make_sde("ve")
    x, s, z = make((6, 300), seed=8)
    for step, step_ in ((S.langevin_step, S.langevin_step_), (S.reverse_diffusion_step, S.reverse_diffusion_step_)):
        kw = dict(t=0.5) if step is S.langevin_step else {}
        args = (SNR,) if step is S.langevin_step else (0.5,)
        want, want_mean = step(x, s, *args, sde, noise=z, **kw)
        out, mean = torch.empty_like(x), torch.empty_like(x)
        got = step(x, s, *args, sde, noise=z, out=out, mean_out=mean, **kw)
        assert got[0] is out and got[1] is mean
        for layout in ("contiguous", "column_major"):
            xi = strided_rows(x.clone(), layout)
            mean_i = strided_rows(torch.empty_like(x), layout)
            assert step_(xi, s, *args, sde, noise=z, mean_out=mean_i, **kw) is xi
            torch.testing.assert_close(xi, want, rtol=0, atol=0)
            torch.testing.assert_close(mean_i, want_mean, rtol=0, atol=0)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(mean, want_mean, rtol=0, atol=0)
    xi = x.clone()
    S.probability_flow_step_(xi, s, 0.5, -0.01, sde)
    torch.testing.assert_close(xi, S.probability_flow_step(x, s, 0.5, -0.01, sde), rtol=0, atol=0)


def test_outputs_that_repeat_memory_are_refused_and_aliased_operands_read_first():
    """An expanded (stride-0) out, mean_out or in-place x raises, naming it (the public API with
    ValueError, a direct op call with RuntimeError). The public in-place steps refuse a score that
    shares memory with x; the kernel itself, called directly, reads such a score (a shifted view of
    x, with and without the corrector's norms) as it was before the call."""
    sde = make_sde("vp")
    x, s, z = make((4, 16), seed=13)
    expanded = torch.zeros(1, 16).expand(4, 16)
    with pytest.raises(ValueError, match="out: more than one of its elements"):
        S.sde_forward(x, 0.5, sde, noise=z, out=expanded)
    with pytest.raises(ValueError, match="mean_out: more than one of its elements"):
        S.euler_maruyama_step(x, s, 0.5, -0.01, sde, noise=z, mean_out=expanded)
    with pytest.raises(ValueError, match="more than one of its elements"):
        S.langevin_step_(torch.zeros(1, 16).expand(4, 16), s, SNR, sde, t=0.5, noise=z)
    with pytest.raises(RuntimeError, match="x: more than one of its elements"):
        torch.ops.diffcore.sde_step_(expanded, s, torch.ones(1, 4, dtype=torch.float64), z, None, 0, None, None)
    buf = torch.randn(5, 16, generator=torch.Generator().manual_seed(14))
    with pytest.raises(ValueError, match="out: must not share memory with score"):
        S.reverse_diffusion_step_(buf[:4], buf[1:], 0.5, sde, noise=z)
    coef = torch.tensor([[0.9, 0.1, 0.3, -1.0]], dtype=torch.float64)
    for snr in (None, SNR):
        b = buf.clone()
        xi, shifted = b[:4], b[1:]
        want = xi.clone()
        torch.ops.diffcore.sde_step_(want, shifted.clone(), coef, z, None, 0, snr, None)
        torch.ops.diffcore.sde_step_(xi, shifted, coef, z, None, 0, snr, None)
        torch.testing.assert_close(xi, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", impl_params("sde_step"))
def test_every_implementation_keeps_autograd(name):
    """diffcore.use(name) runs that implementation with the op's autograd formula (both outputs)."""
    sde = make_sde("vp")
    x, s, z = (v.requires_grad_() for v in make((3, 6), seed=33)[:3])

    def grads():
        out, mean = S.euler_maruyama_step(x, s, 0.5, -0.01, sde, noise=z)
        return torch.autograd.grad(out.sum() + 2 * mean.sum(), (x, s, z))

    want = grads()
    with diffcore.use(name):
        got = grads()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_in_place_and_out_forms_refuse_autograd():
    """Under grad mode an operand that requires grad raises in the in-place and out= forms (they do
    not record autograd), rather than getting a wrong gradient."""
    sde = make_sde("vp")
    x, s = (v.requires_grad_() for v in make((3, 6), seed=31)[:2])
    calls = [
        ("x", lambda: S.euler_maruyama_step_(x * 1, s.detach(), 0.5, -0.01, sde, seed=1)),
        ("score", lambda: S.langevin_step(x.detach(), s, 0.1, sde, t=0.5, seed=1, out=torch.empty(3, 6))),
        ("mean_out", lambda: S.euler_maruyama_step(x.detach(), s.detach(), 0.5, -0.01, sde, seed=1,
                                                   mean_out=torch.empty(3, 6).requires_grad_())),
        # these two run the diffusion family's step
        ("x0", lambda: S.sde_forward(x, 0.5, sde, seed=1, out=torch.empty(3, 6))),
        ("score", lambda: S.probability_flow_step_(x.detach().clone(), s, 0.5, -0.01, sde)),
    ]
    for name, call in calls:
        with pytest.raises(RuntimeError, match=f"{name}: requires grad, but the in-place and out= forms"):
            call()
        with torch.no_grad():
            call()


@pytest.mark.parametrize("name", impl_params("sde_step"))
def test_langevin_without_columns_is_empty(name):
    x, s = make((3, 0), seed=32)[:2]
    with diffcore.use(name):
        out, mean = S.langevin_step(x, s, 0.1, make_sde("ve"), t=0.5, seed=1)
    assert out.shape == mean.shape == (3, 0)


def test_empty_batch():
    x = torch.empty(0, 10)
    out, mean = S.langevin_step(x, x.clone(), SNR, make_sde("vp"), t=0.5, seed=1)
    assert out.shape == mean.shape == (0, 10)


# --- gradients, opcheck, compile ----------------------------------------------------------------
@pytest.mark.parametrize("snr", [None, SNR])
@pytest.mark.parametrize("rows", [1, 3])
def test_sde_step_gradients(snr, rows):
    x, s, z = make((3, 20), seed=12)
    coef = torch.tensor([[0.9, 0.3, 0.5, -2.0], [1.1, 0.2, 0.4, 1.0], [1.0, 0.1, 0.3, -0.5]], dtype=torch.float64)
    coef = coef[:rows]
    g_out, g_mean = torch.randn(3, 20), torch.randn(3, 20)
    grads = []
    for fn in (lambda *a: torch.ops.diffcore.sde_step(*a), lambda *a: ref.step(*a)):
        leaves = [v.clone().requires_grad_() for v in (x, s, z)]
        out, mean = fn(leaves[0], leaves[1], coef, leaves[2], None, 0, snr)
        ((out * g_out).sum() + (mean * g_mean).sum()).backward()
        grads.append([v.grad for v in leaves])
    for mine, want in zip(*grads):
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-5)


def test_seeded_langevin_gradient():
    x, s, _ = make((4, 16), seed=13)
    coef = torch.tensor([[1.0, 1.8, 1.9, 1.0]], dtype=torch.float64)
    z = normal(x.numel(), 5, 2).reshape(4, 16)
    g_out = torch.randn(4, 16)
    mine = s.clone().requires_grad_()
    (torch.ops.diffcore.sde_step(x, mine, coef, None, 5, 2, SNR)[0] * g_out).sum().backward()
    theirs = s.clone().requires_grad_()
    (ref.step(x, theirs, coef, z, None, 0, SNR)[0] * g_out).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"noise": None, "seed": 7, "offset": 3}, {"snr": None}, {"coef": "per_row"}, {"noise": None, "snr": None}],
    ids=["langevin", "seeded", "predictor", "per_row", "noiseless"],
)
def test_opcheck(overrides):
    x, s, z = make((3, 33), seed=14)
    args = dict(score=s, coef=torch.tensor([[1.0, 0.4, 0.6, -1.5]], dtype=torch.float64), noise=z, seed=None,
                offset=0, snr=SNR)
    args.update(overrides)
    if args["coef"] == "per_row":
        args["coef"] = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ordered = tuple(args[k] for k in ("score", "coef", "noise", "seed", "offset", "snr"))
    ops = torch.ops.diffcore
    torch.library.opcheck(ops.sde_step.default, (x.clone().requires_grad_(), *ordered))
    for mean_out in (None, torch.empty_like(x)):
        torch.library.opcheck(ops.sde_step_.default, (x.clone(), *ordered, mean_out))
        out_kwargs = {"out": torch.empty_like(x), "mean_out": mean_out}
        torch.library.opcheck(ops.sde_step_out.default, (x, *ordered), out_kwargs)


def test_compile_fullgraph():
    torch._dynamo.reset()
    sde = make_sde("vp")

    def pc_step(x, s, t, z1, z2):
        x, _ = S.langevin_step(x, s, SNR, sde, t=t, noise=z1)
        x, x_mean = S.reverse_diffusion_step(x, s, t, sde, noise=z2)
        return S.probability_flow_step(x_mean, s, t, -1e-3, sde) * 2

    compiled = torch.compile(pc_step, fullgraph=True)
    x, s, z = make((4, 100), seed=15)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    torch.testing.assert_close(compiled(x, s, t, z, -z), pc_step(x, s, t, z, -z), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"every time must lie in \[0, 1.0\]"):
        compiled(x, s, t + 1, z, -z)


# --- bad input ----------------------------------------------------------------------------------
def bad_cases():
    x, s, z = make((4, 10), seed=16)
    ve, vp = make_sde("ve"), make_sde("vp")
    return [
        (lambda: S.reverse_diffusion_step(x, s[:3], 0.5, vp), ValueError, "score: expected shape"),
        (lambda: S.langevin_step(x, s, SNR, vp, t=0.5, noise=z[:, :5]), ValueError, "noise: expected shape"),
        (lambda: S.langevin_step(x, s.double(), SNR, vp, t=0.5), TypeError, "score: expected dtype"),
        (lambda: S.langevin_step(x, s, 0.0, vp, t=0.5), ValueError, "snr: expected snr > 0"),
        (lambda: S.langevin_step(x, s, -0.1, vp, t=0.5), ValueError, "snr: expected snr > 0"),
        (lambda: S.langevin_step(x, s, float("nan"), vp, t=0.5), ValueError, "snr"),
        (lambda: S.euler_maruyama_step(x, s, 0.5, 1e-3, vp), ValueError, "dt: expected a negative step"),
        (lambda: S.euler_maruyama_step(x, s, 0.5, 0.0, vp), ValueError, "dt: expected a negative step"),
        (lambda: S.probability_flow_step(x, s, 0.5, 0.01, vp), ValueError, "dt: expected a negative step"),
        (lambda: S.reverse_diffusion_step(x, s, 1.5, vp), ValueError, r"t: expected a time in \[0, 1.0\]"),
        (lambda: S.reverse_diffusion_step(x, s, -0.1, ve), ValueError, r"t: expected a time in \[0, 1.0\]"),
        (lambda: S.reverse_diffusion_step(x, s, torch.tensor([0.1, 1.2, 0.3, 0.4]), vp), RuntimeError,
         r"t: every time must lie in \[0, 1.0\]"),
        (lambda: S.reverse_diffusion_step(x, s, torch.tensor([0.1, 0.2]), vp), ValueError, r"t: expected shape \(4,\)"),
        (lambda: S.reverse_diffusion_step(x, s, torch.tensor([1, 0, 0, 1]), vp), TypeError, "t: expected a floating"),
        (lambda: S.reverse_diffusion_step(x, s, "0.5", vp), TypeError, "t: expected a float"),
        (lambda: S.reverse_diffusion_step(x, s, 0.0, vp, prediction="eps"), ValueError, "std at t = 0.0 is 0"),
        (lambda: S.reverse_diffusion_step(x, s, 0.5, vp, prediction="v"), ValueError, "prediction: expected one of"),
        (lambda: S.reverse_diffusion_step(x, s, 0.5, vp, std=0.3), ValueError, "std: only a noise prediction"),
        (lambda: S.reverse_diffusion_step(x, s, 0.5, vp, prediction="eps", std=-1.0), ValueError,
         "std: expected std > 0"),
        (lambda: S.reverse_diffusion_step(x, s, 0.5, vp, prediction="eps", std=torch.full((x.shape[0],), math.inf)),
         RuntimeError, "std: every std must be finite and > 0"),
        (lambda: S.reverse_diffusion_step(x.long(), s, 0.5, vp), TypeError, "x: expected float32"),
        (lambda: S.reverse_diffusion_step(x.double(), s.double(), 0.5, vp), TypeError, "x: expected float32"),
        (lambda: S.reverse_diffusion_step(x[0], s[0], 0.5, vp), ValueError, "x: expected a 2-D tensor"),
        (lambda: S.reverse_diffusion_step(x, s, 0.5, vp, noise=z, seed=1), ValueError, "give one, not both"),
        (lambda: S.reverse_diffusion_step(x, s, 0.5, vp, out=s), ValueError, "out: must not share memory with score"),
        (lambda: S.reverse_diffusion_step(x, s, 0.5, vp, noise=z, mean_out=z[:, :]), ValueError,
         "mean_out: must not share"),
        (lambda: S.reverse_diffusion_step(x, s, 0.5, "vp"), TypeError, "sde: expected a diffcore.sde"),
        (lambda: S.sde_forward(x, 0.5, vp, seed=2**64), ValueError, "seed"),
        (lambda: S.sde_forward(x, 2.0, vp), ValueError, "t: expected a time"),
        (lambda: S.pc_sample(lambda x, t: x, x, vp, eps=1.5), ValueError, "eps: expected 0 < eps < 1"),
        (lambda: S.pc_sample(lambda x, t: x, x, vp, eps=0.0), ValueError, "eps: expected 0 < eps < 1"),
        (lambda: S.pc_sample(lambda x, t: x, x, vp, eps="a"), TypeError, "eps: expected a finite number, got str"),
        (lambda: S.langevin_step_(x[:1].expand(4, -1), s, 0.1, vp, t=0.5, seed=0), ValueError,
         "x: more than one of its elements refers to the same memory location"),
        (lambda: S.probability_flow_step_(x[:1].expand(4, -1), s, 0.5, -0.01, vp), ValueError,
         "x: more than one of its elements"),
        (lambda: S.sde_forward(x[:1].expand(4, -1), 0.5, vp, out=x[:1].expand(4, -1), seed=0), ValueError,
         "out: more than one of its elements"),
        (lambda: S.pc_sample(lambda x, t: x, x, vp, snr=0.0), ValueError, "snr"),
        (lambda: S.pc_sample(lambda x, t: x, x, vp, n_steps=0), ValueError, "n_steps"),
        (lambda: S.pc_sample(lambda x, t: x, x, vp, n_steps=np.int64(0)), ValueError, "n_steps: expected a positive"),
        (lambda: S.pc_sample(lambda x, t: x, x, vp, predictor="ode"), ValueError, "predictor: expected one of"),
        (lambda: S.pc_sample(lambda x, t: x[:2], x, vp, n_steps=2), ValueError, "score_fn: expected a tensor"),
        (lambda: S.VESDE(1.0, 0.5), ValueError, "sigma_min, sigma_max"),
        (lambda: S.VPSDE(0.1, 20.0, 10), ValueError, "beta_min, beta_max"),
        (lambda: S.VPSDE(N=0), ValueError, "N: expected a positive int"),
    ]


def test_bad_input_gives_clear_errors():
    for call, error, match in bad_cases():
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("name", impl_params("sde_step"))
def test_langevin_with_an_all_zero_score_raises(name):
    """The corrector's step size divides by the batch-mean score norm: every implementation raises
    rather than returning inf/NaN (score_sde's loop would)."""
    with diffcore.use(name), pytest.raises(RuntimeError, match="score: every row is zero"):
        S.langevin_step(torch.randn(3, 5), torch.zeros(3, 5), SNR, make_sde("ve"), t=0.5, seed=1)


@pytest.mark.parametrize("name", [p for p in impl_params("sde_step") if p.id != "reference"])
def test_kernels_check_their_arguments(name):
    """The checks a direct torch.ops call (or a compiled graph) relies on live in the kernels."""
    impl = diffcore.implementations("sde_step")[name]
    x, s, z = make((2, 5), seed=17)
    coef = torch.ones(1, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="snr: expected snr > 0"):
        impl(x, s, coef, z, None, 0, -1.0, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match=r"coef must be \(1, 4\) or \(2, 4\)"):
        impl(x, s, torch.ones(3, 4, dtype=torch.float64), z, None, 0, None, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match="noise and seed"):
        impl(x, s, coef, z, 1, 0, None, torch.empty_like(x), None)
    with pytest.raises(RuntimeError, match="mean_out: expected shape"):
        impl(x, s, coef, z, None, 0, None, torch.empty_like(x), torch.empty(2, 4))


def test_mixed_devices_are_refused():
    x, s, _ = make((2, 4))
    with pytest.raises(ValueError, match="device"):
        S.reverse_diffusion_step(x, s.to("meta"), 0.5, make_sde("vp"))
