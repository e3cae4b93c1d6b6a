"""Score-based SDEs (Song et al. 2021, score_sde): VE, VP and sub-VP descriptions, their reverse-time
predictor and corrector steps, and the predictor-corrector sampling loop.

Every SDE here has a drift linear in x, ``f(x, t) = f(t) x``, so every step is an affine map of
the rows of ``x``, the score ``s`` and the noise ``z`` with per-row coefficients::

    x_mean = a x + b s            s = score, or -eps / std from a noise prediction
    x      = x_mean + c z

    euler_maruyama_step      a = 1 + f(t) dt        b = -g(t)^2 dt          c = g(t) sqrt(-dt)
    reverse_diffusion_step   a = 1 - f_i            b = G_i^2               c = G_i       (discretize)
    probability_flow_step    a = 1 + f(t) dt        b = -g(t)^2 dt / 2      c = 0
    langevin_step            a = 1                  b = 2 alpha r^2         c = 2 sqrt(alpha) r
                             r = snr * mean_rows ||z_r|| / mean_rows ||s_r||   (reduced inside)
    sde_forward              a = mean(t)            b = 0                   c = std(t)

The coefficients are formed in float64 from the SDE's float64 tables and cast to float32 per row.
``sde_forward`` and ``probability_flow_step`` return only ``x`` and run the fused affine op of the
diffusion family (``torch.ops.diffcore.diffusion_step``, with one coefficient row per batch row);
the predictors that also return ``x_mean``, the Langevin corrector whose step size needs the
batch-mean norms first, and the steps of :func:`pc_sample` run ``torch.ops.diffcore.sde_step``
(one pass; two for the corrector: per-row norms summed in a fixed order, so the result does not
depend on the thread count).
"""

from __future__ import annotations

import abc
import math
from typing import Callable

import torch

from diffcore import (
    _checks,
    _library,  # defines the ops
    _registry,
)
from diffcore.diffusion import _run_step

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "subVPSDE",
    "sde_forward",
    "euler_maruyama_step",
    "euler_maruyama_step_",
    "reverse_diffusion_step",
    "reverse_diffusion_step_",
    "langevin_step",
    "langevin_step_",
    "probability_flow_step",
    "probability_flow_step_",
    "pc_sample",
]

PREDICTIONS = ("score", "eps")
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "probability_flow", "none")
CORRECTORS = ("langevin", "none")

Time = float | torch.Tensor
Value = float | torch.Tensor  # a float for a float t, a float64 tensor of t's shape for a tensor t


def _sqrt(v: Value) -> Value:
    return math.sqrt(v) if isinstance(v, float) else torch.sqrt(v)


def _exp(v: Value) -> Value:
    return math.exp(v) if isinstance(v, float) else torch.exp(v)


def _full_like(t: Value, value: float) -> Value:
    return value if isinstance(t, float) else torch.full_like(t, value)


