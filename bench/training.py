"""Training-side losses: DiffRec's loss + Lt_history update, LightGCN's BPR, SGL's InfoNCE.

Rows per workload:
- ``diffusion_loss`` (DiffRec, x0 model, reweighting on, importance-sampled t and pt from a warm
  sampler): variant "loss + Lt update" is ``training_losses`` from the model output on: the per-row
  weighted loss, the ``Lt_history`` update, the division by pt; "+ backward" adds d loss.mean() /
  d model_out. Providers: every registered ``training_diffusion_loss`` implementation (with the
  same implementation of the history update), DiffRec's eager code (its loop over the batch), and
  ``torch.compile`` of the loss with that loop left eager (Dynamo cannot trace a loop whose branch
  reads tensor values without breaking the graph at every row). Bytes: model_out and x0 read. The
  forward's same-bytes row (bench.core.SAME_BYTES) reads them with ``torch.dot`` (BLAS).
- ``bpr_loss`` on the Gowalla-sized tables (29,858 users, 40,981 items, d = 64, batch 2,048,
  LightGCN's L2 term on the layer-0 tables): forward, and forward+backward to all four tables.
  Providers: the registered implementations, LightGCN-PyTorch's ``getEmbedding`` + ``bpr_loss``
  + ``weight_decay * reg_loss`` (the eager gather-dot-logsigmoid), and its ``torch.compile``.
  Bytes: the gathered rows (6 B d) read; with the backward, the four dense gradients written.
- ``info_nce`` on 2,048 x 64 (cosine, tau = 0.2): forward and forward+backward, against SELFRec's
  ``InfoNCE`` eager and compiled. Bytes: a and b read (with the backward, their gradients written).
All are checked against the float32 reference (the item-table gradient for BPR) before timing.
Forward rows time every registered implementation (``diffcore.use``; the one the dispatcher runs
through the public call, see ``bench.core.implementation_providers``); rows with a backward time the
public call through the dispatcher, as a training step runs it (like bench.sparse).
"""

from __future__ import annotations

import torch

import diffcore
from bench.core import (
    ALLOCATING,
    COMPILE,
    EAGER,
    SAME_BYTES,
    Case,
    Config,
    Inputs,
    Provider,
    Target,
    Workload,
    compiled_provider,
    dispatched,
    implementation_providers,
    mismatch,
)
from diffcore.reference import training as ref

FAMILY = "training"
DESCRIPTION = "DiffRec's loss + Lt_history update, LightGCN's BPR, SGL's InfoNCE (forward and backward)"
LOSS, BPR, NCE = "diffusion_loss", "bpr_loss", "info_nce"
FORWARD, BACKWARD = "forward", "forward+backward"
LOSS_UPDATE, LOSS_BACKWARD = "loss + Lt update", "loss + Lt update + backward"
WEIGHT_DECAY = 1e-4  # LightGCN's default decay
TEMPERATURE = 0.2  # SGL's ssl_temp
ALPHA = 0.5  # BPR batches: P(user of rank r) ~ r^-ALPHA, likewise positive items (bench.sparse's graphs)


def _diffrec_schedule(steps: int):
    # DiffRec's linear-var schedule with its command-line defaults (noise scale 0.1, min 1e-4, max 0.02)
    return lambda: diffcore.Schedule.linear_var(steps, 0.1, 1e-4, 0.02)


AMAZON_BOOK = (Workload("amazon-book", (400, 94949), "DiffRec, T = 5"), _diffrec_schedule(5))
ML_1M = (Workload("ml-1m", (400, 2810), "DiffRec, T = 40"), _diffrec_schedule(40))
GOWALLA = Workload("gowalla", (2048, 64), "29,858 users x 40,981 items, d = 64, batch 2,048 (LightGCN)")
GOWALLA_TABLES = (29_858, 40_981)
NCE_BATCH = Workload("batch-2048", (2048, 64), "SGL's in-batch InfoNCE, cosine, tau = 0.2")
SMOKE_LOSS = (Workload("smoke", (3, 1001), "tiny, for the test suite"), _diffrec_schedule(5))
SMOKE_BPR, SMOKE_TABLES = Workload("smoke", (16, 8), "tiny, for the test suite"), (40, 60)
SMOKE_NCE = Workload("smoke", (16, 8), "tiny, for the test suite")

