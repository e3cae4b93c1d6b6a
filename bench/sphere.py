"""Geodesic sphere steps: ``sphere.q_sample`` and ``sphere.p_step`` on DESIGN.md's sphere workloads
(65,536 x 64 and 4,096 x 64 DimeRec-style embeddings on the unit sphere).

Rows per workload and op, each with an allocating and an in-place mode:
- given noise: ``q_sample``: ``exp_x0(sqrt(1 - ab[t]) P_x0(z))``; ``p_step``: the diffusion posterior
  step, then ``y / |y|``. Providers: every registered ``sphere_q_sample`` / ``sphere_p_step``
  implementation, the eager reference (``diffcore.reference.sphere``), ``torch.compile`` of it
  (allocating, and in place with ``copy_``), and geoopt's ``Sphere`` where geoopt is installed
  (``expmap(x0, s proju(x0, z))``; the diffusion step then ``projx``). All are checked against the
  float32 reference. A same-bytes row (bench.core.SAME_BYTES): ``torch.add(x0, z)`` /
  ``torch.addcmul(x_t, m, z)``, the same reads and a fresh write in one plain torch op.
- seeded: diffcore draws ``z`` from its Philox stream inside the kernel; the baselines draw it as
  people do, ``torch.randn_like``, eager and compiled. diffcore's rows are checked against the
  reference Philox on rows at both ends; every provider's output must be unit rows, and for
  ``q_sample`` the implied tangent noise ``logmap(x0, out) / s`` must look standard normal.
Bytes the op must move: x0 / x_t (, model_out) (, noise) read and the output written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import diffcore
from bench.core import (
    ALLOCATING,
    COMPILE,
    COMPILE_IN_PLACE,
    EAGER,
    IN_PLACE,
    SAME_BYTES,
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
from diffcore import sphere
from diffcore.reference import diffusion as ref_diffusion
from diffcore.reference import sphere as ref
from diffcore.reference.random import normal as philox_normal

FAMILY = "sphere"
DESCRIPTION = "geodesic q_sample and the sphere p_step (DimeRec), given and seeded noise"
SEED, OFFSET = 1234, 0
CHECK_ROWS = 2  # seeded mode: rows compared with the reference Philox at each end of the batch
T = 1000
Q_T_MAX = 50  # q_sample's per-row timesteps lie in [0, 50): angles below pi, so logmap recovers the noise
P_T = 250  # p_step's timestep, the same for every row (as a reverse loop gives it)
UNIT_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

LARGE = Workload("dimerec-65k", (65536, 64), "65,536 sphere embeddings, d = 64")
SMALL = Workload("dimerec-4k", (4096, 64), "4,096 sphere embeddings, d = 64")
SMOKE = [Workload("smoke", (5, 63), "tiny, for the test suite")]

TARGETS = [
    Target(FAMILY, op, LARGE.name, LARGE.shape, variant, ALLOCATING, "diffcore:cpu", metric, goal)
    for op in ("q_sample", "p_step")
    for variant in ("given noise", "seeded")
    for metric, goal in (("vs_eager", 10.0), ("vs_compile", 2.0))
]

NOTES = [
    "sphere in-place rows: diffcore writes x0 / x_t (`out=x0`, `p_step_`); the compiled reference writes a "
    "preallocated tensor, `out.copy_(reference(...))` (the same bytes, no allocation): Inductor in torch 2.13 fails "
    "to compile `x.copy_(reference(x, ...))` for these steps (KeyError 'buf0'). The eager reference and geoopt "
    "run allocating, as people call them",
    "sphere seeded rows: diffcore draws Philox noise inside the kernel; the baselines draw `torch.randn_like` "
    "(eager: ATen's generator, compiled: Inductor's), so their outputs are checked as unit rows, q_sample's "
    "implied tangent noise as standard normal and p_step's mean cosine to the noiseless step against the "
    "reference's under fresh normal noise, not equal",
]


@dataclass(frozen=True)
class Op:
    name: str  # q_sample or p_step
    impl: str  # the registered op
    reads: int  # tensors read besides the noise


OPS = (Op("q_sample", "sphere_q_sample", 1), Op("p_step", "sphere_p_step", 2))


def workloads(suite: str) -> list[Workload]:
    return SMOKE if suite == "smoke" else [LARGE, SMALL]


def cases(config: Config) -> list[Case]:
    return [_case(op, w, config, seeded) for w in workloads(config.suite) for op in OPS for seeded in (False, True)]


def _geoopt() -> tuple[object | None, str | None]:
    try:
        import geoopt
    except ImportError as exc:
        return None, f"geoopt is not installed (optional dependency: {exc})"
    return geoopt.Sphere(), None


def _case(op: Op, w: Workload, config: Config, seeded: bool) -> Case:
    schedule = diffcore.Schedule.linear(T).to(config.device)
    elem = torch.empty((), dtype=config.dtype).element_size()
    tensors = op.reads + (0 if seeded else 1) + 1

    def noise_kwargs(inputs: Inputs) -> dict:
        return {"seed": SEED, "offset": OFFSET} if seeded else {"noise": inputs["z"]}

    def diffcore_call(in_place: bool):
        def call(inputs: Inputs):
            x, t, kw = inputs["x"], inputs["t"], noise_kwargs(inputs)
            if op.name == "q_sample":
                out = x if in_place else None
                return lambda: sphere.q_sample(x, t, schedule, out=out, **kw)
            m = inputs["m"]
            if in_place:
                return lambda: sphere.p_step_(x, m, t, schedule, **kw)
            return lambda: sphere.p_step(x, m, t, schedule, **kw)

        return call

    diffcore_check = _check(op, schedule, config.dtype, seeded, philox=True)
    baseline_check = _check(op, schedule, config.dtype, seeded, philox=False)
    providers, notes = implementation_providers(
        op.impl, config,
        calls={ALLOCATING: diffcore_call(False), IN_PLACE: diffcore_call(True)},
        checks={ALLOCATING: diffcore_check, IN_PLACE: diffcore_check}, numel=w.numel,
    )

    def reference_step(x, m, t, z):
        noise = torch.randn_like(x) if seeded else z
        if op.name == "q_sample":
            return ref.q_sample(x, t, schedule, noise)
        return ref.p_step(x, m, t, schedule, noise=noise)

    def reference_step_(out, x, m, t, z):
        out.copy_(reference_step(x, m, t, z))

    def args(inputs: Inputs) -> tuple:
        return inputs["x"], inputs.get("m"), inputs["t"], inputs.get("z")

    def out_args(inputs: Inputs) -> tuple:
        return (inputs["out"], *args(inputs))

    def eager(inputs: Inputs):
        a = args(inputs)
        return lambda: reference_step(*a)

    manifold, missing = _geoopt()

    def geoopt_step(inputs: Inputs):
        x, m, t, z = args(inputs)

        def run() -> torch.Tensor:
            noise = torch.randn_like(x) if seeded else z
            if op.name == "q_sample":
                s = ref_diffusion.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.shape)
                return manifold.expmap(x, s * manifold.proju(x, noise))
            return manifold.projx(ref_diffusion.p_step(x, m, t, schedule, noise=noise))

        return run

    suffix = " + randn_like" if seeded else ""
    providers += [
        Provider(f"eager reference{suffix}", ALLOCATING, setup=eager, check=baseline_check, role=EAGER),
        compiled_provider(f"torch.compile(reference{suffix})", ALLOCATING, reference_step, args, config,
                          role=COMPILE, check=baseline_check),
        compiled_provider(f"torch.compile(reference{suffix})", IN_PLACE, reference_step_, out_args, config,
                          role=COMPILE_IN_PLACE, check=baseline_check, result=lambda inputs, _: inputs["out"]),
        Provider(f"geoopt Sphere{suffix}", ALLOCATING, setup=geoopt_step if manifold is not None else None,
                 check=baseline_check, unavailable=missing),
    ]
    if not seeded:
        providers.append(Provider(f"same bytes: {SAME[op.name][0]}", ALLOCATING, setup=SAME[op.name][1], check=None,
                                  role=SAME_BYTES))
    return Case(
        FAMILY, op.name, w, "seeded" if seeded else "given noise",
        bytes_moved=tensors * w.numel * elem,
        make_inputs=lambda: _inputs(op, w, config, seeded),
        providers=providers,
        reset=lambda inputs: inputs["x"].copy_(inputs["x0"]),
        notes=notes + NOTES,
    )


# Given noise, the same reads and a fresh write in one plain torch op (SAME_BYTES in bench.core).
SAME = {
    "q_sample": ("torch.add(x0, z)", lambda i: lambda: torch.add(i["x"], i["z"])),
    "p_step": ("torch.addcmul(x_t, m, z)",
               lambda i: lambda: torch.addcmul(i["x"], i["m"], i["z"])),
}


def _inputs(op: Op, w: Workload, config: Config, seeded: bool) -> Inputs:
    """Synthetic operands from ``config.seed``: unit rows x (and a unit model output), standard
    normal noise; q_sample's t per row in [0, Q_T_MAX), p_step's t = P_T for every row."""
    g = torch.Generator().manual_seed(config.seed)
    shape = w.shape

    def draw(unit: bool) -> torch.Tensor:
        v = torch.randn(shape, generator=g)
        v = torch.nn.functional.normalize(v, dim=1) if unit else v
        return v.to(device=config.device, dtype=config.dtype)

    inputs: Inputs = {"x0": draw(True)}
    inputs["x"] = inputs["x0"].clone()
    inputs["out"] = torch.empty_like(inputs["x0"])
    if op.name == "p_step":
        inputs["m"] = draw(True)
        inputs["t"] = torch.full((shape[0],), P_T, dtype=torch.long, device=config.device)
    else:
        inputs["t"] = torch.randint(0, Q_T_MAX, (shape[0],), generator=g).to(config.device)
    if not seeded:
        inputs["z"] = draw(False)
    return inputs


def _reference(op: Op, inputs: Inputs, schedule: diffcore.Schedule, rows: slice = slice(None),
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 reference on the pristine inputs (rows ``rows``), with ``noise`` or the inputs'."""
    def f32(name: str) -> torch.Tensor | None:
        v = inputs.get(name)
        return None if v is None else v[rows].float()

    z = f32("z") if noise is None else noise
    t = inputs["t"][rows]
    if op.name == "q_sample":
        return ref.q_sample(f32("x0"), t, schedule, z)
    return ref.p_step(f32("x0"), f32("m"), t, schedule, noise=z)


