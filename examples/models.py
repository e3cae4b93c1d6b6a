"""The original code paths the examples and ``python -m bench --only e2e`` accelerate, in plain torch.

Minimal transcriptions, from the papers' maths and ``DESIGN.md``'s parity facts, of what people run
at inference; names follow the public code bases so each piece can be found there. Nothing here
calls diffcore.

- DiffRec (Wang et al., SIGIR 2023): :class:`GaussianDiffusion` (linear-var schedule, float64
  tables cast to float32 per step, ``p_sample``), the :class:`DNN` denoiser, and its evaluation
  step, :func:`diffrec_recommend`: mask each user's history with ``-inf``, then ``torch.topk``.
- LightGCN-PyTorch: :class:`LightGCN` (``computer()``: ``torch.sparse.mm`` per layer over the
  normalised COO ``Graph``, then the mean over layers) and :func:`lightgcn_recommend`: a batch of
  users' scores against every item, history masked, ``torch.topk``.
- DreamRec (Yang et al., NeurIPS 2023): :class:`DreamRecDiffusion` (float32 ``exp`` schedule,
  classifier-free guidance ``x0 = (1 + w) f(x, h, t) - w f(x, null, t)``, noise
  ``sqrt(pv[t]) z`` for t > 0) and :class:`DreamRecDenoiser` (a step MLP over sinusoidal
  features and a linear diffuser over ``[x, h, t]``, with a learned null condition).

:func:`timed` is the examples' stopwatch.
"""

from __future__ import annotations

import enum
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelMeanType", "GaussianDiffusion", "DNN", "diffrec_recommend",
    "LightGCN", "lightgcn_recommend", "random_interactions",
    "exp_beta_schedule", "DreamRecDiffusion", "DreamRecDenoiser", "timed",
]


# --- DiffRec --------------------------------------------------------------------------------------
class ModelMeanType(enum.Enum):
    START_X = enum.auto()  # the denoiser predicts x0
    EPSILON = enum.auto()  # the denoiser predicts the noise


