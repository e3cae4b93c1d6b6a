"""Reference of the score-SDE family, written from the equations as score_sde (Song et al. 2021,
``sde_lib.py`` and ``sampling.py``) writes them, for (B, N) rows instead of images.

Per-row quantities (``beta_t``, ``sigma``, ``G``, ``alpha``, ``std``) are computed in float64 from t
and the SDE's float64 tables and cast to float32 before they meet x, as DiffRec's
``_extract_into_tensor`` casts its tables; the updates then run in float32 in score_sde's order:
``x_mean = x + drift * dt`` then ``x = x_mean + diffusion * sqrt(-dt) * z``, ``rev_f = f - G^2 s``,
``x_mean = x - rev_f``, the Langevin step size from ``torch.norm(..., dim=-1).mean()``. Eager,
readable, no in-place tricks: this is the meaning the kernels are tested against and the baseline
the bench times.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from diffcore.reference.diffusion import noise_term

if TYPE_CHECKING:
    from diffcore.sde import SDE


def _vec_t(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """score_sde's ``vec_t``: one time per row, here in float64, shape (B,)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1)
    return t.expand(x.shape[0])


def _col(v: torch.Tensor) -> torch.Tensor:
    """A per-row float64 quantity as a float32 (B, 1) column."""
    return v.float()[:, None]


def _timestep(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    return (t * (sde.N - 1) / sde.T).long()


# --- sde_lib: sde, marginal_prob, discretize, reverse -------------------------------------------
def sde_fn(sde: SDE, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sde.sde(x, t)``: the drift (B, N) and the diffusion g(t) (B,) float64."""
    if sde.kind == "ve":
        sigma = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
        drift = torch.zeros_like(x)
        diffusion = sigma * math.sqrt(2 * (math.log(sde.sigma_max) - math.log(sde.sigma_min)))
        return drift, diffusion
    beta_t = sde.beta_0 + t * (sde.beta_1 - sde.beta_0)
    drift = -0.5 * _col(beta_t) * x
    if sde.kind == "vp":
        return drift, torch.sqrt(beta_t)
    discount = 1.0 - torch.exp(-2 * sde.beta_0 * t - (sde.beta_1 - sde.beta_0) * t**2)
    return drift, torch.sqrt(beta_t * discount)


def marginal_prob(sde: SDE, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sde.marginal_prob(x, t)``: the mean (B, N) and std (B,) float64 of ``p_t(x | x0 = x)``."""
    t = _vec_t(t, x)
    if sde.kind == "ve":
        return x, sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
    log_mean_coeff = -0.25 * t**2 * (sde.beta_1 - sde.beta_0) - 0.5 * t * sde.beta_0
    mean = _col(torch.exp(log_mean_coeff)) * x
    if sde.kind == "vp":
        return mean, torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff))
    return mean, 1 - torch.exp(2.0 * log_mean_coeff)