class SDE(abc.ABC):
    """A forward SDE ``dx = f(t) x dt + g(t) dw`` on ``t`` in ``[0, T]`` (``T = 1``), discretised into
    ``N`` steps. Subclasses: :class:`VESDE`, :class:`VPSDE`, :class:`subVPSDE`.

    Methods take ``t`` as a float, giving Python floats (computed in double precision), or as a
    float tensor, giving float64 tensors of t's shape.
    """

    kind = ""
    T = 1.0
    prior_std = 1.0

    def __init__(self, N: int) -> None:
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"N: expected a positive int, got {N!r}")
        self.N = N
        self._device = torch.device("cpu")
        self._lists: dict[str, list[float]] = {}

    # --- the continuous SDE ---------------------------------------------------------------------
    @abc.abstractmethod
    def drift_coeff(self, t: Time) -> Value:
        """``f(t)`` of the drift ``f(x, t) = f(t) x``."""

    @abc.abstractmethod
    def diffusion(self, t: Time) -> Value:
        """``g(t)``."""

    @abc.abstractmethod
    def marginal(self, t: Time) -> tuple[Value, Value]:
        """``(mean_coeff, std)`` of ``p_t(x | x0) = N(mean_coeff x0, std^2 I)``."""

    def sde(self, x: torch.Tensor, t: Time) -> tuple[torch.Tensor, Value]:
        """score_sde's ``sde(x, t)``: the drift ``f(t) x`` (x's shape) and ``g(t)``; x: (B, N)."""
        return _rows(self.drift_coeff(t), x) * x, self.diffusion(t)

    def marginal_prob(self, x: torch.Tensor, t: Time) -> tuple[torch.Tensor, Value]:
        """score_sde's ``marginal_prob(x, t)``: the mean ``mean_coeff(t) x`` and ``std(t)``."""
        mean_coeff, std = self.marginal(t)
        return _rows(mean_coeff, x) * x, std

    # --- the discretisation ---------------------------------------------------------------------
    def timestep(self, t: Time) -> int | torch.Tensor:
        """The discrete index ``floor(t (N - 1) / T)`` of a time in [0, T] (computed in float64;
        clamped to [0, N - 1], so a time outside [0, T] never indexes outside the tables: the steps
        reject such times themselves)."""
        t = self._t(t)
        if isinstance(t, float):
            return min(max(int(t * (self.N - 1) / self.T), 0), self.N - 1)
        return (t * (self.N - 1) / self.T).long().clamp(0, self.N - 1)

    def discretize(self, t: Time) -> tuple[Value, Value]:
        """``(f_i, G_i)`` of the forward step ``x_{i+1} = x_i + f_i x_i + G_i z_i``. The default is
        Euler–Maruyama with ``dt = 1 / N``, as score_sde's ``SDE.discretize``."""
        dt = 1.0 / self.N
        return self.drift_coeff(t) * dt, self.diffusion(t) * math.sqrt(dt)

    def langevin_alpha(self, t: Time) -> Value:
        """The ``alpha`` that scales the Langevin corrector's step (1 unless overridden)."""
        return _full_like(self._t(t), 1.0)

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        *,
        seed: int | None = None,
        offset: int = 0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A sample of the prior ``p_T``: ``prior_std * z``, z from the Philox stream ``(seed,
        offset)`` when ``seed`` is given, else ``torch.randn`` with ``generator``."""
        if seed is not None:
            from diffcore.random import randn

            z = randn(*shape, seed=seed, offset=offset, dtype=dtype, device=device)
        else:
            z = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        return z.mul_(self.prior_std) if self.prior_std != 1.0 else z

    # --- coefficients of the fused steps --------------------------------------------------------
    def euler_maruyama_coefficients(self, t: Time, dt: float) -> tuple[Value, Value, Value]:
        """``(a, b, c)`` of the reverse Euler–Maruyama step: ``a = 1 + f dt``, ``b = -g^2 dt``,
        ``c = g sqrt(-dt)``."""
        f, g = self.drift_coeff(t), self.diffusion(t)
        return 1.0 + f * dt, -(g * g) * dt, g * math.sqrt(-dt)

    def probability_flow_coefficients(self, t: Time, dt: float) -> tuple[Value, Value]:
        """``(a, b)`` of the Euler step of the probability-flow ODE ``dx = [f x - g^2 s / 2] dt``."""
        f, g = self.drift_coeff(t), self.diffusion(t)
        return 1.0 + f * dt, -0.5 * (g * g) * dt

    def reverse_diffusion_coefficients(self, t: Time) -> tuple[Value, Value, Value]:
        """``(a, b, c)`` of the reverse-diffusion predictor ``x_mean = x - f_i x + G_i^2 s``,
        ``x = x_mean + G_i z``: ``a = 1 - f_i``, ``b = G_i^2``, ``c = G_i``."""
        f, G = self.discretize(t)
        return 1.0 - f, G * G, G

    def langevin_coefficients(self, t: Time) -> tuple[Value, Value, Value]:
        """``(a, b, c)`` of the Langevin corrector before its batch factor ``r``: ``(1, 2 alpha,
        2 sqrt(alpha))`` (the step multiplies ``b`` by ``r^2`` and ``c`` by ``r``)."""
        alpha = self.langevin_alpha(t)
        return _full_like(alpha, 1.0), 2.0 * alpha, 2.0 * _sqrt(alpha)

    # --- helpers --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> SDE:
        """A copy whose tables live on ``device``."""
        moved = self.__class__.__new__(self.__class__)
        for name, value in vars(self).items():
            setattr(moved, name, value.to(device) if isinstance(value, torch.Tensor) else value)
        moved._device = torch.device(device)
        return moved

    def _t(self, t: Time) -> Value:
        return t.to(dtype=torch.float64) if isinstance(t, torch.Tensor) else float(t)

    def _gather(self, name: str, t: Time) -> Value:
        """``table[timestep(t)]`` of the float64 table attribute ``name``."""
        i = self.timestep(t)
        if isinstance(i, int):
            if name not in self._lists:
                self._lists[name] = getattr(self, name).tolist()
            return self._lists[name][i]
        return getattr(self, name).to(i.device)[i]


def _rows(v: Value, x: torch.Tensor) -> Value:
    """A per-row float64 coefficient as float32 (B, 1), broadcast against x (B, N)."""
    if isinstance(v, float):
        return v
    v = v.float()
    return v.reshape(-1, 1) if v.dim() else v


class VESDE(SDE):
    """Variance exploding: ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``f = 0``,
    ``g = sigma(t) sqrt(2 ln(sigma_max / sigma_min))``, ``p_t(x | x0) = N(x0, sigma(t)^2 I)``.

    Table (float64, (N,)): ``discrete_sigmas = exp(linspace(ln sigma_min, ln sigma_max, N))``; the
    SMLD discretisation ``G_i = sqrt(sigma_i^2 - sigma_{i-1}^2)`` with ``sigma_{-1} = 0``.
    """

    kind = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000) -> None:
        super().__init__(N)
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not (0.0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.discrete_sigmas = torch.exp(
            torch.linspace(math.log(sigma_min), math.log(sigma_max), N, dtype=torch.float64)
        )
        self.prior_std = sigma_max

    def sigma(self, t: Time) -> Value:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** self._t(t)

    def drift_coeff(self, t: Time) -> Value:
        return _full_like(self._t(t), 0.0)

    def diffusion(self, t: Time) -> Value:
        return self.sigma(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))

    def marginal(self, t: Time) -> tuple[Value, Value]:
        std = self.sigma(t)
        return _full_like(std, 1.0), std

    def discretize(self, t: Time) -> tuple[Value, Value]:
        i = self.timestep(t)
        sigma = self._gather("discrete_sigmas", t)
        if isinstance(i, int):
            adjacent = 0.0 if i == 0 else self._lists["discrete_sigmas"][i - 1]
            return 0.0, math.sqrt(sigma**2 - adjacent**2)
        sigmas = self.discrete_sigmas.to(i.device)
        adjacent = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(sigma), torch.sqrt(sigma**2 - adjacent**2)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N})"


class VPSDE(SDE):
    """Variance preserving: ``beta(t) = beta_min + t (beta_max - beta_min)``, ``f = -beta(t) / 2``,
    ``g = sqrt(beta(t))``; ``log m(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``,
    ``p_t(x | x0) = N(m(t) x0, (1 - m(t)^2) I)``.

    Tables (float64, (N,)): ``discrete_betas = linspace(beta_min / N, beta_max / N, N)``, ``alphas``,
    ``alphas_cumprod``, ``sqrt_alphas_cumprod``, ``sqrt_1m_alphas_cumprod``; the DDPM
    discretisation ``f_i = sqrt(alpha_i) - 1``, ``G_i = sqrt(beta_i)``; the Langevin ``alpha_i``.
    """

    kind = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        super().__init__(N)
        self.beta_0, self.beta_1 = float(beta_min), float(beta_max)
        if not (0.0 <= self.beta_0 < self.beta_1 < N):
            raise ValueError(
                f"beta_min, beta_max: expected 0 <= beta_min < beta_max < N (so every discrete beta lies "
                f"in [0, 1)), got {beta_min}, {beta_max} with N = {N}"
            )
        self.discrete_betas = torch.linspace(self.beta_0 / N, self.beta_1 / N, N, dtype=torch.float64)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)

    def beta(self, t: Time) -> Value:
        return self.beta_0 + self._t(t) * (self.beta_1 - self.beta_0)

    def log_mean_coeff(self, t: Time) -> Value:
        t = self._t(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def drift_coeff(self, t: Time) -> Value:
        return -0.5 * self.beta(t)

    def diffusion(self, t: Time) -> Value:
        return _sqrt(self.beta(t))

    def marginal(self, t: Time) -> tuple[Value, Value]:
        lmc = self.log_mean_coeff(t)
        return _exp(lmc), _sqrt(1.0 - _exp(2.0 * lmc))

    def discretize(self, t: Time) -> tuple[Value, Value]:
        return _sqrt(self._gather("alphas", t)) - 1.0, _sqrt(self._gather("discrete_betas", t))

    def langevin_alpha(self, t: Time) -> Value:
        return self._gather("alphas", t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_0}, beta_max={self.beta_1}, N={self.N})"


class subVPSDE(VPSDE):
    """Sub-VP: the VP drift with ``g = sqrt(beta(t) (1 - exp(-2 beta_min t - (beta_max - beta_min)
    t^2)))``; ``p_t(x | x0) = N(m(t) x0, (1 - m(t)^2)^2 I)``. Discretised by Euler–Maruyama with
    ``dt = 1 / N`` (score_sde's default). The Langevin corrector's ``alpha_i`` comes from the VP
    tables, which this class shares (score_sde's corrector reads ``sde.alphas`` for sub-VP too,
    but its ``subVPSDE`` never defines them).
    """

    kind = "subvp"

    def diffusion(self, t: Time) -> Value:
        t = self._t(t)
        discount = 1.0 - _exp(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t**2)
        return _sqrt(self.beta(t) * discount)

    def marginal(self, t: Time) -> tuple[Value, Value]:
        lmc = self.log_mean_coeff(t)
        return _exp(lmc), 1.0 - _exp(2.0 * lmc)

    def discretize(self, t: Time) -> tuple[Value, Value]:
        return SDE.discretize(self, t)


# --- argument checks ----------------------------------------------------------------------------
def _sde(sde: object, x: torch.Tensor) -> SDE:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde: expected a diffcore.sde.VESDE, VPSDE or subVPSDE, got {type(sde).__name__}")
    if sde.device != x.device:
        raise ValueError(f"sde: its tables are on {sde.device}, x on {x.device}; use sde.to(device)")
    return sde


def _times(name: str, t: object, x: torch.Tensor, sde: SDE) -> Time:
    """A float in [0, T], or a float tensor of shape (), (1,) or (B,) on x's device, returned as
    float64 (R,); a tensor's values are checked in the graph (``torch._assert_async``: no host
    synchronisation, and a compiled graph keeps the check)."""
    if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a float or a float tensor, got {type(t).__name__}")
    if not isinstance(t, torch.Tensor):
        t = float(t)
        if not 0.0 <= t <= sde.T:
            raise ValueError(f"{name}: expected a time in [0, {sde.T}], got {t}")
        return t
    t = _per_row(name, t, x)
    torch._assert_async(((t >= 0) & (t <= sde.T)).all(), f"{name}: every time must lie in [0, {sde.T}]")
    return t


def _per_row(name: str, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float tensor of shape (), (1,) or (B,) on x's device, as float64 (1,) or (B,)."""
    if not v.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), got {v.device}")
    rows = x.shape[0]
    v = v.reshape(-1) if v.dim() == 0 else v
    if v.dim() != 1 or v.shape[0] not in (1, rows):
        raise ValueError(f"{name}: expected shape ({rows},) (one value per row) or (1,), got {tuple(v.shape)}")
    return v.to(torch.float64)


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def _positive(name: str, value: object, what: str) -> float:
    return _checks.real(name, value, _checks.finite_positive, what)