class GaussianDiffusion(nn.Module):
    """DiffRec's ``GaussianDiffusion``, inference path: linear-var schedule, float64 tables,
    ``p_sample(model, x_start, steps, sampling_noise)``. ``clamp``: DDRM's variant, where a
    timestep t >= T reads the last table entry (and ``steps`` may exceed T)."""

    def __init__(self, mean_type: ModelMeanType = ModelMeanType.START_X, noise_scale: float = 0.1,
                 noise_min: float = 1e-4, noise_max: float = 0.02, steps: int = 5, beta_fixed: bool = True,
                 clamp: bool = False) -> None:
        super().__init__()
        self.mean_type = mean_type
        self.clamp = clamp
        self.noise_scale, self.noise_min, self.noise_max, self.steps = noise_scale, noise_min, noise_max, steps
        if noise_scale != 0.0:
            self.betas = torch.tensor(self.get_betas(), dtype=torch.float64)
            if beta_fixed:
                self.betas[0] = 1e-5  # DiffRec fixes the first beta
            self.calculate_for_diffusion()

    def get_betas(self) -> np.ndarray:
        """linear-var: ``var = linspace(scale min, scale max, T)``, betas from ``1 - var``."""
        variance = np.linspace(self.noise_scale * self.noise_min, self.noise_scale * self.noise_max, self.steps,
                               dtype=np.float64)
        alpha_bar = 1 - variance
        betas = [1 - alpha_bar[0]]
        for i in range(1, self.steps):
            betas.append(min(1 - alpha_bar[i] / alpha_bar[i - 1], 0.999))
        return np.array(betas)

    def calculate_for_diffusion(self) -> None:
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.tensor([1.0], dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        self.posterior_mean_coef1 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def p_sample(self, model, x_start: torch.Tensor, steps: int, sampling_noise: bool = False) -> torch.Tensor:
        """Start at ``x_start`` (steps == 0) or ``q_sample(x_start, steps - 1)``, then all T reverse steps."""
        assert steps <= self.steps or self.clamp, "Too much steps in inference."
        if steps == 0:
            x_t = x_start
        else:
            x_t = self.q_sample(x_start, torch.tensor([steps - 1] * x_start.shape[0]))
        indices = list(range(self.steps))[::-1]
        if self.noise_scale == 0.0:
            for i in indices:
                x_t = model(x_t, torch.tensor([i] * x_t.shape[0]))
            return x_t
        for i in indices:
            t = torch.tensor([i] * x_t.shape[0])
            out = self.p_mean_variance(model, x_t, t)
            if sampling_noise:
                noise = torch.randn_like(x_t)
                nonzero_mask = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
                x_t = out["model_mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
            else:
                x_t = out["model_mean"]
        return x_t

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + self._extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def p_mean_variance(self, model, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        model_output = model(x, t)
        log_variance = self._extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
        if self.mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        else:
            pred_xstart = (self._extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x.shape) * x
                           - self._extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output)
        model_mean = (self._extract_into_tensor(self.posterior_mean_coef1, t, x.shape) * pred_xstart
                      + self._extract_into_tensor(self.posterior_mean_coef2, t, x.shape) * x)
        return {"model_mean": model_mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _extract_into_tensor(self, arr: torch.Tensor, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
        """``arr[t]`` cast to float32, broadcast to the batch's shape."""
        if self.clamp:
            timesteps = torch.clamp(torch.as_tensor(timesteps), max=len(arr) - 1)
        res = arr[timesteps].float()
        while res.dim() < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B, dim) sinusoidal features ``[cos(t f), sin(t f)]``, ``f = max_period^(-i / half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


class DNN(nn.Module):
    """DiffRec's denoiser with ``dims=[hidden]``: ``[x, emb_layer(time embedding)]`` ->
    Linear -> tanh -> Linear -> n_items. In eval mode it draws no random numbers."""

    def __init__(self, n_items: int, hidden: int = 1000, emb_size: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.emb_size = emb_size
        self.emb_layer = nn.Linear(emb_size, emb_size)
        self.in_layer = nn.Linear(n_items + emb_size, hidden)
        self.out_layer = nn.Linear(hidden, n_items)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.emb_layer(timestep_embedding(timesteps, self.emb_size))
        h = torch.cat([self.drop(x), emb], dim=-1)
        return self.out_layer(torch.tanh(self.in_layer(h)))


def diffrec_recommend(diffusion: GaussianDiffusion, model, batch: torch.Tensor,
                      history: tuple[torch.Tensor, torch.Tensor], k: int, sampling_steps: int = 0,
                      sampling_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiffRec's evaluation of one user batch: ``prediction = p_sample(...)``, then
    ``prediction[his_data.nonzero()] = -inf`` and ``torch.topk``.

    Args:
        batch: (B, n_items) the users' interaction rows (DiffRec's ``x_start``).
        history: ``(rows, cols)`` int64, the (user, item) pairs to mask (``his_data.nonzero()``).
    Returns:
        ``(values, ids)`` of the top k, each (B, k), and the masked prediction (B, n_items).
    """
    prediction = diffusion.p_sample(model, batch, sampling_steps, sampling_noise)
    prediction[history] = -np.inf
    values, ids = torch.topk(prediction, k)
    return values, ids, prediction


# --- LightGCN -------------------------------------------------------------------------------------
def random_interactions(n_users: int, n_items: int, nnz: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``nnz`` (user, item) pairs drawn uniformly (repeats possible: the graph is binary)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_users, (nnz,), generator=g), torch.randint(0, n_items, (nnz,), generator=g)


def lightgcn_graph(n_users: int, n_items: int, users: torch.Tensor, items: torch.Tensor, *,
                   binary: bool = True) -> torch.Tensor:
    """LightGCN-PyTorch's ``Graph``: ``D^-1/2 [[0, R], [R^T, 0]] D^-1/2`` as a coalesced COO
    tensor, degree 0 giving 0. ``binary``: a repeated interaction counts once; else repeats add up,
    as LightGCN-PyTorch's scipy ``csr_matrix((ones, (users, items)))`` sums them."""
    n = n_users + n_items
    users, items = users.long(), items.long()
    index = torch.stack([torch.cat([users, items + n_users]), torch.cat([items + n_users, users])])
    A = torch.sparse_coo_tensor(index, torch.ones(index.shape[1]), (n, n), check_invariants=True).coalesce()
    if binary:
        A = torch.sparse_coo_tensor(A.indices(), torch.ones_like(A.values()), (n, n), check_invariants=True).coalesce()
    d_inv = torch.sparse.sum(A, 1).to_dense().pow(-0.5)
    d_inv[torch.isinf(d_inv)] = 0.0
    idx = A.indices()
    values = d_inv[idx[0]] * A.values() * d_inv[idx[1]]
    return torch.sparse_coo_tensor(idx, values, (n, n), check_invariants=True).coalesce()


class LightGCN(nn.Module):
    """LightGCN-PyTorch's model at inference: ``Graph`` from :func:`lightgcn_graph` (binary),
    embeddings ~ N(0, 0.1^2), ``computer()``."""

    def __init__(self, n_users: int, n_items: int, users: torch.Tensor, items: torch.Tensor, dim: int = 64,
                 n_layers: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.num_users, self.num_items, self.n_layers = n_users, n_items, n_layers
        self.embedding_user = nn.Embedding(n_users, dim)
        self.embedding_item = nn.Embedding(n_items, dim)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embedding_user.weight.normal_(0, 0.1, generator=g)
            self.embedding_item.weight.normal_(0, 0.1, generator=g)
        self.Graph = lightgcn_graph(n_users, n_items, users, items)

    def computer(self) -> tuple[torch.Tensor, torch.Tensor]:
        all_emb = torch.cat([self.embedding_user.weight, self.embedding_item.weight])
        embs = [all_emb]
        for _ in range(self.n_layers):
            all_emb = torch.sparse.mm(self.Graph, all_emb)
            embs.append(all_emb)
        light_out = torch.mean(torch.stack(embs, dim=1), dim=1)
        return torch.split(light_out, [self.num_users, self.num_items])


def lightgcn_recommend(model: LightGCN, users: torch.Tensor, history: tuple[torch.Tensor, torch.Tensor],
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LightGCN-PyTorch's test step for one batch of users: ``computer()``, the users' scores
    against every item, their training items masked, ``torch.topk``. (LightGCN-PyTorch also
    applies a sigmoid to the scores; it is monotone, so the top k do not change, and leaving it out
    only makes this baseline faster.)

    Args:
        users: (B,) int64 user ids.
        history: ``(rows, cols)`` int64: row r of the batch has interacted with item ``cols``.
    Returns:
        ``(values, ids)``, each (B, k), and the masked scores (B, n_items).
    """
    all_users, all_items = model.computer()
    rating = all_users[users] @ all_items.t()
    rating[history] = -np.inf
    values, ids = torch.topk(rating, k)
    return values, ids, rating


# --- DreamRec -------------------------------------------------------------------------------------
def exp_beta_schedule(timesteps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> torch.Tensor:
    """DreamRec's ``exp`` schedule, float32: ``1 - exp(-b_min / T - x (b_max - b_min) / (2 T^2))``
    with ``x = linspace(1, 2T + 1, T)``."""
    x = torch.linspace(1, 2 * timesteps + 1, timesteps)
    return 1 - torch.exp(-beta_min / timesteps - x * 0.5 * (beta_max - beta_min) / (timesteps * timesteps))


def _extract(a: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
    """``a[t]`` shaped (B, 1, ...) to broadcast against x (DreamRec's ``extract``)."""
    out = a.gather(-1, t.cpu())
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1))).to(t.device)


class DreamRecDiffusion:
    """DreamRec's reverse process: float32 tables, guided ``p_sample``, ``sample`` from
    ``randn_like(h)``."""

    def __init__(self, timesteps: int = 500, w: float = 2.0, beta_min: float = 0.1, beta_max: float = 10.0) -> None:
        self.timesteps, self.w = timesteps, w
        self.betas = exp_beta_schedule(timesteps, beta_min, beta_max)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        self.posterior_mean_coef1 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def p_sample(self, model_forward, model_forward_uncon, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor,
                 t_index: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        x_start = (1 + self.w) * model_forward(x, h, t) - self.w * model_forward_uncon(x, t)
        model_mean = (_extract(self.posterior_mean_coef1, t, x.shape) * x_start
                      + _extract(self.posterior_mean_coef2, t, x.shape) * x)
        if t_index == 0:
            return model_mean
        noise = torch.randn_like(x) if noise is None else noise
        return model_mean + torch.sqrt(_extract(self.posterior_variance, t, x.shape)) * noise

    def sample(self, model_forward, model_forward_uncon, h: torch.Tensor, noise=None) -> torch.Tensor:
        """``x_T = randn_like(h)``, then t = T-1 .. 0; returns (B, d) x_0. ``noise(t_index)``, when
        given, supplies the (B, d) noise of each step with t > 0 instead of ``randn_like``."""
        x = torch.randn_like(h)
        for n in reversed(range(self.timesteps)):
            t = torch.full((h.shape[0],), n, dtype=torch.long)
            z = None if noise is None or n == 0 else noise(n)
            x = self.p_sample(model_forward, model_forward_uncon, x, h, t, n, z)
        return x


class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
        args = time[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class DreamRecDenoiser(nn.Module):
    """DreamRec's denoiser ``f(x, h, t)``: ``diffuser([x, h, step_mlp(t)])`` with its default
    diffuser (``mlp1``: one Linear(3 d, d)), hidden size d; ``forward_uncon`` uses the learned
    ``none_embedding`` as the condition."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.hidden = hidden
        self.none_embedding = nn.Embedding(1, hidden)
        self.step_mlp = nn.Sequential(SinusoidalPositionEmbeddings(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                      nn.Linear(2 * hidden, hidden))
        self.diffuser = nn.Sequential(nn.Linear(3 * hidden, hidden))

    def forward(self, x: torch.Tensor, h: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        t = self.step_mlp(step)
        return self.diffuser(torch.cat((x, h, t), dim=1))

    def forward_uncon(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        h = self.none_embedding(torch.tensor([0])).expand(x.shape[0], -1)
        return self.forward(x, h, step)


# --- for the example scripts ----------------------------------------------------------------------
def timed(fn, repeat: int):
    """``(fn()'s output, seconds per call)``: one untimed warm-up call, then the mean of ``repeat``."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - t0) / repeat
