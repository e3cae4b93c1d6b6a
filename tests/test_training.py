"""Training family: every implementation against the transcriptions of DiffRec's training_losses,
sample_timesteps and Lt_history loop, LightGCN's bpr_loss and SELFRec's InfoNCE; values,
gradients (gradcheck in float64), the sampler's FIFO and warm-up rules, opcheck, compile and bad
input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffcore
from diffcore._cases import standard_tolerance
from diffcore.reference import training as ref
from diffcore.training import TimestepSampler, _loss_table, bpr_loss, diffusion_loss, info_nce
from tests.utils import DTYPES, impl_params, strided_rows

SHAPES = [(3, 2810), (7, 1001), (1, 1), (5, 64)]
TRITON_SHAPES = [(3, 37), (2, 300)]  # the interpreter is slow: small shapes
LAYOUTS = ["contiguous", "row_stride", "column_major"]
MODES = [("x0", True), ("eps", True), ("x0", False), ("eps", False)]  # (prediction, reweight)


@pytest.fixture(scope="module")
def schedule():
    return diffcore.Schedule.linear_var(40, 0.1, 0.0005, 0.005)


def shapes_for(name):
    return TRITON_SHAPES if name == "triton" else SHAPES


def make(shape, dtype=torch.float32, seed=0, count=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def timesteps(rows, T, seed=0):
    """One timestep per row, t = 0 (DiffRec's special case) and T - 1 included."""
    t = torch.randint(0, T, (rows,), generator=torch.Generator().manual_seed(seed))
    t[: min(rows, 2)] = torch.tensor([0, T - 1])[: min(rows, 2)]
    return t


def probabilities(rows, seed=0):
    return torch.rand(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05


def check(dtype, got, want, same_dtype=None, what=""):
    verdict = standard_tolerance(dtype).check(got.detach(), want.detach(), same_dtype)
    assert verdict.passed, f"{what} {dtype}: {verdict.message}"


# --- diffusion_loss -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", impl_params("training_diffusion_loss"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("prediction", "reweight"), MODES)
def test_diffusion_loss_matches_diffrec(name, dtype, layout, prediction, reweight, schedule):
    for shape in shapes_for(name):
        if shape == (1, 1) and dtype != torch.float32:
            continue  # one element: the low-precision rule would compare the rounding luck of one square
        m, x, z = make(shape, seed=shape[1])
        t, pt = timesteps(shape[0], 40, seed=shape[0]), probabilities(shape[0])
        kw = dict(prediction=prediction, reweight=reweight)
        want = ref.training_losses(m, x, z, t, schedule, **kw) / pt
        low = [v.to(dtype) for v in (m, x, z)]
        same_dtype = ref.training_losses(*low, t, schedule, **kw).double() / pt
        with diffcore.use(name):
            got = diffusion_loss(*(strided_rows(v, layout) for v in low), t, schedule, pt=pt, **kw)
        assert got.dtype == torch.float64 and got.shape == (shape[0],)
        check(dtype, got, want, same_dtype, f"{shape}")


def test_diffusion_loss_weights_are_diffrecs(schedule):
    """DiffRec's float64 weights: SNR(t-1) - SNR(t) (x0), the eps weight, 1 at t = 0."""
    ab, ab_prev, betas = schedule.alphas_cumprod, schedule.alphas_cumprod_prev, schedule.betas
    t = torch.arange(40)
    snr = ab / (1 - ab)
    x0 = torch.where(t == 0, 1.0, snr[t - 1] - snr[t])
    eps = torch.where(t == 0, 1.0, (1 - ab) / ((1 - ab_prev) ** 2 * (1 - betas)))
    assert torch.equal(_loss_table(schedule, "x0")[:, 0], x0) and x0.dtype == torch.float64
    assert torch.equal(_loss_table(schedule, "eps")[:, 0], eps)
    # per row: a constant error of 1 gives mse = 1, so the loss is the weight itself
    m, x = torch.zeros(40, 9), torch.ones(40, 9)
    torch.testing.assert_close(diffusion_loss(m, x, None, t, schedule), x0, rtol=1e-15, atol=0)


def test_eps_likelihood_at_t0(schedule):
    """eps model at t = 0: mean((x0 - x0_hat)^2 / 2) from x_t and the float32 coefficients."""
    m, x, z = make((2, 50), seed=4)
    t = torch.tensor([0, 0])
    c = [schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, schedule.sqrt_recip_alphas_cumprod,
         schedule.sqrt_recipm1_alphas_cumprod]
    c1, c2, c3, c4 = (float(v[0].float()) for v in c)
    x0_hat = c3 * (c1 * x + c2 * z) - c4 * m
    want = ((x - x0_hat) ** 2 / 2).mean(1).double()
    # x0 - x0_hat cancels: float32 rounding of the two operands is ~1e-5 of the difference
    torch.testing.assert_close(diffusion_loss(m, x, z, t, schedule, prediction="eps"), want, rtol=1e-4, atol=0)
    plain = ((z - m) ** 2).mean(1).double()  # without reweight: the plain mse, weight 1
    torch.testing.assert_close(diffusion_loss(m, x, z, t, schedule, prediction="eps", reweight=False), plain,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", [None] + impl_params("training_diffusion_loss"))
@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_diffusion_loss_gradients(name, prediction, schedule):
    """d/d model_out, x0 and noise against autograd of DiffRec's code (None: the dispatcher)."""
    shape = (4, 37)
    t, pt, w = timesteps(4, 40, seed=1), probabilities(4, seed=2), torch.randn(4, dtype=torch.float64)
    ours = [v.requires_grad_() for v in make(shape, seed=5)]
    theirs = [v.detach().clone().requires_grad_() for v in ours]
    with diffcore.use(name) if name else torch.enable_grad():
        (diffusion_loss(*ours, t, schedule, prediction=prediction, pt=pt) * w).sum().backward()
    (ref.training_losses(*theirs, t, schedule, prediction=prediction) / pt * w).sum().backward()
    for mine, want in zip(ours, theirs):
        if want.grad is None:  # x0 model: the noise is not an operand of the loss
            assert mine.grad is None
            continue
        torch.testing.assert_close(mine.grad, want.grad, rtol=1e-5, atol=1e-5 * want.grad.abs().max().item())


@pytest.mark.parametrize("name", impl_params("training_diffusion_loss"))
def test_forced_backward_runs_the_forced_implementation(name, schedule, monkeypatch):
    """Under diffcore.use(name), each loss's backward op runs through implementation `name` too
    (once per backward), not through the dispatcher, and gives the dispatcher's gradients."""
    from diffcore import _registry

    calls = []

    def spy(op):
        impl = _registry.get(op, name)

        def fn(*args):
            calls.append(op)
            impl(*args)

        monkeypatch.setitem(_registry._REGISTRY[op], name, _registry.Implementation(
            op, name, fn, impl.unavailable, impl.devices))

    for op in ("training_diffusion_loss", "training_bpr_loss", "training_info_nce"):
        spy(f"{op}_backward")
    U, I = bpr_tables(seed=3)[:2]
    users, pos, neg = bpr_indices(seed=4)
    m, x, z = make((4, 37), seed=5)
    a, b = make((6, 5), seed=6, count=2)
    t, pt = timesteps(4, 40, seed=1), probabilities(4, seed=2)
    losses = {
        "training_diffusion_loss": lambda m: diffusion_loss(m, x, z, t, schedule, pt=pt).sum(),
        "training_bpr_loss": lambda U: bpr_loss((U, I), users, pos, neg),
        "training_info_nce": lambda a: info_nce(a, b, 0.5),
    }
    for (op, loss), leaf in zip(losses.items(), (m, U, a)):
        theirs, ours = (leaf.clone().requires_grad_() for _ in range(2))
        want, = torch.autograd.grad(loss(theirs), theirs)
        calls.clear()
        with diffcore.use(name):
            got, = torch.autograd.grad(loss(ours), ours)
        assert calls == [f"{op}_backward"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_large_gradients_are_streamed_alike(dtype, prediction, schedule):
    """A gradient that passes 32 MiB is written with non-temporal stores, each row segment's head up
    to its first aligned element plainly (rows of 21,001 elements start at every alignment). Rows
    are independent, so it equals, bit for bit, the gradients of 100-row slices (under 32 MiB,
    stored plainly), and the gradient of DiffRec's code. t = 0 rows take the eps likelihood path."""
    m, x, z = make((401, 21_001), dtype, seed=8)
    t = timesteps(401, 40, seed=9)

    def grad(rows: slice) -> torch.Tensor:
        mm = m[rows].clone().requires_grad_()
        diffusion_loss(mm, x[rows], z[rows], t[rows], schedule, prediction=prediction).sum().backward()
        return mm.grad

    got = grad(slice(None))
    assert got.numel() * got.element_size() >= 32 << 20
    for r0 in range(0, 401, 100):
        torch.testing.assert_close(got[r0 : r0 + 100], grad(slice(r0, r0 + 100)), rtol=0, atol=0)
    mr = m.clone().requires_grad_()
    ref.training_losses(mr, x, z, t, schedule, prediction=prediction).sum().backward()
    torch.testing.assert_close(got, mr.grad, rtol=1e-5, atol=1e-5 * mr.grad.abs().max().item())


@pytest.mark.parametrize("name", impl_params("training_diffusion_loss"))
def test_diffusion_loss_gradcheck(name, schedule):
    t, pt = torch.tensor([0, 3, 39]), probabilities(3, seed=3)
    for prediction in ("x0", "eps"):
        inputs = [v.requires_grad_() for v in make((3, 5), torch.float64, seed=6)]

        def fn(m, x, z, prediction=prediction):
            return diffusion_loss(m, x, z, t, schedule, prediction=prediction, pt=pt)

        with diffcore.use(name):
            assert torch.autograd.gradcheck(fn, inputs)


def test_diffusion_loss_modes(schedule):
    m, x, z = make((3, 20), seed=7)
    assert diffusion_loss(m, x, None, 5, schedule).shape == (3,)  # x0 needs no noise; an int t
    torch.testing.assert_close(diffusion_loss(m, x, z, torch.tensor([5]), schedule),
                               diffusion_loss(m, x, z, torch.full((3,), 5), schedule), rtol=0, atol=0)
    assert diffusion_loss(torch.empty(0, 10), torch.empty(0, 10), None, torch.empty(0, dtype=torch.long),
                          schedule).shape == (0,)
    flat = diffcore.Schedule.linear_var(5, 0.0, 0.001, 0.02)  # noise_scale 0: x_t = x0, no SNR tables
    torch.testing.assert_close(diffusion_loss(m, x, None, 2, flat, reweight=False), ((x - m) ** 2).mean(1).double(),
                               rtol=1e-6, atol=0)


# --- TimestepSampler ----------------------------------------------------------------------------
def diffrec_history(steps, history, batches):
    lt_history = torch.zeros(steps, history, dtype=torch.float64)
    lt_count = torch.zeros(steps, dtype=torch.int64)
    for t, losses in batches:
        ref.update_lt_history(lt_history, lt_count, t, losses)
    return lt_history, lt_count


@pytest.mark.parametrize("name", impl_params("training_history_update"))
@pytest.mark.parametrize(("steps", "history", "batch"), [(5, 3, 9), (4, 10, 64), (40, 10, 400)])
def test_update_is_diffrecs_fifo(name, steps, history, batch):
    """Batches with repeated timesteps (some repeated more often than the history holds), against
    DiffRec's sequential loop."""
    check_fifo(name, steps, history, batch)


def check_fifo(name, steps, history, batch):
    g = torch.Generator().manual_seed(steps)
    batches = []
    for k in range(6):
        t = torch.randint(0, steps, (batch,), generator=g)
        if k == 1:
            t[: history + 3] = steps - 1
        batches.append((t, torch.rand(batch, generator=g, dtype=torch.float64)))
    sampler = TimestepSampler(steps, "importance", history)
    with diffcore.use(name):
        for t, losses in batches:
            sampler.update(t, losses)
    want_history, want_count = diffrec_history(steps, history, batches)
    assert torch.equal(sampler.history, want_history) and torch.equal(sampler.count, want_count)


@pytest.mark.parametrize("name", impl_params("training_history_update"))
def test_update_appends_repeats_in_batch_order(name):
    sampler = TimestepSampler(3, history=3)
    with diffcore.use(name):
        sampler.update(torch.tensor([2]), torch.tensor([0.5], dtype=torch.float64))
        sampler.update(torch.tensor([2, 0, 2, 2, 2, 2]), torch.arange(1.0, 7.0, dtype=torch.float64))
        sampler.update(torch.tensor([0, 0]), torch.tensor([7.0, 8.0], dtype=torch.float32))
    assert sampler.history[2].tolist() == [4.0, 5.0, 6.0] and sampler.history[0].tolist() == [2.0, 7.0, 8.0]
    assert sampler.count.tolist() == [3, 0, 3] and sampler.history[1].tolist() == [0.0, 0.0, 0.0]


def test_warm_up_is_uniform_until_every_history_is_full():
    steps, history, B = 4, 2, 6
    sampler = TimestepSampler(steps, "importance", history)
    lt_history = torch.zeros(steps, history, dtype=torch.float64)
    lt_count = torch.zeros(steps, dtype=torch.int64)
    for t_fill in ([0, 0, 1, 1, 2], [2, 3, 3]):  # after the first batch, timestep 3 is still empty
        got_t, got_pt = sampler.sample(B, torch.Generator().manual_seed(1))
        want_t, want_pt = ref.sample_timesteps(lt_history, lt_count, B, "cpu", "importance",
                                               generator=torch.Generator().manual_seed(1))
        assert torch.equal(got_t, want_t) and torch.equal(got_pt, want_pt.double()) and not sampler.warm()
        t = torch.tensor(t_fill)
        losses = torch.rand(len(t_fill), dtype=torch.float64, generator=torch.Generator().manual_seed(len(t_fill)))
        sampler.update(t, losses)
        ref.update_lt_history(lt_history, lt_count, t, losses)
    assert sampler.warm()
    for seed in range(3):  # importance sampling: DiffRec's draws for the same generator
        got_t, got_pt = sampler.sample(B, torch.Generator().manual_seed(seed))
        want_t, want_pt = ref.sample_timesteps(lt_history, lt_count, B, "cpu", "importance",
                                               generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got_t, want_t) and torch.equal(got_pt, want_pt) and got_pt.dtype == torch.float64
    lt_sqrt = torch.sqrt((lt_history**2).mean(-1))
    torch.testing.assert_close(sampler.probabilities(), lt_sqrt / lt_sqrt.sum() * 0.999 + 0.001 / steps, rtol=1e-15,
                               atol=0)


def test_sample_of_no_rows_once_warm():
    sampler = TimestepSampler(3, "importance", history=1)
    sampler.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))
    assert sampler.warm()
    t, pt = sampler.sample(0, seed=1)
    assert t.shape == pt.shape == (0,) and t.dtype == torch.int64 and pt.dtype == torch.float64


def test_sample_is_deterministic_for_a_seed():
    sampler = TimestepSampler(50, "uniform")
    t1, pt1 = sampler.sample(64, 7)
    t2, _ = sampler.sample(64, seed=7)
    t3, _ = sampler.sample(64, torch.Generator().manual_seed(7))
    assert torch.equal(t1, t2) and torch.equal(t1, t3) and torch.equal(pt1, torch.ones(64, dtype=torch.float64))
    torch.manual_seed(3)
    t4, _ = sampler.sample(64)  # the global RNG, as DiffRec draws
    torch.manual_seed(3)
    assert torch.equal(t4, torch.randint(0, 50, (64,)))
    assert int(t1.min()) >= 0 and int(t1.max()) < 50 and t1.dtype == torch.int64


def test_update_rejects_non_finite_losses():
    """A NaN or inf loss would make every later importance draw invalid (DiffRec's weights are
    sqrt(mean(Lt^2))): refused on the CPU, history and counts unchanged; signs are accepted."""
    sampler = TimestepSampler(3, "importance", history=2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"losses: expected finite losses.*got losses\[1\] = "):
            sampler.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, bad, 2.0], dtype=torch.float64))
        assert int(sampler.count.sum()) == 0 and not bool(sampler.history.any())
    sampler.update(torch.tensor([0, 1]), torch.tensor([-1.0, 2.0]))
    assert sampler.history[:2, 0].tolist() == [-1.0, 2.0] and sampler.count.tolist() == [1, 1, 0]