TARGETS = [
    Target(FAMILY, LOSS, "amazon-book", AMAZON_BOOK[0].shape, LOSS_UPDATE, ALLOCATING, "diffcore:cpu", "vs_eager",
           10.0),
    Target(FAMILY, BPR, "gowalla", GOWALLA.shape, BACKWARD, ALLOCATING, "diffcore:cpu", "vs_eager", 3.0),
]

NOTES = [
    "diffusion_loss rows: the compiled baseline compiles DiffRec's loss; its Lt_history loop stays eager (a "
    "branch on tensor values per row breaks a Dynamo graph at every row)",
    "bpr_loss forward+backward rows return the item table's gradient; all four tables' gradients are computed",
]


def cases(config: Config) -> list[Case]:
    smoke = config.suite == "smoke"
    loss_settings = [SMOKE_LOSS] if smoke else [AMAZON_BOOK, ML_1M]
    out = [_loss_case(w, s, config, backward) for w, s in loss_settings for backward in (False, True)]
    bpr, tables = (SMOKE_BPR, SMOKE_TABLES) if smoke else (GOWALLA, GOWALLA_TABLES)
    out += [_bpr_case(bpr, tables, config, variant) for variant in (FORWARD, BACKWARD)]
    nce = SMOKE_NCE if smoke else NCE_BATCH
    out += [_nce_case(nce, config, variant) for variant in (FORWARD, BACKWARD)]
    return out


def _diffcore_providers(op: str, config: Config, call, check, numel: int, backward: bool):
    """Forward rows: every registered implementation of ``op`` through ``diffcore.use``. Rows with a
    backward: the public call under autograd through the dispatcher (its kernel and its backward
    op), as a training step runs it; a forced implementation would copy each output into the
    registry's out form, a 150 MB copy for DiffRec's gradient."""
    if not backward:
        return implementation_providers(op, config, calls={ALLOCATING: call}, checks={ALLOCATING: check}, numel=numel)
    name = dispatched(config.device)
    reason = diffcore.implementations(op)[name].reason(config.device)
    return [Provider(f"diffcore:{name}", ALLOCATING, setup=call, check=check, unavailable=reason)], []


def _elem(config: Config) -> int:
    return torch.empty((), dtype=config.dtype).element_size()


