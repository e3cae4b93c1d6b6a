"""Score-SDE steps: one predictor-corrector step of score_sde's PC sampler on DESIGN.md's SDE
workloads (4,096 x 128 and 65,536 x 128 SGSR-like embeddings), VE and VP, with a given score.

One PC step is a Langevin corrector step (its step size from the batch-mean norms of the score and
the noise) and then a reverse-diffusion predictor step, at t = 0.5, the scores ``s1`` (corrector) and
``s2`` (predictor) given as tensors. Rows per workload, each with an allocating mode (``langevin_step``
then ``reverse_diffusion_step``, both returning new tensors as score_sde's functions do) and an
in-place mode (``langevin_step_`` then ``reverse_diffusion_step_``, writing x):
- given noise: ``z1``, ``z2`` are tensors. Providers: every registered ``sde_step`` implementation,
  the eager reference (``diffcore.reference.sde``, score_sde's style), ``torch.compile`` of it, and
  its best form (compiled, writing x in place with ``copy_``). All are checked against the float32
  reference. The compiled baselines break the graph between the two steps, where a sampler calls
  the score model (score_sde evaluates the predictor's score at the corrected x), so no compiled
  graph can fuse the corrector's update into the predictor's pass. Rows compiling both steps as one
  graph (possible only because this bench hands over s2 in advance) are shown beside them, not as
  baselines. This departs from a literal "torch.compile of the PC step" on purpose: that row times
  a fusion no sampler can run.
- seeded: diffcore draws z1 and z2 from its Philox stream inside the kernels (the corrector at
  ``offset``, the predictor at ``offset + ceil(B N / 4)``); the baselines draw ``torch.randn_like``,
  eager and compiled. diffcore's output is checked against the reference fed the same stream
  (``diffcore.random.randn``, itself checked against the reference Philox by the random family); every
  provider's output must differ from that by noise of the step's exact scale.
Bytes the step must move: x, s1, s2 (, z1, z2) read and x written once.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from diffcore import sde
from diffcore.reference import sde as ref

FAMILY = "sde"
DESCRIPTION = "one score-SDE predictor-corrector step (Langevin + reverse diffusion), VE and VP, given and seeded noise"
OP = "pc_step"
SEED, OFFSET = 1234, 0
T = 0.5  # the step's time, the same for every row (as score_sde's loop gives it)
SNR = 0.16  # score_sde's corrector signal-to-noise ratio

LARGE = Workload("sgsr-65k", (65536, 128), "65,536 user embeddings, d = 128")
SMALL = Workload("sgsr-4k", (4096, 128), "4,096 user embeddings, d = 128")
SMOKE = [Workload("smoke", (5, 63), "tiny, for the test suite")]


@dataclass(frozen=True)
class Setting:
    name: str  # VE or VP
    make: type

    def build(self, device: torch.device) -> sde.SDE:
        return self.make().to(device)  # score_sde's defaults: VE(0.01, 50, 1000), VP(0.1, 20, 1000)


SDES = (Setting("VE", sde.VESDE), Setting("VP", sde.VPSDE))

TARGETS = [  # issue 8, on the in-place rows as the diffusion family's targets (a sampler loop writes x)
    Target(FAMILY, OP, LARGE.name, LARGE.shape, f"{s.name}, {noise}", IN_PLACE, "diffcore:cpu", metric, goal)
    for s in SDES
    for noise in ("given noise", "seeded")
    for metric, goal in (("vs_eager", 10.0), ("vs_compile", 2.0))
]

NOTES = [
    "pc_step: a Langevin corrector step then a reverse-diffusion predictor step with given scores s1, s2; the "
    "allocating rows return new tensors (x and x_mean) as score_sde's predictor and corrector do; the in-place "
    "rows write x (diffcore's `langevin_step_` / `reverse_diffusion_step_`, the compiled reference's "
    "`x.copy_(...)`). The eager reference has no in-place form, so its one row serves both modes",
    "pc_step seeded rows: diffcore draws Philox noise inside the kernels (the corrector's norms draw it once "
    "more, no noise tensor is stored); the baselines draw `torch.randn_like` (eager: ATen's generator, compiled: "
    "Inductor's), so their outputs are checked by the implied noise's scale, not equal",
    "pc_step compiled baselines: `torch.compile(reference)` compiles the step as a sampler runs it, with a graph "
    "break between the corrector and the predictor (where score_sde's loop evaluates the score at the corrected "
    "x), so x is stored in between; the vs compile columns are against these rows. The rows `both steps in one "
    "graph` compile the pair as one function, which only this bench can do because it hands over s2 in advance: "
    "Inductor then fuses the corrector's update into the predictor's pass and skips storing x (shown for "
    "reference, not a baseline)",
]


def workloads(suite: str) -> list[Workload]:
    if suite == "smoke":
        return SMOKE
    return [LARGE, SMALL] if suite == "full" else [LARGE]


def cases(config: Config) -> list[Case]:
    return [_case(s, w, config, seeded) for w in workloads(config.suite) for s in SDES for seeded in (False, True)]


def _case(setting: Setting, w: Workload, config: Config, seeded: bool) -> Case:
    the_sde = setting.build(config.device)
    elem = torch.empty((), dtype=config.dtype).element_size()
    tensors = 3 + (0 if seeded else 2) + 1
    stride = (w.numel + 3) // 4  # Philox counters one seeded step consumes

    def noise_kwargs(inputs: Inputs) -> tuple[dict, dict]:
        if seeded:
            return {"seed": SEED, "offset": OFFSET}, {"seed": SEED, "offset": OFFSET + stride}
        return {"noise": inputs["z1"]}, {"noise": inputs["z2"]}

    def diffcore_call(in_place: bool):
        def call(inputs: Inputs):
            x, s1, s2 = inputs["x"], inputs["s1"], inputs["s2"]
            corrector_kw, predictor_kw = noise_kwargs(inputs)
            if in_place:
                def run_in_place() -> torch.Tensor:
                    sde.langevin_step_(x, s1, SNR, the_sde, t=T, **corrector_kw)
                    return sde.reverse_diffusion_step_(x, s2, T, the_sde, **predictor_kw)

                return run_in_place

            def run() -> torch.Tensor:
                x1, _ = sde.langevin_step(x, s1, SNR, the_sde, t=T, **corrector_kw)
                return sde.reverse_diffusion_step(x1, s2, T, the_sde, **predictor_kw)[0]

            return run

        return call

    diffcore_check = _check(the_sde, config.dtype, seeded, philox=True)
    baseline_check = _check(the_sde, config.dtype, seeded, philox=False)
    providers, notes = implementation_providers(
        "sde_step", config,
        calls={ALLOCATING: diffcore_call(False), IN_PLACE: diffcore_call(True)},
        checks={ALLOCATING: diffcore_check, IN_PLACE: diffcore_check}, numel=w.numel,
    )

    def corrector(x, s1, z1):
        return ref.langevin_step(x, s1, SNR, the_sde, T, torch.randn_like(x) if seeded else z1)[0]

    def predictor(x, s2, z2):
        return ref.reverse_diffusion_step(x, s2, T, the_sde, torch.randn_like(x) if seeded else z2)[0]

    def reference_step(x, s1, s2, z1, z2):
        return predictor(corrector(x, s1, z1), s2, z2)

    def sampler_step(x, s1, s2, z1, z2):
        x = corrector(x, s1, z1)
        torch._dynamo.graph_break()  # a sampler calls the score model here: no graph holds both steps
        return predictor(x, s2, z2)

    def sampler_step_(x, s1, s2, z1, z2):
        x.copy_(corrector(x, s1, z1))
        torch._dynamo.graph_break()
        x.copy_(predictor(x, s2, z2))

    def reference_step_(x, s1, s2, z1, z2):
        x.copy_(reference_step(x, s1, s2, z1, z2))

    def args(inputs: Inputs) -> tuple:
        return inputs["x"], inputs["s1"], inputs["s2"], inputs.get("z1"), inputs.get("z2")

    def eager(inputs: Inputs):
        a = args(inputs)
        return lambda: reference_step(*a)

    suffix = " + randn_like" if seeded else ""
    in_x = {"result": lambda inputs, _: inputs["x"]}
    one_graph = ", both steps in one graph"
    providers += [
        Provider(f"eager reference{suffix}", ALLOCATING, setup=eager, check=baseline_check, role=EAGER),
        compiled_provider(f"torch.compile(reference{suffix})", ALLOCATING, sampler_step, args, config,
                          role=COMPILE, check=baseline_check),
        compiled_provider(f"torch.compile(reference{suffix})", IN_PLACE, sampler_step_, args, config,
                          role=COMPILE_IN_PLACE, check=baseline_check, **in_x),
        compiled_provider(f"torch.compile(reference{suffix}){one_graph}", ALLOCATING, reference_step, args, config,
                          role=None, check=baseline_check),
        compiled_provider(f"torch.compile(reference{suffix}){one_graph}", IN_PLACE, reference_step_, args, config,
                          role=None, check=baseline_check, **in_x),
    ]
    return Case(
        FAMILY, OP, w, f"{setting.name}, {'seeded' if seeded else 'given noise'}",
        bytes_moved=tensors * w.numel * elem,
        make_inputs=lambda: _inputs(w, config, seeded),
        providers=providers,
        reset=lambda inputs: inputs["x"].copy_(inputs["x0"]),
        notes=notes + NOTES,
    )


def _inputs(w: Workload, config: Config, seeded: bool) -> Inputs:
    """Synthetic operands from ``config.seed``: x standard normal (a sample in the middle of the
    loop), the scores -x-like (standard normal, scaled by 1/2), the noise standard normal."""
    g = torch.Generator().manual_seed(config.seed)

    def draw(scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(w.shape, generator=g) * scale).to(device=config.device, dtype=config.dtype)

    inputs: Inputs = {"x0": draw(), "s1": draw(0.5), "s2": draw(0.5)}
    inputs["x"] = inputs["x0"].clone()
    if not seeded:
        inputs["z1"], inputs["z2"] = draw(), draw()
    return inputs


def _reference(the_sde: sde.SDE, inputs: Inputs, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The float32 reference PC step on the pristine inputs with the noise z1, z2."""
    x0, s1, s2 = (inputs[k].float() for k in ("x0", "s1", "s2"))
    x, _ = ref.langevin_step(x0, s1, SNR, the_sde, T, z1.float())
    return ref.reverse_diffusion_step(x, s2, T, the_sde, z2.float())[0]