def test_importance_sample_rejects_a_history_that_is_no_distribution():
    """A full history whose weights are no distribution (all losses 0, NaN in it, squares that
    overflow float64) raised torch's 'invalid multinomial distribution'; now a ValueError."""
    steps, history = 3, 2
    t = torch.arange(steps).repeat(history)
    cases = [
        (torch.zeros(steps * history, dtype=torch.float64), "every loss in it is 0"),
        (torch.full((steps * history,), 1e200, dtype=torch.float64), "overflow float64"),
    ]
    for losses, why in cases:
        sampler = TimestepSampler(steps, "importance", history)
        sampler.update(t, losses)
        assert sampler.warm()
        with pytest.raises(ValueError, match=f"history: expected losses whose importance weights.*{why}"):
            sampler.sample(4, seed=0)
    sampler = TimestepSampler(steps, "importance", history)
    sampler.update(t, torch.ones(steps * history, dtype=torch.float64))
    sampler.history[1, 0] = float("nan")  # written past update's check
    with pytest.raises(ValueError, match="history: .*it holds NaN or inf"):
        sampler.sample(4, seed=0)
    uniform = TimestepSampler(steps, "uniform", history)  # uniform draws never read the history
    uniform.update(t, torch.zeros(steps * history, dtype=torch.float64))
    assert uniform.sample(4, seed=0)[0].shape == (4,)