def _step_dt(dt: object) -> float:
    return _checks.real("dt", dt, lambda v: v < 0 and math.isfinite(v),
                        "a negative step (the reverse SDE runs from t = 1 towards 0)")


def _score_scale(prediction: str, std: object, t: Time, x: torch.Tensor, sde: SDE) -> torch.Tensor | float:
    """``k`` with ``score = k * model_out``: 1, or ``-1 / std`` for a noise prediction (``std``
    None: the marginal std at t)."""
    _choice("prediction", prediction, PREDICTIONS)
    if prediction == "score":
        if std is not None:
            raise ValueError('std: only a noise prediction (prediction="eps") takes std')
        return 1.0
    if std is None:
        std = sde.marginal(t)[1]
        if isinstance(t, float):
            if not float(std) > 0:
                raise ValueError(f"t: the marginal std at t = {t} is 0, so an eps prediction has no score")
        else:
            torch._assert_async((std > 0).all(), "t: an eps prediction needs std(t) > 0 at every time")
        return -1.0 / std
    if isinstance(std, torch.Tensor):
        std = _per_row("std", std, x)
        torch._assert_async(((std > 0) & torch.isfinite(std)).all(), "std: every std must be finite and > 0")
        return -1.0 / std
    return -1.0 / _positive("std", std, "std > 0")


