"""SVD truncation: replace each weight by its best rank-k approximation (the Eckart–Young baseline)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..targets import weight_targets

__all__ = ["svd_truncation"]


@contextlib.contextmanager
def svd_truncation(model: nn.Module, module_names: Sequence[str], rank: int) -> Iterator[None]:
    """Temporarily replace each target's weight by its best rank-``rank`` approximation (SVD in float64; an expert
    projection expert by expert); the original weights are restored on exit, also after an error."""
    targets = weight_targets(model)
    saved = {}
    try:
        with torch.no_grad():
            for n in module_names:
                w = targets[n].parameter()
                saved[n] = w.detach().clone()
                u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)  # batched over experts
                k = min(rank, s.shape[-1])
                w.copy_(((u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]).to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                targets[n].parameter().copy_(w)
