"""Reference of the training family, written as the public code people run writes it.

- DiffRec's ``GaussianDiffusion`` (YiyanXu/DiffRec, ``models/gaussian_diffusion.py``):
  :func:`training_losses` (the loss after the model call: per-row ``mean_flat`` MSE, the float64
  reweighting ``SNR(t-1) - SNR(t)`` for an x0 model or ``(1 - ab) / ((1 - ab_prev)^2 (1 - beta))``
  for an eps model, the t = 0 cases), :func:`sample_timesteps` (importance sampling from
  ``Lt_history``) and :func:`update_lt_history` (its loop over the batch).
- LightGCN-PyTorch's ``bpr_loss`` (gusye1234/LightGCN-PyTorch, ``code/model.py``) and the L2 term
  ``utils.BPRLoss`` scales by ``weight_decay``: :func:`get_embedding`, :func:`bpr_loss`.
- SGL's in-batch InfoNCE as SELFRec writes it (``util/loss_torch.py``): :func:`info_nce`.

Eager, readable, no in-place tricks: this is the meaning the kernels are tested against and the
baseline the bench times. The ``*_op`` functions below are the registered ops' meanings in terms
of their arguments (tables instead of a Schedule), written on top of the transcriptions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffcore.reference.diffusion import extract

if TYPE_CHECKING:
    from diffcore.diffusion import Schedule


# --- DiffRec -------------------------------------------------------------------------------------
def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over all non-batch dimensions (DiffRec's ``mean_flat``)."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def snr(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """DiffRec's ``SNR(t) = ab[t] / (1 - ab[t])`` in float64 (t = -1 indexes the last entry)."""
    alphas_cumprod = schedule.alphas_cumprod.to(t.device)
    return alphas_cumprod[t] / (1 - alphas_cumprod[t])


def training_losses(
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    *,
    prediction: str = "x0",
    reweight: bool = True,
) -> torch.Tensor:
    """DiffRec's ``training_losses`` from the model output on: ``terms["loss"]`` before ``/= pt``.

    ``x_t = q_sample(x_start, ts, noise)`` (float32 coefficients); ``mse = mean_flat((target -
    model_output)^2)`` with target ``x_start`` (x0) or ``noise`` (eps); with ``reweight`` the
    float64 weight, 1 at t = 0, and for eps at t = 0 the likelihood
    ``mean_flat((x_start - x0_hat)^2 / 2)``. DiffRec leaves ``loss`` unbound when ``reweight`` is
    False (a NameError); its evident meaning, ``weight = 1, loss = mse``, is written here.

    Args:
        model_output, x_start: (B, N).
        noise: (B, N), the noise of ``x_t``; only an eps model reads it (None for x0).
        ts: (B,) int64 timesteps.
    Returns:
        (B,) float64 with ``reweight`` (DiffRec's weights are float64), else mse's dtype.
    """
    target = x_start if prediction == "x0" else noise
    mse = mean_flat((target - model_output) ** 2)
    if reweight:
        if prediction == "x0":
            weight = snr(schedule, ts - 1) - snr(schedule, ts)
            weight = torch.where((ts == 0), 1.0, weight)
            loss = mse
        else:
            ab = schedule.alphas_cumprod
            weight = (1 - ab[ts]) / ((1 - schedule.alphas_cumprod_prev[ts]) ** 2 * (1 - schedule.betas[ts]))
            weight = torch.where((ts == 0), 1.0, weight)
            x_t = (  # DiffRec's q_sample before the model call, needed here only
                extract(schedule.sqrt_alphas_cumprod, ts, x_start.shape) * x_start
                + extract(schedule.sqrt_one_minus_alphas_cumprod, ts, x_start.shape) * noise
            )
            x0_hat = (
                extract(schedule.sqrt_recip_alphas_cumprod, ts, x_t.shape) * x_t
                - extract(schedule.sqrt_recipm1_alphas_cumprod, ts, x_t.shape) * model_output
            )
            likelihood = mean_flat((x_start - x0_hat) ** 2 / 2.0)
            loss = torch.where((ts == 0), likelihood, mse)
    else:
        weight = torch.tensor([1.0] * len(target)).to(x_start.device)
        loss = mse
    return weight * loss