def _operands(x, score, noise, seed, offset, out, mean_out):
    """Checks the operands every step shares; returns the normalised (seed, offset)."""
    _checks.float_tensor("x", x, ndim=2)
    _checks.like("score", score, x, "x")
    if noise is not None:
        _checks.like("noise", noise, x, "x")
        if seed is not None:
            raise ValueError("noise and seed: give one, not both")
    seed, offset = _checks.seed_offset(seed, offset)
    inputs = {"score": score, "noise": noise}
    if out is not None:
        _checks.out_tensor(out, x, {**inputs, "mean_out": mean_out}, "x", apart_in_place=True)
    if mean_out is not None:
        _checks.out_tensor(mean_out, x, inputs, "x", name="mean_out")
    return seed, offset


# --- coefficient rows ---------------------------------------------------------------------------
def _column(v: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1)


def _table(columns: tuple, device: torch.device) -> torch.Tensor:
    """(R, len(columns)) float64, R = 1 or B: one coefficient row per batch row, or one for all."""
    if all(isinstance(c, float) for c in columns):
        return torch.tensor([columns], dtype=torch.float64, device=device)
    cols = [_column(c, device) for c in columns]
    rows = max(c.shape[0] for c in cols)
    return torch.stack([c.expand(rows) for c in cols], 1).contiguous()


