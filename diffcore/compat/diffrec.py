"""Drop-in acceleration of DiffRec's ``GaussianDiffusion`` (also T-DiffRec, L-DiffRec, DDRM).

::

    from diffcore.compat import diffrec
    handle = diffrec.accelerate(diffusion)            # diffusion.p_sample / q_sample are now fused
    prediction = diffusion.p_sample(model, batch, args.sampling_steps, args.sampling_noise)
    handle.restore()                                  # or: with diffrec.accelerate(diffusion): ...

Duck-typed: the object needs ``betas`` (float64, shape (steps,)), ``steps``, ``noise_scale``,
``mean_type`` (an enum whose ``name`` is ``START_X`` or ``EPSILON``, or the strings ``"x0"`` /
``"eps"``) and the methods ``p_sample(model, x_start, steps, sampling_noise=False)`` and
``q_sample(x_start, t, noise=None)``. A :class:`diffcore.Schedule` is built from the object's own
betas, and the object's tables (``posterior_mean_coef1/2``, ``posterior_log_variance_clipped``,
``alphas_cumprod``, ...) are checked against it, so a variant with different tables is refused
rather than silently changed.

Same results given the same noise: the replacements draw noise with ``torch.randn_like`` (or
``Tensor.normal_``, the same stream) in the original's order: the start's ``q_sample`` (when
``steps > 0``), then one draw per step when ``sampling_noise`` (also at t = 0, where DiffRec masks
it). Results agree with the original to float32 rounding (diffcore folds the eps-prediction's two
products into one float64 coefficient).

Calls the replacement does not cover fall back to the original method: ``noise_scale == 0``,
inputs that are not contiguous 2-D float32 tensors (a non-contiguous batch: see ``_supported``),
a ``steps`` that is not an int in ``[0, steps]``, a ``q_sample`` timestep that is not an int or
an integer tensor on x_start's device or a noise not like x_start, or an object whose ``steps``,
``noise_scale`` or ``betas`` (the tensor itself: a new one assigned) changed since
:func:`accelerate` (the schedule is built once, from the values then; edit a ``betas`` tensor in
place and the tables no longer describe it: restore and accelerate again).

DDRM clamps timesteps ``t >= T`` to the last table entry: ``accelerate(diffusion, clamp_t=True)``
(``q_sample`` clamps ``t``, ``p_sample`` accepts ``steps > T`` and starts at ``T - 1``).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch

from diffcore import _checks
from diffcore.diffusion import Schedule, p_step, q_sample, sample

__all__ = ["accelerate", "AcceleratedDiffusion"]

_MISSING = object()
_METHODS = ("p_sample", "q_sample")
# the object's tables that must equal diffcore's (DiffRec's calculate_for_diffusion)
_TABLES = (
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _integer(name: str, value: object) -> int:
    """An integer (Python or numpy; not a bool, not a float such as 10.5, which int() would cut)."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {value!r}") from None


def _prediction(mean_type: object) -> str:
    name = getattr(mean_type, "name", mean_type)
    mapping = {"START_X": "x0", "EPSILON": "eps", "x0": "x0", "eps": "eps"}
    if not isinstance(name, str) or name not in mapping:
        raise ValueError(f"mean_type: expected START_X or EPSILON, got {mean_type!r}")
    return mapping[name]