# --- DiffRec's loss and Lt_history -----------------------------------------------------------------
def _loss_case(w: Workload, schedule_fn, config: Config, backward: bool) -> Case:
    schedule = schedule_fn().to(config.device)

    def diffcore_call(inputs: Inputs):
        m, x0, t, pt, sampler = inputs["m"], inputs["x0"], inputs["t"], inputs["pt"], inputs["sampler"]

        def run() -> torch.Tensor:
            loss = diffcore.training.diffusion_loss(m, x0, None, t, schedule)
            sampler.update(t, loss)
            loss = loss / pt
            if not backward:
                return loss
            (g,) = torch.autograd.grad(loss.mean(), m)
            return g

        return run

    check = _loss_check(schedule, backward, config.dtype, "sampler")
    baseline_check = _loss_check(schedule, backward, config.dtype, "lt")
    providers, notes = _diffcore_providers("training_diffusion_loss", config, diffcore_call, check, w.numel, backward)

    def diffrec_step(m, x0, noise, t, pt, lt_history, lt_count):
        loss = ref.training_losses(m, x0, noise, t, schedule, prediction="x0", reweight=True)
        return _lt_update_and_divide(loss, t, pt, lt_history, lt_count, m, backward)

    def args(inputs: Inputs) -> tuple:
        return (inputs["m"], inputs["x0"], inputs["noise"], inputs["t"], inputs["pt"], inputs["lt_history"],
                inputs["lt_count"])

    def eager(inputs: Inputs):
        a = args(inputs)
        return lambda: diffrec_step(*a)

    def finish(inputs: Inputs, loss: torch.Tensor) -> torch.Tensor:
        _, _, _, t, pt, lt_history, lt_count = args(inputs)
        return _lt_update_and_divide(loss, t, pt, lt_history, lt_count, inputs["m"], backward)

    providers += [
        Provider("DiffRec eager (training_losses + Lt loop)", ALLOCATING, setup=eager, check=baseline_check,
                 role=EAGER),
        compiled_provider("torch.compile(training_losses) + eager Lt loop", ALLOCATING,
                          lambda m, x0, noise, t: ref.training_losses(m, x0, noise, t, schedule),
                          lambda inputs: args(inputs)[:4], config, role=COMPILE, check=baseline_check, result=finish),
    ]
    if not backward:
        providers.append(Provider("same bytes: torch.dot(m, x0)", ALLOCATING, setup=_dot, check=None, role=SAME_BYTES))
    reads = 2 * w.numel * _elem(config)  # model_out and x0
    return Case(
        FAMILY, LOSS, w, LOSS_BACKWARD if backward else LOSS_UPDATE,
        bytes_moved=reads + (w.numel * _elem(config) if backward else 0),
        make_inputs=lambda: _loss_inputs(w, schedule, config, backward),
        providers=providers,
        reset=_reset_histories,
        notes=notes + NOTES[:1],
    )


def _dot(inputs: Inputs):
    """The loss's reads in one plain torch op: BLAS's dot product of model_out and x0."""
    m, x0 = inputs["m"].reshape(-1), inputs["x0"].reshape(-1)
    return lambda: torch.dot(m, x0)


def _lt_update_and_divide(loss, t, pt, lt_history, lt_count, m, backward: bool) -> torch.Tensor:
    """The rest of DiffRec's step after the loss: its Lt_history loop, ``/ pt`` (and d mean / d m)."""
    ref.update_lt_history(lt_history, lt_count, t, loss)
    loss = loss / pt
    return torch.autograd.grad(loss.mean(), m)[0] if backward else loss


def _loss_inputs(w: Workload, schedule: diffcore.Schedule, config: Config, backward: bool) -> Inputs:
    """DiffRec's batch: x0 binary interaction rows (1% density), the model output uniform in [0, 1],
    t and pt drawn by a warm importance sampler (every history full), as late in training."""
    g = torch.Generator().manual_seed(config.seed)
    B, N = w.shape
    x0 = (torch.rand(B, N, generator=g) < 0.01).to(device=config.device, dtype=config.dtype)
    m = torch.rand(B, N, generator=g).to(device=config.device, dtype=config.dtype).requires_grad_(backward)
    T = schedule.num_steps
    sampler = diffcore.training.TimestepSampler(T, "importance", device=config.device)
    warm_t = torch.arange(T).repeat(10).to(config.device)
    sampler.update(warm_t, torch.rand(10 * T, generator=g, dtype=torch.float64).to(config.device))
    t, pt = sampler.sample(B, torch.Generator(config.device).manual_seed(config.seed))
    history0 = (sampler.history.clone(), sampler.count.clone())
    return {"m": m, "x0": x0, "noise": None, "t": t, "pt": pt, "sampler": sampler, "history0": history0,
            "lt_history": history0[0].clone(), "lt_count": history0[1].clone()}


def _reset_histories(inputs: Inputs) -> None:
    """Both sides' Lt_history back to the warm state the inputs were made with."""
    history, count = inputs["history0"]
    for h, c in ((inputs["sampler"].history, inputs["sampler"].count), (inputs["lt_history"], inputs["lt_count"])):
        h.copy_(history)
        c.copy_(count)


