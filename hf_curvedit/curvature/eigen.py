"""Eigendecomposition of K-FAC factors (fp64, symmetrized, clamped, sorted descending) and its file format.

The bottom layer of the curvature package: it needs nothing from collection or storage. `eigendecompose` (factors →
bases, with the cache next to the factor file) lives with the factors in `storage.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import Fix, InputError, InputKeyError
from ..integrity import read_safetensors
from ..utils import all_finite, save_safetensors

EIGEN_FILENAME = "eigen.safetensors"
EIGEN_FORMAT = "hf_curvedit.eigen"
REBUILD_EIGEN = Fix(python="Delete it and eigendecompose the factors again (load_factors(folder).eigendecompose(); a "
                           "damaged cache next to its factors is recomputed by any call that reads them)",
                    cli="Delete it and run any hf-curvedit command that reads the factors (a damaged cache next to its "
                        "factors is recomputed)")


@dataclass
class ModuleEigen:
    """Eigenbasis of one module's factors: ``A = U_A diag(μ) U_Aᵀ`` and ``G = U_G diag(λ) U_Gᵀ``.

    Eigenvalues are float64, non-negative and sorted in descending order; eigenvectors are the
    matching columns (computed in float64, kept in the factors' dtype: float32 unless they were accumulated in
    float64). For an expert projection every tensor has a leading experts dimension (one basis per
    expert, see `expert`) and ``num_tokens`` holds how many tokens each expert's factors saw. ``eigvals_corrected``,
    when EK-FAC measured it, is the ``(d_out, d_in)`` curvature of each component in this basis.
    """

    eigvals_A: torch.Tensor  # (d_in,) or (experts, d_in)
    eigvecs_A: torch.Tensor  # (d_in, d_in) or (experts, d_in, d_in)
    eigvals_G: torch.Tensor  # (d_out,) or (experts, d_out)
    eigvecs_G: torch.Tensor  # (d_out, d_out) or (experts, d_out, d_out)
    num_tokens: torch.Tensor | None = None  # (experts,) int64, for an expert projection
    # EK-FAC: the measured curvature of each component (d_out, d_in), see `hf_curvedit.curvature.correction`
    eigvals_corrected: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the weight this basis belongs to (of one expert's matrix for an expert projection)."""
        return int(self.eigvals_G.shape[-1]), int(self.eigvals_A.shape[-1])

    @property
    def num_experts(self) -> int | None:
        """The number of experts of a stacked basis, ``None`` for a linear layer's."""
        return int(self.eigvals_G.shape[0]) if self.eigvals_G.dim() == 2 else None

    def expert(self, index: int) -> ModuleEigen:
        """The basis of one expert of a stacked (expert projection) basis."""
        if self.num_experts is None:
            raise InputError("this eigenbasis belongs to a linear layer, not to an expert projection")
        return ModuleEigen(self.eigvals_A[index], self.eigvecs_A[index], self.eigvals_G[index],
                           self.eigvecs_G[index])


def symmetric_eigh(matrix: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decompose a PSD matrix in float64: symmetrize, clamp eigenvalues at 0, sort descending.

    The decomposition runs on `device` (the CPU by default; a GPU with fast float64, e.g. ``"cuda"``, for large
    factors); the results are returned on the CPU.
    """
    if matrix.dim() == 3:  # a stack (one factor per expert), one at a time to bound the float64 workspace
        pairs = [symmetric_eigh(m, device) for m in matrix]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    m = matrix.detach().to(device, torch.float64)
    if not all_finite(m):
        raise InputError("cannot eigendecompose a factor with non-finite entries (NaN or inf)")
    m = 0.5 * (m + m.T)
    vals, vecs = torch.linalg.eigh(m)  # ascending
    vals = vals.flip(0).clamp_min(0.0)
    vecs = vecs.flip(1).contiguous()
    return vals.cpu(), vecs.cpu()


class KFACEigen(Mapping[str, ModuleEigen]):
    """Per-module eigenbases, keyed by the module's qualified name, plus the factors' metadata."""

    def __init__(self, modules: dict[str, ModuleEigen], metadata: dict[str, Any] | None = None):
        self.modules = dict(modules)
        self.metadata = dict(metadata or {})

    def __getitem__(self, name: str) -> ModuleEigen:
        return self.modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        return f"KFACEigen({len(self)} modules)"

    def save(self, path: str | Path) -> Path:
        """Write all bases to one safetensors file (atomically)."""
        tensors = {f"{name}.{kind}": getattr(e, kind) for name, e in self.modules.items()
                   for kind in ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G", "num_tokens")
                   if getattr(e, kind) is not None}
        meta = {"format": EIGEN_FORMAT, "modules": json.dumps(list(self.modules)),
                "metadata": json.dumps(self.metadata)}
        return save_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, modules: list[str] | None = None) -> KFACEigen:
        """Read bases from ``path``; ``modules`` restricts which ones are loaded."""
        path = Path(path)
        with read_safetensors(path, "an hf-curvedit eigenbasis file", REBUILD_EIGEN) as f:
            meta = f.metadata
            if meta.get("format") != EIGEN_FORMAT:
                raise f.damaged("is not an hf-curvedit eigenbasis file")
            names = json.loads(meta["modules"])
            if modules is not None:
                missing = [m for m in modules if m not in names]
                if missing:
                    raise InputKeyError(f"{path} has no eigenbasis for modules {missing}; it holds {names}")
                names = [n for n in names if n in set(modules)]
            keys = set(f.keys())

            get = f.get

            out = {
                n: ModuleEigen(get(f"{n}.eigvals_A"), get(f"{n}.eigvecs_A"), get(f"{n}.eigvals_G"),
                               get(f"{n}.eigvecs_G"), get(f"{n}.num_tokens") if f"{n}.num_tokens" in keys else None)
                for n in names
            }
        return cls(out, json.loads(meta.get("metadata", "{}")))
