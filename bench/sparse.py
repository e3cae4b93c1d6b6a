"""Sparse adjacency propagation: LightGCN's whole ``computer()`` (``propagate``, 3 layers, the mean)
on DESIGN.md's graph workloads, d = 64, forward and forward+backward.

Graphs are synthetic, drawn from ``config.seed`` with power-law degrees and the published sizes
(users, items, interactions) of Gowalla, Yelp2018 and Amazon-book; node ids are shuffled, so hubs
sit anywhere. Rows per workload and variant:
- diffcore: forward through every registered ``sparse_propagate`` implementation; forward+backward
  through the public API (the dispatcher's kernel and its backward over the cached transpose).
- LightGCN-PyTorch (the eager baseline): the normalised graph as a COO tensor, ``torch.sparse.mm``
  per layer, ``torch.stack`` and the mean, autograd for the backward.
- the same stack on a torch CSR tensor, and on scipy.sparse CSR (forward+backward: scipy has no
  autograd, so the backward is written out as the propagation over ``A_hat^T``).
All are checked against the float32 COO stack (its gradient, for forward+backward) before anything
is timed.
Bytes: per layer, the CSR arrays and one read and one write of the (n, d) layer (twice with the
backward); the roofline copy moves as many.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

import diffcore
from bench.core import (
    ALLOCATING,
    EAGER,
    Case,
    Config,
    Inputs,
    Provider,
    Target,
    Workload,
    dispatched,
    implementation_providers,
    mismatch,
)
from diffcore.reference import sparse as ref
from diffcore.sparse import Adjacency

FAMILY = "sparse"
DESCRIPTION = "LightGCN propagation (3 layers, mean, d = 64) over power-law user-item graphs"
OP = "propagate"
D, LAYERS = 64, 3
FORWARD, BACKWARD = "forward", "forward+backward"
CSR_STACK = "torch CSR stack"
ALPHA = 0.5  # degree exponent: P(user u) ~ rank(u)^-ALPHA, likewise items (max degrees ~2,000)


@dataclass(frozen=True)
class Graph:
    """A workload: a bipartite graph of n_users x n_items with nnz distinct interactions."""

    workload: Workload
    n_users: int
    n_items: int
    nnz: int


def _graph(name: str, n_users: int, n_items: int, nnz: int, note: str) -> Graph:
    return Graph(Workload(name, (n_users + n_items, D), f"{n_users:,} users x {n_items:,} items, "
                                                      f"{nnz:,} edges; {note}"), n_users, n_items, nnz)


GOWALLA = _graph("gowalla", 29_858, 40_981, 810_128, "LightGCN's Gowalla")
YELP2018 = _graph("yelp2018", 31_668, 38_048, 1_237_259, "LightGCN's Yelp2018")
AMAZON_BOOK = _graph("amazon-book", 52_643, 91_599, 2_380_730, "LightGCN's Amazon-book")
SMOKE = [_graph("smoke", 40, 60, 400, "tiny, for the test suite")]

TARGETS = [
    Target(FAMILY, OP, "gowalla", GOWALLA.workload.shape, FORWARD, ALLOCATING, "diffcore:cpu", "vs_eager", 8.0),
    Target(FAMILY, OP, "gowalla", GOWALLA.workload.shape, BACKWARD, ALLOCATING, "diffcore:cpu", "vs_eager", 5.0),
    Target(FAMILY, OP, "gowalla", GOWALLA.workload.shape, FORWARD, ALLOCATING, "diffcore:cpu", "vs_provider", 1.5,
           baseline=CSR_STACK),
]

NOTES = [
    "sparse: `diffcore:cpu` rows call `diffcore.sparse.propagate` as a model does (forward+backward under autograd); "
    "other implementations run through the registry, writing a preallocated output",
    "sparse: no torch.compile rows; torch.compile does not fuse sparse matrix products",
]


def settings(suite: str) -> list[Graph]:
    if suite == "smoke":
        return SMOKE
    if suite == "quick":  # the graph the targets name; the others only in the full suite
        return [GOWALLA]
    return [GOWALLA, YELP2018, AMAZON_BOOK]


def cases(config: Config) -> list[Case]:
    return [_case(g, config, variant) for g in settings(config.suite) for variant in (FORWARD, BACKWARD)]


def power_law_interactions(n_users: int, n_items: int, nnz: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nnz`` distinct (user, item) pairs with P(user of rank r) ~ r^-ALPHA (likewise items), ids
    shuffled; deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    p_users = torch.arange(1, n_users + 1, dtype=torch.float64) ** -ALPHA
    p_items = torch.arange(1, n_items + 1, dtype=torch.float64) ** -ALPHA
    keys = torch.empty(0, dtype=torch.long)
    while keys.numel() < nnz:
        draw = int(1.3 * (nnz - keys.numel())) + 64
        users = torch.multinomial(p_users, draw, replacement=True, generator=g)
        items = torch.multinomial(p_items, draw, replacement=True, generator=g)
        keys = torch.unique(torch.cat([keys, users * n_items + items]))
    keys = keys[torch.randperm(keys.numel(), generator=g)[:nnz]]
    user_ids, item_ids = torch.randperm(n_users, generator=g), torch.randperm(n_items, generator=g)
    return user_ids[keys // n_items], item_ids[keys % n_items]


def _case(graph: Graph, config: Config, variant: str) -> Case:
    backward = variant == BACKWARD
    elem = torch.empty((), dtype=config.dtype).element_size()
    n = graph.n_users + graph.n_items
    per_layer = graph.nnz * 2 * 4 + (n + 1) * 8 + 2 * n * D * elem
    check = _check(config.dtype, backward)

    def diffcore_forward(inputs: Inputs):
        adj, e0 = inputs["adj"], inputs["e0"]
        return lambda: diffcore.sparse.propagate(adj, e0, LAYERS)

    if backward:
        impl = diffcore.implementations("sparse_propagate")[dispatched(config.device)]
        name = f"diffcore:{impl.name}"
        run = _autograd(lambda i: diffcore.sparse.propagate(i["adj"], i["e0"], LAYERS))
        providers = [Provider(name, ALLOCATING, setup=run, check=check, unavailable=impl.reason(config.device))]
        notes = []
    else:
        providers, notes = implementation_providers(
            "sparse_propagate", config, calls={ALLOCATING: diffcore_forward}, checks={ALLOCATING: check},
            numel=n * D,
        )
        for p in providers:  # the C++ kernel as a model calls it: the dispatcher's, no copy into an out tensor
            if p.name == "diffcore:cpu":
                p.setup = diffcore_forward

    def stack(layout: str):
        def setup(inputs: Inputs):
            graph_t, e0 = inputs[layout], inputs["e0"]
            return lambda: ref.propagate(graph_t, e0, LAYERS)

        return _autograd(lambda i: ref.propagate(i[layout], i["e0"], LAYERS)) if backward else setup

    providers += [
        Provider("LightGCN-PyTorch: torch.sparse.mm on COO, stack, mean", ALLOCATING, setup=stack("coo"),
                 check=check, role=EAGER),
        Provider(CSR_STACK, ALLOCATING, setup=stack("csr"), check=check),
        Provider("scipy.sparse CSR stack" + (" (backward written out)" if backward else ""), ALLOCATING,
                 setup=_scipy(backward), check=check,
                 unavailable=None if config.device.type == "cpu" else "scipy runs on the CPU only"),
    ]
    return Case(
        FAMILY, OP, graph.workload, variant,
        bytes_moved=per_layer * LAYERS * (2 if backward else 1),
        make_inputs=lambda: _inputs(graph, config, backward),
        providers=providers,
        notes=notes + NOTES,
    )


def _autograd(forward):
    """A runner for forward+backward: ``forward(inputs)``, then the gradient of ``<out, G>`` wrt E0."""
    def setup(inputs: Inputs):
        e0, grad = inputs["e0"], inputs["grad"]

        def run() -> torch.Tensor:
            (g,) = torch.autograd.grad(forward(inputs), e0, grad)
            return g

        return run

    return setup


def _scipy(backward: bool):
    def setup(inputs: Inputs):
        A = inputs["scipy"]
        At = A.T.tocsr()
        e0 = inputs["e0"].detach().float().cpu().numpy()
        grad = inputs["grad"].float().cpu().numpy()

        def mean_stack(M, x: np.ndarray) -> np.ndarray:
            embs = [x]
            for _ in range(LAYERS):
                embs.append(M @ embs[-1])
            return np.stack(embs, 1).mean(1)

        def run() -> torch.Tensor:
            out = mean_stack(A, e0)
            if backward:
                out = mean_stack(At, grad)  # d<out, G>/dE0 = sum_k w_k (A^T)^k G
            return torch.from_numpy(out)

        return run

    return setup


def _inputs(graph: Graph, config: Config, backward: bool) -> Inputs:
    """The graph, its COO / CSR / scipy forms (LightGCN-PyTorch's normalised ``Graph``), E0 ~ N(0, 0.1)
    as LightGCN initialises its embeddings, and the upstream gradient G ~ N(0, 1)."""
    users, items = power_law_interactions(graph.n_users, graph.n_items, graph.nnz, config.seed)
    adj = Adjacency.from_interactions(users, items, graph.n_users, graph.n_items).to(config.device)
    g = torch.Generator().manual_seed(config.seed + 1)
    n = graph.n_users + graph.n_items
    e0 = (0.1 * torch.randn(n, D, generator=g)).to(device=config.device, dtype=config.dtype)
    coo = adj.to_sparse_coo(config.dtype)
    inputs: Inputs = {"adj": adj, "e0": e0.requires_grad_(backward), "coo": coo}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        inputs["csr"] = coo.to_sparse_csr()
    inputs["grad"] = torch.randn(n, D, generator=g).to(device=config.device, dtype=config.dtype)
    if config.device.type == "cpu":
        import scipy.sparse as sp

        c = adj.to_sparse_coo().coalesce()
        index = c.indices().numpy()
        inputs["scipy"] = sp.csr_matrix((c.values().numpy(), (index[0], index[1])), shape=(n, n))
    return inputs


def _check(dtype: torch.dtype, backward: bool):
    """Against the float32 COO stack (its gradient for forward+backward), computed once per case."""
    def check(inputs: Inputs, out: torch.Tensor) -> str | None:
        if "expected" not in inputs:
            graph = inputs["adj"].to_sparse_coo(torch.float32)
            e0 = inputs["e0"].detach().float()
            if backward:
                expected = ref.propagate(graph.t().coalesce(), inputs["grad"].float(), LAYERS)
            else:
                expected = ref.propagate(graph, e0, LAYERS)
            inputs["expected"] = expected
        return mismatch(out.to(inputs["expected"].device), inputs["expected"], dtype,
                        what="grad E0" if backward else "output")

    return check