def sample_timesteps(
    lt_history: torch.Tensor,
    lt_count: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    method: str = "uniform",
    uniform_prob: float = 0.001,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffRec's ``sample_timesteps`` (``generator`` None: the global RNG, as DiffRec draws).

    ``importance``: uniform until every timestep has a full history; then
    ``pt_all = sqrt(mean(Lt^2)) / sum``, mixed ``* (1 - u) + u / T``, ``t ~ multinomial(pt_all)``
    and ``pt = pt_all[t] * T``. ``uniform``: ``t ~ randint(T)``, ``pt = 1`` (float32)."""
    steps, history_num_per_term = lt_history.shape
    if method == "importance":
        if not (lt_count == history_num_per_term).all():
            return sample_timesteps(lt_history, lt_count, batch_size, device, "uniform", uniform_prob, generator)
        Lt_sqrt = torch.sqrt(torch.mean(lt_history**2, axis=-1))
        pt_all = Lt_sqrt / torch.sum(Lt_sqrt)
        pt_all *= 1 - uniform_prob
        pt_all += uniform_prob / len(pt_all)
        t = torch.multinomial(pt_all, num_samples=batch_size, replacement=True, generator=generator)
        pt = pt_all.gather(dim=0, index=t) * len(pt_all)
        return t, pt
    t = torch.randint(0, steps, (batch_size,), device=device, generator=generator).long()
    pt = torch.ones_like(t).float()
    return t, pt


def update_lt_history(lt_history: torch.Tensor, lt_count: torch.Tensor, ts: torch.Tensor, losses: torch.Tensor) -> None:
    """DiffRec's loop over the batch after the loss: each timestep keeps its last ``H`` losses.

    lt_history: (T, H) float64, lt_count: (T,) int64, both updated in place; ts: (B,) int64;
    losses: (B,) the weighted loss before division by pt."""
    history_num_per_term = lt_history.shape[1]
    for t, loss in zip(ts, losses):
        if lt_count[t] == history_num_per_term:
            Lt_history_old = lt_history.clone()
            lt_history[t, :-1] = Lt_history_old[t, 1:]
            lt_history[t, -1] = loss.detach()
        else:
            lt_history[t, lt_count[t]] = loss.detach()
            lt_count[t] += 1


# --- LightGCN-PyTorch ----------------------------------------------------------------------------
def get_embedding(
    all_users: torch.Tensor,
    all_items: torch.Tensor,
    embedding_user: torch.Tensor,
    embedding_item: torch.Tensor,
    users: torch.Tensor,
    pos_items: torch.Tensor,
    neg_items: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """LightGCN's ``getEmbedding``: the propagated rows and the layer-0 (ego) rows of the batch
    (``embedding_user(users)`` is ``F.embedding`` on the layer-0 table)."""
    users_emb = all_users[users]
    pos_emb = all_items[pos_items]
    neg_emb = all_items[neg_items]
    users_emb_ego = F.embedding(users, embedding_user)
    pos_emb_ego = F.embedding(pos_items, embedding_item)
    neg_emb_ego = F.embedding(neg_items, embedding_item)
    return users_emb, pos_emb, neg_emb, users_emb_ego, pos_emb_ego, neg_emb_ego


def bpr_loss(
    users_emb: torch.Tensor,
    pos_emb: torch.Tensor,
    neg_emb: torch.Tensor,
    userEmb0: torch.Tensor,  # noqa: N803  (LightGCN's names)
    posEmb0: torch.Tensor,  # noqa: N803
    negEmb0: torch.Tensor,  # noqa: N803
) -> tuple[torch.Tensor, torch.Tensor]:
    """LightGCN's ``bpr_loss``: ``(mean softplus(s_neg - s_pos), reg_loss)`` with
    ``reg_loss = 0.5 (|u0|^2 + |p0|^2 + |n0|^2) / B``; its trainer adds ``weight_decay * reg_loss``.
    All (B, d)."""
    reg_loss = (1 / 2) * (userEmb0.norm(2).pow(2) +
                         posEmb0.norm(2).pow(2) +
                         negEmb0.norm(2).pow(2)) / float(len(users_emb))
    pos_scores = torch.mul(users_emb, pos_emb)
    pos_scores = torch.sum(pos_scores, dim=1)
    neg_scores = torch.mul(users_emb, neg_emb)
    neg_scores = torch.sum(neg_scores, dim=1)
    loss = torch.mean(torch.nn.functional.softplus(neg_scores - pos_scores))
    return loss, reg_loss


# --- SGL (SELFRec) -------------------------------------------------------------------------------
def info_nce(view1: torch.Tensor, view2: torch.Tensor, temperature: float, b_cos: bool = True) -> torch.Tensor:
    """SGL's in-batch InfoNCE as SELFRec writes it: ``-mean diag(log_softmax(v1 v2^T / tau))``,
    rows L2-normalised first when ``b_cos``. view1, view2: (B, d); returns a scalar."""
    if b_cos:
        view1, view2 = F.normalize(view1, dim=1), F.normalize(view2, dim=1)
    pos_score = (view1 @ view2.T) / temperature
    score = torch.diag(F.log_softmax(pos_score, dim=1))
    return -score.mean()


# --- the registered ops' meanings ----------------------------------------------------------------
def reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def diffusion_loss_op(
    model_out: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor | None,
    t: torch.Tensor,
    table: torch.Tensor,
    pt: torch.Tensor | None,
    eps: bool,
    reweight: bool,
) -> torch.Tensor:
    """The op ``training_diffusion_loss``: ``w[t] term / pt`` per row, float64 (B,).

    ``table``: (T, 5) rows ``(w, sqrt_ab, sqrt_1mab, sqrt_recip_ab, sqrt_recipm1_ab)`` in float64;
    ``term = mean_flat((target - model_out)^2)`` (target x0, or noise when ``eps``), except for
    ``eps and reweight`` at t = 0: ``mean_flat((x0 - x0_hat)^2 / 2)`` with ``x_t`` and ``x0_hat``
    from the float32 coefficients; ``w = 1`` without ``reweight``. Math in float32 (float64 for
    float64 operands), as DiffRec runs it."""
    t = t.expand(model_out.shape[0])
    acc = torch.float64 if model_out.dtype == torch.float64 else torch.float32
    m, x = model_out.to(acc), x0.to(acc)
    z = None if noise is None else noise.to(acc)
    mse = mean_flat(((z if eps else x) - m) ** 2)
    loss = mse.double()
    if reweight:
        coef = table[t].float().to(acc)  # _extract_into_tensor's float32 coefficients
        if eps:
            x_t = coef[:, 1:2] * x + coef[:, 2:3] * z
            x0_hat = coef[:, 3:4] * x_t - coef[:, 4:5] * m
            likelihood = mean_flat((x - x0_hat) ** 2 / 2.0)
            loss = torch.where(t == 0, likelihood.double(), loss)
        loss = table[t, 0].double() * loss
    return loss if pt is None else loss / pt.double()


def bpr_loss_op(
    user_table: torch.Tensor,
    item_table: torch.Tensor,
    users: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    user_ego: torch.Tensor | None,
    item_ego: torch.Tensor | None,
    weight_decay: float,
    reduction: str,
) -> torch.Tensor:
    """The op ``training_bpr_loss``: per row ``softplus(<u, n> - <u, p>) + weight_decay * 0.5
    (|u0|^2 + |p0|^2 + |n0|^2)``, reduced by ``reduction`` (``"mean"`` is LightGCN's ``loss +
    weight_decay * reg_loss``). The ego rows come from ``user_ego``/``item_ego`` (None: the score
    tables). Math in float32 (float64 for float64 tables); the result in the tables' dtype."""
    acc = torch.float64 if user_table.dtype == torch.float64 else torch.float32
    user_ego = user_table if user_ego is None else user_ego
    item_ego = item_table if item_ego is None else item_ego
    rows = get_embedding(user_table.to(acc), item_table.to(acc), user_ego.to(acc), item_ego.to(acc),
                         users.long(), pos.long(), neg.long())
    u, p, n, u0, p0, n0 = rows
    scores = F.softplus(torch.sum(u * n, dim=1) - torch.sum(u * p, dim=1))
    reg = 0.5 * (u0.pow(2).sum(1) + p0.pow(2).sum(1) + n0.pow(2).sum(1))
    return reduce(scores + weight_decay * reg, reduction).to(user_table.dtype)


def info_nce_op(a: torch.Tensor, b: torch.Tensor, temperature: float, cosine: bool, reduction: str) -> torch.Tensor:
    """The op ``training_info_nce``: per row ``logsumexp_j(s_ij / tau) - s_ii / tau`` with
    ``s = <a^_i, b^_j>`` (rows L2-normalised when ``cosine``), reduced by ``reduction``
    (``"mean"`` is SELFRec's InfoNCE). Math in float32 (float64 for float64 rows)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    view1, view2 = a.to(acc), b.to(acc)
    if cosine:
        view1, view2 = F.normalize(view1, dim=1), F.normalize(view2, dim=1)
    score = torch.diag(F.log_softmax((view1 @ view2.T) / temperature, dim=1))
    return reduce(-score, reduction).to(a.dtype)
