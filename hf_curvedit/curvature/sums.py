"""The sums a factor pass accumulates: upper-triangle covariance sums (half the GEMM work of a full one, mirrored
once at the end) and which modules read the same input (they share one A)."""

from __future__ import annotations

import torch

__all__ = ["InputSharing", "accumulate_upper", "mirror_upper"]

# Covariances are symmetric, so only the upper triangle is computed: as a few row strips
# acc[i0:i1, i0:] += x[:, i0:i1]ᵀ x[:, i0:], which covers every entry on or above the diagonal
# with ~(1 + 1/n)/2 of the GEMM work and few, large GEMM calls. The lower triangle is mirrored
# at the end.
_MIN_STRIP = 128
_MAX_STRIPS = 4


def _strips(d: int) -> list[tuple[int, int]]:
    n = max(1, min(_MAX_STRIPS, d // _MIN_STRIP))
    edges = [round(i * d / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def accumulate_upper(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc[upper triangle] += (xᵀx)[upper triangle] for x of shape (N, d); acc may be float64."""
    for i0, i1 in _strips(x.shape[1]):
        if acc.dtype == x.dtype:
            acc[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:])
        else:
            acc[i0:i1, i0:] += (x[:, i0:i1].T @ x[:, i0:]).to(acc.dtype)


def mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """Make ``acc`` (a sum filled by `accumulate_upper`, or a stack of them) the full symmetric matrix of its upper
    triangle, in place, and return it.

    `accumulate_upper` fills whole diagonal blocks of its strips and the blocks right of them, so only the blocks
    below the diagonal blocks are copied (no full-size temporary) and each diagonal block is made exactly symmetric.
    Idempotent: accumulating more and mirroring again gives the same result as mirroring once at the end.
    """
    for i0, i1 in _strips(acc.shape[-1]):
        block = acc[..., i0:i1, i0:i1]
        block.copy_(torch.triu(block) + torch.triu(block, 1).mT)
        acc[..., i1:, i0:i1] = acc[..., i0:i1, i1:].mT
    return acc


class InputSharing:
    """Which modules read the very same input tensor object (gate and up projections do): they share one A factor.

    `observe` each module's input during a forward pass; ``alias`` maps a module to the first one seen with the same
    tensor. Seen tensors are held until `reset`, so an id cannot be reused by another activation in between.
    """

    def __init__(self) -> None:
        self.alias: dict[str, str] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        seen = self._seen.get(id(x))
        if seen is not None and seen[1] is x:
            self.alias[name] = seen[0]
        else:
            self._seen[id(x)] = (name, x)

    def reset(self) -> None:
        """Forget the tensors of the last pass (the aliases found are kept)."""
        self._seen.clear()
