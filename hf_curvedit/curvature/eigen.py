"""Eigendecomposition of K-FAC factors (fp64, symmetrized, clamped, sorted descending)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import atomic_path

EIGEN_FILENAME = "eigen.safetensors"


@dataclass
class ModuleEigen:
    """Eigenbasis of one module's factors: ``A = U_A diag(μ) U_Aᵀ`` and ``G = U_G diag(λ) U_Gᵀ``.

    Eigenvalues are float64, non-negative and sorted in descending order; eigenvectors are the
    matching columns (float64).
    """

    eigvals_A: torch.Tensor  # (d_in,)
    eigvecs_A: torch.Tensor  # (d_in, d_in)
    eigvals_G: torch.Tensor  # (d_out,)
    eigvecs_G: torch.Tensor  # (d_out, d_out)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the weight this basis belongs to."""
        return int(self.eigvals_G.numel()), int(self.eigvals_A.numel())


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decompose a PSD matrix in float64: symmetrize, clamp eigenvalues at 0, sort descending."""
    m = matrix.detach().to("cpu", torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError("cannot eigendecompose a factor with non-finite entries (NaN or inf)")
    m = 0.5 * (m + m.T)
    vals, vecs = torch.linalg.eigh(m)  # ascending
    vals = vals.flip(0).clamp_min(0.0)
    vecs = vecs.flip(1).contiguous()
    return vals, vecs


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
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, e in self.modules.items():
            for kind in ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G"):
                t = getattr(e, kind).contiguous()
                # Modules with a shared A (gate/up) share tensors; safetensors refuses shared memory.
                if t.data_ptr() in seen:
                    t = t.clone()
                seen.add(t.data_ptr())
                tensors[f"{name}.{kind}"] = t
        meta = {"format": "hf_curvedit.eigen", "modules": json.dumps(list(self.modules)),
                "metadata": json.dumps(self.metadata)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, modules: list[str] | None = None) -> "KFACEigen":
        """Read bases from ``path``; ``modules`` restricts which ones are loaded."""
        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "hf_curvedit.eigen":
                raise ValueError(f"{path} is not an hf-curvedit eigenbasis file")
            names = json.loads(meta["modules"])
            if modules is not None:
                missing = [m for m in modules if m not in names]
                if missing:
                    raise KeyError(f"{path} has no eigenbasis for modules {missing}; it holds {names}")
                names = [n for n in names if n in set(modules)]
            out = {
                n: ModuleEigen(
                    f.get_tensor(f"{n}.eigvals_A"), f.get_tensor(f"{n}.eigvecs_A"),
                    f.get_tensor(f"{n}.eigvals_G"), f.get_tensor(f"{n}.eigvecs_G"),
                )
                for n in names
            }
        return cls(out, json.loads(meta.get("metadata", "{}")))
