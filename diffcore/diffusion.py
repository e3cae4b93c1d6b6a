"""Reverse-diffusion steps: schedules, q_sample, p_step, ddim_step and the whole sampling loop.

Every step is one fused pass over the (B, N) rows (``torch.ops.diffcore.diffusion_step``)::

    out = a[t] * x + b[t] * f + c[t] * z,    f = (1 + w) model_out - w uncond_out

with the per-timestep coefficients ``(a, b, c)`` precombined in float64 by :class:`Schedule` and
cast to float32 per row, as DiffRec's ``_extract_into_tensor`` casts its tables. (DESIGN.md names
one op per step; they are one kernel with three coefficient tables, so diffcore registers one op.)
In ``prediction="eps"`` the two products DiffRec applies in turn (x0 from eps, then the posterior
mean) are folded into one float64 coefficient per operand: the result agrees with DiffRec's to
float32 rounding, and the kernel reads each operand once.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from diffcore import (
    _checks,
    _library,  # defines the ops
    _registry,
)

__all__ = ["Schedule", "q_sample", "p_step", "p_step_", "ddim_step", "sample"]

PREDICTIONS = ("x0", "eps")
VARIANCES = ("posterior", "beta", "none")


class Schedule:
    """A discrete diffusion schedule and its tables, in the dtype of the betas (float64 by default).

    Tables (shape (T,)): ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev``,
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``,
    ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance``, ``posterior_log_variance_clipped``
    (``log(cat(pv[1], pv[1:]))``), ``posterior_mean_coef1``, ``posterior_mean_coef2``.

    Betas lie in (0, 1], and 1 - betas[0] must not round to 1 in their dtype (alphas_cumprod[0]
    = 1 would make the posterior divide by 0): ValueError otherwise. A beta of exactly 1 (a zero
    terminal SNR) zeroes alphas_cumprod from its step on: x0-prediction ancestral steps stay
    defined; eps-prediction steps, DDIM and DiffRec's eps weights divide by ``sqrt(ab)`` or by
    ratios of ab there and raise ValueError.

    ``noise_scale == 0`` (DiffRec) describes a model without diffusion: :func:`sample` then only
    applies the denoiser T times, and the step functions refuse it.
    """

    def __init__(self, betas: torch.Tensor, *, noise_scale: float = 1.0) -> None:
        if not isinstance(betas, torch.Tensor):
            betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas: expected a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if betas.dtype not in (torch.float64, torch.float32):
            raise TypeError(f"betas: expected float64 or float32, got {betas.dtype}")
        self.noise_scale = _checks.real("noise_scale", noise_scale, _checks.finite_non_negative,
                                        "a finite noise_scale >= 0")
        if self.noise_scale != 0.0:
            if not bool(torch.isfinite(betas).all()):
                raise ValueError("betas: every beta must be finite")
            if not bool(((betas > 0) & (betas <= 1)).all()):
                lo, hi = betas.min().item(), betas.max().item()
                raise ValueError(f"betas: every beta must lie in (0, 1], got values in [{lo}, {hi}]")
        self.betas = betas
        self.num_steps = betas.numel()
        one = betas.new_ones(1)
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        if self.noise_scale != 0.0 and bool(self.alphas_cumprod[0] == 1):
            raise ValueError(f"betas: 1 - betas[0] rounds to 1 in {betas.dtype} (betas[0] = {betas[0].item()}), so "
                             "alphas_cumprod[0] = 1 and the posterior divides by 1 - alphas_cumprod[0] = 0; use a "
                             "larger first beta (or float64)")
        # The first t with alphas_cumprod[t] == 0 (a beta of exactly 1, a zero terminal SNR), or None.
        zero = torch.nonzero(self.alphas_cumprod == 0)
        self.first_zero_alpha_bar = int(zero[0]) if zero.numel() else None
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2] if self.num_steps > 1 else pv, pv[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._tables: dict[tuple, torch.Tensor] = {}

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: torch.Tensor | Sequence[float], *, noise_scale: float = 1.0) -> Schedule:
        betas = betas if isinstance(betas, torch.Tensor) else torch.tensor(betas, dtype=torch.float64)
        return cls(betas, noise_scale=noise_scale)

    @classmethod
    def linear(
        cls, T: int, beta_start: float = 1e-4, beta_end: float = 0.02, *, dtype: torch.dtype = torch.float64
    ) -> Schedule:
        return cls(torch.linspace(beta_start, beta_end, _steps(T), dtype=dtype))

    @classmethod
    def cosine(
        cls,
        T: int,
        s: float = 0.008,
        max_beta: float = 0.999,
        *,
        clip: tuple[float, float] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Schedule:
        """DiffRec's ``betas_for_alpha_bar`` with ``cos((t + s) / (1 + s) pi / 2)^2``, betas capped at
        ``max_beta``; ``clip=(1e-4, 0.9999)`` clamps instead, as DreamRec does."""
        T = _steps(T)
        s = _checks.real("s", s, _checks.finite_non_negative, "a finite offset s >= 0")
        beta_range = "a beta in (0, 1]"
        if clip is None:
            max_beta = _checks.real("max_beta", max_beta, lambda v: 0 < v <= 1, beta_range)
        else:
            if not isinstance(clip, (tuple, list)) or len(clip) != 2:
                raise TypeError(f"clip: expected a (min, max) pair, got {clip!r}")
            clip = tuple(_checks.real(f"clip[{i}]", c, lambda v: 0 < v <= 1, beta_range) for i, c in enumerate(clip))
            if clip[0] > clip[1]:
                raise ValueError(f"clip: expected min <= max, got {clip}")
        x = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        betas = betas.clamp(clip[0], clip[1]) if clip is not None else betas.clamp(max=max_beta)
        return cls(betas.to(dtype))

    @classmethod
    def linear_var(
        cls, steps: int, noise_scale: float, noise_min: float, noise_max: float, beta_fixed: bool = True
    ) -> Schedule:
        """DiffRec's ``linear-var``: ``var = linspace(scale min, scale max, T)``, ``beta_0 = var_0``,
        ``beta_i = min(1 - (1 - var_i) / (1 - var_{i-1}), 0.999)``; ``beta_0 = 1e-5`` if ``beta_fixed``."""
        steps = _steps(steps)
        var = torch.linspace(noise_scale * noise_min, noise_scale * noise_max, steps, dtype=torch.float64)
        alpha_bar = 1 - var
        betas = torch.empty(steps, dtype=torch.float64)
        betas[0] = 1 - alpha_bar[0]
        betas[1:] = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        if beta_fixed:
            betas[0] = 1e-5
        return cls(betas, noise_scale=noise_scale)

    @classmethod
    def exp(
        cls, T: int, beta_min: float = 0.1, beta_max: float = 10.0, *, dtype: torch.dtype = torch.float64
    ) -> Schedule:
        """DreamRec's ``exp_beta_schedule``."""
        T = _steps(T)
        x = torch.linspace(1, 2 * T + 1, T, dtype=torch.float64)
        betas = 1 - torch.exp(-beta_min / T - x * 0.5 * (beta_max - beta_min) / (T * T))
        return cls(betas.to(dtype))

    def to(self, device: torch.device | str) -> Schedule:
        moved = Schedule.__new__(Schedule)
        for name, value in vars(self).items():
            setattr(moved, name, value.to(device) if isinstance(value, torch.Tensor) else value)
        moved._tables = {}
        return moved

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def __repr__(self) -> str:
        return (f"Schedule(T={self.num_steps}, dtype={self.betas.dtype}, device={self.device}, "
                f"noise_scale={self.noise_scale})")

    # --- coefficient tables of the fused step: (T, 3) rows (a, b, c) ---------------------------
    def q_table(self) -> torch.Tensor:
        """``q_sample``: ``sqrt(ab) x0 + sqrt(1 - ab) z``."""
        return self._table(
            ("q",), lambda: (self.sqrt_alphas_cumprod, torch.zeros_like(self.betas), self.sqrt_one_minus_alphas_cumprod)
        )

    def p_table(self, prediction: str = "x0", variance: str = "posterior") -> torch.Tensor:
        """``p_step``: posterior mean ``c1 x0_hat + c2 x_t`` plus ``[t > 0] sigma_t z``."""
        _choice("prediction", prediction, PREDICTIONS)
        _choice("variance", variance, VARIANCES)
        if prediction == "eps":
            self.require_positive_alpha_bar("prediction='eps'")

        def build():
            c1, c2 = self.posterior_mean_coef1, self.posterior_mean_coef2
            if prediction == "x0":
                a, b = c2, c1
            else:  # x0_hat = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps
                a, b = c1 * self.sqrt_recip_alphas_cumprod + c2, -c1 * self.sqrt_recipm1_alphas_cumprod
            if variance == "posterior":
                sigma = torch.exp(0.5 * self.posterior_log_variance_clipped)
            elif variance == "beta":  # DiffuRec: log(cat(pv[1], betas[1:]))
                sigma = torch.exp(0.5 * torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]])))
                sigma = sigma if self.num_steps > 1 else torch.zeros_like(self.betas)  # T = 1: only t = 0
            else:
                sigma = torch.zeros_like(self.betas)
            sigma = sigma.clone()
            sigma[0] = 0.0  # no noise at t = 0
            return a, b, sigma

        return self._table(("p", prediction, variance), build)

    def ddim_table(
        self, t: int | torch.Tensor, t_prev: int | torch.Tensor, eta: float, prediction: str
    ) -> torch.Tensor:
        """DDIM from ``t`` to ``t_prev`` (``< 0``: to the data): one row, or one per row for tensors."""
        _choice("prediction", prediction, PREDICTIONS)
        self.require_positive_alpha_bar("ddim_step")
        T = self.num_steps
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        t_prev = torch.as_tensor(t_prev, device=self.device).reshape(-1)
        ab = self.alphas_cumprod[t]
        ab_prev = torch.cat([self.alphas_cumprod, self.alphas_cumprod.new_ones(1)])[torch.where(t_prev < 0, T, t_prev)]
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        rest = 1 - ab_prev - sigma**2  # >= 0 up to rounding for eta <= 1
        if eta > 1:
            torch._assert_async((rest >= 0).all(), f"eta: {eta} makes sigma^2 exceed 1 - ab[t_prev] for this step "
                                "(DDIM's eta must keep sigma^2 <= 1 - ab[t_prev]; eta <= 1 always does)")
        k = torch.sqrt(rest.clamp_min(0))
        sr, srm1 = self.sqrt_recip_alphas_cumprod[t], self.sqrt_recipm1_alphas_cumprod[t]
        if prediction == "x0":  # eps_hat = (sr x_t - x0_hat) / srm1
            a, b = k * sr / srm1, torch.sqrt(ab_prev) - k / srm1
        else:  # x0_hat = sr x_t - srm1 eps
            a, b = torch.sqrt(ab_prev) * sr, k - torch.sqrt(ab_prev) * srm1
        return torch.stack([a, b, sigma * (t != 0)], 1)

    def _table(self, key: tuple, build: Callable[[], tuple[torch.Tensor, ...]]) -> torch.Tensor:
        if key not in self._tables:
            self._tables[key] = torch.stack(build(), 1).contiguous()
        return self._tables[key]

    def require_positive_alpha_bar(self, what: str) -> None:
        """Raises for ``what`` (eps-parametrised steps, DDIM, DiffRec's eps weights) on a schedule
        whose alphas_cumprod reaches 0: they divide by ``sqrt(ab[t])`` or by ratios of ab, undefined
        there. x0-prediction ancestral steps stay defined and are allowed."""
        k = self.first_zero_alpha_bar
        if k is not None:
            raise ValueError(f"{what}: the schedule's alphas_cumprod is 0 from t = {k} on (a beta of exactly 1), "
                             "where it divides by sqrt(alphas_cumprod) or by ratios of it; use prediction='x0' "
                             "ancestral steps (p_step) or betas < 1")

    def _require_diffusion(self) -> None:
        if self.noise_scale == 0.0:
            raise ValueError("schedule: noise_scale == 0 defines no diffusion steps (only sample() accepts it)")