def test_sample_seeds_must_be_ints_in_u64():
    """``seed=2**70`` raised torch's 'Overflow when unpacking long long'; seeds are checked as
    every diffcore seed is, and the whole [0, 2**64) draws as torch.Generator.manual_seed does."""
    sampler = TimestepSampler(50, "uniform")
    for big in (2**64, 2**70):
        with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*64\)"):
            sampler.sample(2, seed=big)
        with pytest.raises(ValueError, match=r"generator: expected a torch.Generator or an int seed in \[0, 2\*\*64\)"):
            sampler.sample(2, big)
    for bad in ("7", 7.0, True, torch.Generator()):
        with pytest.raises(TypeError, match="seed: expected an int, got"):
            sampler.sample(2, seed=bad)
    for seed in (0, 2**63 - 1, 2**63, 2**64 - 1):
        want, _ = sampler.sample(16, torch.Generator().manual_seed(seed))
        assert torch.equal(sampler.sample(16, seed=seed)[0], want) and torch.equal(sampler.sample(16, seed)[0], want)


def test_uniform_prob_is_a_probability():
    """``uniform_prob='a'`` raised "'<=' not supported between instances"; now a TypeError."""
    for bad in ("a", None, True, torch.tensor(0.1)):
        with pytest.raises(TypeError, match="uniform_prob: expected a probability in \\[0, 1\\], got"):
            TimestepSampler(3, uniform_prob=bad)
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="uniform_prob: expected a probability in \\[0, 1\\]"):
            TimestepSampler(3, uniform_prob=bad)
    assert [TimestepSampler(3, uniform_prob=p).uniform_prob for p in (0, 1, 0.5)] == [0.0, 1.0, 0.5]