def _check(op: Op, schedule: diffcore.Schedule, dtype: torch.dtype, seeded: bool, philox: bool):
    """Given noise: the float32 reference. Seeded: diffcore's rows at both ends equal the reference
    Philox's; every provider's rows are unit rows; q_sample's implied tangent noise is normal;
    p_step's rows lie as far from the noiseless step as the reference's with fresh normal noise."""
    def unit_rows(out: torch.Tensor) -> str | None:
        norm = out.float().norm(dim=1)
        if not bool(torch.isfinite(norm).all()):
            return "output: non-finite values"
        err = float((norm - 1).abs().max())
        return None if err <= UNIT_ATOL[dtype] else f"output: rows are not unit rows (| |row| - 1 | up to {err:.3g})"

    def spread(inputs: Inputs, out: torch.Tensor) -> str | None:
        """p_step: normalising loses |y|, so z cannot be recovered; instead the mean cosine between
        each row and the noiseless step's row is compared with the reference's under fresh
        torch.randn noise (a step that drops or misscales its noise moves it by far more than 6
        standard errors)."""
        if "noiseless" not in inputs:
            g = torch.Generator().manual_seed(SEED + 1)
            z = torch.randn(out.shape, generator=g).to(out.device)
            inputs["noiseless"] = _reference(op, inputs, schedule, noise=torch.zeros_like(z))
            inputs["cos_ref"] = (_reference(op, inputs, schedule, noise=z) * inputs["noiseless"]).sum(1)
        cos, cos_ref = (out.float() * inputs["noiseless"]).sum(1), inputs["cos_ref"]
        se = math.sqrt(float(cos.var()) / cos.numel() + float(cos_ref.var()) / cos_ref.numel())
        gap = abs(float(cos.mean()) - float(cos_ref.mean()))
        if gap <= 6 * se + UNIT_ATOL[dtype]:
            return None
        return (f"noise: mean cosine to the noiseless step {float(cos.mean()):.5f}, the reference's with normal noise "
                f"{float(cos_ref.mean()):.5f} (6 standard errors: {6 * se:.2g})")

    def implied_noise(inputs: Inputs, out: torch.Tensor) -> str | None:
        """``logmap(x0, out) / s = P_x0(z)``; rescaled by sqrt(d / (d - 1)) for the dimension P
        removes, its entries look standard normal."""
        if op.name != "q_sample":
            return spread(inputs, out)
        x0 = inputs["x0"].float()
        s = schedule.sqrt_one_minus_alphas_cumprod[inputs["t"]].float().unsqueeze(1)
        d = x0.shape[1]
        u = ref.logmap(x0, out.float()) / s * (d / (d - 1)) ** 0.5
        slack = float(UNIT_ATOL[dtype] / s.min())
        return not_standard_normal(u, "implied tangent noise logmap(x0, out) / s", slack)

    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        if not seeded:
            if "expected" not in inputs:
                inputs["expected"] = _reference(op, inputs, schedule)
            return mismatch(out, inputs["expected"], dtype)
        error = unit_rows(out)
        if error is None and philox:
            B, N = out.shape
            k = min(CHECK_ROWS, B)
            for r0, r1 in ((0, k), (B - k, B)):
                i0 = r0 * N
                first = i0 // 4  # the Philox counter holding element i0
                z = philox_normal(r1 * N - 4 * first, SEED, OFFSET + first)[i0 - 4 * first:].reshape(r1 - r0, N)
                expected = _reference(op, inputs, schedule, slice(r0, r1), noise=z.to(out.device))
                error = mismatch(out[r0:r1], expected, dtype, what=f"rows {r0}..{r1 - 1} vs the reference Philox")
                if error:
                    return error
        return error or implied_noise(inputs, out)

    return check