def _steps(T: int) -> int:
    return _checks.integer("T", T, lambda v: v >= 1, "a positive int")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def _schedule(schedule: object, x: torch.Tensor) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a diffcore.Schedule, got {type(schedule).__name__}")
    schedule._require_diffusion()
    if schedule.device != x.device:
        raise ValueError(f"schedule: its tables are on {schedule.device}, x_t on {x.device}; use schedule.to(device)")
    return schedule


def _run_step(x, f, f_uncond, guidance, t, table, noise, seed, offset, clamp_t, out):
    """Calls the fused op (or the implementation forced by ``diffcore.use``); ``out`` None:
    allocate, ``out is x``: in place."""
    impl = _registry.forced_for("diffusion_step", x.device)
    if out is x:
        f, f_uncond, noise = _checks.in_place_operands(x, impl, (f, f_uncond, noise))
    args = (f, f_uncond, float(guidance), t, table, noise, seed, offset, clamp_t)
    if impl is not None and out is None:
        return _library.run_forced("diffusion_step", impl, (x, *args),
                                   lambda: (torch.empty_like(x, memory_format=torch.contiguous_format),))
    if impl is not None:
        impl(x, *args, out)
        return out
    if out is None:
        return torch.ops.diffcore.diffusion_step(x, *args)
    if out is x:
        torch.ops.diffcore.diffusion_step_(x, *args)
    else:
        torch.ops.diffcore.diffusion_step_out(x, *args, out=out)
    return out


