"""diffcore.compat adapters and diffcore.nn samplers against independent stand-ins.

The stand-ins transcribe the public code's maths and RNG order (DiffRec's GaussianDiffusion, from
examples/models.py, which the e2e bench runs too; LightGCN-PyTorch's computer(), DreamRec's /
DiffuRec's reverse loops) in plain torch; they never call diffcore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diffcore
import diffcore.nn
from diffcore.compat import diffrec, lightgcn
from examples.models import GaussianDiffusion, ModelMeanType, lightgcn_graph

TOL = dict(rtol=1e-5, atol=1e-5)


# --- DiffRec: GaussianDiffusion is the examples' transcription (DDRM's clamp included) ---------------
class Denoiser(nn.Module):
    """A DiffRec DNN-like denoiser: time embedding + MLP; it draws no random numbers in eval."""

    def __init__(self, n_items, hidden=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(n_items + 4, hidden, generator=g) * 0.3)
        self.w2 = nn.Parameter(torch.randn(hidden, n_items, generator=g) * 0.3)

    def forward(self, x, t):
        freqs = torch.arange(2, dtype=torch.float32)
        emb = torch.cat([torch.cos(t[:, None].float() * freqs), torch.sin(t[:, None].float() * freqs)], -1)
        return torch.tanh(torch.cat([x, emb], -1) @ self.w1) @ self.w2


def _diffusion(mean_type=ModelMeanType.START_X, noise_scale=0.1, steps=5, clamp=False):
    return GaussianDiffusion(mean_type, noise_scale, 0.001, 0.02, steps, clamp=clamp)


def _run(diffusion, model, x, steps, noise, seed=7):
    torch.manual_seed(seed)
    return diffusion.p_sample(model, x, steps, sampling_noise=noise)


@pytest.mark.parametrize("mean_type", [ModelMeanType.START_X, ModelMeanType.EPSILON], ids=["x0", "eps"])
@pytest.mark.parametrize("steps", [0, 3, 5])
@pytest.mark.parametrize("noise", [False, True], ids=["nonoise", "noise"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_diffrec_p_sample_matches(mean_type, steps, noise, grad):
    diffusion = _diffusion(mean_type)
    model = Denoiser(12)
    x = torch.rand(6, 12)
    with torch.set_grad_enabled(grad):
        expected = _run(diffusion, model, x, steps, noise)
        with diffrec.accelerate(diffusion) as handle:
            assert handle.prediction == ("x0" if mean_type is ModelMeanType.START_X else "eps")
            handle._originals = {}  # a fallback to the original would raise: the fused path runs
            got = _run(diffusion, model, x, steps, noise)
            after = torch.randn(3)  # the RNG advanced exactly as the original's did
        torch.manual_seed(7)
        _run(diffusion, model, x, steps, noise)
        torch.testing.assert_close(after, torch.randn(3))
    torch.testing.assert_close(got, expected, **TOL)
    assert got.requires_grad == grad
    if grad:
        got.sum().backward()
        assert model.w1.grad is not None and torch.isfinite(model.w1.grad).all()


def test_diffrec_noise_scale_zero_falls_back():
    diffusion = _diffusion(noise_scale=0.0)
    model = Denoiser(8)
    x = torch.rand(4, 8)
    expected = _run(diffusion, model, x, 0, True)
    with diffrec.accelerate(diffusion) as handle:
        assert handle.schedule is None
        got = _run(diffusion, model, x, 0, True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_diffrec_q_sample_and_tables():
    diffusion = _diffusion(steps=10)
    x = torch.rand(5, 9)
    t = torch.tensor([0, 3, 9, 2, 5])
    noise = torch.randn(5, 9)
    expected = diffusion.q_sample(x, t, noise=noise)
    torch.manual_seed(1)
    expected_drawn = diffusion.q_sample(x, t)
    handle = diffrec.accelerate(diffusion)
    torch.testing.assert_close(diffusion.q_sample(x, t, noise=noise), expected, **TOL)
    torch.manual_seed(1)
    torch.testing.assert_close(diffusion.q_sample(x, t), expected_drawn, **TOL)
    for name in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_log_variance_clipped", "alphas_cumprod"):
        torch.testing.assert_close(getattr(handle.schedule, name), getattr(diffusion, name), rtol=1e-12, atol=0)
    handle.restore()


def test_diffrec_restore():
    diffusion = _diffusion()
    handle = diffrec.accelerate(diffusion)
    assert diffusion.p_sample.__self__ is handle and diffusion.q_sample.__self__ is handle
    with pytest.raises(ValueError, match="already accelerated"):
        diffrec.accelerate(diffusion)
    handle.restore()
    handle.restore()  # idempotent
    assert "p_sample" not in diffusion.__dict__ and "q_sample" not in diffusion.__dict__
    assert diffusion.p_sample.__func__ is GaussianDiffusion.p_sample
    assert diffusion.q_sample.__func__ is GaussianDiffusion.q_sample
    with diffrec.accelerate(diffusion):
        assert diffusion.p_sample.__func__ is not GaussianDiffusion.p_sample
    assert diffusion.p_sample.__func__ is GaussianDiffusion.p_sample


def test_diffrec_refuses_other_tables_and_bad_objects():
    diffusion = _diffusion()
    diffusion.posterior_mean_coef1 = diffusion.posterior_mean_coef1 * 1.01
    with pytest.raises(ValueError, match="posterior_mean_coef1"):
        diffrec.accelerate(diffusion)
    assert "p_sample" not in diffusion.__dict__
    with pytest.raises(TypeError):
        diffrec.accelerate(object())
    diffusion = _diffusion()
    diffusion.mean_type = "velocity"
    with pytest.raises(ValueError, match="mean_type"):
        diffrec.accelerate(diffusion)


def test_ddrm_clamp():
    diffusion = _diffusion(steps=4, clamp=True)
    model = Denoiser(7)
    x = torch.rand(3, 7)
    t = torch.tensor([1, 4, 9])
    noise = torch.randn(3, 7)
    expected_q = diffusion.q_sample(x, t, noise=noise)
    expected = _run(diffusion, model, x, 6, True)
    with diffrec.accelerate(diffusion, clamp_t=True):
        torch.testing.assert_close(diffusion.q_sample(x, t, noise=noise), expected_q, **TOL)
        with torch.no_grad():
            got = _run(diffusion, model, x, 6, True)
    torch.testing.assert_close(got, expected, **TOL)


def test_diffrec_unsupported_inputs_fall_back():
    diffusion = _diffusion()
    model = Denoiser(5).double()
    x = torch.rand(2, 5, dtype=torch.float64)
    expected = _run(diffusion, model, x, 2, True)
    with diffrec.accelerate(diffusion):
        got = _run(diffusion, model, x, 2, True)
        with pytest.raises(AssertionError, match="Too much steps"):
            diffusion.p_sample(Denoiser(5), torch.rand(2, 5), 99)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_diffrec_q_sample_falls_back_and_follows_changes():
    """Timesteps the fused op takes (numpy ints too) run fused; others (a list, a noise not like
    x_start) run the original; after noise_scale or betas change, the original runs."""
    diffusion = _diffusion(steps=4, clamp=True)
    x, noise = torch.rand(3, 7), torch.randn(3, 7)
    expected = diffusion.q_sample(x, 9, noise=noise)
    wide = torch.randn(1, 7)
    with diffrec.accelerate(diffusion, clamp_t=True) as handle:
        torch.testing.assert_close(diffusion.q_sample(x, np.int64(9), noise=noise), expected, **TOL)
        originals, handle._originals = handle._originals, {}  # a fallback now raises KeyError
        with pytest.raises(KeyError):
            diffusion.q_sample(x, [1, 2, 3], noise=noise)
        with pytest.raises(KeyError):
            diffusion.q_sample(x, torch.tensor([1, 2, 3]), noise=wide)
        handle._originals = originals
        torch.testing.assert_close(diffusion.q_sample(x, torch.tensor([1, 2, 3]), noise=wide),
                                   diffusion.sqrt_alphas_cumprod[[1, 2, 3], None].float() * x
                                   + diffusion.sqrt_one_minus_alphas_cumprod[[1, 2, 3], None].float() * wide, **TOL)
        diffusion.noise_scale = 0.0
        assert not handle._supported(x)
        diffusion.noise_scale = 0.1
        assert handle._supported(x)
        diffusion.betas = diffusion.betas.clone()
        assert not handle._supported(x)


def test_diffrec_non_contiguous_batch_keeps_the_originals_noise():
    """randn_like fills a non-contiguous x_start's layout in memory order, so accelerate runs the
    original loop for it: the same values as without accelerate, given the same global seed."""
    diffusion = _diffusion()
    model = Denoiser(8)
    x = torch.rand(8, 4).T  # column-major (4, 8)
    expected = _run(diffusion, model, x, 3, True)
    with torch.no_grad():
        expected_no_grad = _run(diffusion, model, x, 3, True)
    with diffrec.accelerate(diffusion):
        got = _run(diffusion, model, x, 3, True)
        with torch.no_grad():
            got_no_grad = _run(diffusion, model, x, 3, True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_no_grad, expected_no_grad, rtol=0, atol=0)


# --- a LightGCN written like LightGCN-PyTorch's, training side too (edge dropout, forward) --------
class LightGCN(nn.Module):
    def __init__(self, n_users, n_items, edges, n_layers=3, dim=8, dropout=False):
        super().__init__()
        self.num_users, self.num_items = n_users, n_items
        self.n_layers = n_layers
        self.config = {"dropout": dropout}
        self.keep_prob = 0.6
        self.embedding_user = nn.Embedding(n_users, dim)
        self.embedding_item = nn.Embedding(n_items, dim)
        nn.init.normal_(self.embedding_user.weight, std=0.1)
        nn.init.normal_(self.embedding_item.weight, std=0.1)
        self.Graph = lightgcn_graph(n_users, n_items, *edges, binary=False)  # repeated edges add up

    def __dropout(self, keep_prob):
        size, index, values = self.Graph.size(), self.Graph.indices().t(), self.Graph.values()
        random_index = (torch.rand(len(values)) + keep_prob).int().bool()
        index, values = index[random_index], values[random_index] / keep_prob
        return torch.sparse_coo_tensor(index.t(), values, size, check_invariants=True)

    def computer(self):
        users_emb = self.embedding_user.weight
        items_emb = self.embedding_item.weight
        all_emb = torch.cat([users_emb, items_emb])
        embs = [all_emb]
        g_droped = self.__dropout(self.keep_prob) if self.config["dropout"] and self.training else self.Graph
        for _ in range(self.n_layers):
            all_emb = torch.sparse.mm(g_droped, all_emb)
            embs.append(all_emb)
        embs = torch.stack(embs, dim=1)
        light_out = torch.mean(embs, dim=1)
        users, items = torch.split(light_out, [self.num_users, self.num_items])
        return users, items

    def forward(self, users, items):
        all_users, all_items = self.computer()
        return torch.sum(all_users[users] * all_items[items], dim=1)


def _lightgcn(dropout=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_users, n_items = 9, 13
    users = torch.randint(0, n_users - 1, (40,), generator=g)  # the last user has no edges
    items = torch.randint(0, n_items, (40,), generator=g)
    torch.manual_seed(seed)
    return LightGCN(n_users, n_items, (users, items), dropout=dropout)


def _forward_and_grads(model):
    users, items = torch.tensor([0, 3, 8, 5]), torch.tensor([1, 12, 4, 4])
    model.zero_grad()
    out = model(users, items)
    (out.square().sum()).backward()
    return out.detach(), model.embedding_user.weight.grad.clone(), model.embedding_item.weight.grad.clone()


def test_lightgcn_forward_backward_match():
    model = _lightgcn()
    expected = _forward_and_grads(model)
    expected_users, expected_items = (t.detach() for t in model.computer())
    with lightgcn.accelerate(model) as handle:
        assert handle.adj.nnz == model.Graph._nnz()
        got = _forward_and_grads(model)
        users, items = model.computer()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(users.detach(), expected_users, **TOL)
    torch.testing.assert_close(items.detach(), expected_items, **TOL)


def test_lightgcn_restore_and_dropout_path():
    model = _lightgcn(dropout=True)
    handle = lightgcn.accelerate(model)
    assert model.computer.__self__ is handle
    with pytest.raises(ValueError, match="already accelerated"):
        lightgcn.accelerate(model)
    model.train()  # edge dropout: the original computer() runs, with its own RNG draws
    torch.manual_seed(3)
    got = model.computer()[0]
    handle.restore()
    assert "computer" not in model.__dict__ and model.computer.__func__ is LightGCN.computer
    torch.manual_seed(3)
    torch.testing.assert_close(got, model.computer()[0], rtol=0, atol=0)
    model.eval()
    with lightgcn.accelerate(model):
        got = model.computer()[1]
    torch.testing.assert_close(got, model.computer()[1], **TOL)
    model.Graph = [model.Graph]
    with pytest.raises(TypeError, match="A_split"):
        lightgcn.accelerate(model)


# --- samplers against hand-written loops ----------------------------------------------------------
def _tables(schedule):
    """DreamRec/DiffuRec-style tables in plain torch from the schedule's betas."""
    betas = schedule.betas
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=betas.dtype), ab[:-1]])
    c1 = betas * torch.sqrt(ab_prev) / (1 - ab)
    c2 = (1 - ab_prev) * torch.sqrt(1 - betas) / (1 - ab)
    pv = betas * (1 - ab_prev) / (1 - ab)
    return c1, c2, pv, betas


