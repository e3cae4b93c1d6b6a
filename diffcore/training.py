"""Training-side losses: DiffRec's diffusion loss and timestep sampler, BPR and InfoNCE.

A joint objective ``L = L_diff + l1 L_BPR + l2 L_CL`` (the SDE social recommenders of this field)
in fused ops that never materialise their intermediates:

- :func:`diffusion_loss`: DiffRec's ``training_losses`` per row in one pass over the (B, N) rows
  (``torch.ops.diffcore.training_diffusion_loss``): the MSE over items, its float64 weight
  ``SNR(t-1) - SNR(t)`` (x0 model) or ``(1 - ab) / ((1 - ab_prev)^2 (1 - beta))`` (eps model), the
  t = 0 cases, the division by ``pt``; the loss is float64, as DiffRec's is.
- :class:`TimestepSampler`: DiffRec's importance sampling of timesteps with its ``Lt_history``
  (``training_history_update_``, no Python loop over the batch, no device sync).
- :func:`bpr_loss`: LightGCN's BPR loss and L2 term, gathered rows never stored; the backward
  scatters into the embedding tables (``training_bpr_loss``).
- :func:`info_nce`: SGL's in-batch InfoNCE without the (B, B) matrix (``training_info_nce``).

Each call goes to the dispatcher (C++ on CPU, Triton on CUDA), or to the implementation forced by
``diffcore.use``, whose backward then runs through the same implementation.
"""

from __future__ import annotations

from typing import Sequence, overload

import torch

from diffcore import _checks, _library, _registry
from diffcore.diffusion import PREDICTIONS, Schedule

__all__ = ["diffusion_loss", "TimestepSampler", "bpr_loss", "info_nce"]

SAMPLERS = ("uniform", "importance")
REDUCTIONS = ("mean", "sum", "none")
SIMILARITIES = ("cosine", "dot")
LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
UNIFORM_PROB = 0.001  # DiffRec's mixing weight of the uniform distribution


# --- running an op ------------------------------------------------------------------------------
def _run(op: str, *args) -> torch.Tensor:
    """The loss op ``op`` through the dispatcher, or the forced implementation with autograd."""
    impl = _registry.forced_for(op, args[0].device)
    if impl is None:
        return getattr(torch.ops.diffcore, op)(*args)
    return _library.run_forced(op, impl, args, lambda: _library.training_outputs(op, args))


# --- diffusion loss -----------------------------------------------------------------------------
def _loss_table(schedule: Schedule, prediction: str) -> torch.Tensor:
    """(T, 5) rows ``(w, sqrt_ab, sqrt_1mab, sqrt_recip_ab, sqrt_recipm1_ab)`` in the schedule's
    dtype; ``w`` is DiffRec's weight, 1 at t = 0 (DiffRec's ``torch.where(ts == 0, 1.0, w)``)."""

    def build():
        ab = schedule.alphas_cumprod
        if schedule.noise_scale == 0.0:
            weight = torch.ones_like(schedule.betas)
        elif prediction == "x0":  # SNR(t - 1) - SNR(t); t = 0 reads SNR(-1), then becomes 1
            snr = ab / (1 - ab)
            weight = snr[torch.arange(schedule.num_steps, device=ab.device) - 1] - snr
        else:
            weight = (1 - ab) / ((1 - schedule.alphas_cumprod_prev) ** 2 * (1 - schedule.betas))
        weight = torch.where(torch.arange(schedule.num_steps, device=ab.device) == 0, 1.0, weight)
        return (weight, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod,
                schedule.sqrt_recip_alphas_cumprod, schedule.sqrt_recipm1_alphas_cumprod)

    return schedule._table(("training_loss", prediction), build)


