"""Reverse-diffusion steps: ``p_step`` / ``p_step_`` on DESIGN.md's diffusion workloads.

Rows per workload, each with an allocating (``p_step``) and an in-place (``p_step_``) mode:
- given noise: ``x_{t-1} = c1[t] x0_hat + c2[t] x_t + sigma_t z`` with ``z`` a tensor, as DiffRec
  passes it. Providers: every registered ``diffusion_step`` implementation, the eager reference
  (``diffcore.reference.diffusion.p_step``, DiffRec's style), ``torch.compile`` of it, and its best
  form (compiled, writing ``x_t`` in place with ``copy_``). On DreamRec's workload the baselines run
  DreamRec's own step (``examples/models.py``: its (B, 1) coefficients, ``sqrt(posterior_variance)``,
  no mask) on the schedule's tables. All are checked against the reference.
- seeded: diffcore draws ``z`` from its Philox stream inside the kernel; the baselines draw it as
  people do, ``torch.randn_like``, eager and compiled. diffcore's rows are checked against the
  reference Philox on a slice of rows (the reference generator is slow on 38M elements) and the
  noise of every provider is checked to be standard normal.
Bytes the op must move: x_t, model_out (, uncond_out), noise read and the output written; seeded
mode reads no noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import diffcore
from bench.core import (
    ALLOCATING,
    COMPILE,
    COMPILE_IN_PLACE,
    EAGER,
    IN_PLACE,
    Case,
    Config,
    Inputs,
    Provider,
    Target,
    Workload,
    compiled_provider,
    implementation_providers,
    mismatch,
    not_standard_normal,
)
from bench.core import TOLERANCES as _TOL
from diffcore.reference import diffusion as ref
from diffcore.reference.random import normal as philox_normal
from examples import models

FAMILY = "diffusion"
DESCRIPTION = "reverse-diffusion steps p_step / p_step_ (DiffRec, DreamRec), given and seeded noise"
OP = "p_step"
SEED, OFFSET = 1234, 0
CHECK_ROWS = 2  # seeded mode: rows compared with the reference Philox at each end of the batch


@dataclass(frozen=True)
class Setting:
    """A workload and the step it runs: schedule, timestep, guidance."""

    workload: Workload
    schedule: Callable[[], diffcore.Schedule]
    t: int
    guidance: float | None = None  # DreamRec's classifier-free guidance scale w


def _diffrec(steps: int) -> Callable[[], diffcore.Schedule]:
    # DiffRec's linear-var schedule with its command-line defaults (noise scale 0.1, min 1e-4, max 0.02)
    return lambda: diffcore.Schedule.linear_var(steps, 0.1, 1e-4, 0.02)


AMAZON_BOOK = Setting(Workload("amazon-book", (400, 94949), "DiffRec, T = 5, first reverse step"),
                      _diffrec(5), t=4)
ML_1M = Setting(Workload("ml-1m", (400, 2810), "DiffRec, T = 40, first reverse step"), _diffrec(40), t=39)
DREAMREC = Setting(
    Workload("dreamrec", (256, 64), "DreamRec, guided w = 2, T = 500, float32 tables"),
    lambda: diffcore.Schedule.exp(500, dtype=torch.float32), t=250, guidance=2.0,
)
SMOKE = [
    Setting(Workload("smoke", (3, 1001), "tiny, for the test suite"), _diffrec(5), t=4),
    Setting(Workload("smoke-guided", (4, 64), "tiny, for the test suite"), lambda: diffcore.Schedule.exp(
        50, dtype=torch.float32), t=25, guidance=2.0),
]

TARGETS = [
    Target(FAMILY, OP, "amazon-book", (400, 94949), "given noise", IN_PLACE, "diffcore:cpu", metric, goal)
    for metric, goal in (("vs_eager", 15.0), ("vs_compile", 3.0), ("copy_share", 0.6))
] + [Target(FAMILY, OP, "amazon-book", (400, 94949), "seeded", IN_PLACE, "diffcore:cpu", "vs_eager", 15.0)]

NOTES = [
    "p_step in-place rows: diffcore's `p_step_` and the compiled reference's `x_t.copy_(p_step(...))` both write "
    "x_t; the eager reference has no in-place form (people run it allocating), so its one row serves both modes",
    "p_step seeded rows: diffcore draws Philox noise inside the kernel; the baselines draw `torch.randn_like` "
    "(eager: ATen's generator, compiled: Inductor's), so their values are checked as standard normal, not equal",
]


def settings(suite: str) -> list[Setting]:
    return SMOKE if suite == "smoke" else [AMAZON_BOOK, ML_1M, DREAMREC]


def cases(config: Config) -> list[Case]:
    out = []
    for s in settings(config.suite):
        for seeded in (False, True):
            out.append(_case(s, config, seeded))
    return out


def _case(s: Setting, config: Config, seeded: bool) -> Case:
    schedule = s.schedule().to(config.device)
    w = s.guidance
    guided = w is not None
    tensors = 3 + guided + (0 if seeded else 1)  # read: x, model_out (, uncond_out) (, noise); write: out
    elem = torch.empty((), dtype=config.dtype).element_size()

    def step_kwargs(inputs: Inputs) -> dict:
        kw = {"uncond_out": inputs["u"], "guidance_scale": w} if guided else {}
        if seeded:
            return {**kw, "seed": SEED, "offset": OFFSET}
        return {**kw, "noise": inputs["z"]}

    def diffcore_call(in_place: bool):
        def call(inputs: Inputs):
            x, m, t, kw = inputs["x"], inputs["m"], inputs["t"], step_kwargs(inputs)
            if in_place:
                return lambda: diffcore.p_step_(x, m, t, schedule, **kw)
            return lambda: diffcore.p_step(x, m, t, schedule, **kw)

        return call

    if seeded:
        diffcore_check = _seeded_check(schedule, w, config.dtype)
        baseline_check = _noise_check(schedule, w, config.dtype)
    else:
        diffcore_check = baseline_check = _given_check(schedule, w, config.dtype)
    providers, notes = implementation_providers(
        "diffusion_step", config,
        calls={ALLOCATING: diffcore_call(False), IN_PLACE: diffcore_call(True)},
        checks={ALLOCATING: diffcore_check, IN_PLACE: diffcore_check}, numel=s.workload.numel,
    )

    if guided:  # DreamRec's own step (examples/models.py) on the schedule's float32 tables
        dreamrec = models.DreamRecDiffusion(schedule.num_steps, w)
        for name in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance"):
            setattr(dreamrec, name, getattr(schedule, name).float().cpu())

    def reference_step(x, m, u, t, z):
        noise = torch.randn_like(x) if seeded else z
        if guided:
            return dreamrec.p_sample(lambda *_: m, lambda *_: u, x, None, t, s.t, noise)
        return ref.p_step(x, m, t, schedule, uncond_out=u, guidance_scale=w or 0.0, noise=noise)

    def reference_step_(x, m, u, t, z):
        x.copy_(reference_step(x, m, u, t, z))

    def args(inputs: Inputs) -> tuple:
        return inputs["x"], inputs["m"], inputs.get("u"), inputs["t"], inputs.get("z")

    def eager(inputs: Inputs):
        a = args(inputs)
        return lambda: reference_step(*a)

    suffix = " + randn_like" if seeded else ""
    name = "DreamRec p_sample" if guided else "reference"
    providers += [
        Provider(f"eager {name}{suffix}", ALLOCATING, setup=eager, check=baseline_check, role=EAGER),
        compiled_provider(f"torch.compile({name}{suffix})", ALLOCATING, reference_step, args, config,
                          role=COMPILE, check=baseline_check),
        compiled_provider(f"torch.compile({name}{suffix})", IN_PLACE, reference_step_, args, config,
                          role=COMPILE_IN_PLACE, check=baseline_check, result=lambda inputs, _: inputs["x"]),
    ]
    return Case(
        FAMILY, OP, s.workload, "seeded" if seeded else "given noise",
        bytes_moved=tensors * s.workload.numel * elem,
        make_inputs=lambda: _inputs(s, config, seeded),
        providers=providers,
        reset=lambda inputs: inputs["x"].copy_(inputs["x0"]),
        notes=notes + NOTES,
    )


def _inputs(s: Setting, config: Config, seeded: bool) -> Inputs:
    """Synthetic step operands from ``config.seed``: x_t and the model output(s) uniform in
    [-1, 1], the noise standard normal; t the same for every row, as DiffRec's loop gives it."""
    g = torch.Generator().manual_seed(config.seed)
    shape = s.workload.shape

    def draw(normal: bool = False) -> torch.Tensor:
        v = torch.empty(shape)
        v = v.normal_(generator=g) if normal else v.uniform_(-1, 1, generator=g)
        return v.to(device=config.device, dtype=config.dtype)

    inputs: Inputs = {"x0": draw(), "m": draw()}
    inputs["x"] = inputs["x0"].clone()
    if s.guidance is not None:
        inputs["u"] = draw()
    if not seeded:
        inputs["z"] = draw(normal=True)
    inputs["t"] = torch.full((shape[0],), s.t, dtype=torch.long, device=config.device)
    return inputs


