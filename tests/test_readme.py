"""The README's examples run as written: every ```python block, in order, in one namespace that
holds what the README leaves to the reader (a denoiser, interactions, a DiffRec-shaped model, ...).
A renamed argument, a changed signature or a name the package stops exporting fails here first.
One substitution: Amazon-book's 94,949 items become 949, so the Triton call (interpreted on the
CPU) stays quick; every other size is the README's."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHRINK = {"94_949": "949"}


def _blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    for old, new in SHRINK.items():
        blocks = [b.replace(old, new) for b in blocks]
    return blocks


def _models():
    spec = importlib.util.spec_from_file_location("readme_models", ROOT / "examples" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reader() -> dict:
    """What the README's reader already has, small."""
    models = _models()
    g = torch.Generator().manual_seed(0)
    n_users, n_items = 30, 150  # k = 100 of the README needs 100 items
    users, items = models.random_interactions(n_users, n_items, 600)
    history = torch.sparse_coo_tensor(torch.stack([users, items]), torch.ones(users.numel()),
                                      (n_users, n_items), check_invariants=True).coalesce().to_sparse_csr()
    diffusion = models.GaussianDiffusion(steps=5)
    return {
        # any denoiser signature (x_t, t), (x_t, condition, t): its first argument, squashed
        "denoiser": lambda x, *rest: torch.tanh(x),
        "score_fn": lambda x, t: -x,
        "x_start": torch.rand(4, 949, generator=g),
        "x_init": torch.randn(4096, 64, generator=g),
        "users": users, "items": items, "n_users": n_users, "n_items": n_items,
        "R": torch.randn(300, 200, generator=g).relu().to_sparse_csr(),
        "scores": torch.randn(n_users, n_items, generator=g), "history_csr": history,
        "user_emb": torch.randn(n_users, 16, generator=g), "item_emb": torch.randn(n_items, 16, generator=g),
        "crow": history.crow_indices(), "col": history.col_indices(),
        "diffusion": diffusion, "model": models.DNN(n_items, hidden=32).eval(),
        "batch": torch.rand(8, n_items, generator=g).round(), "steps": 5, "sampling_noise": False,
        "recmodel": models.LightGCN(n_users, n_items, users, items, dim=16),
        "h": torch.randn(16, 64, generator=g), "h_null": torch.randn(64, generator=g),
        "item_rep": torch.randn(16, 64, generator=g), "x_T": torch.randn(16, 64, generator=g),
    }


def test_readme_has_examples():
    assert len(_blocks()) >= 5


@torch.no_grad()
def test_readme_examples_run():
    namespace = _reader()
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # name the block: the traceback's line numbers count from its start
            pytest.fail(f"README python block {i} raised {type(e).__name__}: {e}")