# --- bpr_loss -----------------------------------------------------------------------------------
def bpr_tables(dtype=torch.float32, seed=0, n_users=11, n_items=17, d=9):
    g = torch.Generator().manual_seed(seed)
    return [(0.5 * torch.randn(n, d, generator=g)).to(dtype) for n in (n_users, n_items, n_users, n_items)]


def bpr_indices(batch=23, n_users=11, n_items=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users, (batch,), generator=g)
    pos, neg = (torch.randint(0, n_items, (batch,), generator=g) for _ in range(2))
    neg[0] = pos[0]
    return users, pos, neg


def lightgcn(U, I, U0, I0, users, pos, neg, weight_decay):
    """LightGCN's trainer: ``loss + weight_decay * reg_loss``."""
    loss, reg_loss = ref.bpr_loss(*ref.get_embedding(U, I, U0, I0, users, pos, neg))
    return loss + weight_decay * reg_loss


@pytest.mark.parametrize("name", impl_params("training_bpr_loss"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["indices", "rows"])
@pytest.mark.parametrize("ego", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "column_major"])
def test_bpr_matches_lightgcn(name, dtype, form, ego, layout):
    users, pos, neg = bpr_indices()
    tables = bpr_tables()
    U, I, U0, I0 = tables if ego else (tables[0], tables[1], tables[0], tables[1])

    def ours(U, I, U0, I0):
        if form == "indices":
            return bpr_loss((U, I), users, pos, neg, ego=(U0, I0) if ego else None, weight_decay=0.1)
        return bpr_loss(U[users], I[pos], I[neg], ego=(U0[users], I0[pos], I0[neg]) if ego else None, weight_decay=0.1)

    leaves = [strided_rows(v.to(dtype), layout).requires_grad_() for v in (U, I, U0, I0)[: 4 if ego else 2]]
    with diffcore.use(name):
        got = ours(*leaves, *([] if ego else leaves))
        got_grads = torch.autograd.grad(got, leaves)
    truth = [v.detach().clone().requires_grad_() for v in (U, I, U0, I0)[: 4 if ego else 2]]
    want = lightgcn(*truth, *([] if ego else truth), users, pos, neg, 0.1)
    want_grads = torch.autograd.grad(want, truth)
    low = [v.detach().to(dtype).requires_grad_() for v in (U, I, U0, I0)[: 4 if ego else 2]]
    same = lightgcn(*low, *([] if ego else low), users, pos, neg, 0.1)
    same_grads = torch.autograd.grad(same, low)
    assert got.dtype == dtype and got.shape == ()
    check(dtype, got, want, same.detach(), "loss")
    for g, w, s in zip(got_grads, want_grads, same_grads):
        check(dtype, g, w, s, "grad")