def _reference(inputs: Inputs, schedule: diffcore.Schedule, w: float | None, rows: slice = slice(None),
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 reference on the pristine inputs (the rows ``rows``); ``noise`` None: given
    noise mode uses ``inputs["z"]``, seeded mode the posterior mean."""
    def f32(name: str) -> torch.Tensor | None:
        v = inputs.get(name)
        return None if v is None else v[rows].float()

    if noise is None and "z" in inputs:
        noise = f32("z")
    return ref.p_step(f32("x0"), f32("m"), inputs["t"][rows], schedule, uncond_out=f32("u"),
                      guidance_scale=w or 0.0, noise=noise)


def _given_check(schedule: diffcore.Schedule, w: float | None, dtype: torch.dtype):
    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        if "expected" not in inputs:
            inputs["expected"] = _reference(inputs, schedule, w)
        return mismatch(out, inputs["expected"], dtype)

    return check


def _seeded_check(schedule: diffcore.Schedule, w: float | None, dtype: torch.dtype):
    """diffcore's Philox noise: rows at both ends equal the reference generator's; the whole
    output's implied noise is standard normal."""
    noise_check = _noise_check(schedule, w, dtype)

    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        B, N = out.shape
        k = min(CHECK_ROWS, B)
        for r0, r1 in ((0, k), (B - k, B)):
            i0 = r0 * N
            first = i0 // 4  # the Philox counter holding element i0
            z = philox_normal(r1 * N - 4 * first, SEED, OFFSET + first)[i0 - 4 * first:].reshape(r1 - r0, N)
            expected = _reference(inputs, schedule, w, slice(r0, r1), noise=z.to(inputs["x0"].device))
            error = mismatch(out[r0:r1], expected, dtype, what=f"rows {r0}..{r1 - 1} vs the reference Philox")
            if error:
                return error
        return noise_check(inputs, out)

    return check


def _noise_check(schedule: diffcore.Schedule, w: float | None, dtype: torch.dtype):
    """The noise a provider added, ``(out - posterior mean) / sigma_t``, must be standard normal."""
    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        if "mean" not in inputs:
            inputs["mean"] = _reference(inputs, schedule, w, noise=None)
        mean = inputs["mean"]
        sigma = torch.exp(0.5 * schedule.posterior_log_variance_clipped[inputs["t"]].float()).unsqueeze(1)
        rtol, atol = _TOL[dtype]
        slack = float((rtol * mean.abs().mean() + atol) / sigma.min())  # rounding of the output
        return not_standard_normal((out.float() - mean) / sigma, "implied noise (out - mean) / sigma", slack)

    return check
