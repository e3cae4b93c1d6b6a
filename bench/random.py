"""The Philox normal stream alone: ``diffcore.random.randn_`` / ``randn`` against torch's generator.

The noise of one seeded step, drawn by itself: every registered ``random_normal`` implementation
(checked against the reference Philox on the first and last elements, and as standard normal),
torch's ``Tensor.normal_`` / ``torch.randn`` as people draw noise, and their ``torch.compile``
forms (Inductor's generator). Bytes the op must move: the output, written once.
"""

from __future__ import annotations

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
from diffcore.reference.random import normal as philox_normal

FAMILY = "random"
DESCRIPTION = "the Philox normal stream randn_ / randn vs torch's generator"
OP = "randn"
SEED, OFFSET = 1234, 0
CHECK_ELEMENTS = 8192  # compared with the reference Philox at each end of the output

TARGETS: list[Target] = []

NOTES = [
    "randn rows: the baselines draw from torch's generators (eager: ATen's, compiled: Inductor's), so their "
    "values are checked as standard normal, not equal; diffcore's equal the reference Philox",
]


def workloads(suite: str) -> list[Workload]:
    if suite == "smoke":
        return [Workload("smoke", (3, 1001), "tiny, for the test suite")]
    book = Workload("amazon-book", (400, 94949), "the noise of one seeded Amazon-book step")
    if suite == "full":
        return [book, Workload("ml-1m", (400, 2810), "the noise of one seeded ML-1M step")]
    return [book]


def cases(config: Config) -> list[Case]:
    return [_case(w, config) for w in workloads(config.suite)]


def _case(w: Workload, config: Config) -> Case:
    shape, dtype, device = w.shape, config.dtype, config.device

    def fill(inputs: Inputs):
        out = inputs["out"]
        return lambda: diffcore.random.randn_(out, seed=SEED, offset=OFFSET)

    def draw(inputs: Inputs):
        return lambda: diffcore.random.randn(*shape, seed=SEED, offset=OFFSET, dtype=dtype, device=device)

    check = _check(dtype)
    providers, notes = implementation_providers(
        "random_normal", config, calls={ALLOCATING: draw, IN_PLACE: fill}, checks={ALLOCATING: check, IN_PLACE: check},
        numel=w.numel,
    )

    def randn():
        return torch.randn(shape, dtype=dtype, device=device)

    def normal_(out):
        return out.normal_()

    def out_arg(inputs: Inputs) -> tuple:
        return (inputs["out"],)

    def eager_fill(inputs: Inputs):
        out = inputs["out"]
        return lambda: out.normal_()

    providers += [
        Provider("torch.randn", ALLOCATING, setup=lambda inputs: randn, check=_normal_check, role=EAGER),
        Provider("torch Tensor.normal_", IN_PLACE, setup=eager_fill, check=_normal_check),
        compiled_provider("torch.compile(randn)", ALLOCATING, randn, lambda inputs: (), config, role=COMPILE,
                          check=_normal_check),
        compiled_provider("torch.compile(normal_)", IN_PLACE, normal_, out_arg, config, role=COMPILE_IN_PLACE,
                          check=_normal_check, result=lambda inputs, _: inputs["out"]),
    ]
    elem = torch.empty((), dtype=dtype).element_size()
    return Case(
        FAMILY, OP, w, "seeded", bytes_moved=w.numel * elem,
        make_inputs=lambda: {"out": torch.zeros(shape, dtype=dtype, device=device)},
        providers=providers,
        reset=lambda inputs: inputs["out"].zero_(),
        notes=notes + NOTES,
    )


def _check(dtype: torch.dtype):
    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        flat = out.reshape(-1)
        n = flat.numel()
        k = min(CHECK_ELEMENTS, n)
        first = (n - k) // 4  # the Philox counter of the last slice's first element
        for start, expected in ((0, philox_normal(k, SEED, OFFSET)),
                                (4 * first, philox_normal(n - 4 * first, SEED, OFFSET + first))):
            error = mismatch(flat[start:start + expected.numel()], expected.to(out.device), dtype,
                             what=f"elements {start}..{start + expected.numel() - 1} vs the reference Philox")
            if error:
                return error
        return _normal_check(inputs, out)

    return check


def _normal_check(inputs: Inputs, out: torch.Tensor) -> str | None:
    return not_standard_normal(out, "values", slack=0.0 if out.dtype == torch.float32 else 2e-3)