def _extract(arr, t, x):
    return arr[t].float()[:, None].expand_as(x)


class CondDenoiser(nn.Module):
    def __init__(self, d, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(2 * d + 1, d, generator=g) * 0.3)

    def forward(self, x, c, t):
        return torch.tanh(torch.cat([x, c, t[:, None].float() / 10], -1) @ self.w)


@pytest.mark.parametrize("batched", [False, True], ids=["two_calls", "batched"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_dreamrec_sampler(batched, grad):
    T, B, d, w = 8, 5, 6, 2.0
    schedule = diffcore.Schedule.exp(T, dtype=torch.float32)
    model = CondDenoiser(d)
    h, h_null = torch.randn(B, d), torch.randn(1, d)
    c1, c2, pv, _ = _tables(schedule)
    torch.manual_seed(11)
    x = torch.randn_like(h)  # DreamRec's loop
    with torch.no_grad():
        for n in reversed(range(T)):
            t = torch.full((B,), n, dtype=torch.long)
            x_start = (1 + w) * model(x, h, t) - w * model(x, h_null.expand(B, -1), t)
            mean = _extract(c1, t, x) * x_start + _extract(c2, t, x) * x
            x = mean if n == 0 else mean + torch.sqrt(_extract(pv, t, x)) * torch.randn_like(x)
    sampler = diffcore.nn.DreamRecSampler(model, schedule, w, batched=batched)
    torch.manual_seed(11)
    with torch.set_grad_enabled(grad):
        got = sampler(h, h_null)
    torch.manual_seed(11)
    x_T = torch.randn_like(h)
    with torch.set_grad_enabled(grad):  # an explicit start: the same draws after it, x_T not written
        got_from_start = sampler(h, h_null, x_T=x_T)
    torch.testing.assert_close(got_from_start, got, rtol=0, atol=0)
    torch.manual_seed(11)
    torch.testing.assert_close(x_T, torch.randn_like(h), rtol=0, atol=0)
    torch.testing.assert_close(got.detach(), x, **TOL)
    assert got.requires_grad == grad


@pytest.mark.parametrize("batched", [False, True], ids=["two_calls", "batched"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_dreamrec_sampler_seeded(batched, grad):
    """Opt-in Philox noise: the start at ``offset``, step k at ``offset + k ceil(B d / 4)``, i.e.
    ``diffcore.sample`` with guidance over the same denoiser pair."""
    T, B, d, w, seed, offset = 8, 5, 6, 2.0, 3, 17
    schedule = diffcore.Schedule.exp(T, dtype=torch.float32)
    model = CondDenoiser(d)
    h, h_null = torch.randn(B, d), torch.randn(1, d)
    x_T = diffcore.random.randn(B, d, seed=seed, offset=offset)
    with torch.no_grad():
        expected = diffcore.sample(lambda x, t: (model(x, h, t), model(x, h_null.expand(B, -1), t)), x_T, schedule,
                                   noise=True, seed=seed, offset=offset, guidance_scale=w)
    sampler = diffcore.nn.DreamRecSampler(model, schedule, w, batched=batched)
    with torch.set_grad_enabled(grad):
        got = sampler(h, h_null, seed=seed, offset=offset)
    torch.testing.assert_close(got.detach(), expected, **TOL)
    assert got.requires_grad == grad


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_diffurec_sampler(grad):
    T, B, d = 6, 4, 7
    schedule = diffcore.Schedule.linear(T, 1e-4, 0.2)
    model = Denoiser(d)
    c1, c2, pv, betas = _tables(schedule)
    log_var = torch.log(torch.cat([pv[1:2], betas[1:]]))
    x_T = torch.randn(B, d)
    torch.manual_seed(5)
    x = x_T
    with torch.no_grad():  # DiffuRec's p_sample loop
        for i in reversed(range(T)):
            t = torch.tensor([i] * B)
            mean = _extract(c1, t, x) * model(x, t) + _extract(c2, t, x) * x
            noise = torch.randn_like(x)
            x = mean + (t != 0).float()[:, None] * torch.exp(0.5 * _extract(log_var, t, x)) * noise
    torch.manual_seed(5)
    with torch.set_grad_enabled(grad):
        x_T_copy = x_T.clone()
        got = diffcore.nn.DiffuRecSampler(model, schedule)(x_T)
        torch.testing.assert_close(x_T, x_T_copy, rtol=0, atol=0)  # the start is not written
    torch.testing.assert_close(got.detach(), x, **TOL)


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_sphere_sampler(grad):
    T, B, d = 6, 4, 5
    schedule = diffcore.Schedule.linear(T, 1e-3, 0.1)
    model = Denoiser(d, seed=3)
    c1, c2, pv, _ = _tables(schedule)
    log_var = torch.log(torch.cat([pv[1:2], pv[1:]]))
    x_T = torch.randn(B, d)
    torch.manual_seed(9)
    x = x_T / x_T.norm(dim=1, keepdim=True)
    with torch.no_grad():
        for i in reversed(range(T)):
            t = torch.tensor([i] * B)
            y = _extract(c1, t, x) * model(x, t) + _extract(c2, t, x) * x
            if i > 0:
                y = y + torch.exp(0.5 * _extract(log_var, t, x)) * torch.randn_like(x)
            x = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
    torch.manual_seed(9)
    with torch.set_grad_enabled(grad):
        x_T_copy = x_T.clone()
        got = diffcore.nn.SphereSampler(model, schedule)(x_T)
        torch.testing.assert_close(x_T, x_T_copy, rtol=0, atol=0)
    torch.testing.assert_close(got.detach(), x, **TOL)
    torch.testing.assert_close(got.detach().norm(dim=1), torch.ones(B), **TOL)


@pytest.mark.parametrize("sampler", ["dreamrec_batched", "dreamrec_two_calls", "diffurec", "sphere"])
def test_samplers_step_in_place_safely(sampler):
    """Under no_grad the loops step one buffer in place: a denoiser output that shares memory with
    that buffer (here: the input itself) is read before it is overwritten, so the result equals
    the out-of-place loop's; an output of the wrong shape raises, naming model_out."""
    T, B, d = 5, 3, 4
    schedule = diffcore.Schedule.exp(T, dtype=torch.float32)
    h, h_null = torch.randn(B, d), torch.randn(1, d)

    def run(denoiser, grad):
        torch.manual_seed(2)
        with torch.set_grad_enabled(grad):
            if sampler == "diffurec":
                return diffcore.nn.DiffuRecSampler(lambda x, t: denoiser(x, h, t), schedule)(torch.randn(B, d))
            if sampler == "sphere":
                return diffcore.nn.SphereSampler(lambda x, t: denoiser(x, h, t), schedule)(torch.randn(B, d))
            batched = sampler == "dreamrec_batched"
            return diffcore.nn.DreamRecSampler(denoiser, schedule, 2.0, batched=batched)(h, h_null)

    def first_row(x, c, t):  # every row a view of x's first row, which the step writes first
        return x[:1].expand_as(x)

    torch.testing.assert_close(run(first_row, False), run(first_row, True).detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="model_out: expected shape"):
        run(lambda x, c, t: x[:, :-1], False)


def test_dreamrec_guidance_scale_is_checked():
    """A NaN, infinite or non-number scale raises at construction, with or without grad (the
    in-place loop under no_grad used to run it into NaN rows)."""
    schedule = diffcore.Schedule.linear_var(8, 1.0, 1e-4, 0.02)
    for w, error in ((float("nan"), ValueError), (float("inf"), ValueError), ("2", TypeError)):
        with pytest.raises(error, match="guidance_scale: expected a finite number"):
            diffcore.nn.DreamRecSampler(lambda x, c, t: x, schedule, w)


def test_diffrec_accelerate_needs_integer_steps():
    diffusion = _diffusion()
    diffusion.steps = 5.5
    with pytest.raises(TypeError, match=r"diffusion.steps: expected an int, got 5.5"):
        diffrec.accelerate(diffusion)
    diffusion.steps = np.int64(5)  # numpy ints are ints
    with diffrec.accelerate(diffusion) as accelerated:
        assert accelerated.num_steps == 5


def test_samplers_reject_bad_arguments():
    schedule = diffcore.Schedule.linear(4)
    with pytest.raises(TypeError):
        diffcore.nn.DiffuRecSampler("not callable", schedule)
    with pytest.raises(TypeError):
        diffcore.nn.SphereSampler(Denoiser(3), "not a schedule")
    dreamrec = diffcore.nn.DreamRecSampler(lambda x, c, t: 0.5 * x, schedule, 2.0, batched=True)
    h = torch.randn(2, 8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"null_condition: expected shape \(8,\), \(1, 8\) or"):
        dreamrec(h, torch.randn(4, 4), seed=1)  # 16 values, not reshaped into two rows of 8
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="x_T: expected 2 rows"):
            dreamrec(h, torch.randn(8), torch.randn(1, 8), seed=1)  # not broadcast to the batch
    with pytest.raises(TypeError, match="null_condition: expected dtype torch.float32"):
        dreamrec(h, torch.randn(8, dtype=torch.float64), seed=1)


def test_samplers_draw_alike_with_and_without_grad_for_strided_starts():
    """A non-contiguous x_T: every step's noise is drawn in row-major order with grad mode on or off."""
    schedule = diffcore.Schedule.linear(4)
    x_T = torch.randn(8, 3).t()
    dreamrec = diffcore.nn.DreamRecSampler(lambda x, c, t: 0.5 * x + c, schedule, 1.5)
    diffurec = diffcore.nn.DiffuRecSampler(lambda x, t: 0.5 * x, schedule)
    runs = {
        "dreamrec": lambda: dreamrec(torch.ones(3, 8), torch.zeros(8), x_T),
        "diffurec": lambda: diffurec(x_T, generator=torch.Generator().manual_seed(2)),
    }
    for name, run in runs.items():
        outs = []
        for grad in (False, True):
            torch.manual_seed(5)
            with torch.set_grad_enabled(grad):
                outs.append(run())
        torch.testing.assert_close(outs[0], outs[1], msg=name)


class RecBoleLightGCN(nn.Module):
    """RecBole's layout: user_embedding / item_embedding, norm_adj_matrix, the propagation in forward()."""

    def __init__(self, source):
        super().__init__()
        self.n_users, self.n_items, self.n_layers = source.num_users, source.num_items, source.n_layers
        self.user_embedding = nn.Embedding(self.n_users, source.embedding_user.weight.shape[1])
        self.item_embedding = nn.Embedding(self.n_items, source.embedding_item.weight.shape[1])
        with torch.no_grad():
            self.user_embedding.weight.copy_(source.embedding_user.weight)
            self.item_embedding.weight.copy_(source.embedding_item.weight)
        self.norm_adj_matrix = source.Graph

    def get_ego_embeddings(self):
        return torch.cat([self.user_embedding.weight, self.item_embedding.weight], dim=0)

    def forward(self):
        all_embeddings = self.get_ego_embeddings()
        embeddings_list = [all_embeddings]
        for _ in range(self.n_layers):
            all_embeddings = torch.sparse.mm(self.norm_adj_matrix, all_embeddings)
            embeddings_list.append(all_embeddings)
        out = torch.mean(torch.stack(embeddings_list, dim=1), dim=1)
        return torch.split(out, [self.n_users, self.n_items])

    def calculate_loss(self, users, items):
        user_all, item_all = self.forward()
        return (user_all[users] * item_all[items]).sum(1).square().sum()


def test_recbole_lightgcn_layout():
    model = RecBoleLightGCN(_lightgcn())
    users, items = torch.tensor([0, 3, 8, 5]), torch.tensor([1, 12, 4, 4])
    model.calculate_loss(users, items).backward()
    expected = [p.grad.clone() for p in (model.user_embedding.weight, model.item_embedding.weight)]
    expected_out = [t.detach() for t in model()]
    model.zero_grad()
    with lightgcn.accelerate(model) as handle:
        assert handle.layout == "recbole" and model.forward.__self__ is handle
        model.calculate_loss(users, items).backward()
        got_out = [t.detach() for t in model()]
    assert "forward" not in model.__dict__ and model.forward.__func__ is RecBoleLightGCN.forward
    for a, b in zip(got_out, expected_out):
        torch.testing.assert_close(a, b, **TOL)
    for p, b in zip((model.user_embedding.weight, model.item_embedding.weight), expected):
        torch.testing.assert_close(p.grad, b, **TOL)