def _loss_check(schedule: diffcore.Schedule, backward: bool, dtype: torch.dtype, state: str):
    """The loss (or its gradient) against DiffRec's, and the Lt_history the provider updated
    (``state``: diffcore's ``sampler``, or the baselines' ``lt`` tensors) against DiffRec's loop
    run on the same warm history."""
    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        if "expected" not in inputs:
            m = inputs["m"].detach().float().requires_grad_(backward)
            loss = ref.training_losses(m, inputs["x0"].float(), None, inputs["t"], schedule)
            history, count = (v.clone() for v in inputs["history0"])
            ref.update_lt_history(history, count, inputs["t"], loss.detach())
            inputs["expected_history"] = history, count
            loss = loss / inputs["pt"]
            inputs["expected"] = torch.autograd.grad(loss.mean(), m)[0] if backward else loss.detach()
        error = mismatch(out, inputs["expected"], dtype, what="d loss / d model_out" if backward else "loss")
        sampler = inputs["sampler"]
        history, count = (sampler.history, sampler.count) if state == "sampler" else \
            (inputs["lt_history"], inputs["lt_count"])
        if error is None and not torch.equal(count, inputs["expected_history"][1]):
            return "Lt_history: the per-timestep counts differ from DiffRec's loop"
        return error or mismatch(history, inputs["expected_history"][0], dtype, what="Lt_history")

    return check


# --- LightGCN's BPR -----------------------------------------------------------------------------------
def _bpr_case(w: Workload, tables: tuple[int, int], config: Config, variant: str) -> Case:
    backward = variant == BACKWARD
    B, d = w.shape
    n_users, n_items = tables
    elem = _elem(config)

    def leaves(inputs: Inputs) -> list[torch.Tensor]:
        return [inputs[k] for k in ("U", "I", "U0", "I0")]

    def diffcore_call(inputs: Inputs):
        U, I, U0, I0 = leaves(inputs)
        users, pos, neg = inputs["users"], inputs["pos"], inputs["neg"]

        def run() -> torch.Tensor:
            loss = diffcore.training.bpr_loss((U, I), users, pos, neg, ego=(U0, I0), weight_decay=WEIGHT_DECAY)
            return _grad_items(loss, inputs) if backward else loss

        return run

    def lightgcn(U, I, U0, I0, users, pos, neg):
        loss, reg_loss = ref.bpr_loss(*ref.get_embedding(U, I, U0, I0, users, pos, neg))
        return loss + WEIGHT_DECAY * reg_loss

    def args(inputs: Inputs) -> tuple:
        return (*leaves(inputs), inputs["users"], inputs["pos"], inputs["neg"])

    def eager(inputs: Inputs):
        a = args(inputs)
        return lambda: finish(inputs, lightgcn(*a))

    def finish(inputs: Inputs, loss: torch.Tensor) -> torch.Tensor:
        return _grad_items(loss, inputs) if backward else loss

    check = _bpr_check(lightgcn, backward, config.dtype)
    providers, notes = _diffcore_providers("training_bpr_loss", config, diffcore_call, check, B * d, backward)
    providers += [
        Provider("LightGCN-PyTorch eager (getEmbedding + bpr_loss)", ALLOCATING, setup=eager, check=check, role=EAGER),
        compiled_provider("torch.compile(LightGCN-PyTorch)", ALLOCATING, lightgcn, args, config, role=COMPILE,
                          check=check, result=finish),
    ]
    moved = 6 * B * d * elem + (2 * (n_users + n_items) * d * elem if backward else 0)
    return Case(FAMILY, BPR, w, variant, bytes_moved=moved,
                make_inputs=lambda: _bpr_inputs(w, tables, config, backward), providers=providers,
                notes=notes + NOTES[1:])


