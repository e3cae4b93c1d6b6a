"""Drop-in acceleration of LightGCN-PyTorch's ``LightGCN``: ``computer()`` runs
:func:`diffcore.sparse.propagate` (one fused op forward, one over the transpose backward).

::

    from diffcore.compat import lightgcn
    with lightgcn.accelerate(model):      # model.computer() (and so forward, getUsersRating,
        ...                               # bpr_loss) now propagate with diffcore

Duck-typed: the model needs ``embedding_user`` / ``embedding_item`` (``nn.Embedding``), ``Graph``
(a square torch sparse tensor, already normalised: the :class:`~diffcore.sparse.Adjacency` is
built once with ``Adjacency.from_torch(Graph, norm="none")``), ``n_layers`` and ``computer()``.
The layer combination is LightGCN's mean over the L + 1 layers, and the users/items split uses
``num_users`` / ``num_items`` (or the embeddings' sizes).

RecBole's layout (``user_embedding`` / ``item_embedding``, ``norm_adj_matrix``, ``n_layers``,
``n_users`` / ``n_items``, the propagation in ``forward()``) is recognised too: then ``forward``
is the method replaced.

Edge dropout in training (``config["dropout"]`` with ``model.training``) changes the graph each
call: that path is left to the original ``computer()``. A graph split into folds (``A_split``,
``Graph`` a list) is refused. The graph is read once: rebuild (``restore()`` and accelerate again)
after replacing ``model.Graph``. The Adjacency keeps its edge values in float32 (diffcore.sparse's
rule), so a float64 model propagates float64 embeddings over float32 weights: equal to the original
to about 1e-9, not to float64 rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from diffcore.sparse import Adjacency, propagate

__all__ = ["accelerate", "AcceleratedLightGCN"]

_MISSING = object()
_LIGHTGCN_PYTORCH = ("embedding_user", "embedding_item", "Graph", "n_layers", "computer")
_RECBOLE = ("user_embedding", "item_embedding", "norm_adj_matrix", "n_layers", "n_users", "n_items", "forward")


class AcceleratedLightGCN:
    """The handle :func:`accelerate` returns; ``restore()`` (or ``with`` exit) puts the original
    ``computer`` back. ``adj`` is the :class:`~diffcore.sparse.Adjacency` in use."""

    def __init__(self, model: Any) -> None:
        if all(hasattr(model, name) for name in _RECBOLE) and not hasattr(model, "Graph"):
            self.layout = "recbole"
            self.method, graph_name = "forward", "norm_adj_matrix"
            self._embeddings = ("user_embedding", "item_embedding")
            self._counts = ("n_users", "n_items")
        else:
            for name in _LIGHTGCN_PYTORCH:
                if not hasattr(model, name):
                    raise TypeError(
                        f"model: expected an object shaped like LightGCN-PyTorch's (or RecBole's) LightGCN, it has "
                        f"no {name!r}"
                    )
            self.layout = "lightgcn-pytorch"
            self.method, graph_name, self._embeddings = "computer", "Graph", ("embedding_user", "embedding_item")
            self._counts = ("num_users", "num_items")
        current = model.__dict__.get(self.method)
        if isinstance(getattr(current, "__self__", None), AcceleratedLightGCN):
            raise ValueError("model: already accelerated; restore() it first")
        graph = getattr(model, graph_name)
        if isinstance(graph, (list, tuple)):
            raise TypeError(f"model.{graph_name}: a graph split into folds (a list: LightGCN-PyTorch's A_split) is not "
                            "supported; build it whole (A_split=False)")
        if not isinstance(graph, torch.Tensor) or graph.layout not in (torch.sparse_coo, torch.sparse_csr):
            raise TypeError(f"model.{graph_name}: expected a torch sparse tensor, got {type(graph).__name__}")
        self.model = model
        self.adj = Adjacency.from_torch(graph, norm="none")
        self._adjs: dict[torch.device, Adjacency] = {self.adj.device: self.adj}
        self._original = getattr(model, self.method)
        self._saved = model.__dict__.get(self.method, _MISSING)
        setattr(model, self.method, self.computer)
        self.active = True

    def _adj_on(self, device: torch.device) -> Adjacency:
        if device not in self._adjs:
            self._adjs[device] = self.adj.to(device)
        return self._adjs[device]

    def _dropout_active(self) -> bool:
        config = getattr(self.model, "config", None)
        dropout = config.get("dropout", False) if isinstance(config, dict) else getattr(self.model, "dropout", False)
        return bool(dropout) and bool(getattr(self.model, "training", False))

    def computer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users, items)``: the mean of ``A^k E0`` for k = 0 .. n_layers, split as the original."""
        if self.layout == "lightgcn-pytorch" and self._dropout_active():
            return self._original()
        m = self.model
        users_emb, items_emb = (getattr(m, name).weight for name in self._embeddings)
        n_users = getattr(m, self._counts[0], users_emb.shape[0])
        n_items = getattr(m, self._counts[1], items_emb.shape[0])
        all_emb = torch.cat([users_emb, items_emb])
        out = propagate(self._adj_on(all_emb.device), all_emb, int(m.n_layers), "mean")
        users, items = torch.split(out, [n_users, n_items])
        return users, items

    def restore(self) -> None:
        """Puts the original ``computer`` (RecBole: ``forward``) back (idempotent)."""
        if not self.active:
            return
        if self._saved is _MISSING:
            self.model.__dict__.pop(self.method, None)
        else:
            setattr(self.model, self.method, self._saved)
        self.active = False

    def __enter__(self) -> AcceleratedLightGCN:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        return f"AcceleratedLightGCN({type(self.model).__name__}, layout={self.layout!r}, adj={self.adj!r}, {state})"


def accelerate(model: Any) -> AcceleratedLightGCN:
    """Replaces ``model.computer`` (RecBole: ``model.forward``) on the instance with diffcore's propagation over an
    :class:`~diffcore.sparse.Adjacency` built once from ``model.Graph``; returns the handle whose
    ``restore()`` (or ``with`` exit) undoes it."""
    return AcceleratedLightGCN(model)
