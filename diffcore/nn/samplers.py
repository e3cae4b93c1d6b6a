"""Reverse-diffusion samplers as modules, for the families without one canonical code base.

Each takes the user's denoiser as a callable (an ``nn.Module`` is registered as a submodule) and a
:class:`diffcore.Schedule`, and runs one fused diffcore step per timestep; noise is drawn with
``torch.randn_like`` in the order the published loops draw it, so a seeded run equals the
original loop to float32 rounding (for a contiguous ``x_T``: ``randn_like`` fills a non-contiguous
tensor in memory order, while these samplers draw every step's noise in row-major order, with
grad mode on or off alike).

- :class:`DreamRecSampler`: classifier-free guidance ``x0 = (1 + w) f(x, c, t) - w f(x, c_null, t)``,
  two denoiser calls per step or one batched call over ``[c; c_null]``; starts at
  ``randn_like(c)``; noise ``sqrt(pv[t]) z`` drawn for t > 0 only (DreamRec's ``p_sample``).
- :class:`DiffuRecSampler`: ``variance="beta"`` (``exp(0.5 log(cat(pv[1], betas[1:])))``), noise
  drawn every step and masked at t = 0 (DiffuRec's ``p_sample``): :func:`diffcore.sample`.
- :class:`SphereSampler`: DimeRec-style geodesic steps, :func:`diffcore.sphere.p_step` per step
  (each step ends on the unit sphere); noise drawn for t > 0 only.

Under ``torch.no_grad()`` the loops step in place on one buffer; with grad enabled they step out
of place, so autograd through the denoiser works.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from diffcore import _checks, sphere
from diffcore.diffusion import Schedule, _InPlaceSteps, p_step, sample
from diffcore.random import randn_

__all__ = ["DreamRecSampler", "DiffuRecSampler", "SphereSampler"]


def _check_schedule(schedule: object) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a diffcore.Schedule, got {type(schedule).__name__}")
    schedule._require_diffusion()
    return schedule


class _Sampler(nn.Module):
    def __init__(self, denoiser: Callable, schedule: Schedule) -> None:
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser: expected a callable, got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.schedule = _check_schedule(schedule)

    def _schedule_on(self, device: torch.device) -> Schedule:
        if self.schedule.device != device:
            self.schedule = self.schedule.to(device)
        return self.schedule

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}"


class DreamRecSampler(_Sampler):
    """DreamRec's guided reverse loop.

    Args:
        denoiser: ``denoiser(x_t, condition, t) -> x0_hat`` with ``x_t`` (B, d), ``condition``
            (B, d_c) and ``t`` int64 (B,).
        schedule: DreamRec uses float32 tables (``Schedule.exp(T, dtype=torch.float32)`` or
            ``Schedule(betas_float32)``); float64 tables are also accepted.
        guidance_scale: w.
        batched: one denoiser call per step over ``cat([x, x])``, ``cat([c, c_null])``,
            ``cat([t, t])`` (split in halves) instead of two calls.
        prediction: ``"x0"`` (DreamRec) or ``"eps"``.
    """

    def __init__(
        self, denoiser: Callable, schedule: Schedule, guidance_scale: float = 0.0, *, batched: bool = False,
        prediction: str = "x0",
    ) -> None:
        super().__init__(denoiser, schedule)
        self.guidance_scale = _checks.real("guidance_scale", guidance_scale)
        self.batched = bool(batched)
        self.prediction = prediction

    def forward(
        self, condition: torch.Tensor, null_condition: torch.Tensor, x_T: torch.Tensor | None = None, *,
        seed: int | None = None, offset: int = 0,
    ) -> torch.Tensor:
        """Args:
            condition: (B, d_c), DreamRec's ``h``.
            null_condition: (d_c,), (1, d_c) or (B, d_c): the learned null embedding.
            x_T: (B, d) start; None: ``torch.randn_like(condition)``, as DreamRec draws it (with
                ``seed``: the Philox stream at ``offset``).
            seed, offset: opt-in noise drawn inside the step kernels from the Philox stream (step
                k, k = 1..T, at ``offset + k ceil(B d / 4)``, as :func:`diffcore.sample`), instead
                of DreamRec's ``randn_like`` before every step: the same distribution, other draws.
        Returns:
            (B, d) x_0."""
        _checks.float_tensor("condition", condition, ndim=2)
        seed, offset = _checks.seed_offset(seed, offset)
        B, d_c = condition.shape
        null_condition = torch.as_tensor(null_condition, device=condition.device)
        if null_condition.dtype != condition.dtype:
            raise TypeError(f"null_condition: expected dtype {condition.dtype} (the dtype of condition), got "
                            f"{null_condition.dtype}")
        if null_condition.shape not in ((d_c,), (1, d_c), (B, d_c)):
            raise ValueError(f"null_condition: expected shape ({d_c},), (1, {d_c}) or ({B}, {d_c}) (condition is "
                             f"({B}, {d_c})), got {tuple(null_condition.shape)}")
        null_condition = null_condition.reshape(-1, d_c).expand(B, -1)
        if x_T is None:
            x_T = torch.empty_like(condition) if seed is not None else torch.randn_like(condition)
            if seed is not None:
                randn_(x_T, seed=seed, offset=offset)
        _checks.float_tensor("x_T", x_T, ndim=2)
        if x_T.shape[0] != B:
            raise ValueError(f"x_T: expected {B} rows (one per condition row), got shape {tuple(x_T.shape)}")
        schedule = self._schedule_on(x_T.device)
        stride = (x_T.numel() + 3) // 4
        t_all = torch.arange(schedule.num_steps, device=x_T.device)
        # row i: the timesteps of one call (B,), or of the batched call over [c; c_null] (2 B,)
        t_rows = t_all.unsqueeze(1).expand(-1, 2 * B if self.batched else B)
        both = torch.cat([condition, null_condition]) if self.batched else None
        grad = torch.is_grad_enabled()
        if not grad:  # in place on one buffer; batched, x is the first half of the input [x; x]
            xx = torch.empty((2 * B if self.batched else B, x_T.shape[1]), dtype=x_T.dtype, device=x_T.device)
            x, mirror = xx[:B], xx[B:]
            x.copy_(x_T)
            step = _InPlaceSteps(x, schedule, prediction=self.prediction, variance="posterior",
                                 guidance_scale=self.guidance_scale)
            noise_buf = torch.empty_like(x) if seed is None else None
        else:  # out of place, so autograd reaches through the denoiser
            x = x_T

        def outputs(x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            """The conditional and unconditional outputs at t = i: one call or two."""
            if not self.batched:
                return self.denoiser(x, condition, t_rows[i]), self.denoiser(x, null_condition, t_rows[i])
            if grad:
                pair = torch.cat([x, x])
            else:  # one copy refreshes the second half
                mirror.copy_(x)
                pair = xx
            out = self.denoiser(pair, both, t_rows[i])
            return out[:B], out[B:]

        for k, i in enumerate(reversed(range(schedule.num_steps)), start=1):
            cond_out, uncond_out = outputs(x, i)
            step_seed = seed if i > 0 else None
            if grad:
                noise = torch.randn_like(x, memory_format=torch.contiguous_format) if i > 0 and seed is None else None
                x = p_step(x, cond_out, t_all[i : i + 1], schedule, prediction=self.prediction, uncond_out=uncond_out,
                           guidance_scale=self.guidance_scale, noise=noise, seed=step_seed, offset=offset + k * stride)
            else:
                noise = noise_buf.normal_() if i > 0 and seed is None else None
                step(i, cond_out, uncond_out, noise=noise, seed=step_seed, offset=offset + k * stride)
        return x

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale}, batched={self.batched}, {super().extra_repr()}"


class DiffuRecSampler(_Sampler):
    """DiffuRec's reverse loop: ``denoiser(x_t, t) -> x0_hat`` (wrap DiffuRec's
    ``xstart_model(item_rep, x_t, t, mask)`` in a closure), ``variance="beta"``.

    ``forward(x_T)``: x_T (B, d), DiffuRec's ``randn_like(item_rep)``; returns (B, d) x_0.
    ``noise=False`` drops the reverse noise; ``generator`` is passed to ``Tensor.normal_``."""

    def __init__(self, denoiser: Callable, schedule: Schedule, *, noise: bool = True, prediction: str = "x0") -> None:
        super().__init__(denoiser, schedule)
        self.noise = bool(noise)
        self.prediction = prediction

    def forward(self, x_T: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        _checks.float_tensor("x_T", x_T, ndim=2)
        schedule = self._schedule_on(x_T.device)
        if torch.is_grad_enabled():
            x = x_T
            for i in reversed(range(schedule.num_steps)):
                t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
                model_out = self.denoiser(x, t)
                noise = (torch.empty_like(x, memory_format=torch.contiguous_format).normal_(generator=generator)
                         if self.noise else None)
                x = p_step(x, model_out, t, schedule, prediction=self.prediction, variance="beta", noise=noise)
            return x
        return sample(self.denoiser, x_T, schedule, noise=self.noise, prediction=self.prediction, variance="beta",
                      generator=generator)


class SphereSampler(_Sampler):
    """DimeRec-style sampling on the unit hypersphere: ``x = sphere.p_step(x, denoiser(x, t), t)``
    for t = T-1 .. 0, each step ending on the sphere.

    Args:
        denoiser: ``denoiser(x_t, t) -> x0_hat`` (or eps, ``prediction="eps"``).
        variance: ``"posterior"``, ``"beta"`` or ``"none"`` (as :func:`diffcore.p_step`).
        noise: draw ``torch.randn_like(x)`` for every t > 0.

    ``forward(x_T)``: x_T (B, d) start (normalised first); returns (B, d) unit rows."""

    def __init__(
        self, denoiser: Callable, schedule: Schedule, *, prediction: str = "x0", variance: str = "posterior",
        noise: bool = True,
    ) -> None:
        super().__init__(denoiser, schedule)
        self.prediction = prediction
        self.variance = variance
        self.noise = bool(noise)

    def forward(self, x_T: torch.Tensor) -> torch.Tensor:
        _checks.float_tensor("x_T", x_T, ndim=2)
        schedule = self._schedule_on(x_T.device)
        x = sphere.normalize(x_T)
        in_place = not torch.is_grad_enabled()
        t_all = torch.arange(schedule.num_steps, device=x.device)
        for i in reversed(range(schedule.num_steps)):
            t = t_all[i : i + 1].expand(x.shape[0])
            model_out = self.denoiser(x, t)
            noise = torch.randn_like(x) if self.noise and i > 0 else None
            kwargs = dict(prediction=self.prediction, variance=self.variance, noise=noise)
            if in_place:
                # an output sharing x's memory is read as it was (sphere.p_step's in-place rule)
                sphere.p_step(x, model_out, t_all[i : i + 1], schedule, out=x, **kwargs)
            else:
                x = sphere.p_step(x, model_out, t_all[i : i + 1], schedule, **kwargs)
        return x

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, variance={self.variance!r}, noise={self.noise}, {super().extra_repr()}"