def _step_operands(x_t, model_out, uncond_out, guidance_scale, noise, seed, offset, out, x_name="x_t"):
    """Checks the operands every step shares (x_t named ``x_name`` in the messages); returns the
    normalised (seed, offset, out)."""
    _checks.float_tensor(x_name, x_t, ndim=2)
    _checks.real("guidance_scale", guidance_scale)
    if model_out is not None:
        _checks.like("model_out", model_out, x_t, x_name)
    if uncond_out is not None:
        _checks.like("uncond_out", uncond_out, x_t, x_name)
    if guidance_scale != 0.0 and uncond_out is None:
        raise ValueError("guidance_scale: a non-zero scale needs uncond_out (the unconditional model output)")
    if noise is not None:
        _checks.like("noise", noise, x_t, x_name)
        if seed is not None:
            raise ValueError("noise and seed: give one, not both")
    seed, offset = _checks.seed_offset(seed, offset)
    if out is not None:
        out = _checks.out_tensor(out, x_t, {"model_out": model_out, "uncond_out": uncond_out, "noise": noise}, x_name)
    return seed, offset, out


class _InPlaceSteps:
    """:func:`p_step_` for a loop that steps one buffer ``x_t`` through t = T-1 .. 0.

    What the loop keeps fixed (``x_t``, the schedule and its coefficient table, the guidance scale,
    the implementation) is checked once here. Per step, on the CPU with the C++ kernel, the op is
    called with no Python checks: it checks the denoiser's outputs and the noise itself (a failed
    check re-runs the Python checks, so the error names the operand with the usual exception type)
    and reads any operand that aliases ``x_t`` from a copy (``apart_from`` in
    ``csrc/include/diffcore/checks.h``). Elsewhere the operands are checked here and copied as every
    in-place entry copies them (``_checks.in_place_operands``).
    In DreamRec's 500-step loop at 256 x 64 (0.4 ms a step, most of it the denoiser), those Python
    checks cost about 5% end to end: right after the denoiser each torch attribute they read is slow.
    """

    def __init__(self, x_t: torch.Tensor, schedule: Schedule, *, prediction: str, variance: str,
                 guidance_scale: float) -> None:
        _checks.float_tensor("x_t", x_t, ndim=2)
        self.x = x_t
        self.table = _schedule(schedule, x_t).p_table(prediction, variance)
        self.t_all = torch.arange(schedule.num_steps, device=x_t.device)
        self.guidance = _checks.real("guidance_scale", guidance_scale)
        self.impl = _registry.forced_for("diffusion_step", x_t.device)
        self.kernel_checks = _checks.cpu_kernel(x_t.device, self.impl)

    def _check(self, model_out: torch.Tensor, uncond_out: torch.Tensor | None, noise: torch.Tensor | None) -> None:
        """The per-step operands: tensors of x_t's shape, dtype and device."""
        _checks.like("model_out", model_out, self.x, "x_t")
        for name, v in (("uncond_out", uncond_out), ("noise", noise)):
            if v is not None:
                _checks.like(name, v, self.x, "x_t")

    def __call__(self, i: int, model_out: torch.Tensor, uncond_out: torch.Tensor | None = None, *,
                 noise: torch.Tensor | None = None, seed: int | None = None, offset: int = 0) -> None:
        """Step ``x_t`` in place at t = i. ``seed``: normalised by ``_checks.seed_offset``."""
        if uncond_out is None and self.guidance != 0.0:
            raise ValueError("guidance_scale: a non-zero scale needs uncond_out (the unconditional model output)")
        t = self.t_all[i : i + 1]
        if self.kernel_checks and model_out is not None:  # the op reads a missing model_out as "none"
            try:
                torch.ops.diffcore.diffusion_step_(self.x, model_out, uncond_out, self.guidance, t, self.table, noise,
                                                   seed, offset, False)
            except RuntimeError:
                self._check(model_out, uncond_out, noise)  # raises the typed error when an operand is wrong
                raise
            return
        self._check(model_out, uncond_out, noise)
        model_out, uncond_out, noise = _checks.in_place_operands(self.x, self.impl, (model_out, uncond_out, noise))
        args = (model_out, uncond_out, self.guidance, t, self.table, noise, seed, offset, False)
        if self.impl is not None:
            self.impl(self.x, *args, self.x)
        else:
            torch.ops.diffcore.diffusion_step_(self.x, *args)


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
    """Forward noising ``sqrt(ab[t]) x0 + sqrt(1 - ab[t]) z``.

    Args:
        x0: (B, N) float32/float16/bfloat16; rows may be strided.
        t: int, or int64 tensor (B,) or (1,).
        noise: (B, N) like x0; or ``seed``/``offset`` for the in-kernel Philox stream; neither:
            ``torch.randn_like(x0)``, as DiffRec does.
        out: (B, N) like x0; may be x0 itself (in place).
    Returns:
        (B, N) in x0's dtype. Differentiable in x0 (and noise).
    """
    seed, offset, out = _step_operands(x0, None, None, 0.0, noise, seed, offset, out, "x0")
    schedule = _schedule(schedule, x0)
    t = _checks.timesteps("t", t, x0.shape[0], schedule.num_steps, x0.device)
    if noise is None and seed is None:
        noise = torch.randn_like(x0)
    return _run_step(x0, None, None, 0.0, t, schedule.q_table(), noise, seed, offset, False, out)


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
    """One reverse step ``x_{t-1} = c1[t] x0_hat + c2[t] x_t + [t > 0] sigma_t z``.

    Args:
        x_t: (B, N) float32/float16/bfloat16 (math in float32); rows may be strided.
        model_out: (B, N), the model's x0 (``prediction="x0"``) or eps (``"eps"``) prediction.
        t: int, or int64 tensor (B,) or (1,); outside [0, T) raises unless ``clamp_t`` (DDRM:
            t >= T uses T - 1).
        variance: ``"posterior"`` (DiffRec: ``exp(0.5 posterior_log_variance_clipped[t])``),
            ``"beta"`` (DiffuRec: ``sqrt(beta_t)``) or ``"none"``.
        uncond_out, guidance_scale: classifier-free guidance ``(1 + w) model_out - w uncond_out``.
        noise: (B, N) like x_t, or ``seed``/``offset`` for the in-kernel Philox stream; neither:
            no noise (DiffRec with ``sampling_noise=False``).
        out: (B, N) like x_t, sharing memory with no other input, no element of it sharing memory
            with another (not an expanded view); ``out=x_t`` is :func:`p_step_`, where the other
            operands may share x_t's memory: the CPU kernel reads them as they were before the call.
    Returns:
        (B, N) in x_t's dtype. Differentiable in x_t, model_out, uncond_out and noise.
    """
    seed, offset, out = _step_operands(x_t, model_out, uncond_out, guidance_scale, noise, seed, offset, out)
    _checks.like("model_out", model_out, x_t, "x_t")
    schedule = _schedule(schedule, x_t)
    t = _checks.timesteps("t", t, x_t.shape[0], schedule.num_steps, x_t.device, clamp=clamp_t)
    table = schedule.p_table(prediction, variance)
    return _run_step(x_t, model_out, uncond_out, guidance_scale, t, table, noise, seed, offset, clamp_t, out)