def _noise(x: torch.Tensor, noise: torch.Tensor | None, seed: int | None) -> torch.Tensor | None:
    """score_sde draws ``torch.randn_like(x)`` when neither noise nor seed is given."""
    return torch.randn_like(x) if noise is None and seed is None else noise


# --- running the ops ----------------------------------------------------------------------------
def _run_sde_step(x, score, coef, noise, seed, offset, snr, out, mean_out):
    """``torch.ops.diffcore.sde_step`` (or the implementation forced by ``diffcore.use``).
    ``out`` None: allocate; ``out is x``: in place. ``mean_out`` None: not written (in place) or
    allocated (otherwise). Returns ``(out, mean_out)``."""
    args = (score, coef, noise, seed, offset, snr)
    impl = _registry.forced_for("sde_step", x.device)
    if impl is not None and out is None and mean_out is None:
        return _library.run_forced("sde_step", impl, (x, *args),
                                   lambda: tuple(torch.empty_like(x, memory_format=torch.contiguous_format)
                                                 for _ in range(2)))
    if impl is not None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
        if mean_out is None and out is not x:
            mean_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        impl(x, *args, out, mean_out)
        return out, mean_out
    if out is None and mean_out is None:
        return torch.ops.diffcore.sde_step(x, *args)
    if out is x:
        torch.ops.diffcore.sde_step_(x, *args, mean_out)
        return x, mean_out
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    mean_out = torch.empty_like(x, memory_format=torch.contiguous_format) if mean_out is None else mean_out
    torch.ops.diffcore.sde_step_out(x, *args, out=out, mean_out=mean_out)
    return out, mean_out