@pytest.mark.parametrize("name", impl_params("training_bpr_loss"))
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bpr_reductions_and_index_forms(name, reduction):
    U, I, U0, I0 = bpr_tables(seed=2)
    users, pos, neg = bpr_indices(seed=3)
    want = ref.bpr_loss_op(U, I, users, pos, neg, U0, I0, 0.05, reduction)
    with diffcore.use(name):
        got = bpr_loss((U, I), users.int(), pos.int(), neg.int(), ego=(U0, I0), weight_decay=0.05, reduction=reduction)
        one_table = bpr_loss(I, pos, neg, pos, reduction=reduction)  # one table for users and items
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one_table, ref.bpr_loss_op(I, I, pos, neg, pos, None, None, 0.0, reduction), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("name", impl_params("training_bpr_loss"))
def test_bpr_gradcheck(name):
    U, I, U0, I0 = (v.requires_grad_() for v in bpr_tables(torch.float64, seed=4, n_users=4, n_items=5, d=3))
    users, pos, neg = bpr_indices(batch=6, n_users=4, n_items=5, seed=5)
    with diffcore.use(name):
        assert torch.autograd.gradcheck(
            lambda U, I, U0, I0: bpr_loss((U, I), users, pos, neg, ego=(U0, I0), weight_decay=0.3), (U, I, U0, I0))
        assert torch.autograd.gradcheck(
            lambda u, p, n: bpr_loss(u, p, n, weight_decay=0.3, reduction="none"),
            [v.detach().clone().requires_grad_() for v in (U[:3], I[:3], I[2:])])


# --- info_nce -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", impl_params("training_info_nce"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_selfrec(name, dtype, similarity, symmetric):
    shape, tau = ((37, 19), 0.2) if similarity == "cosine" else ((21, 6), 0.7)
    a, b = make(shape, seed=8, count=2)

    def selfrec(a, b):
        one = lambda x, y: ref.info_nce(x, y, tau, b_cos=similarity == "cosine")  # noqa: E731
        return 0.5 * (one(a, b) + one(b, a)) if symmetric else one(a, b)

    leaves = [strided_rows(v.to(dtype), "column_major" if symmetric else "row_stride").requires_grad_() for v in (a, b)]
    with diffcore.use(name):
        got = info_nce(*leaves, tau, similarity=similarity, symmetric=symmetric)
        got_grads = torch.autograd.grad(got, leaves)
    truth = [v.clone().requires_grad_() for v in (a, b)]
    want = selfrec(*truth)
    low = [v.to(dtype).requires_grad_() for v in (a, b)]
    same = selfrec(*low)
    assert got.dtype == dtype and got.shape == ()
    check(dtype, got, want, same.detach(), "loss")
    for g, w, s in zip(got_grads, torch.autograd.grad(want, truth), torch.autograd.grad(same, low)):
        check(dtype, g, w, s, "grad")


@pytest.mark.parametrize("name", impl_params("training_info_nce"))
def test_info_nce_is_stable_and_reduces(name):
    """Large dot products at a small temperature: the exp-sum form overflows, the fused one does not."""
    a, b = (40 * v for v in make((20, 16), seed=9, count=2))
    with diffcore.use(name):
        got = info_nce(a, b, 0.01, similarity="dot", reduction="none")
        total = info_nce(a, b, 0.01, similarity="dot", reduction="sum")
    want = -torch.diag(torch.log_softmax(a.double() @ b.double().T / 0.01, dim=1))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(total.double(), want.sum(), rtol=1e-4, atol=1e-1)


