"""End-to-end inference of existing recommenders, with and without diffcore.

The original code is the plain-torch transcription in ``examples/models.py`` (DiffRec's
``GaussianDiffusion`` and DNN, LightGCN-PyTorch's ``LightGCN``, DreamRec's guided loop and
denoiser), run as people run it; the diffcore rows run the same objects through diffcore's drop-in
paths: ``diffcore.compat.diffrec.accelerate`` / ``compat.lightgcn.accelerate`` (applied to a
shallow copy of the object, so the original stays runnable in the same process),
``diffcore.nn.DreamRecSampler`` and ``diffcore.retrieval.topk``. Every diffcore row is checked
against the original on the same inputs and the same seeded noise before anything is timed: the
same top-k values, and each returned item's original score equal to the original's value at that
rank (a near-tie may pick the other item); DiffRec's predictions and DreamRec's samples equal to
float32 rounding.

Rows (ops), float32; per user batch:
- ``diffrec``: DiffRec's evaluation of one batch: ``p_sample`` (x0 prediction, T = 5, DiffRec's
  ``sampling_steps = 0`` and ``sampling_noise = False``), the batch's history masked with
  ``-inf``, top-100. diffcore: ``accelerate(diffusion)``, ``retrieval.topk(prediction, k,
  exclude=history)``.
- ``lightgcn``: ``computer()`` on the graph, the scores of a batch of users against every item,
  history masked, top-20. diffcore: ``accelerate(model)``, ``retrieval.topk(queries, k,
  items=..., exclude=...)`` (the scores are never materialised).
- ``dreamrec``: DreamRec's 500-step guided sampling (w = 2, float32 tables, noise for t > 0;
  DreamRec's default denoiser, ``mlp1``). diffcore: ``DreamRecSampler`` with one batched denoiser
  call per step over ``[h; h_null]``, and with DreamRec's two calls; both draw ``randn_like`` as
  DreamRec does. One more row, opt-in seeded noise: ``DreamRecSampler(..., batched=True)(h,
  h_null, x_T, seed=)``, its noise drawn inside the step kernel (Philox); checked against
  DreamRec's loop fed the same Philox stream (the target's row).
- ``topk``: the last step alone, from queries: ``queries @ items.T`` (+ mask) + ``torch.topk``
  vs ``retrieval.topk(queries, k, items=, exclude=)``.

Variants split the time at the user's denoiser: ``end to end``; ``outside the denoiser`` (the same
loop with a null denoiser that returns precomputed outputs of the right shapes, so the row times
exactly what the denoiser does not); ``inside the denoiser`` (the denoiser's calls of one
inference alone). LightGCN has no denoiser: all of its time is diffcore's to win; its two parts
are the sparse family's ``propagate`` rows and this family's ``topk`` rows.
Bytes (for the copy roofline): what the loop outside the denoiser reads and writes at the least.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

import diffcore
import diffcore.nn
from bench.core import ALLOCATING, EAGER, Case, Config, Inputs, Provider, Target, Workload, mismatch
from bench.sparse import power_law_interactions
from diffcore import retrieval
from diffcore.compat import diffrec, lightgcn
from diffcore.reference.random import normal as philox_normal
from examples import models

FAMILY = "e2e"
DESCRIPTION = "end-to-end inference (DiffRec, LightGCN, DreamRec, top-k) as people run it vs through diffcore"
END_TO_END, OUTSIDE, INSIDE = "end to end", "outside the denoiser", "inside the denoiser"
SEED = 7  # torch.manual_seed before every sampling run: each provider draws the same noise

DIFFREC_ORIGINAL = "DiffRec: p_sample + mask + torch.topk"
DIFFREC_DIFFCORE = "diffcore: compat.diffrec + retrieval.topk"
DIFFREC_DENOISER = "the user's DNN (T calls)"
LIGHTGCN_ORIGINAL = "LightGCN-PyTorch: COO computer() + matmul + mask + torch.topk"
LIGHTGCN_DIFFCORE = "diffcore: compat.lightgcn + retrieval.topk(queries)"
DREAMREC_ORIGINAL = "DreamRec loop (eager)"
DREAMREC_BATCHED = "diffcore: DreamRecSampler(batched)"
DREAMREC_TWO_CALLS = "diffcore: DreamRecSampler (two calls)"
DREAMREC_SEEDED = "diffcore: DreamRecSampler(batched)(seed=); Philox noise (opt-in)"
DREAMREC_DENOISER_TWO = "two denoiser calls per step (DreamRec)"
DREAMREC_DENOISER_BATCHED = "one batched denoiser call per step"
TOPK_ORIGINAL = "torch: queries @ items.T + torch.topk"
TOPK_ORIGINAL_MASKED = "torch: queries @ items.T + mask + torch.topk"
TOPK_DIFFCORE = "diffcore: retrieval.topk(queries)"


@dataclass(frozen=True)
class DiffRecSetting:
    workload: Workload  # shape (batch, n_items)
    steps: int
    hidden: int  # the DNN's dims=[hidden]
    k: int
    per_user: int  # interactions per user in the batch (power-law)
    variants: tuple[str, ...] = (END_TO_END, OUTSIDE, INSIDE)


@dataclass(frozen=True)
class LightGCNSetting:
    workload: Workload  # shape (n_users + n_items, d)
    n_users: int
    n_items: int
    nnz: int
    batch: int  # users scored per call
    k: int


@dataclass(frozen=True)
class DreamRecSetting:
    workload: Workload  # shape (batch, hidden)
    steps: int
    w: float


@dataclass(frozen=True)
class TopkSetting:
    workload: Workload  # shape (batch, n_items)
    dim: int
    n_users: int  # the graph the histories come from
    nnz: int
    ks: tuple[int, ...]


@dataclass(frozen=True)
class Settings:
    diffrec: list[DiffRecSetting] = field(default_factory=list)
    lightgcn: list[LightGCNSetting] = field(default_factory=list)
    dreamrec: list[DreamRecSetting] = field(default_factory=list)
    topk: list[TopkSetting] = field(default_factory=list)


AMAZON_BOOK = DiffRecSetting(
    Workload("amazon-book", (400, 94_949), "DiffRec: DNN [1000], T = 5, x0, no sampling noise, top-100"),
    steps=5, hidden=1000, k=100, per_user=29,
)
ML_1M = DiffRecSetting(Workload("ml-1m", (400, 2_810), "DiffRec: DNN [1000], T = 40, x0, no sampling noise, top-100"),
                       steps=40, hidden=1000, k=100, per_user=100)
GOWALLA = LightGCNSetting(
    Workload("gowalla", (29_858 + 40_981, 64), "LightGCN, 3 layers; 2,048 users scored against 40,981 items, top-20"),
    n_users=29_858, n_items=40_981, nnz=810_128, batch=2_048, k=20,
)
DREAMREC = DreamRecSetting(Workload("dreamrec", (256, 64), "DreamRec: T = 500, w = 2, float32 tables"), steps=500,
                           w=2.0)
GOWALLA_TOPK = TopkSetting(
    Workload("gowalla", (2_048, 40_981), "2,048 queries of d = 64 against LightGCN's 40,981 Gowalla items"),
    dim=64, n_users=29_858, nnz=810_128, ks=(20, 100),
)
SMOKE = Settings(
    diffrec=[DiffRecSetting(Workload("smoke", (4, 300), "tiny, for the test suite"), steps=5, hidden=16, k=10,
                            per_user=20)],
    lightgcn=[LightGCNSetting(Workload("smoke", (100, 8), "tiny, for the test suite"), n_users=40, n_items=60, nnz=300,
                              batch=16, k=5)],
    dreamrec=[DreamRecSetting(Workload("smoke", (4, 8), "tiny, for the test suite"), steps=10, w=2.0)],
    topk=[TopkSetting(Workload("smoke", (16, 300), "tiny, for the test suite"), dim=8, n_users=40, nnz=400, ks=(5,))],
)

TARGETS = [
    Target(FAMILY, "diffrec", "amazon-book", AMAZON_BOOK.workload.shape, OUTSIDE, ALLOCATING, DIFFREC_DIFFCORE,
           "vs_eager", 10.0),
    Target(FAMILY, "lightgcn", "gowalla", GOWALLA.workload.shape, END_TO_END, ALLOCATING, LIGHTGCN_DIFFCORE,
           "vs_eager", 4.0),
    Target(FAMILY, "dreamrec", "dreamrec", DREAMREC.workload.shape, END_TO_END, ALLOCATING, DREAMREC_SEEDED,
           "vs_eager", 1.5),
] + [
    Target(FAMILY, "topk", "gowalla", GOWALLA_TOPK.workload.shape, _variant, ALLOCATING, TOPK_DIFFCORE, "vs_eager", 2.0)
    for _variant in ("k = 20", "k = 20, history masked", "k = 100", "k = 100, history masked")
]

NOTES = [
    "e2e: the diffcore rows run the original objects through diffcore's drop-in paths; `outside the denoiser` "
    "runs the same loops with a null denoiser (precomputed outputs), `inside the denoiser` the denoiser's calls "
    "alone; end to end is about their sum",
    "e2e: histories are precomputed for both sides: (rows, cols) index pairs for the original's mask, a CSR for "
    "`retrieval.topk(exclude=)`",
    "e2e: no torch.compile rows; the loops are timed as people run them (compiled steps: the diffusion family)",
    "e2e lightgcn: no user denoiser, so no split; its two parts are timed alone in the sparse family's propagate "
    "rows (Gowalla, forward) and this family's topk rows",
    "e2e dreamrec: `DreamRecSampler(...)(seed=)` draws its noise from diffcore's Philox stream inside the step "
    "(opt-in), not the original's `randn_like`; it is checked against DreamRec's loop fed that stream. The target "
    "is on that row: with `randn_like` parity the time outside the denoiser is ATen's generator and the "
    "(B, d) noise tensor each step, the same work as the original's",
]


def settings(suite: str) -> Settings:
    if suite == "smoke":
        return SMOKE
    if suite == "quick":  # DiffRec's DNN costs seconds per call at Amazon-book: timed alone in the full suite
        return Settings([replace(AMAZON_BOOK, variants=(END_TO_END, OUTSIDE))], [GOWALLA], [DREAMREC], [GOWALLA_TOPK])
    return Settings([AMAZON_BOOK, ML_1M], [GOWALLA], [DREAMREC], [GOWALLA_TOPK])


def cases(config: Config) -> list[Case]:
    s = settings(config.suite)
    notes = NOTES + _topk_backend_note(config)
    if config.suite == "quick":
        notes = notes + ["e2e quick: DiffRec's `inside the denoiser` row (5 DNN calls of seconds each at "
                         "Amazon-book) runs in the full suite only; inside = end to end - outside"]
    out = [_diffrec_case(d, v, config) for d in s.diffrec for v in d.variants]
    out += [_lightgcn_case(g, config) for g in s.lightgcn]
    out += [_dreamrec_case(d, v, config) for d in s.dreamrec for v in (END_TO_END, OUTSIDE, INSIDE)]
    out += [_topk_case(t, k, masked, config) for t in s.topk for k in t.ks for masked in (False, True)]
    unavailable = _unavailable(config)
    for case in out:
        case.notes = notes
        for p in case.providers:
            p.unavailable = p.unavailable or unavailable
    return out


def _topk_backend_note(config: Config) -> list[str]:
    reason = diffcore.implementations("retrieval_topk")["cpu"].reason(config.device)
    if config.device.type != "cpu" or reason is None:
        return []
    return [f"e2e: `retrieval.topk` ran the PyTorch reference (a full stable sort), not a kernel: {reason}"]


# --- checks ---------------------------------------------------------------------------------------
def _original_check(inputs: Inputs, out) -> str | None:
    """The original defines the expected output: kept for the other providers' checks."""
    inputs["expected"] = out
    return None