# --- public steps -------------------------------------------------------------------------------
def sde_forward(
    x0: torch.Tensor,
    t: Time,
    sde: SDE,
    *,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A sample of ``p_t(x | x0)``: ``mean_coeff(t) x0 + std(t) z``.

    Runs the diffusion family's fused step (``diffusion_step`` with one coefficient row per batch
    row), so there is no separate kernel.

    Args:
        x0: (B, N) float32/float16/bfloat16; rows may be strided.
        t: float in [0, 1], or a float tensor (B,) or (1,).
        noise: (B, N) like x0, or ``seed``/``offset`` for the Philox stream; neither:
            ``torch.randn_like(x0)``.
        out: (B, N) like x0; may be x0 itself (in place).
    Returns:
        (B, N) in x0's dtype. Differentiable in x0 (and noise).
    """
    _checks.float_tensor("x0", x0, ndim=2)
    if noise is not None:
        _checks.like("noise", noise, x0, "x0")
        if seed is not None:
            raise ValueError("noise and seed: give one, not both")
    seed, offset = _checks.seed_offset(seed, offset)
    if out is not None:
        _checks.out_tensor(out, x0, {"noise": noise}, "x0")
    sde = _sde(sde, x0)
    t = _times("t", t, x0, sde)
    mean, std = sde.marginal(t)
    table = _table((mean, 0.0, std), x0.device)
    return _run_step(x0, None, None, 0.0, None, table, _noise(x0, noise, seed), seed, offset, False, out)


def euler_maruyama_step(
    x: torch.Tensor,
    score: torch.Tensor,
    t: Time,
    dt: float,
    sde: SDE,
    *,
    prediction: str = "score",
    std: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
    mean_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse-time Euler–Maruyama step (score_sde's ``EulerMaruyamaPredictor``)::

        x_mean = x + [f(t) x - g(t)^2 s] dt,     x = x_mean + g(t) sqrt(-dt) z

    Args:
        x: (B, N) float32/float16/bfloat16 (math in float32); rows may be strided.
        score: (B, N) like x: the score, or with ``prediction="eps"`` a noise prediction
            converted as ``s = -eps / std`` (``std``: float or float tensor (B,); default the
            marginal std at t).
        t: float in [0, 1], or a float tensor (B,) or (1,).
        dt: the (negative) time step; score_sde uses ``-1 / N``.
        noise: (B, N) like x, or ``seed``/``offset`` for the Philox stream; neither:
            ``torch.randn_like(x)``, as score_sde draws it.
        out, mean_out: (B, N) like x, sharing memory with no input (``out=x``: in place).
    Returns:
        ``(x, x_mean)``, (B, N) in x's dtype. Differentiable in x, score and noise.
    """
    return _step("euler_maruyama", x, score, t, dt, None, sde, prediction, std, noise, seed, offset, out, mean_out)


