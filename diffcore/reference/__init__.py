"""Pure-PyTorch references: the meaning of every diffcore op, one module per family."""

from diffcore.reference import diffusion, linalg, random, retrieval, sde, sparse, sphere, training

__all__ = ["diffusion", "linalg", "random", "retrieval", "sde", "sparse", "sphere", "training"]