def _expected(inputs: Inputs):
    if "expected" not in inputs:  # the original failed or was filtered out: run it once here
        inputs["expected"] = inputs["original"]()
    return inputs["expected"]


def _topk_mismatch(values: torch.Tensor, ids: torch.Tensor, expected, dtype: torch.dtype) -> str | None:
    """The original's top-k values; each returned item's original (masked) score equals the
    original's value at its rank (so a near-tie may pick the other item); no item twice."""
    ref_values, _, ref_scores = expected[:3]
    error = mismatch(values, ref_values, dtype, what="top-k values")
    if error is None:
        error = mismatch(ref_scores.gather(1, ids), ref_values, dtype, what="the original's scores of the top-k ids")
    if error is None and bool((ids.sort(1).values.diff(dim=1) == 0).any()):
        error = "top-k ids: an item appears twice in a row"
    return error


def _diffrec_check(config: Config):
    def check(inputs: Inputs, out) -> str | None:
        expected = _expected(inputs)
        values, ids, prediction = out
        unmasked = torch.isfinite(expected[2])
        error = mismatch(torch.where(unmasked, prediction, 0.0), torch.where(unmasked, expected[2], 0.0),
                         config.dtype, what="prediction (p_sample)")
        return error or _topk_mismatch(values, ids, expected, config.dtype)

    return check