def p_step_(
    x_t: torch.Tensor, model_out: torch.Tensor, t: int | torch.Tensor, schedule: Schedule, **kwargs
) -> torch.Tensor:
    """:func:`p_step` written into ``x_t`` (no allocation); returns ``x_t``."""
    if "out" in kwargs:
        raise TypeError("p_step_: writes x_t in place and takes no out=")
    return p_step(x_t, model_out, t, schedule, out=x_t, **kwargs)


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
    seed: int | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM step from ``t`` to ``t_prev`` (``t_prev < 0``: to the data):
    ``sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + [t > 0] sigma z`` with
    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)``.

    Shapes and the other arguments as in :func:`p_step`; ``t``/``t_prev`` ints or int64 (B,)
    tensors with ``0 <= t < T`` and ``-1 <= t_prev < t`` (a DDIM step goes down); ints are checked
    here (ValueError), tensor values with ``torch._assert_async`` (RuntimeError on the CPU, no
    device sync on a GPU). ``eta <= 1`` always gives ``sigma^2 <= 1 - ab_prev``; a larger eta
    that does not raises RuntimeError the same way."""
    seed, offset, out = _step_operands(x_t, model_out, uncond_out, guidance_scale, noise, seed, offset, out)
    _checks.like("model_out", model_out, x_t, "x_t")
    schedule = _schedule(schedule, x_t)
    T, B = schedule.num_steps, x_t.shape[0]
    t_int = int(t) if _checks.is_int(t) else None
    t = _checks.timesteps("t", t, B, T, x_t.device)
    if _checks.is_int(t_prev):  # else a tensor (a bool or another type raises in _checks.timesteps)
        t_prev = int(t_prev)
        if not -1 <= t_prev < T:
            raise ValueError(f"t_prev: expected a timestep in [-1, {T}), got {t_prev}")
        if t_int is not None and t_prev >= t_int:
            raise ValueError(f"t_prev: expected t_prev < t (a DDIM step goes down), got t = {t_int}, t_prev = {t_prev}")
    else:
        t_prev = _checks.timesteps("t_prev", t_prev, B, T, x_t.device)
    if t_int is None or not isinstance(t_prev, int):  # tensor values (ints were checked above)
        torch._assert_async(((t >= 0) & (t < T)).all(), f"t: every timestep must lie in [0, {T})")
        torch._assert_async(((t_prev >= -1) & (t_prev < t)).all(), "t_prev: every t_prev must lie in [-1, t)")
    eta = _checks.real("eta", eta, _checks.finite_non_negative, "a finite eta >= 0")
    table = schedule.ddim_table(t, t_prev, eta, prediction)
    return _run_step(x_t, model_out, uncond_out, guidance_scale, None, table, noise, seed, offset, False, out)


def sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    x_start: torch.Tensor,
    schedule: Schedule,
    *,
    steps: int = 0,
    noise: bool = False,
    seed: int | None = None,
    offset: int = 0,
    prediction: str = "x0",
    variance: str = "posterior",
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The whole reverse loop with DiffRec's ``p_sample`` semantics.

    Start at ``x_start`` (``steps == 0``) or at ``q_sample(x_start, steps - 1)``; then for t = T-1
    down to 0: ``model_out = denoiser(x_t, t)`` (t an int64 (B,) tensor) and one fused
    :func:`p_step_` (a denoiser output sharing memory with x_t is copied first). Noise is drawn
    only if ``noise=True``: from the Philox stream when ``seed`` is given (step k at
    ``offset + k ceil(B N / 4)``, the start's q_sample at ``offset``), else with
    ``Tensor.normal_(generator=generator)``, which equals DiffRec's ``randn_like`` draws in order
    for a contiguous ``x_start`` (``randn_like`` fills a non-contiguous tensor in memory order).
    The q_sample of ``steps > 0`` always draws noise, as DiffRec's does. With
    ``guidance_scale`` set, ``denoiser`` returns ``(cond_out, uncond_out)`` (DreamRec).
    ``schedule.noise_scale == 0``: the loop only applies the denoiser, as DiffRec does.

    Args:
        x_start: (B, N) float tensor; not modified.
    Returns:
        (B, N) x_0. Allocation-free per step: one buffer for x_t, made by the first step (and one
            for noise). Under grad mode, once a denoiser output (or x_t) requires grad, the steps
            run out of place instead, so gradients reach through the denoiser.
    """
    _checks.float_tensor("x_start", x_start, ndim=2)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a diffcore.Schedule, got {type(schedule).__name__}")
    T = schedule.num_steps
    steps = _checks.integer("steps", steps, lambda v: 0 <= v <= T, f"an int in [0, {T}]")
    seed, offset = _checks.seed_offset(seed, offset)
    B = x_start.shape[0]
    t_all = torch.arange(T, device=x_start.device)
    t_rows = t_all.unsqueeze(1).expand(T, B)  # row i: the (B,) timesteps the denoiser sees
    if schedule.noise_scale == 0.0:
        x_t = x_start
        for i in reversed(range(T)):
            x_t = denoiser(x_t, t_rows[i])
        return x_t

    stride = (x_start.numel() + 3) // 4  # Philox counters one seeded step consumes
    draws = seed is None and (noise or steps > 0)
    noise_buf = torch.empty_like(x_start, memory_format=torch.contiguous_format) if draws else None
    # The first write (the start's q_sample, else the first step) allocates x_t's buffer from
    # x_start (no copy of x_start; from the block pool, see csrc/include/diffcore/memory.h); the
    # later steps write that buffer in place.
    x_t, step = x_start, None
    options = dict(prediction=prediction, variance=variance, guidance_scale=guidance_scale or 0.0)
    if steps > 0:
        if seed is None:
            noise_buf.normal_(generator=generator)
        x_t = q_sample(x_start, steps - 1, schedule, noise=noise_buf, seed=seed, offset=offset)
        step = _InPlaceSteps(x_t, schedule, **options)
    for k, i in enumerate(reversed(range(T)), start=1):
        model_out = denoiser(x_t, t_rows[i])
        uncond_out = None
        if guidance_scale is not None:
            model_out, uncond_out = model_out
        step_noise, step_seed = None, None
        if noise and seed is None:
            step_noise = noise_buf.normal_(generator=generator)
        elif noise:
            step_seed = seed
        kwargs = dict(noise=step_noise, seed=step_seed, offset=offset + k * stride)
        tracked = torch.is_grad_enabled() and any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in (x_t, model_out, uncond_out))
        if step is None or tracked:  # out of place, so autograd reaches through the denoiser
            x_t = p_step(x_t, model_out, t_all[i : i + 1], schedule, uncond_out=uncond_out, **options, **kwargs)
            step = None if tracked else _InPlaceSteps(x_t, schedule, **options)
        else:
            step(i, model_out, uncond_out, **kwargs)
    return x_t