def _grad_items(loss: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """Gradients of all four tables; returns the item table's."""
    grads = torch.autograd.grad(loss, [inputs[k] for k in ("U", "I", "U0", "I0")])
    return grads[1]


def _power_law(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    p = torch.arange(1, n + 1, dtype=torch.float64) ** -ALPHA
    return torch.randperm(n, generator=g)[torch.multinomial(p, size, replacement=True, generator=g)]


def _bpr_inputs(w: Workload, tables: tuple[int, int], config: Config, backward: bool) -> Inputs:
    """LightGCN's tables: the propagated ones (U, I) and the layer-0 ones (U0, I0), N(0, 0.1) as it
    initialises them; a batch of power-law users and positives (repeats included) and uniform
    negatives, as its sampler draws them."""
    g = torch.Generator().manual_seed(config.seed)
    B, d = w.shape
    n_users, n_items = tables
    inputs: Inputs = {}
    for key, n in (("U", n_users), ("I", n_items), ("U0", n_users), ("I0", n_items)):
        t = (0.1 * torch.randn(n, d, generator=g)).to(device=config.device, dtype=config.dtype)
        inputs[key] = t.requires_grad_(backward)
    inputs["users"] = _power_law(n_users, B, g).to(config.device)
    inputs["pos"] = _power_law(n_items, B, g).to(config.device)
    inputs["neg"] = torch.randint(0, n_items, (B,), generator=g).to(config.device)
    return inputs


def _bpr_check(lightgcn, backward: bool, dtype: torch.dtype):
    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        if "expected" not in inputs:
            tables = [inputs[k].detach().float().requires_grad_(backward) for k in ("U", "I", "U0", "I0")]
            loss = lightgcn(*tables, inputs["users"], inputs["pos"], inputs["neg"])
            inputs["expected"] = torch.autograd.grad(loss, tables)[1] if backward else loss.detach()
        return mismatch(out, inputs["expected"], dtype, what="d loss / d item table" if backward else "loss")

    return check


# --- SGL's InfoNCE ------------------------------------------------------------------------------------
def _nce_case(w: Workload, config: Config, variant: str) -> Case:
    backward = variant == BACKWARD

    def finish(inputs: Inputs, loss: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(loss, (inputs["a"], inputs["b"]))[0] if backward else loss

    def run_with(fn):
        def setup(inputs: Inputs):
            a, b = inputs["a"], inputs["b"]
            return lambda: finish(inputs, fn(a, b))

        return setup

    def selfrec(a, b):
        return ref.info_nce(a, b, TEMPERATURE)

    check = _nce_check(backward, config.dtype)
    def ours(a, b):
        return diffcore.training.info_nce(a, b, TEMPERATURE)

    providers, notes = _diffcore_providers("training_info_nce", config, run_with(ours), check, w.numel, backward)
    providers += [
        Provider("SELFRec InfoNCE eager", ALLOCATING, setup=run_with(selfrec), check=check, role=EAGER),
        compiled_provider("torch.compile(SELFRec InfoNCE)", ALLOCATING, selfrec, lambda i: (i["a"], i["b"]), config,
                          role=COMPILE, check=check, result=finish),
    ]
    moved = 2 * w.numel * _elem(config) * (2 if backward else 1)
    return Case(FAMILY, NCE, w, variant, bytes_moved=moved, make_inputs=lambda: _nce_inputs(w, config, backward),
                providers=providers, notes=notes)


def _nce_inputs(w: Workload, config: Config, backward: bool) -> Inputs:
    """Two views of a batch: b a perturbed copy of a (SGL's augmented views agree closely)."""
    g = torch.Generator().manual_seed(config.seed)
    a = torch.randn(w.shape, generator=g)
    b = a + 0.5 * torch.randn(w.shape, generator=g)
    return {k: v.to(device=config.device, dtype=config.dtype).requires_grad_(backward) for k, v in (("a", a), ("b", b))}


def _nce_check(backward: bool, dtype: torch.dtype):
    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        if "expected" not in inputs:
            a, b = (inputs[k].detach().float().requires_grad_(backward) for k in ("a", "b"))
            loss = ref.info_nce(a, b, TEMPERATURE)
            inputs["expected"] = torch.autograd.grad(loss, (a, b))[0] if backward else loss.detach()
        return mismatch(out, inputs["expected"], dtype, what="d loss / d a" if backward else "loss")

    return check