def discretize(sde: SDE, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sde.discretize(x, t)``: ``f`` (B, N) and ``G`` (B,) float64 of ``x_{i+1} = x_i + f + G z``."""
    if sde.kind == "ve":  # SMLD
        timestep = _timestep(sde, t)
        sigma = sde.discrete_sigmas.to(t.device)[timestep]
        adjacent_sigma = torch.where(
            timestep == 0, torch.zeros_like(t), sde.discrete_sigmas.to(t.device)[(timestep - 1).clamp(min=0)]
        )
        return torch.zeros_like(x), torch.sqrt(sigma**2 - adjacent_sigma**2)
    if sde.kind == "vp":  # DDPM
        timestep = _timestep(sde, t)
        beta = sde.discrete_betas.to(x.device)[timestep]
        alpha = sde.alphas.to(x.device)[timestep]
        f = _col(torch.sqrt(alpha)) * x - x
        return f, torch.sqrt(beta)
    dt = 1 / sde.N  # Euler-Maruyama
    drift, diffusion = sde_fn(sde, x, t)
    return drift * dt, diffusion * math.sqrt(dt)


def reverse_sde(sde: SDE, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor, probability_flow: bool = False):
    """The reverse SDE's ``sde(x, t)``: drift ``f - g^2 s`` (halved for the ODE), diffusion g (0 for the ODE)."""
    drift, diffusion = sde_fn(sde, x, t)
    drift = drift - _col(diffusion) ** 2 * score * (0.5 if probability_flow else 1.0)
    return drift, torch.zeros_like(diffusion) if probability_flow else diffusion


def reverse_discretize(sde: SDE, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor, probability_flow: bool = False):
    """The reverse SDE's ``discretize(x, t)``: ``rev_f = f - G^2 s`` (halved for the ODE), ``rev_G``."""
    f, G = discretize(sde, x, t)
    rev_f = f - _col(G) ** 2 * score * (0.5 if probability_flow else 1.0)
    return rev_f, torch.zeros_like(G) if probability_flow else G


def score_from_eps(eps: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """score_sde's ``get_score_fn`` for a noise-predicting model: ``score = -eps / std``."""
    return -eps / _col(std)


# --- the steps ----------------------------------------------------------------------------------
def sde_forward(x0: torch.Tensor, t: float | torch.Tensor, sde: SDE, noise: torch.Tensor) -> torch.Tensor:
    """A sample of ``p_t(x | x0)``: ``mean + std z`` (score_sde's loss perturbation)."""
    mean, std = marginal_prob(sde, x0.float(), t)
    return (mean + _col(std) * noise.float()).to(x0.dtype)


def euler_maruyama_step(
    x: torch.Tensor, score: torch.Tensor, t: float | torch.Tensor, dt: float, sde: SDE, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``EulerMaruyamaPredictor.update_fn`` with the given ``dt`` (score_sde: ``-1 / N``)."""
    dtype, x, score, z = x.dtype, x.float(), score.float(), noise.float()
    drift, diffusion = reverse_sde(sde, x, _vec_t(t, x), score)
    x_mean = x + drift * dt
    x = x_mean + _col(diffusion) * math.sqrt(-dt) * z
    return x.to(dtype), x_mean.to(dtype)


def reverse_diffusion_step(
    x: torch.Tensor, score: torch.Tensor, t: float | torch.Tensor, sde: SDE, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ReverseDiffusionPredictor.update_fn``."""
    dtype, x, score, z = x.dtype, x.float(), score.float(), noise.float()
    f, G = reverse_discretize(sde, x, _vec_t(t, x), score)
    x_mean = x - f
    x = x_mean + _col(G) * z
    return x.to(dtype), x_mean.to(dtype)


def probability_flow_step(
    x: torch.Tensor, score: torch.Tensor, t: float | torch.Tensor, dt: float, sde: SDE
) -> torch.Tensor:
    """``EulerMaruyamaPredictor`` with ``probability_flow=True``: ``x + [f - g^2 s / 2] dt``."""
    dtype, x, score = x.dtype, x.float(), score.float()
    drift, _ = reverse_sde(sde, x, _vec_t(t, x), score, probability_flow=True)
    return (x + drift * dt).to(dtype)


def langevin_alpha(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    if sde.kind in ("vp", "subvp"):
        return sde.alphas.to(t.device)[_timestep(sde, t)]
    return torch.ones_like(t)


def langevin_step(
    x: torch.Tensor, score: torch.Tensor, snr: float, sde: SDE, t: float | torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of ``LangevinCorrector.update_fn``."""
    dtype, x, grad, noise = x.dtype, x.float(), score.float(), noise.float()
    alpha = langevin_alpha(sde, _vec_t(t, x)).float()
    grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
    noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
    step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    x_mean = x + step_size[:, None] * grad
    x = x_mean + torch.sqrt(step_size * 2)[:, None] * noise
    return x.to(dtype), x_mean.to(dtype)


def pc_sample(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_init: torch.Tensor,
    sde: SDE,
    *,
    n_steps: int | None = None,
    corrector_steps: int = 1,
    snr: float = 0.16,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    eps: float = 1e-3,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
) -> torch.Tensor:
    """``get_pc_sampler(...)(model)`` from ``x`` = ``x_init``: at each of ``linspace(1, eps, n)``,
    ``corrector_steps`` Langevin steps then one predictor step; returns the last ``x_mean``.
    ``noise_fn(x)`` draws each step's noise (score_sde: ``torch.randn_like``)."""
    n = sde.N if n_steps is None else n_steps
    x = x_mean = x_init
    timesteps = torch.linspace(sde.T, eps, n, device=x_init.device)
    for i in range(n):
        vec_t = torch.ones(x.shape[0], device=x.device) * timesteps[i]
        if corrector == "langevin":
            for _ in range(corrector_steps):
                grad = score_fn(x, vec_t)
                noise = noise_fn(x)
                x, x_mean = langevin_step(x, grad, snr, sde, vec_t, noise)
        if predictor == "euler_maruyama":
            z = noise_fn(x)
            x, x_mean = euler_maruyama_step(x, score_fn(x, vec_t), vec_t, -1.0 / n, sde, z)
        elif predictor == "reverse_diffusion":
            score = score_fn(x, vec_t)
            x, x_mean = reverse_diffusion_step(x, score, vec_t, sde, noise_fn(x))
        elif predictor == "probability_flow":
            x = x_mean = probability_flow_step(x, score_fn(x, vec_t), vec_t, -1.0 / n, sde)
        else:
            x_mean = x
    return x_mean


# --- the fused op -------------------------------------------------------------------------------
# The corrector's step size divides by the batch-mean score norm: every implementation raises
# this rather than returning inf/NaN (score_sde's loop would).
ZERO_SCORE = "score: every row is zero, so the corrector's step size 2 alpha (snr mean|z| / mean|score|)^2 is undefined"


def step(
    x: torch.Tensor,
    score: torch.Tensor,
    coef: torch.Tensor,
    noise: torch.Tensor | None,
    seed: int | None,
    offset: int,
    snr: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op ``sde_step``: with ``(a, b, c, k)`` = float32 of ``coef``'s row r (one row: all)::

        s      = k score
        r      = 1, or with snr: snr * mean_r ||z_r|| / mean_r ||s_r||
        x_mean = a x + b r^2 s,     out = x_mean + c r z   (a row whose c is 0 takes no z)

    ``z`` the given noise or the Philox stream ``(seed, offset)`` over the (B, N) output, or none.
    Returns ``(out, x_mean)`` in x's dtype."""
    from diffcore.reference.random import normal

    rows = x.shape[0]
    c64 = coef.to(torch.float64).expand(rows, 4)
    a, c, k = (c64[:, j : j + 1].float() for j in (0, 2, 3))
    bk = (c64[:, 1:2] * c64[:, 3:4]).float()
    x32, s32 = x.float(), score.float()
    z = None
    if noise is not None:
        z = noise.float()
    elif seed is not None:
        z = normal(x.numel(), seed, offset).reshape(x.shape).to(x.device)
    if snr is not None:
        z_norm = torch.norm(z, dim=-1).mean() if z is not None else torch.zeros(())
        s_norm = (k.abs()[:, 0] * torch.norm(s32, dim=-1)).mean()
        if float(s_norm) == 0 and x.numel() > 0:  # no elements: nothing to step, as the kernels
            raise RuntimeError(ZERO_SCORE)
        ratio = snr * z_norm / s_norm
        bk, c = bk * ratio**2, c * ratio
    mean = a * x32 + bk * s32
    out = mean if z is None else mean + noise_term(c, z)
    return out.to(x.dtype), mean.to(x.dtype)


def step_backward(
    score: torch.Tensor,
    coef: torch.Tensor,
    z: torch.Tensor | None,
    snr: float | None,
    grad_out: torch.Tensor | None,
    grad_mean: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The vector-Jacobian product of :func:`step` for ``x``, ``score`` and the noise ``z`` (the
    given tensor or the redrawn Philox stream). With ``snr``, ``r`` depends on the score and the
    noise through the batch-mean norms: ``dr/ds_r = -r |k_r| s_r / (B S ||s_r||)``,
    ``dr/dz_r = r z_r / (B Z ||z_r||)`` with ``S``, ``Z`` the two means. Returns float32 grads."""
    rows = score.shape[0]
    c64 = coef.to(torch.float64).expand(rows, 4)
    a, c, k = (c64[:, j : j + 1].float() for j in (0, 2, 3))
    bk = (c64[:, 1:2] * c64[:, 3:4]).float()
    zero = torch.zeros(score.shape, dtype=torch.float32, device=score.device)
    g_out = zero if grad_out is None else grad_out.float()
    u = g_out if grad_mean is None else g_out + grad_mean.float()
    if snr is None:
        return a * u, bk * u, None if z is None else c * g_out
    s32 = score.float()
    z32 = zero if z is None else z.float()
    s_norm, z_norm = torch.norm(s32, dim=-1, keepdim=True), torch.norm(z32, dim=-1, keepdim=True)
    S, Z = (k.abs() * s_norm).mean(), z_norm.mean()
    r = snr * Z / S
    grad_r = (2 * r * bk * s32 * u).sum() + (c * z32 * g_out).sum()
    unit_s = torch.where(s_norm > 0, s32 / s_norm, 0.0)
    unit_z = torch.where(z_norm > 0, z32 / z_norm, 0.0)
    grad_s = bk * r**2 * u - grad_r * r / (rows * S) * k.abs() * unit_s
    grad_z = c * r * g_out + grad_r * r / (rows * Z) * unit_z
    return a * u, grad_s, None if z is None else grad_z