def diffusion_loss(
    model_out: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor | None,
    t: int | torch.Tensor,
    schedule: Schedule,
    *,
    prediction: str = "x0",
    reweight: bool = True,
    pt: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiffRec's ``training_losses`` per row, after the model call, in one fused pass::

        term = mean_j (target - model_out)^2             target = x0 ("x0") or noise ("eps")
        w    = SNR(t-1) - SNR(t)                          "x0": SNR = ab / (1 - ab), float64
             = (1 - ab) / ((1 - ab_prev)^2 (1 - beta))    "eps"
        w    = 1 at t = 0; "eps" at t = 0: term = mean_j (x0 - x0_hat)^2 / 2 with
               x_t = sqrt(ab) x0 + sqrt(1 - ab) noise, x0_hat = sqrt(1/ab) x_t - sqrt(1/ab - 1) model_out
               (float32 coefficients, as DiffRec's ``_extract_into_tensor`` gives them)
        loss = w * term / pt

    ``reweight=False``: ``w = 1`` and the plain MSE at every t (DiffRec leaves this branch's
    ``loss`` unbound; this is its evident meaning). A schedule with ``noise_scale == 0`` has no SNR
    tables, as in DiffRec: it needs ``reweight=False``.

    Args:
        model_out: (B, N) float32/float16/bfloat16 (float32 math) or float64; rows may be strided.
        x0: (B, N) like model_out, the clean rows (DiffRec's ``x_start``).
        noise: (B, N) like model_out, the noise that made ``x_t``; needed for ``"eps"`` (target and
            the t = 0 case), unused for ``"x0"`` (may be None).
        t: int, or int64 tensor (B,) or (1,); outside [0, T) raises.
        pt: (B,) float tensor of sampling probabilities (``TimestepSampler.sample``), every value
            > 0; None: no division (the loss :meth:`TimestepSampler.update` takes).
    Returns:
        (B,) float64, DiffRec's ``terms["loss"]``. Differentiable in model_out, x0 and noise (not
        pt: it is a sampling probability).
    """
    _checks.float_tensor("model_out", model_out, ndim=2, dtypes=LOSS_DTYPES)
    _checks.like("x0", x0, model_out, "model_out")
    _choice("prediction", prediction, PREDICTIONS)
    eps = prediction == "eps"
    if noise is not None:
        _checks.like("noise", noise, model_out, "model_out")
    elif eps:
        raise ValueError("noise: prediction='eps' needs the noise (its target)")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a diffcore.Schedule, got {type(schedule).__name__}")
    if schedule.device != model_out.device:
        raise ValueError(f"schedule: its tables are on {schedule.device}, model_out on {model_out.device}; "
                         "use schedule.to(device)")
    reweight = bool(reweight)
    if reweight and schedule.noise_scale == 0.0:
        raise ValueError("reweight: a schedule with noise_scale == 0 has no SNR weights (DiffRec has no tables "
                         "then); pass reweight=False")
    if eps and reweight:
        schedule.require_positive_alpha_bar("prediction='eps' with reweight")
    B = model_out.shape[0]
    t = _checks.timesteps("t", t, B, schedule.num_steps, model_out.device)
    if pt is not None:
        _checks.float_tensor("pt", pt, ndim=1, dtypes=LOSS_DTYPES)
        if pt.shape[0] != B:
            raise ValueError(f"pt: expected shape ({B},) (one probability per row), got {tuple(pt.shape)}")
        if pt.device != model_out.device:
            raise ValueError(f"pt: expected a tensor on {model_out.device} (the device of model_out), got {pt.device}")
    table = _loss_table(schedule, prediction)
    return _run("training_diffusion_loss", model_out, x0, noise, t, table, pt, eps, reweight)


# --- timestep sampler ---------------------------------------------------------------------------
class TimestepSampler:
    """DiffRec's timestep sampling with its per-timestep loss history ``Lt_history``.

    ``kind="importance"``: uniform until every timestep has ``history`` losses (the warm-up), then
    ``pt_all = sqrt(mean(Lt^2))`` normalised and mixed ``* (1 - uniform_prob) + uniform_prob / T``,
    ``t ~ multinomial(pt_all)``, ``pt = pt_all[t] * T``. ``kind="uniform"``: ``t ~ randint(T)``,
    ``pt = 1``. :meth:`update` keeps the history in both kinds, as DiffRec's training step does.

    Args:
        steps: T, a positive int.
        kind: ``"uniform"`` or ``"importance"``.
        history: the losses kept per timestep, a positive int (DiffRec's ``history_num_per_term``).
        uniform_prob: a real number (Python or numpy) in [0, 1], the weight of the uniform
            distribution in the mix (DiffRec's 0.001).

    Attributes:
        history: (T, history) float64, DiffRec's ``Lt_history`` (FIFO per timestep, oldest first).
        count: (T,) int64, DiffRec's ``Lt_count``.
    """

    def __init__(
        self,
        steps: int,
        kind: str = "uniform",
        history: int = 10,
        *,
        uniform_prob: float = UNIFORM_PROB,
        device: torch.device | str = "cpu",
    ) -> None:
        steps, history = (_checks.integer(name, value, lambda v: v >= 1, "a positive int")
                          for name, value in (("steps", steps), ("history", history)))
        _choice("kind", kind, SAMPLERS)
        uniform_prob = _checks.real("uniform_prob", uniform_prob, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]")
        self.steps, self.kind, self.uniform_prob = steps, kind, uniform_prob
        self.history = torch.zeros(steps, history, dtype=torch.float64, device=device)
        self.count = torch.zeros(steps, dtype=torch.int64, device=device)
        self._warm = False  # every history full: counts never decrease, so it stays so

    @property
    def device(self) -> torch.device:
        return self.history.device

    def warm(self) -> bool:
        """Whether every timestep has a full history (importance sampling has begun). Reads the
        counts until it is first true (a device sync on CUDA), never after."""
        if not self._warm:
            self._warm = bool((self.count == self.history.shape[1]).all())
        return self._warm

    def probabilities(self) -> torch.Tensor:
        """(T,) float64 ``pt_all`` as DiffRec computes it from the history (NaN where the history
        gives no distribution: all zeros, or squares that overflow; :meth:`sample` raises then)."""
        lt_sqrt = torch.sqrt(torch.mean(self.history**2, dim=-1))
        pt_all = lt_sqrt / torch.sum(lt_sqrt)
        return pt_all * (1 - self.uniform_prob) + self.uniform_prob / self.steps

    def _check_distribution(self, pt_all: torch.Tensor, just_warm: bool) -> None:
        """``pt_all`` must be a distribution for ``multinomial``: finite, >= 0, a positive sum.

        Reading the values is a device sync on CUDA: it is done on every call for a CPU sampler,
        and on CUDA only in the call that ends the warm-up (which syncs on the counts already,
        once per sampler), never after; a CUDA history that turns non-finite later is left to
        ``torch.multinomial``. Skipped under ``torch.compile`` (reading values breaks the graph)."""
        if torch.compiler.is_compiling() or (self.device.type != "cpu" and not just_warm):
            return
        finite = torch.isfinite(pt_all)
        if bool(finite.all() & (pt_all >= 0).all() & (pt_all.sum() > 0)):
            return
        lt_sqrt = torch.sqrt(torch.mean(self.history**2, dim=-1))
        if not bool(torch.isfinite(self.history).all()):
            why = "it holds NaN or inf"
        elif not bool(torch.isfinite(lt_sqrt).all()):
            why = "its squared losses overflow float64"
        elif float(lt_sqrt.sum()) == 0:
            why = "every loss in it is 0"
        else:
            why = f"pt_all has {int((~finite).sum())} non-finite values"
        raise ValueError(f"history: expected losses whose importance weights sqrt(mean(Lt^2)) form a distribution "
                         f"(finite, not all 0), got a history where {why}")

    def sample(
        self, batch_size: int, generator: torch.Generator | int | None = None, *, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws ``batch_size`` timesteps.

        Args:
            generator: a ``torch.Generator`` on the sampler's device, or an int seed in
                [0, 2**64) (a fresh generator); None: the global RNG (as DiffRec draws).
            seed: an int in [0, 2**64), the same as an int ``generator`` (checked as every seed
                of diffcore is, by ``_checks.seed_offset``). A given generator draws exactly
                DiffRec's values (``randint``/``multinomial`` in its order).
        Returns:
            ``t``: (B,) int64 and ``pt``: (B,) float64 (1 while uniform), on the sampler's device.
        Raises:
            ValueError: importance sampling from a history whose weights are no distribution
                (all losses 0, NaN/inf, squares overflowing float64); on CUDA checked only once,
                when the warm-up ends (see ``_check_distribution``).
        """
        batch_size = _checks.integer("batch_size", batch_size, lambda v: v >= 0, "a non-negative int")
        if seed is not None:
            if generator is not None:
                raise ValueError("generator and seed: give one, not both")
            seed, _ = _checks.seed_offset(seed, 0)  # "seed: expected an int in [0, 2**64) ..., got ..."
            generator = torch.Generator(self.device).manual_seed(seed)
        elif _checks.is_int(generator):
            try:
                seed, _ = _checks.seed_offset(generator, 0)
            except ValueError:
                raise ValueError(f"generator: expected a torch.Generator or an int seed in [0, 2**64), got "
                                 f"{generator}") from None
            generator = torch.Generator(self.device).manual_seed(seed)
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or an int seed, got {type(generator).__name__}")
        was_warm = self._warm
        if self.kind == "importance" and self.warm():
            pt_all = self.probabilities()
            self._check_distribution(pt_all, just_warm=not was_warm)
            if batch_size == 0:  # multinomial refuses to draw no samples
                t = torch.zeros(0, dtype=torch.long, device=self.device)
            else:
                t = torch.multinomial(pt_all, num_samples=batch_size, replacement=True, generator=generator)
            return t, pt_all.gather(dim=0, index=t) * self.steps
        t = torch.randint(0, self.steps, (batch_size,), device=self.device, generator=generator)
        return t, torch.ones(batch_size, dtype=torch.float64, device=self.device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Appends each row's loss to its timestep's history, exactly as DiffRec's loop over the
        batch does (rows in batch order: a timestep drawn k times gets k values, the last
        ``history`` kept), in one op; ``losses`` are detached.

        Args:
            t: (B,) int64 timesteps (those :meth:`sample` gave); outside [0, T) raises.
            losses: (B,) float, the weighted loss before division by pt (:func:`diffusion_loss`
                without ``pt``), as DiffRec's ``Lt_history`` holds it; finite (the importance
                weights are ``sqrt(mean(Lt^2))``; the sign does not enter them). Checked for a
                CPU sampler outside ``torch.compile``; on CUDA not (reading the values would be a
                device sync every training step): :meth:`sample` checks the weights there once,
                when the warm-up ends.
        Raises:
            ValueError: a NaN or inf loss (CPU); the history is left unchanged.
        """
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"t: expected a 1-D int64 tensor, got {_describe(t)}")
        _checks.float_tensor("losses", losses, ndim=1, dtypes=LOSS_DTYPES)
        if losses.shape != t.shape:
            raise ValueError(f"losses: expected shape {tuple(t.shape)} (one loss per timestep), got "
                             f"{tuple(losses.shape)}")
        for name, v in (("t", t), ("losses", losses)):
            if v.device != self.device:
                raise ValueError(f"{name}: expected a tensor on {self.device} (the sampler's device), got {v.device}")
        losses = losses.detach()
        # Values are read on the CPU only: on CUDA this would be a device sync in every training
        # step; under torch.compile it would break the graph. The kernels check t, not losses.
        if self.device.type == "cpu" and not torch.compiler.is_compiling():
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                i = int((~finite).nonzero()[0, 0])
                raise ValueError(f"losses: expected finite losses (the importance weights are sqrt(mean(Lt^2))), "
                                 f"got losses[{i}] = {float(losses[i])}")
        impl = _registry.forced_for("training_history_update", self.device)
        if impl is None:
            torch.ops.diffcore.training_history_update_(self.history, self.count, t, losses)
        else:
            impl(self.history, self.count, t, losses)

    def __repr__(self) -> str:
        return (f"TimestepSampler(steps={self.steps}, kind={self.kind!r}, history={self.history.shape[1]}, "
                f"device={self.device})")


# --- BPR ----------------------------------------------------------------------------------------
@overload
def bpr_loss(
    user_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor, /, *,
    ego: Sequence[torch.Tensor] | None = None, weight_decay: float = 0.0, reduction: str = "mean",
) -> torch.Tensor: ...


@overload
def bpr_loss(
    E: torch.Tensor | Sequence[torch.Tensor], users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, /, *,
    ego: torch.Tensor | Sequence[torch.Tensor] | None = None, weight_decay: float = 0.0, reduction: str = "mean",
) -> torch.Tensor: ...


def bpr_loss(
    *operands: torch.Tensor | Sequence[torch.Tensor],
    ego: torch.Tensor | Sequence[torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """LightGCN's BPR loss with its L2 term, per row::

        loss_b = softplus(<u_b, n_b> - <u_b, p_b>) + weight_decay * 0.5 (|u0_b|^2 + |p0_b|^2 + |n0_b|^2)

    ``reduction="mean"`` is LightGCN's ``loss + weight_decay * reg_loss``. Two forms:

    - rows: ``bpr_loss(user_emb, pos_emb, neg_emb)``, each (B, d); ``ego=(u0, p0, n0)`` the
      layer-0 rows (B, d) of the L2 term;
    - indices: ``bpr_loss(E, users, pos, neg)`` with ``E = (user_table, item_table)`` (LightGCN's
      ``computer()`` output; one tensor: the same table for users and items) and int (B,)
      indices; ``ego`` the layer-0 tables, ``(E0_users, E0_items)`` or one tensor. The rows are
      gathered inside the kernel and never stored; the backward scatters into the tables.

    ``ego=None``: the L2 term is on the scored rows themselves (MF-BPR).

    Args:
        weight_decay: LightGCN's ``decay`` (its ``weight_decay``); 0 drops the L2 term.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` ((B,) per-row losses).
    Returns:
        A scalar (or (B,)) in the tables' dtype (float32 math for float16/bfloat16, float64 for
        float64). Differentiable in every table.
    """
    _choice("reduction", reduction, REDUCTIONS)
    weight_decay = _checks.real("weight_decay", weight_decay, _checks.finite_non_negative, "a finite weight_decay >= 0")
    if len(operands) == 3:
        names = ("user_emb", "pos_emb", "neg_emb")
        user_emb, pos_emb, neg_emb = (_embedding_rows(n, v) for n, v in zip(names, operands))
        for name, v in (("pos_emb", pos_emb), ("neg_emb", neg_emb)):
            _checks.like(name, v, user_emb, "user_emb")
        B = user_emb.shape[0]
        index = torch.arange(2 * B, device=user_emb.device)
        user_table, item_table = user_emb, torch.cat([pos_emb, neg_emb])
        users, pos, neg = index[:B], index[:B], index[B:]
        user_ego = item_ego = None
        if ego is not None:
            if not isinstance(ego, (tuple, list)) or len(ego) != 3:
                raise TypeError("ego: the rows form takes (u0, p0, n0), the layer-0 rows (B, d) each")
            for name, v in zip(("ego[0]", "ego[1]", "ego[2]"), ego):
                _checks.like(name, v, user_emb, "user_emb")
            user_ego, item_ego = ego[0], torch.cat([ego[1], ego[2]])
    elif len(operands) == 4:
        E, users, pos, neg = operands
        user_table, item_table = _tables("E", E)
        users, pos, neg = (_indices(n, v, user_table.device) for n, v in (("users", users), ("pos", pos), ("neg", neg)))
        for name, v in (("pos", pos), ("neg", neg)):
            if v.shape != users.shape:
                raise ValueError(f"{name}: expected shape {tuple(users.shape)} (the shape of users), got "
                                 f"{tuple(v.shape)}")
        user_ego = item_ego = None
        if ego is not None:
            user_ego, item_ego = _tables("ego", ego)
            for name, v, ref in (("ego users", user_ego, user_table), ("ego items", item_ego, item_table)):
                if v.dtype != ref.dtype or v.device != ref.device or v.shape[1:] != ref.shape[1:]:
                    raise ValueError(f"{name}: expected a (n, {ref.shape[1]}) {ref.dtype} table on {ref.device}, got "
                                     f"{tuple(v.shape)} {v.dtype} on {v.device}")
    else:
        raise TypeError(f"bpr_loss: expected (user_emb, pos_emb, neg_emb) or (E, users, pos, neg), got {len(operands)} "
                        "positional arguments")
    args = (user_table, item_table, users, pos, neg, user_ego, item_ego, weight_decay, reduction)
    return _run("training_bpr_loss", *args)


def _embedding_rows(name: str, v: object) -> torch.Tensor:
    return _checks.float_tensor(name, v, ndim=2, dtypes=LOSS_DTYPES)


def _tables(name: str, E: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(E, torch.Tensor):
        E = (E, E)
    if not isinstance(E, (tuple, list)) or len(E) != 2:
        raise TypeError(f"{name}: expected (user_table, item_table) or one table, got {_describe(E)}")
    users, items = (_embedding_rows(f"{name}[{i}]", v) for i, v in enumerate(E))
    if items.dtype != users.dtype or items.device != users.device or items.shape[1] != users.shape[1]:
        raise ValueError(f"{name}: the item table must match the user table's dtype, device and width; got "
                         f"{tuple(users.shape)} {users.dtype} on {users.device} and {tuple(items.shape)} {items.dtype} "
                         f"on {items.device}")
    return users, items


def _indices(name: str, v: object, device: torch.device) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dtype not in (torch.int64, torch.int32) or v.dim() != 1:
        raise TypeError(f"{name}: expected a 1-D int64 or int32 tensor of indices, got {_describe(v)}")
    if v.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the tables), got {v.device}")
    return v


# --- InfoNCE ------------------------------------------------------------------------------------
def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float,
    *,
    similarity: str = "cosine",
    symmetric: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """SGL's in-batch InfoNCE: row i of ``a`` against every row of ``b``, its positive ``b_i``::

        loss_i = logsumexp_j(s_ij / tau) - s_ii / tau,   s_ij = <a^_i, b^_j>

    with ``a^ = a / max(|a|, 1e-12)`` for ``similarity="cosine"`` (``F.normalize``), the rows
    as given for ``"dot"``. ``reduction="mean"`` is SELFRec's ``InfoNCE``; ``symmetric`` averages
    the a->b and b->a losses. Fused and stable: no (B, B) matrix is stored, the logsumexp runs
    with its running maximum.

    Args:
        a, b: (B, d) float32/float16/bfloat16 (float32 math) or float64, the same shape.
        temperature: tau > 0.
    Returns:
        A scalar, or (B,) for ``reduction="none"``, in a's dtype. Differentiable in a and b.
    """
    _checks.float_tensor("a", a, ndim=2, dtypes=LOSS_DTYPES)
    if isinstance(b, torch.Tensor) and b.dim() == 2 and b.shape[0] != a.shape[0]:
        raise ValueError(f"b: expected {a.shape[0]} rows (the batch of a), got {b.shape[0]}")
    _checks.like("b", b, a, "a")
    temperature = _checks.real("temperature", temperature, _checks.finite_positive, "a positive float (finite)")
    _choice("similarity", similarity, SIMILARITIES)
    _choice("reduction", reduction, REDUCTIONS)
    args = (temperature, similarity == "cosine", reduction)
    loss = _run("training_info_nce", a, b, *args)
    if symmetric:
        loss = 0.5 * (loss + _run("training_info_nce", b, a, *args))
    return loss


def _choice(name: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def _describe(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dim()}-D {v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__