def euler_maruyama_step_(
    x: torch.Tensor,
    score: torch.Tensor,
    t: Time,
    dt: float,
    sde: SDE,
    *,
    prediction: str = "score",
    std: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    mean_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`euler_maruyama_step` written into ``x`` (and ``x_mean`` into ``mean_out`` when
    given); returns ``x``."""
    return _step("euler_maruyama", x, score, t, dt, None, sde, prediction, std, noise, seed, offset, x, mean_out,
                 in_place=True)


def reverse_diffusion_step(
    x: torch.Tensor,
    score: torch.Tensor,
    t: Time,
    sde: SDE,
    *,
    prediction: str = "score",
    std: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
    mean_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse-diffusion predictor step (score_sde's ``ReverseDiffusionPredictor``) from the
    SDE's discretisation ``(f_i, G_i)`` at ``i = floor(t (N - 1))``::

        x_mean = x - f_i x + G_i^2 s,     x = x_mean + G_i z

    VE: ``f_i = 0``, ``G_i^2 = sigma_i^2 - sigma_{i-1}^2``; VP: ``f_i = sqrt(alpha_i) - 1``,
    ``G_i^2 = beta_i``; sub-VP: Euler–Maruyama with ``dt = 1 / N``. Arguments and shapes as in
    :func:`euler_maruyama_step`. Returns ``(x, x_mean)``.
    """
    return _step("reverse_diffusion", x, score, t, None, None, sde, prediction, std, noise, seed, offset, out,
                 mean_out)


def reverse_diffusion_step_(
    x: torch.Tensor,
    score: torch.Tensor,
    t: Time,
    sde: SDE,
    *,
    prediction: str = "score",
    std: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    mean_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`reverse_diffusion_step` written into ``x`` (and ``x_mean`` into ``mean_out`` when
    given); returns ``x``."""
    return _step("reverse_diffusion", x, score, t, None, None, sde, prediction, std, noise, seed, offset, x,
                 mean_out, in_place=True)


def langevin_step(
    x: torch.Tensor,
    score: torch.Tensor,
    snr: float,
    sde: SDE,
    *,
    t: Time,
    prediction: str = "score",
    std: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
    mean_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Langevin corrector step (score_sde's ``LangevinCorrector``, one of its ``n_steps``)::

        eps    = 2 alpha (snr * mean_r ||z_r|| / mean_r ||s_r||)^2
        x_mean = x + eps s,     x = x_mean + sqrt(2 eps) z

    ``alpha`` is 1 for VE and ``alphas[floor(t (N - 1))]`` for VP and sub-VP. The two batch means
    are reduced inside the op, per-row norms summed in a fixed order: the result does not depend
    on the thread count. ``snr > 0``; the other arguments and shapes as in
    :func:`euler_maruyama_step`. Returns ``(x, x_mean)``.
    """
    return _step("langevin", x, score, t, None, snr, sde, prediction, std, noise, seed, offset, out, mean_out)


def langevin_step_(
    x: torch.Tensor,
    score: torch.Tensor,
    snr: float,
    sde: SDE,
    *,
    t: Time,
    prediction: str = "score",
    std: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    mean_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`langevin_step` written into ``x`` (and ``x_mean`` into ``mean_out`` when given);
    returns ``x``."""
    return _step("langevin", x, score, t, None, snr, sde, prediction, std, noise, seed, offset, x, mean_out,
                 in_place=True)


def _step(kind, x, score, t, dt, snr, sde, prediction, std, noise, seed, offset, out, mean_out, in_place=False):
    """The checks and coefficients of the three steps that return ``x_mean`` too."""
    seed, offset = _operands(x, score, noise, seed, offset, out, mean_out)
    sde = _sde(sde, x)
    t = _times("t", t, x, sde)
    if kind == "langevin":
        snr = _positive("snr", snr, "snr > 0 (the corrector's signal-to-noise ratio)")
        a, b, c = sde.langevin_coefficients(t)
    elif kind == "euler_maruyama":
        a, b, c = sde.euler_maruyama_coefficients(t, _step_dt(dt))
    else:
        a, b, c = sde.reverse_diffusion_coefficients(t)
    k = _score_scale(prediction, std, t, x, sde)
    coef = _table((a, b, c, k), x.device)
    noise = _noise(x, noise, seed)
    if in_place:
        return _run_sde_step(x, score, coef, noise, seed, offset, snr, x, mean_out)[0]
    if out is x and mean_out is None:
        mean_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return _run_sde_step(x, score, coef, noise, seed, offset, snr, out, mean_out)


def probability_flow_step(
    x: torch.Tensor,
    score: torch.Tensor,
    t: Time,
    dt: float,
    sde: SDE,
    *,
    prediction: str = "score",
    std: float | torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Euler step of the probability-flow ODE (score_sde's reverse SDE with
    ``probability_flow=True``), deterministic::

        x = x + [f(t) x - g(t)^2 s / 2] dt

    Runs the diffusion family's fused step (``diffusion_step``). Arguments and shapes as in
    :func:`euler_maruyama_step`; ``out=x`` is :func:`probability_flow_step_`. Returns x, (B, N).
    """
    _checks.float_tensor("x", x, ndim=2)
    _checks.like("score", score, x, "x")
    if out is not None:
        _checks.out_tensor(out, x, {"score": score}, "x", apart_in_place=True)
    sde = _sde(sde, x)
    t, dt = _times("t", t, x, sde), _step_dt(dt)
    k = _score_scale(prediction, std, t, x, sde)
    a, b = sde.probability_flow_coefficients(t, dt)
    table = _table((a, b * k, 0.0), x.device)
    return _run_step(x, score, None, 0.0, None, table, None, None, 0, False, out)


def probability_flow_step_(
    x: torch.Tensor,
    score: torch.Tensor,
    t: Time,
    dt: float,
    sde: SDE,
    *,
    prediction: str = "score",
    std: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`probability_flow_step` written into ``x``; returns ``x``."""
    return probability_flow_step(x, score, t, dt, sde, prediction=prediction, std=std, out=x)


# --- the sampling loop --------------------------------------------------------------------------
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
    prediction: str = "score",
    seed: int | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The predictor-corrector sampler of score_sde (``get_pc_sampler``), from ``x_init``.

    ``n_steps`` times ``t = linspace(1, eps, n_steps)`` (float32, as score_sde builds them); at
    each, ``corrector_steps`` Langevin steps, then one predictor step (``"reverse_diffusion"``,
    ``"euler_maruyama"`` with ``dt = -1 / n_steps``, ``"probability_flow"`` (its ODE, same dt) or
    ``"none"``); the score is ``score_fn(x, t)`` with t a float32 (B,) tensor, evaluated before
    every step (``prediction="eps"``: a noise prediction, ``s = -eps / std(t)``). Returns the last
    predictor's ``x_mean`` (without its noise), as score_sde's ``denoise=True``; with
    ``predictor="none"``, the last corrector's ``x``.

    Noise: with ``seed``, the Philox stream, sub-step k (correctors and predictor in order, k from
    0) at ``offset + k ceil(B N / 4)``, so each equals the single seeded step at that offset; else
    ``Tensor.normal_(generator=generator)``, one draw per sub-step in score_sde's order.

    Args:
        x_init: (B, N) float tensor, e.g. ``sde.prior_sampling((B, N))``; not modified.
    Returns:
        (B, N) in x_init's dtype. Allocation-free per step: one buffer for x (and one for noise).
    """
    _checks.float_tensor("x_init", x_init, ndim=2)
    sde = _sde(sde, x_init)
    n_steps = sde.N if n_steps is None else n_steps
    n_steps = _checks.integer("n_steps", n_steps, lambda v: v >= 1, "a positive int")
    corrector_steps = _checks.integer("corrector_steps", corrector_steps, lambda v: v >= 0, "an int >= 0")
    _choice("predictor", predictor, PREDICTORS)
    _choice("corrector", corrector, CORRECTORS)
    _choice("prediction", prediction, PREDICTIONS)
    if corrector == "langevin" and corrector_steps > 0:
        snr = _positive("snr", snr, "snr > 0 (the corrector's signal-to-noise ratio)")
    eps = _checks.real("eps", eps)
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps: expected 0 < eps < {sde.T}, so the times decrease from {sde.T} to eps; got {eps}")
    seed, offset = _checks.seed_offset(seed, offset)
    if not callable(score_fn):
        raise TypeError(f"score_fn: expected a callable score_fn(x, t), got {type(score_fn).__name__}")

    device = x_init.device
    B = x_init.shape[0]
    times = torch.linspace(sde.T, eps, n_steps, device=device)  # float32, as score_sde
    t_rows = times.unsqueeze(1).expand(n_steps, B)  # row i: the (B,) times score_fn sees
    t64 = times.double()
    k = -1.0 / sde.marginal(t64)[1] if prediction == "eps" else torch.ones_like(t64)
    corrector_table = _table((*sde.langevin_coefficients(t64), k), device)
    dt = -1.0 / n_steps
    if predictor == "reverse_diffusion":
        a, b, c = sde.reverse_diffusion_coefficients(t64)
    elif predictor == "euler_maruyama":
        a, b, c = sde.euler_maruyama_coefficients(t64, dt)
    else:
        (a, b), c = sde.probability_flow_coefficients(t64, dt), 0.0
    predictor_table = _table((a, b, c, k), device)

    stride = (x_init.numel() + 3) // 4  # Philox counters one seeded sub-step consumes
    noise_buf = torch.empty_like(x_init, memory_format=torch.contiguous_format) if seed is None else None
    x = x_init.clone(memory_format=torch.contiguous_format)
    corrects = corrector == "langevin"
    draws = predictor in ("reverse_diffusion", "euler_maruyama")
    sub = 0
    for i in range(n_steps):
        t = t_rows[i]
        for _ in range(corrector_steps if corrects else 0):
            score = _score(score_fn, x, t)
            z = noise_buf.normal_(generator=generator) if seed is None else None
            _run_sde_step(x, score, corrector_table[i : i + 1], z, seed, offset + sub * stride, snr, x, None)
            sub += 1
        if predictor == "none":
            continue
        z = None
        if predictor == "euler_maruyama" and seed is None:  # score_sde draws z before the score here
            z = noise_buf.normal_(generator=generator)
        score = _score(score_fn, x, t)
        if predictor == "reverse_diffusion" and seed is None:
            z = noise_buf.normal_(generator=generator)
        last = i == n_steps - 1
        step_noise = None if last or not draws else z
        step_seed = seed if draws and not last else None
        _run_sde_step(x, score, predictor_table[i : i + 1], step_noise, step_seed, offset + sub * stride, None, x, None)
        sub += 1
    return x


def _score(score_fn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    score = score_fn(x, t)
    if not isinstance(score, torch.Tensor) or score.shape != x.shape or score.dtype != x.dtype:
        got = f"{tuple(score.shape)} {score.dtype}" if isinstance(score, torch.Tensor) else type(score).__name__
        raise ValueError(f"score_fn: expected a tensor of x's shape {tuple(x.shape)} and dtype {x.dtype}, got {got}")
    return score