@pytest.mark.parametrize("name", impl_params("training_info_nce"))
def test_info_nce_gradcheck(name):
    a, b = (v.requires_grad_() for v in make((3, 4), torch.float64, seed=10, count=2))
    with diffcore.use(name):
        for similarity, symmetric in (("cosine", True), ("dot", False)):
            assert torch.autograd.gradcheck(
                lambda a, b: info_nce(a, b, 0.3, similarity=similarity, symmetric=symmetric, reduction="none"), (a, b))


def test_triton_works_in_chunks(monkeypatch):
    """The Triton BPR and InfoNCE kernels take the features in chunks, and the history update the
    history slots (so any d or history length fits a GPU program): with the chunk cut to 16
    features, d = 40 needs three, the last partial, and the InfoNCE gradients come from three
    feature tiles each; with 4 slots a chunk, a 10-slot history moves in three."""
    if diffcore.implementations("training_info_nce")["triton"].reason("cpu") is not None:
        pytest.skip("no Triton here")
    from diffcore.kernels import training as kt

    monkeypatch.setattr(kt, "_BPR_BLOCK_D", 16)
    monkeypatch.setattr(kt, "_NCE_BLOCK_K", 16)
    monkeypatch.setattr(kt, "_NCE_BLOCK_D", 16)
    monkeypatch.setattr(kt, "_HISTORY_BLOCK", 4)
    check_fifo("triton", 4, 10, 9)
    U, I, U0, I0 = bpr_tables(seed=6, d=40)
    users, pos, neg = bpr_indices(seed=7)
    a, b = make((20, 40), seed=11, count=2)
    for ego in (True, False):
        leaves = [v.clone().requires_grad_() for v in ((U, I, U0, I0) if ego else (U, I))]
        truth = [v.clone().requires_grad_() for v in leaves]
        with diffcore.use("triton"):
            got = bpr_loss(tuple(leaves[:2]), users, pos, neg, ego=tuple(leaves[2:]) or None, weight_decay=0.1)
        want = lightgcn(*truth, *(() if ego else truth), users, pos, neg, 0.1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, truth)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for similarity in ("cosine", "dot"):
        leaves = [v.clone().requires_grad_() for v in (a, b)]
        truth = [v.clone().requires_grad_() for v in (a, b)]
        with diffcore.use("triton"):
            got = info_nce(*leaves, 0.5, similarity=similarity)
        want = ref.info_nce(*truth, 0.5, b_cos=similarity == "cosine")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, truth)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", impl_params("training_info_nce"))
