"""SVD truncation: replace each weight by its best rank-k approximation (the Eckart–Young baseline)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["svd_truncation"]


@contextlib.contextmanager
def svd_truncation(model: nn.Module, module_names: Sequence[str], rank: int) -> Iterator[None]:
    """Temporarily replace each module's weight by its best rank-``rank`` approximation (SVD in float64); the
    original weights are restored on exit, also after an error."""
    mods = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for n in module_names:
                w = mods[n].weight
                saved[n] = w.detach().clone()
                u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
                k = min(rank, s.numel())
                w.copy_(((u[:, :k] * s[:k]) @ vh[:k]).to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                mods[n].weight.copy_(w)