class AcceleratedDiffusion:
    """The handle :func:`accelerate` returns: ``restore()`` puts the original methods back; as a
    context manager it restores on exit. ``schedule`` is the diffcore schedule in use (None when
    ``noise_scale == 0``)."""

    def __init__(self, diffusion: Any, *, clamp_t: bool = False, check_tables: bool = True) -> None:
        for name in _METHODS + ("steps", "noise_scale", "mean_type"):
            if not hasattr(diffusion, name):
                raise TypeError(
                    f"diffusion: expected an object shaped like DiffRec's GaussianDiffusion, it has no {name!r}"
                )
        current = diffusion.__dict__.get("p_sample") if hasattr(diffusion, "__dict__") else None
        if isinstance(getattr(current, "__self__", None), AcceleratedDiffusion):
            raise ValueError("diffusion: already accelerated; restore() it first")
        self.diffusion = diffusion
        self.clamp_t = bool(clamp_t)
        self.prediction = _prediction(diffusion.mean_type)
        self.num_steps = _integer("diffusion.steps", diffusion.steps)
        self.noise_scale = float(diffusion.noise_scale)
        self.schedule: Schedule | None = None
        self._schedules: dict[torch.device, Schedule] = {}
        if self.noise_scale != 0.0:
            betas = getattr(diffusion, "betas", None)
            if not isinstance(betas, torch.Tensor):
                raise TypeError("diffusion.betas: expected a tensor (DiffRec builds it when noise_scale != 0)")
            if betas.dim() != 1 or betas.numel() != self.num_steps:
                raise ValueError(f"diffusion.betas: expected shape ({self.num_steps},), got {tuple(betas.shape)}")
            self._betas = betas  # the tensor the schedule was built from (see _supported)
            self.schedule = Schedule(betas.detach().to(torch.float64), noise_scale=self.noise_scale)
            self._schedules[self.schedule.device] = self.schedule
            if check_tables:
                self._check_tables()
        self._originals = {name: getattr(diffusion, name) for name in _METHODS}
        self._saved = {name: diffusion.__dict__.get(name, _MISSING) for name in _METHODS}
        diffusion.p_sample = self.p_sample
        diffusion.q_sample = self.q_sample
        self.active = True

    def _check_tables(self) -> None:
        for name in _TABLES:
            theirs = getattr(self.diffusion, name, None)
            if not isinstance(theirs, torch.Tensor):
                continue
            ours = getattr(self.schedule, name)
            theirs = theirs.detach().to(device=ours.device, dtype=torch.float64)
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-9, atol=1e-12):
                raise ValueError(
                    f"diffusion.{name}: differs from the table diffcore builds from diffusion.betas; "
                    "pass check_tables=False to accelerate anyway"
                )

    def _schedule_on(self, device: torch.device) -> Schedule:
        if device not in self._schedules:
            self._schedules[device] = self.schedule.to(device)
        return self._schedules[device]

    # --- the replacements ---------------------------------------------------------------------
    def _supported(self, x: object) -> bool:
        """Whether the fused ops take ``x``; otherwise the original runs. A non-contiguous batch
        runs the original: DiffRec's ``randn_like`` draws into tensors laid out like its x_t (in
        memory order), and the fused ops return contiguous tensors, so later draws would differ."""
        return (
            self.schedule is not None
            and isinstance(x, torch.Tensor)
            and x.dim() == 2
            and x.dtype == torch.float32
            and x.is_contiguous()
            and int(self.diffusion.steps) == self.num_steps
            and float(self.diffusion.noise_scale) == self.noise_scale
            and getattr(self.diffusion, "betas", None) is self._betas
        )

    def q_sample(self, x_start: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``sqrt(ab[t]) x_start + sqrt(1 - ab[t]) noise`` in one fused op; noise drawn with
        ``torch.randn_like(x_start)`` when not given, as DiffRec does."""
        t_ok = _checks.is_int(t) or (isinstance(t, torch.Tensor) and not t.dtype.is_floating_point
                                     and t.device == x_start.device)
        noise_ok = noise is None or (isinstance(noise, torch.Tensor) and noise.shape == x_start.shape
                                     and noise.dtype == x_start.dtype and noise.device == x_start.device)
        if not (self._supported(x_start) and t_ok and noise_ok):
            return self._originals["q_sample"](x_start, t, noise)
        if self.clamp_t:
            t = min(int(t), self.num_steps - 1) if _checks.is_int(t) else t.clamp(max=self.num_steps - 1)
        return q_sample(x_start, t, self._schedule_on(x_start.device), noise=noise)

    def p_sample(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_start: torch.Tensor, steps: int,
        sampling_noise: bool = False,
    ) -> torch.Tensor:
        """DiffRec's reverse loop with one fused step per timestep (see the module docstring)."""
        T = self.num_steps
        valid_steps = (
            _checks.is_int(steps) and steps >= 0 and (steps <= T or self.clamp_t)
        )
        if not (self._supported(x_start) and valid_steps):
            return self._originals["p_sample"](model, x_start, steps, sampling_noise)
        steps = min(int(steps), T)
        schedule = self._schedule_on(x_start.device)
        if torch.is_grad_enabled():
            return self._p_sample_autograd(model, x_start, steps, bool(sampling_noise), schedule)
        return sample(model, x_start, schedule, steps=steps, noise=bool(sampling_noise), prediction=self.prediction)

    def _p_sample_autograd(self, model, x_start, steps, sampling_noise, schedule) -> torch.Tensor:
        """The loop out of place, so that autograd through the model still works."""
        B, T = x_start.shape[0], self.num_steps
        x_t = x_start
        if steps > 0:
            x_t = q_sample(x_start, steps - 1, schedule, noise=torch.randn_like(x_start))
        for i in reversed(range(T)):
            t = torch.full((B,), i, dtype=torch.long, device=x_start.device)
            model_out = model(x_t, t)
            noise = torch.randn_like(x_t) if sampling_noise else None
            x_t = p_step(x_t, model_out, t, schedule, prediction=self.prediction, noise=noise)
        return x_t

    # --- restore --------------------------------------------------------------------------------
    def restore(self) -> None:
        """Puts the original ``p_sample`` and ``q_sample`` back (idempotent)."""
        if not self.active:
            return
        for name, saved in self._saved.items():
            if saved is _MISSING:
                self.diffusion.__dict__.pop(name, None)
            else:
                setattr(self.diffusion, name, saved)
        self.active = False

    def __enter__(self) -> AcceleratedDiffusion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        name = type(self.diffusion).__name__
        return f"AcceleratedDiffusion({name}, prediction={self.prediction!r}, clamp_t={self.clamp_t}, {state})"


def accelerate(diffusion: Any, *, clamp_t: bool = False, check_tables: bool = True) -> AcceleratedDiffusion:
    """Replaces ``diffusion.p_sample`` and ``diffusion.q_sample`` on the instance with diffcore's
    fused versions; returns the handle whose ``restore()`` (or ``with`` exit) undoes it.

    Args:
        diffusion: an object shaped like DiffRec's ``GaussianDiffusion`` (module docstring).
        clamp_t: DDRM's variant: timesteps ``t >= T`` use the last table entry.
        check_tables: refuse an object whose float64 tables differ from those of its betas.
    """
    return AcceleratedDiffusion(diffusion, clamp_t=clamp_t, check_tables=check_tables)