def test_float64_scalars_are_exact(name):
    """float64 losses use weight_decay and temperature as given: 0.3 is not a float32 value, and a
    kernel that rounded it to one would be off by ~1e-8 (kernels/_launch.py, F64_SCALARS)."""
    U, I, U0, I0 = bpr_tables(torch.float64, seed=12)
    users, pos, neg = bpr_indices(seed=13)
    a, b = make((9, 5), torch.float64, seed=14, count=2)
    with diffcore.use(name):
        bpr = bpr_loss((U, I), users, pos, neg, ego=(U0, I0), weight_decay=0.3, reduction="none")
        nce = info_nce(a, b, 0.3, similarity="dot", reduction="none")
    torch.testing.assert_close(bpr, ref.bpr_loss_op(U, I, users, pos, neg, U0, I0, 0.3, "none"), rtol=1e-13, atol=0)
    torch.testing.assert_close(nce, ref.info_nce_op(a, b, 0.3, False, "none"), rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", impl_params("training_bpr_loss"))
def test_double_backward_raises(name, schedule):
    """The loss ops' gradients come from fused backward kernels without derivatives: a backward
    with create_graph=True through them raises rather than give a silently wrong second derivative;
    a plain backward, and create_graph=True through inputs that need no grad, work."""
    U = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([3, 0])
    x0 = torch.randn(4, 3, dtype=torch.float64)
    losses = {
        "training_bpr_loss": lambda: bpr_loss(U, users, pos, neg, weight_decay=0.1),
        "training_info_nce": lambda: info_nce(U, U.flip(0), 0.5),
        "training_diffusion_loss": lambda: diffusion_loss(U, x0, None, torch.tensor([1, 3, 0, 2]), schedule).sum(),
    }
    with diffcore.use(name):
        for op, loss in losses.items():
            with pytest.raises(RuntimeError, match=f"{op}: double backward \\(create_graph=True\\) is not supported"):
                torch.autograd.grad(loss(), U, create_graph=True)
            torch.autograd.grad(loss(), U)
        w = torch.ones((), dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(w * bpr_loss(U.detach(), users, pos, neg), w, create_graph=True)
        assert g.requires_grad is False


# --- opcheck, compile, dispatch -----------------------------------------------------------------
def test_opcheck(schedule):
    ops = torch.ops.diffcore
    m, x, z = make((4, 33), seed=11)
    t, pt = torch.tensor([0, 5, 39, 7]), probabilities(4)
    for prediction, p in (("eps", pt), ("x0", None)):
        eps, table = prediction == "eps", _loss_table(schedule, prediction)
        args = (*(v.clone().requires_grad_() for v in (m, x, z)), t, table, p, eps, True)
        torch.library.opcheck(ops.training_diffusion_loss.default, args)
    grad = torch.randn(4, dtype=torch.float64)
    args = (grad, m, x, z, t, _loss_table(schedule, "eps"), pt, True, True)
    torch.library.opcheck(ops.training_diffusion_loss_backward.default, args)
    torch.library.opcheck(ops.training_history_update_.default,
                          (torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.long),
                           torch.tensor([1, 1, 1, 1, 2]), torch.rand(5, dtype=torch.float64)))
    U, I, U0, I0 = bpr_tables()
    users, pos, neg = bpr_indices()
    for reduction, egos in (("mean", (U0, I0)), ("none", (None, None))):
        args = (U.clone().requires_grad_(), I.clone().requires_grad_(), users, pos, neg,
                *(v.clone().requires_grad_() if v is not None else None for v in egos), 0.1, reduction)
        torch.library.opcheck(ops.training_bpr_loss.default, args)
    args = (torch.randn(()), U, I, users, pos, neg, U0, I0, 0.1, "sum")
    torch.library.opcheck(ops.training_bpr_loss_backward.default, args)
    a, b = make((6, 8), seed=12, count=2)
    args = (a.clone().requires_grad_(), b.clone().requires_grad_(), 0.2, True, "mean")
    torch.library.opcheck(ops.training_info_nce.default, args)
    torch.library.opcheck(ops.training_info_nce_backward.default, (torch.randn(6), a, b, 0.2, False, "none"))


def joint_objective(schedule, sampler):
    """``L = L_diff + l1 L_BPR + l2 L_CL`` with the sampler's history update, as one step."""
    t, pt = torch.tensor([0, 5, 39, 7]), probabilities(4)
    _, x, z = make((4, 33), seed=13)
    users, pos, neg = bpr_indices()
    *_, U0, I0 = bpr_tables()

    def step(m, U, I, a, b):
        loss = diffusion_loss(m, x, z, t, schedule, prediction="eps")
        sampler.update(t, loss)
        l_bpr = bpr_loss((U, I), users, pos, neg, ego=(U0, I0), weight_decay=1e-4)
        return (loss / pt).mean() + 0.5 * l_bpr + 0.1 * info_nce(a, b, 0.2, symmetric=True)

    leaves = [make((4, 33), seed=14, count=1)[0], *bpr_tables()[:2], *make((6, 8), seed=15, count=2)]
    return step, leaves


def test_compile_fullgraph(schedule):
    """One Inductor compile (about 10 s here) of the joint objective, forward and backward."""
    torch._dynamo.reset()
    sampler, eager_sampler = TimestepSampler(40, "importance"), TimestepSampler(40, "importance")
    step, leaves = joint_objective(schedule, sampler)
    eager_step, _ = joint_objective(schedule, eager_sampler)
    compiled = torch.compile(step, fullgraph=True)
    ours = [v.clone().requires_grad_() for v in leaves]
    theirs = [v.clone().requires_grad_() for v in leaves]
    compiled(*ours).backward()
    eager_step(*theirs).backward()
    for mine, want in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, want.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(sampler.history, eager_sampler.history) and torch.equal(sampler.count, eager_sampler.count)


def test_values_do_not_depend_on_the_thread_count(schedule):
    """The C++ reductions use fixed partitions: 1 and 2 threads give the same bits."""
    m, x, z = make((9, 9001), seed=18)
    t = timesteps(9, 40, seed=19)
    U, I, U0, I0 = (v.requires_grad_() for v in bpr_tables())
    users, pos, neg = bpr_indices()
    a, b = (v.requires_grad_() for v in make((300, 16), seed=20, count=2))
    m.requires_grad_()

    def run():
        loss = diffusion_loss(m, x, z, t, schedule, prediction="eps")
        bpr = bpr_loss((U, I), users, pos, neg, ego=(U0, I0), weight_decay=0.1)
        nce = info_nce(a, b, 0.2)
        return [loss, bpr, nce, *torch.autograd.grad(loss.sum() + bpr + nce, (m, U, I, U0, I0, a, b))]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, q) for p, q in zip(one, two))


