"""Drop-in acceleration of existing recommender code bases, duck-typed (diffcore imports none of them).

- :func:`diffcore.compat.diffrec.accelerate`: DiffRec / T-DiffRec / L-DiffRec / DDRM
  ``GaussianDiffusion`` objects: ``p_sample`` and ``q_sample`` run diffcore's fused steps.
- :func:`diffcore.compat.lightgcn.accelerate`: LightGCN-PyTorch ``LightGCN`` models:
  ``computer()`` runs :func:`diffcore.sparse.propagate`.

Each returns a handle with ``restore()`` that is also a context manager.
"""

from diffcore.compat import diffrec as diffrec
from diffcore.compat import lightgcn as lightgcn

__all__ = ["diffrec", "lightgcn"]