def _philox_noise(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The two noises diffcore's seeded step draws: the stream at ``OFFSET`` and one step later."""
    x0 = inputs["x0"]
    stride = (x0.numel() + 3) // 4
    return tuple(diffcore.random.randn(*x0.shape, seed=SEED, offset=OFFSET + k * stride, device=x0.device)
                 for k in (0, 1))


def _check(the_sde: sde.SDE, dtype: torch.dtype, seeded: bool, philox: bool):
    """Given noise: the float32 reference. Seeded: diffcore equals the reference fed its Philox
    stream; every provider differs from that by noise of the step's scale."""
    def expected(inputs: Inputs) -> torch.Tensor:
        if "expected" not in inputs:
            z = (inputs["z1"], inputs["z2"]) if not seeded else _philox_noise(inputs)
            inputs["expected"] = _reference(the_sde, inputs, *z)
        return inputs["expected"]

    def implied_noise(inputs: Inputs, out: torch.Tensor) -> str | None:
        """Two draws of the step differ by ``a sqrt(2 eps) (z1 - z1') + G (z2 - z2')`` (the
        corrector's eps depends on the draw only through the batch-mean noise norm, to ~1e-4)."""
        z1, _ = _philox_noise(inputs)
        s1 = inputs["s1"].float()
        alpha = float(ref.langevin_alpha(the_sde, torch.tensor([T], dtype=torch.float64)))
        eps = 2 * alpha * (SNR * z1.norm(dim=-1).mean() / s1.norm(dim=-1).mean()) ** 2
        a, _, G = (float(v) for v in the_sde.reverse_diffusion_coefficients(T))
        sigma = (2 * (a * a * 2 * eps + G * G)) ** 0.5
        diff = (out.float() - expected(inputs)) / sigma
        slack = 0.0 if dtype == torch.float32 else 2e-2
        return not_standard_normal(diff, "(out - reference with diffcore's noise) / its scale", slack)

    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        if not seeded or philox:
            return mismatch(out, expected(inputs), dtype)
        return implied_noise(inputs, out)

    return check