# --- bad input ----------------------------------------------------------------------------------
def bad_calls(schedule):
    m, x, z = make((4, 10), seed=16)
    U, I, U0, I0 = bpr_tables()
    users, pos, neg = bpr_indices()
    sampler = TimestepSampler(40, "importance")
    return [
        (lambda: diffusion_loss(m, x, z, 40, schedule), ValueError, r"t: expected a timestep in \[0, 40\)"),
        (lambda: diffusion_loss(m, x, z, torch.tensor([1, 2]), schedule), ValueError, r"t: expected shape \(4,\)"),
        (lambda: diffusion_loss(m, x[:3], z, 1, schedule), ValueError, "x0: expected shape"),
        (lambda: diffusion_loss(m, x, z.double(), 1, schedule), TypeError, "noise: expected dtype"),
        (lambda: diffusion_loss(m, x, None, 1, schedule, prediction="eps"), ValueError, "noise: prediction='eps'"),
        (lambda: diffusion_loss(m, x, z, 1, schedule, prediction="v"), ValueError, "prediction: expected one of"),
        (lambda: diffusion_loss(m, x, z, 1, schedule, pt=torch.ones(3)), ValueError, r"pt: expected shape \(4,\)"),
        (lambda: diffusion_loss(m.long(), x, z, 1, schedule), TypeError, "model_out: expected float32"),
        (lambda: diffusion_loss(m, x, z, 1, "linear"), TypeError, "schedule: expected a diffcore.Schedule"),
        (lambda: diffusion_loss(m, x, z, 1, diffcore.Schedule.linear_var(5, 0.0, 0.001, 0.02)), ValueError,
         "noise_scale == 0"),
        (lambda: TimestepSampler(0), ValueError, "steps: expected a positive int"),
        (lambda: TimestepSampler(np.int64(0)), ValueError, "steps: expected a positive int, got np.int64\\(0\\)"),
        (lambda: TimestepSampler(5, "learned"), ValueError, "kind: expected one of"),
        (lambda: sampler.update(torch.tensor([1, 2]), torch.ones(3)), ValueError, r"losses: expected shape \(2,\)"),
        (lambda: sampler.update(torch.tensor([1.0]), torch.ones(1)), TypeError, "t: expected a 1-D int64 tensor"),
        (lambda: sampler.sample(4, "seed"), TypeError, "generator: expected a torch.Generator"),
        (lambda: bpr_loss((U, I), users, pos[:5], neg), ValueError, r"pos: expected shape \(23,\)"),
        (lambda: bpr_loss(U[:5], I[:4], I[:5]), ValueError, "pos_emb: expected shape"),
        (lambda: bpr_loss((U, I), users.float(), pos, neg), TypeError, "users: expected a 1-D int64 or int32"),
        (lambda: bpr_loss((U, I.double()), users, pos, neg), ValueError, "the item table must match"),
        (lambda: bpr_loss((U, I), users), TypeError, r"expected \(user_emb, pos_emb, neg_emb\) or"),
        (lambda: bpr_loss((U, I), users, pos, neg, reduction="max"), ValueError, "reduction: expected one of"),
        (lambda: info_nce(U, I, 0.2), ValueError, "b: expected 11 rows"),
        (lambda: info_nce(U, U0, 0.0), ValueError, "temperature: expected a positive float"),
        (lambda: info_nce(U, U0, -1.0), ValueError, "temperature"),
        (lambda: info_nce(U, U0, float("inf")), ValueError, "temperature: expected a positive float"),
        (lambda: info_nce(U, U0, "0.2"), TypeError, "temperature: expected a positive float"),
        (lambda: bpr_loss((U, I), users, pos, neg, weight_decay=float("nan")), ValueError,
         "weight_decay: expected a finite weight_decay >= 0, got nan"),
        (lambda: bpr_loss((U, I), users, pos, neg, weight_decay=-1e-4), ValueError, "weight_decay: expected"),
        (lambda: bpr_loss((U, I), users, pos, neg, weight_decay="1e-4"), TypeError, "weight_decay: expected"),
        (lambda: info_nce(U, U0, 0.2, similarity="l2"), ValueError, "similarity: expected one of"),
        (lambda: info_nce(U, U0[:, :3], 0.2), ValueError, "b: expected shape"),
    ]


def test_bad_input_gives_clear_errors(schedule):
    for call, error, match in bad_calls(schedule):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("name", [None] + impl_params("training_diffusion_loss"))
def test_values_are_checked_by_every_implementation(name, schedule):
    """Checks that need tensor values live in the kernels: the same message everywhere."""
    m, x, z = make((4, 10), seed=17)
    U, I, _, _ = bpr_tables()
    users, pos, neg = bpr_indices()
    bad_pos = pos.clone()
    bad_pos[3] = 17
    sampler = TimestepSampler(40)
    calls = [
        (lambda: diffusion_loss(m, x, z, torch.tensor([0, 1, 40, 2]), schedule), r"t\[2\] = 40"),
        (lambda: diffusion_loss(m, x, z, torch.tensor([0, -3, 1, 2]), schedule), r"t\[1\] = -3"),
        (lambda: diffusion_loss(m, x, z, 1, schedule, pt=torch.tensor([0.5, 0.0, 1.0, 1.0])), r"pt\[1\] = 0"),
        (lambda: sampler.update(torch.tensor([3, 40]), torch.ones(2)), r"t\[1\] = 40"),
        (lambda: bpr_loss((U, I), users, bad_pos, neg), r"pos: every index must lie in \[0, 17\), got pos\[3\] = 17"),
        (lambda: bpr_loss((U, I), -users - 1, pos, neg), r"users\[0\] = -"),
    ]
    with diffcore.use(name) if name else torch.no_grad():
        for call, match in calls:
            with pytest.raises(RuntimeError, match=match):
                call()
    assert int(sampler.count.sum()) == 0  # a refused update changes nothing
