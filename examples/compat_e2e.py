"""End to end with and without diffcore: a DiffRec-style model and a LightGCN, on synthetic data.

    python examples/compat_e2e.py                 # small sizes (seconds)
    python examples/compat_e2e.py --full          # DESIGN.md sizes: 400 x 94,949 items; Gowalla-sized graph

Each part runs the original code (minimal transcriptions of DiffRec's GaussianDiffusion and
LightGCN-PyTorch's computer()), then the same object accelerated by diffcore.compat, checks the
outputs agree and prints the times. Noise is seeded identically, so the results agree to float32
rounding.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch import nn

from diffcore import retrieval
from diffcore.compat import diffrec, lightgcn


class GaussianDiffusion:
    """DiffRec's GaussianDiffusion, inference path only (x0 prediction, linear-var schedule)."""

    def __init__(self, noise_scale=0.1, noise_min=0.0001, noise_max=0.02, steps=5):
        self.mean_type = type("ModelMeanType", (), {"name": "START_X"})()
        self.noise_scale, self.steps = noise_scale, steps
        var = np.linspace(noise_scale * noise_min, noise_scale * noise_max, steps, dtype=np.float64)
        betas = [1 - (1 - var[0])] + [min(1 - (1 - var[i]) / (1 - var[i - 1]), 0.999) for i in range(1, steps)]
        self.betas = torch.tensor(betas, dtype=torch.float64)
        self.betas[0] = 1e-5
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.tensor([1.0], dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        pv = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_variance = pv
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        self.posterior_mean_coef1 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _extract(arr, t, shape):
        return arr[t].float()[:, None].expand(shape)

    def q_sample(self, x_start, t, noise=None):
        noise = torch.randn_like(x_start) if noise is None else noise
        e = self._extract
        return e(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start + e(
            self.sqrt_one_minus_alphas_cumprod, t, x_start.shape
        ) * noise

    def p_sample(self, model, x_start, steps, sampling_noise=False):
        B = x_start.shape[0]
        x_t = x_start if steps == 0 else self.q_sample(x_start, torch.tensor([steps - 1] * B))
        for i in reversed(range(self.steps)):
            t = torch.tensor([i] * B)
            x0 = model(x_t, t)
            mean = self._extract(self.posterior_mean_coef1, t, x_t.shape) * x0 + self._extract(
                self.posterior_mean_coef2, t, x_t.shape
            ) * x_t
            if sampling_noise:
                noise = torch.randn_like(x_t)
                logvar = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
                x_t = mean + (t != 0).float()[:, None] * torch.exp(0.5 * logvar) * noise
            else:
                x_t = mean
        return x_t


class DNN(nn.Module):
    """DiffRec's denoiser shape: [x, time embedding] -> 1000 -> n_items."""

    def __init__(self, n_items, hidden=1000, emb=10):
        super().__init__()
        self.emb = emb
        self.inp = nn.Linear(n_items + emb, hidden)
        self.out = nn.Linear(hidden, n_items)

    def forward(self, x, t):
        half = self.emb // 2
        freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return self.out(torch.tanh(self.inp(torch.cat([x, emb], -1))))


class LightGCN(nn.Module):
    """LightGCN-PyTorch's computer() over its normalised COO Graph."""

    def __init__(self, n_users, n_items, n_edges, dim=64, n_layers=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_users, self.num_items, self.n_layers = n_users, n_items, n_layers
        self.embedding_user = nn.Embedding(n_users, dim)
        self.embedding_item = nn.Embedding(n_items, dim)
        users = torch.randint(0, n_users, (n_edges,), generator=g)
        items = torch.randint(0, n_items, (n_edges,), generator=g)
        n = n_users + n_items
        index = torch.stack([torch.cat([users, items + n_users]), torch.cat([items + n_users, users])])
        A = torch.sparse_coo_tensor(index, torch.ones(index.shape[1]), (n, n), check_invariants=True).coalesce()
        ones = torch.ones_like(A.values())  # binary: repeated random edges count once
        A = torch.sparse_coo_tensor(A.indices(), ones, (n, n), check_invariants=True).coalesce()
        deg = torch.sparse.sum(A, 1).to_dense()
        d = deg.pow(-0.5)
        d[torch.isinf(d)] = 0
        idx = A.indices()
        values = d[idx[0]] * A.values() * d[idx[1]]
        self.Graph = torch.sparse_coo_tensor(idx, values, (n, n), check_invariants=True).coalesce()

    def computer(self):
        all_emb = torch.cat([self.embedding_user.weight, self.embedding_item.weight])
        embs = [all_emb]
        for _ in range(self.n_layers):
            all_emb = torch.sparse.mm(self.Graph, all_emb)
            embs.append(all_emb)
        out = torch.stack(embs, 1).mean(1)
        return torch.split(out, [self.num_users, self.num_items])


def timed(fn, repeat):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - t0) / repeat


def main() -> None:
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="DESIGN.md sizes (slow on few cores)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    B, n_items = (400, 94_949) if args.full else (64, 4_000)
    n_users, n_graph_items, n_edges = (29_858, 40_981, 810_128) if args.full else (2_000, 3_000, 40_000)

    torch.manual_seed(0)
    diffusion, model = GaussianDiffusion(steps=5), DNN(n_items).eval()
    batch = (torch.rand(B, n_items) < 0.01).float()

    def infer():
        torch.manual_seed(1)
        prediction = diffusion.p_sample(model, batch, 5, sampling_noise=True)
        return retrieval.topk(prediction, 100, exclude=batch.to_sparse_csr())

    with torch.no_grad():
        (ref_values, ref_ids), t_ref = timed(infer, args.repeat)
        with diffrec.accelerate(diffusion):
            (values, ids), t_fast = timed(infer, args.repeat)
    torch.testing.assert_close(values, ref_values, rtol=1e-4, atol=1e-4)
    overlap = (ids[:, :, None] == ref_ids[:, None, :]).any(-1).float().mean().item()
    print(f"DiffRec-style {B} x {n_items}, 5 steps + top-100: original {t_ref * 1e3:.1f} ms, "
          f"diffcore {t_fast * 1e3:.1f} ms ({t_ref / t_fast:.2f}x); top-100 overlap {overlap:.4f}")

    gcn = LightGCN(n_users, n_graph_items, n_edges)
    with torch.no_grad():
        (ref_users, ref_items), t_ref = timed(gcn.computer, args.repeat)
        with lightgcn.accelerate(gcn):
            (users, items), t_fast = timed(gcn.computer, args.repeat)
    torch.testing.assert_close(users, ref_users, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(items, ref_items, rtol=1e-4, atol=1e-5)
    print(f"LightGCN {n_users} + {n_graph_items} nodes, {n_edges} edges, 3 layers: original {t_ref * 1e3:.1f} ms, "
          f"diffcore {t_fast * 1e3:.1f} ms ({t_ref / t_fast:.2f}x)")


if __name__ == "__main__":
    main()
