"""Reference of the reverse-diffusion family, written as the public code people run writes it.

DiffRec's ``GaussianDiffusion`` (``_extract_into_tensor``: gather the float64 table at ``t`` and cast
to float32; posterior mean ``c1[t] x0 + c2[t] x_t``; noise ``(t != 0) exp(0.5 logvar[t]) z``),
DreamRec's guidance ``(1 + w) f(x, c, t) - w f(x, null, t)``, DiffuRec's ``beta`` variance and
DDIM's update (Song et al. 2021, as guided-diffusion writes it). Eager, readable, no in-place
tricks: this is the meaning the kernels are tested against and the baseline the bench times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from diffcore.diffusion import Schedule


def extract(arr: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """DiffRec's ``_extract_into_tensor``: ``arr[t]`` cast to float32, broadcast to ``shape``."""
    res = arr.to(t.device)[t].float()
    while res.dim() < len(shape):
        res = res[..., None]
    return res.expand(shape)


def _timesteps(t: int | torch.Tensor, x: torch.Tensor, schedule: Schedule, clamp_t: bool) -> torch.Tensor:
    if isinstance(t, int):
        t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    t = t.expand(x.shape[0])
    if clamp_t:  # DDRM: t >= T uses the last table entry
        t = t.clamp(max=schedule.num_steps - 1)
    return t


def q_sample(x0: torch.Tensor, t: int | torch.Tensor, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """``sqrt(ab[t]) x0 + sqrt(1 - ab[t]) noise`` (DiffRec ``q_sample``). x0, noise: (B, N)."""
    t = _timesteps(t, x0, schedule, False)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def predict_x0(
    x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, schedule: Schedule, prediction: str
) -> torch.Tensor:
    if prediction == "x0":
        return model_out
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * model_out
    )


def guide(model_out: torch.Tensor, uncond_out: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """DreamRec's classifier-free guidance ``(1 + w) f_c - w f_u``."""
    if uncond_out is None:
        return model_out
    return (1 + guidance_scale) * model_out - guidance_scale * uncond_out


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
    clamp_t: bool = False,
) -> torch.Tensor:
    """One reverse step ``x_{t-1}`` from ``x_t`` (B, N) and the model output (B, N).

    ``variance="posterior"``: ``exp(0.5 posterior_log_variance_clipped[t])`` (DiffRec);
    ``"beta"``: ``exp(0.5 log(cat(pv[1], betas[1:]))[t])`` (DiffuRec); ``"none"`` or ``noise=None``:
    the posterior mean only."""
    t = _timesteps(t, x_t, schedule, clamp_t)
    out = guide(model_out, uncond_out, guidance_scale)
    x0 = predict_x0(x_t, out, t, schedule, prediction)
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    if variance == "none" or noise is None:
        return mean
    if variance == "posterior":
        log_variance = schedule.posterior_log_variance_clipped
    else:
        log_variance = torch.log(torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]))
    nonzero_mask = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero_mask * torch.exp(0.5 * extract(log_variance, t, x_t.shape)) * noise


def ddim_step(
    x_t: torch.Tensor,
    model_out: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    prediction: str = "x0",
    uncond_out: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM step from ``t`` to ``t_prev`` (``t_prev < 0``: to the data, ``ab_prev = 1``).

    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)``;
    ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + (t != 0) sigma z``."""
    t = _timesteps(t, x_t, schedule, False)
    t_prev = _timesteps(t_prev, x_t, schedule, False)
    out = guide(model_out, uncond_out, guidance_scale)
    x0 = predict_x0(x_t, out, t, schedule, prediction)
    if prediction == "eps":
        eps = out
    else:
        eps = (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
            schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )
    ab = extract(schedule.alphas_cumprod, t, x_t.shape)
    ab_table_prev = torch.cat([schedule.alphas_cumprod, schedule.alphas_cumprod.new_ones(1)])
    ab_prev = extract(ab_table_prev, torch.where(t_prev < 0, schedule.num_steps, t_prev), x_t.shape)
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    mean = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
    if noise is None or eta == 0.0:
        return mean
    nonzero_mask = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero_mask * sigma * noise


def sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_start: torch.Tensor,
    schedule: Schedule,
    *,
    steps: int = 0,
    noise: bool = False,
    prediction: str = "x0",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiffRec's ``p_sample``: start at ``x_start`` (``steps == 0``) or ``q_sample(x_start,
    steps - 1)``, then all T steps from T-1 down to 0, noise (``randn_like``) only if asked."""
    if steps == 0:
        x_t = x_start
    else:
        t = torch.tensor([steps - 1] * x_start.shape[0]).to(x_start.device)
        x_t = q_sample(x_start, t, schedule, _randn_like(x_start, generator))
    indices = list(range(schedule.num_steps))[::-1]
    if schedule.noise_scale == 0.0:
        for i in indices:
            t = torch.tensor([i] * x_t.shape[0]).to(x_start.device)
            x_t = denoiser(x_t, t)
        return x_t
    for i in indices:
        t = torch.tensor([i] * x_t.shape[0]).to(x_start.device)
        model_out = denoiser(x_t, t)
        x_t = p_step(
            x_t, model_out, t, schedule, prediction=prediction,
            noise=_randn_like(x_t, generator) if noise else None,
        )
    return x_t


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def noise_term(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``c z`` for (B, 1) c and (B, N) noise z, with the rows whose c is 0 exactly 0. A fused step
    neither reads nor draws the noise of such a row (every row at t = 0), so NaN or inf there do not
    reach the result, as torch.addmm's beta = 0 ignores its input (``c * z`` would give 0 * inf = NaN)."""
    return torch.where(c == 0, 0.0, c * z)


def step(
    x: torch.Tensor,
    f: torch.Tensor | None,
    f_uncond: torch.Tensor | None,
    guidance: float,
    t: torch.Tensor | None,
    table: torch.Tensor,
    noise: torch.Tensor | None,
    seed: int | None,
    offset: int,
    clamp_t: bool,
) -> torch.Tensor:
    """The fused op ``diffusion_step``: ``a x + b f + c z`` with ``(a, b, c) = float32(table[t])``.

    ``f = (1 + w) f - w f_uncond`` with guidance; ``z`` the given noise or the Philox stream
    ``(seed, offset)`` over the (B, N) output; without t, ``table`` has one row or one per row.
    A row whose c is 0 takes no noise: see :func:`noise_term`."""
    from diffcore.reference.random import normal

    if t is None:
        coef = table.float().expand(x.shape[0], 3)
    else:
        t = t.expand(x.shape[0])
        if clamp_t:
            t = t.clamp(max=table.shape[0] - 1)
        coef = table[t].float()
    a, b, c = (coef[:, k : k + 1] for k in range(3))
    x32 = x.float()
    out = a * x32
    if f is not None:
        out = out + b * guide(f.float(), None if f_uncond is None else f_uncond.float(), guidance)
    if noise is not None:
        out = out + noise_term(c, noise.float())
    elif seed is not None:
        out = out + noise_term(c, normal(x.numel(), seed, offset).reshape(x.shape).to(x.device))
    return out.to(x.dtype)