def _topk_check(config: Config):
    def check(inputs: Inputs, out) -> str | None:
        return _topk_mismatch(out[0], out[1], _expected(inputs), config.dtype)

    return check


def _sample_check(config: Config):
    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        return mismatch(out, _expected(inputs), config.dtype, what="x_0")

    return check


def _history(users: torch.Tensor, items: torch.Tensor, batch: int):
    """The interactions of users ``0 .. batch-1``: ``(rows, cols)`` index pairs (what the original
    masks with) and ``(crow, col)``, the same as a CSR (what ``retrieval.topk`` excludes)."""
    keep = users < batch
    rows, cols = users[keep], items[keep]
    order = torch.argsort(rows * (int(items.max()) + 1) + cols)
    rows, cols = rows[order], cols[order]
    crow = torch.zeros(batch + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=batch), 0)
    return (rows, cols), (crow, cols)


@functools.lru_cache(maxsize=2)
def _interactions(n_users: int, n_items: int, nnz: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return power_law_interactions(n_users, n_items, nnz, seed)


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def _fixed(config: Config, *shape: int, offset: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(config.seed + 100 + offset)
    return torch.empty(shape).uniform_(-1, 1, generator=g).to(config.dtype)


def _unavailable(config: Config) -> str | None:
    if config.dtype != torch.float32 or config.device.type != "cpu":
        return "the e2e rows run the original models as people do: float32 on the CPU (--dtype float32)"
    return None


# --- DiffRec --------------------------------------------------------------------------------------
def _diffrec_case(s: DiffRecSetting, variant: str, config: Config) -> Case:
    B, N = s.workload.shape
    elem = torch.empty((), dtype=config.dtype).element_size()

    def make_inputs() -> Inputs:
        users, items = _interactions(B, N, B * s.per_user, config.seed)
        pairs, (crow, col) = _history(users, items, B)
        batch = torch.zeros(B, N)
        batch[pairs] = 1.0  # DiffRec's x_start: the users' interaction rows
        diffusion = models.GaussianDiffusion(models.ModelMeanType.START_X, 0.1, 1e-4, 0.02, s.steps)
        fast = copy.copy(diffusion)
        inputs: Inputs = {"batch": batch, "pairs": pairs, "history": (crow, col), "diffusion": diffusion,
                          "fast": fast, "handle": diffrec.accelerate(fast)}
        if variant == OUTSIDE:
            model_out = _fixed(config, B, N)
            inputs["model"] = lambda x_t, t: model_out
        else:
            torch.manual_seed(config.seed)
            inputs["model"] = models.DNN(N, s.hidden).eval()
            inputs["t"] = [torch.tensor([i] * B) for i in reversed(range(s.steps))]
        inputs["original"] = original(inputs)
        return inputs

    def original(inputs: Inputs):
        diffusion, model, batch, pairs = inputs["diffusion"], inputs["model"], inputs["batch"], inputs["pairs"]
        return _no_grad(lambda: models.diffrec_recommend(diffusion, model, batch, pairs, s.k))

    def accelerated(inputs: Inputs):
        fast, model, batch, history = inputs["fast"], inputs["model"], inputs["batch"], inputs["history"]

        def run():
            prediction = fast.p_sample(model, batch, 0, False)
            values, ids = retrieval.topk(prediction, s.k, exclude=history)
            return values, ids, prediction

        return _no_grad(run)

    def denoiser_alone(inputs: Inputs):
        model, batch, ts = inputs["model"], inputs["batch"], inputs["t"]

        def run():
            for t in ts:
                out = model(batch, t)
            return out

        return _no_grad(run)

    if variant == INSIDE:
        providers = [Provider(DIFFREC_DENOISER, ALLOCATING, setup=denoiser_alone, check=None, role=EAGER)]
    else:
        providers = [
            Provider(DIFFREC_ORIGINAL, ALLOCATING, setup=original, check=_original_check, role=EAGER),
            Provider(DIFFREC_DIFFCORE, ALLOCATING, setup=accelerated, check=_diffrec_check(config)),
        ]
    return Case(FAMILY, "diffrec", s.workload, variant, bytes_moved=(3 * s.steps + 1) * B * N * elem,
                make_inputs=make_inputs, providers=providers)


# --- LightGCN -------------------------------------------------------------------------------------
def _lightgcn_case(s: LightGCNSetting, config: Config) -> Case:
    n, d = s.workload.shape
    elem = torch.empty((), dtype=config.dtype).element_size()

    def make_inputs() -> Inputs:
        users, items = _interactions(s.n_users, s.n_items, s.nnz, config.seed)
        model = models.LightGCN(s.n_users, s.n_items, users, items, dim=d, seed=config.seed)
        fast = copy.copy(model)
        pairs, history = _history(users, items, s.batch)
        inputs: Inputs = {"model": model, "fast": fast, "handle": lightgcn.accelerate(fast), "pairs": pairs,
                          "history": history, "users": torch.arange(s.batch)}
        inputs["original"] = original(inputs)
        return inputs

    def original(inputs: Inputs):
        model, users, pairs = inputs["model"], inputs["users"], inputs["pairs"]
        return _no_grad(lambda: models.lightgcn_recommend(model, users, pairs, s.k))

    def accelerated(inputs: Inputs):
        fast, users, history = inputs["fast"], inputs["users"], inputs["history"]

        def run():
            all_users, all_items = fast.computer()
            return retrieval.topk(all_users[users], s.k, items=all_items, exclude=history)

        return _no_grad(run)

    per_layer = s.nnz * 2 * (4 + elem) + (n + 1) * 8 + 2 * n * d * elem
    return Case(
        FAMILY, "lightgcn", s.workload, END_TO_END,
        bytes_moved=3 * per_layer + (s.batch + s.n_items) * d * elem,
        make_inputs=make_inputs,
        providers=[
            Provider(LIGHTGCN_ORIGINAL, ALLOCATING, setup=original, check=_original_check, role=EAGER),
            Provider(LIGHTGCN_DIFFCORE, ALLOCATING, setup=accelerated, check=_topk_check(config)),
        ],
    )


# --- DreamRec -------------------------------------------------------------------------------------
def _dreamrec_case(s: DreamRecSetting, variant: str, config: Config) -> Case:
    B, d = s.workload.shape
    elem = torch.empty((), dtype=config.dtype).element_size()

    def make_inputs() -> Inputs:
        torch.manual_seed(config.seed)
        model = models.DreamRecDenoiser(d).eval()
        diffusion = models.DreamRecDiffusion(s.steps, s.w)
        h = _fixed(config, B, d, offset=1)
        null = model.none_embedding.weight.detach()
        inputs: Inputs = {"diffusion": diffusion, "schedule": diffcore.Schedule(diffusion.betas), "h": h,
                          "null": null}
        if variant == OUTSIDE:  # null denoisers: precomputed conditional and unconditional outputs
            cond, uncond = _fixed(config, B, d, offset=2), _fixed(config, B, d, offset=3)
            both = torch.cat([cond, uncond])
            inputs["forward"] = lambda x, c, t: cond if c is h else uncond
            inputs["forward_uncon"] = lambda x, t: uncond
            inputs["batched"] = lambda x, c, t: both
            inputs["pair"] = lambda x, t: (cond, uncond)
        else:
            inputs["forward"] = inputs["batched"] = model.forward
            inputs["forward_uncon"] = model.forward_uncon
            x = _fixed(config, B, d, offset=4)
            c2 = torch.cat([h, null.expand(B, -1)])
            inputs.update(model=model, x=x, x2=torch.cat([x, x]), c2=c2,
                          t=[torch.full((B,), n, dtype=torch.long) for n in reversed(range(s.steps))])
            inputs["pair"] = lambda x, t: model.forward(torch.cat([x, x]), c2, torch.cat([t, t])).chunk(2)
        inputs["original"] = original(inputs)
        return inputs

    def original(inputs: Inputs):
        diffusion, forward, forward_uncon, h = (inputs[k] for k in ("diffusion", "forward", "forward_uncon", "h"))

        def run():
            torch.manual_seed(SEED)
            return diffusion.sample(forward, forward_uncon, h)

        return _no_grad(run)

    def sampler(batched: bool):
        def setup(inputs: Inputs):
            denoiser = inputs["batched"] if batched else inputs["forward"]
            sample = diffcore.nn.DreamRecSampler(denoiser, inputs["schedule"], s.w, batched=batched)
            h, null = inputs["h"], inputs["null"]

            def run():
                torch.manual_seed(SEED)
                return sample(h, null)

            return _no_grad(run)

        return setup

    def seeded(inputs: Inputs):
        sample = diffcore.nn.DreamRecSampler(inputs["batched"], inputs["schedule"], s.w, batched=True)
        h, null = inputs["h"], inputs["null"]

        def run():
            torch.manual_seed(SEED)
            x_T = torch.randn_like(h)  # the start as DreamRec draws it; the steps' noise from Philox
            return sample(h, null, x_T, seed=SEED)

        return _no_grad(run)

    def seeded_check(inputs: Inputs, out: torch.Tensor) -> str | None:
        """Against DreamRec's loop fed the Philox stream: step k (t = T - k) reads counters from
        ``k ceil(B d / 4)`` on (the sampler's offsets, as ``diffcore.sample``'s); the start is ``randn_like(h)``."""
        if "expected_philox" not in inputs:
            stride = (B * d + 3) // 4
            z = philox_normal(4 * stride * s.steps, SEED, stride).reshape(s.steps, 4 * stride)[:, :B * d]
            diffusion, forward, forward_uncon, h = (inputs[k] for k in ("diffusion", "forward", "forward_uncon", "h"))
            torch.manual_seed(SEED)
            with torch.no_grad():
                inputs["expected_philox"] = diffusion.sample(
                    forward, forward_uncon, h, noise=lambda n: z[s.steps - n - 1].reshape(B, d))
        return mismatch(out, inputs["expected_philox"], config.dtype, what="x_0 (Philox noise)")

    def denoiser_alone(batched: bool):
        def setup(inputs: Inputs):
            model, x, h, ts = inputs["model"], inputs["x"], inputs["h"], inputs["t"]
            x2, c2 = inputs["x2"], inputs["c2"]
            t2 = [torch.cat([t, t]) for t in ts]

            def run():  # the last step's (conditional, unconditional) outputs
                if batched:
                    for t in t2:
                        out = model.forward(x2, c2, t)
                    return out.chunk(2)
                for t in ts:
                    cond = model.forward(x, h, t)
                    uncond = model.forward_uncon(x, t)
                return cond, uncond

            return _no_grad(run)

        return setup

    def denoiser_check(inputs: Inputs, out: tuple[torch.Tensor, torch.Tensor]) -> str | None:
        """The last step's outputs against DreamRec's two calls at t = 0 (the batched call must give
        the same rows)."""
        model, x, h, t = inputs["model"], inputs["x"], inputs["h"], inputs["t"][-1]
        with torch.no_grad():
            expected = torch.cat([model.forward(x, h, t), model.forward_uncon(x, t)])
        return mismatch(torch.cat(out), expected, config.dtype, what="denoiser outputs at t = 0")

    if variant == INSIDE:
        providers = [
            Provider(DREAMREC_DENOISER_TWO, ALLOCATING, setup=denoiser_alone(False), check=denoiser_check,
                     role=EAGER),
            Provider(DREAMREC_DENOISER_BATCHED, ALLOCATING, setup=denoiser_alone(True), check=denoiser_check),
        ]
    else:
        check = _sample_check(config)
        providers = [
            Provider(DREAMREC_ORIGINAL, ALLOCATING, setup=original, check=_original_check, role=EAGER),
            Provider(DREAMREC_BATCHED, ALLOCATING, setup=sampler(True), check=check),
            Provider(DREAMREC_TWO_CALLS, ALLOCATING, setup=sampler(False), check=check),
            Provider(DREAMREC_SEEDED, ALLOCATING, setup=seeded, check=seeded_check),
        ]
    return Case(FAMILY, "dreamrec", s.workload, variant, bytes_moved=5 * s.steps * B * d * elem,
                make_inputs=make_inputs, providers=providers)


# --- top-k ----------------------------------------------------------------------------------------
def _topk_case(s: TopkSetting, k: int, masked: bool, config: Config) -> Case:
    B, n_items = s.workload.shape
    elem = torch.empty((), dtype=config.dtype).element_size()

    def make_inputs() -> Inputs:
        g = torch.Generator().manual_seed(config.seed + 5)
        queries = torch.randn(B, s.dim, generator=g).to(config.dtype)
        items = torch.randn(n_items, s.dim, generator=g).to(config.dtype)
        inputs: Inputs = {"queries": queries, "items": items, "pairs": None, "history": None}
        if masked:
            users, item_ids = _interactions(s.n_users, n_items, s.nnz, config.seed)
            inputs["pairs"], inputs["history"] = _history(users, item_ids, B)
        inputs["original"] = original(inputs)
        return inputs

    def original(inputs: Inputs):
        queries, items, pairs = inputs["queries"], inputs["items"], inputs["pairs"]

        def run():
            scores = queries @ items.T
            if pairs is not None:
                scores[pairs] = float("-inf")
            values, ids = torch.topk(scores, k)
            return values, ids, scores

        return _no_grad(run)

    def accelerated(inputs: Inputs):
        queries, items, history = inputs["queries"], inputs["items"], inputs["history"]
        return lambda: retrieval.topk(queries, k, items=items, exclude=history)

    return Case(
        FAMILY, "topk", s.workload, f"k = {k}" + (", history masked" if masked else ""),
        bytes_moved=(B + n_items) * s.dim * elem + B * k * (elem + 8),
        make_inputs=make_inputs,
        providers=[
            Provider(TOPK_ORIGINAL_MASKED if masked else TOPK_ORIGINAL, ALLOCATING, setup=original,
                     check=_original_check, role=EAGER),
            Provider(TOPK_DIFFCORE, ALLOCATING, setup=accelerated, check=_topk_check(config)),
        ],
    )

