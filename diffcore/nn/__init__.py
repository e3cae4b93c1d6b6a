"""nn.Modules over diffcore's ops.

Samplers (:mod:`diffcore.nn.samplers`): :class:`DreamRecSampler`, :class:`DiffuRecSampler`,
:class:`SphereSampler`, each over the user's denoiser callable.

:class:`LightGCNPropagation` replaces LightGCN's ``computer()``: the graph is built once, the
propagation runs as one fused op and its backward as one op over the transpose::

    # LightGCN-PyTorch                              # diffcore
    all_emb = torch.cat([users_emb, items_emb])     prop = LightGCNPropagation(
    embs = [all_emb]                                    Adjacency.from_interactions(
    for layer in range(self.n_layers):                      users, items, n_users, n_items),
        all_emb = torch.sparse.mm(g, all_emb)           num_layers=3)
        embs.append(all_emb)                        users, items = prop(self.embedding_user.weight,
    light_out = torch.stack(embs, 1).mean(1)                            self.embedding_item.weight)
    users, items = torch.split(light_out, [n_users, n_items])

Edge dropout during training (LightGCN's ``dropout`` flag) changes the graph per batch: build an
:class:`~diffcore.sparse.Adjacency` from the kept interactions and pass it as ``adj=``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from diffcore.nn.samplers import DiffuRecSampler, DreamRecSampler, SphereSampler
from diffcore.sparse import Adjacency, propagate

__all__ = ["LightGCNPropagation", "DreamRecSampler", "DiffuRecSampler", "SphereSampler"]


class LightGCNPropagation(nn.Module):
    """``sum_k w_k A_hat^k E0`` over a fixed graph: LightGCN's layer combination.

    Args:
        adj: the graph; from :meth:`Adjacency.from_interactions` the output splits into users and
            items. It follows the module's ``.to(device)``.
        num_layers: L.
        combine: ``"mean"`` (LightGCN), ``"sum"``, ``"last"`` or L + 1 layer weights.
    """

    def __init__(self, adj: Adjacency, num_layers: int = 3, combine: str | Sequence[float] = "mean") -> None:
        super().__init__()
        if not isinstance(adj, Adjacency):
            raise TypeError(f"adj: expected a diffcore.sparse.Adjacency, got {type(adj).__name__}")
        self.adj = adj
        self.num_layers = num_layers
        self.combine = combine

    def forward(
        self, users_emb: torch.Tensor, items_emb: torch.Tensor | None = None, *, adj: Adjacency | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``forward(E0)``: E0 (n, d) -> (n, d). ``forward(users_emb, items_emb)``: (n_users, d)
        and (n_items, d) -> their propagated tables, split as LightGCN's ``computer()`` returns
        them. ``adj`` overrides the module's graph for this call (e.g. an edge-dropped graph)."""
        graph = self.adj if adj is None else adj
        if items_emb is None:
            return propagate(graph, users_emb, self.num_layers, self.combine)
        if graph.n_users is None:
            raise ValueError("items_emb: splitting into users and items needs a graph from Adjacency.from_interactions")
        if users_emb.shape[0] != graph.n_users or items_emb.shape[0] != graph.n_items:
            raise ValueError(
                f"users_emb, items_emb: expected {graph.n_users} and {graph.n_items} rows, got "
                f"{users_emb.shape[0]} and {items_emb.shape[0]}"
            )
        out = propagate(graph, torch.cat([users_emb, items_emb]), self.num_layers, self.combine)
        return out[: graph.n_users], out[graph.n_users :]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.adj.device)).device
        if device != self.adj.device:
            self.adj = self.adj.to(device)
        return self

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, combine={self.combine!r}, adj={self.adj!r}"
