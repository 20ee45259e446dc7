"""Eigendecomposition of K-FAC factors (fp64, symmetrized, clamped, sorted descending) and its file format.

The bottom layer of the curvature package: it needs nothing from collection or storage. Decomposing whole factor
sets (streamed module by module into a sharded cache, spread over processes) is `decompose.py`.

The eigen store (`hf_curvedit.shards`: ``eigen.safetensors``, or shards and ``eigen.safetensors.index.json``) names
its tensors ``<module>.eigvals_A``, ``.eigvecs_A``, ``.eigvals_G``, ``.eigvecs_G`` and, for an expert projection, one
of each per expert (``<module>.eigvecs_G.<e>``) plus ``<module>.num_tokens``. A module that shares another's input
(``a_alias``) stores no A basis of its own. Stores written before that (one file, experts stacked, every A stored)
read the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import Fix, InputError, InputKeyError
from ..integrity import DamagedFileError
from ..shards import TensorFiles, plan_shards, remove_tensor_files, write_index, write_shard
from ..utils import all_finite, save_safetensors

EIGEN_STEM = "eigen"
EIGEN_FILENAME = f"{EIGEN_STEM}.safetensors"
EIGEN_FORMAT = "hf_curvedit.eigen"
REBUILD_EIGEN = Fix(python="Delete it and eigendecompose the factors again (load_factors(folder).eigendecompose(); a "
                           "damaged cache next to its factors is recomputed by any call that reads them)",
                    cli="Delete it and run any hf-curvedit command that reads the factors (a damaged cache next to its "
                        "factors is recomputed)")
_KINDS = ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G")


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
        corrected = self.eigvals_corrected[index] if self.eigvals_corrected is not None and \
            self.eigvals_corrected.dim() == 3 else None
        return ModuleEigen(self.eigvals_A[index], self.eigvecs_A[index], self.eigvals_G[index],
                           self.eigvecs_G[index], eigvals_corrected=corrected)


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


def module_tensors(name: str, e: ModuleEigen, owns_A: bool = True) -> dict[str, torch.Tensor]:
    """The stored tensors of one module's basis (one set per expert for an expert projection; no A basis for a
    module that shares another's)."""
    kinds = _KINDS if owns_A else _KINDS[2:]
    if e.num_experts is None:
        return {f"{name}.{k}": getattr(e, k) for k in kinds}
    out = {f"{name}.{k}.{x}": getattr(e, k)[x] for x in range(e.num_experts) for k in kinds}
    if e.num_tokens is not None:
        out[f"{name}.num_tokens"] = e.num_tokens
    return out


def read_module(store: Mapping[str, torch.Tensor], name: str, alias: Mapping[str, str], first: int | None = None,
                end: int | None = None) -> ModuleEigen:
    """One module's basis from an eigen store (every layout the store may have); for an expert projection, only
    experts ``first`` to ``end`` when given."""
    owner = alias.get(name, name)
    tokens = store.get(f"{name}.num_tokens")
    span = slice(first, end)

    def get(kind: str) -> torch.Tensor:
        who = owner if kind.endswith("_A") else name
        if f"{who}.{kind}" in store:  # a linear layer, or a stacked store written before sharding
            t = store[f"{who}.{kind}"]
            return t if tokens is None else t[span]
        if tokens is None:
            raise KeyError(f"{who}.{kind}")
        return torch.stack([store[f"{who}.{kind}.{x}"] for x in range(int(tokens.shape[0]))[span]])

    return ModuleEigen(*(get(k) for k in _KINDS), None if tokens is None else tokens[span])


class KFACEigen(Mapping[str, ModuleEigen]):
    """Per-module eigenbases held in memory, keyed by the module's qualified name, plus the factors' metadata."""

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

    def save(self, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
        """Write all bases as an eigen store (``eigen.safetensors``, or shards and an index beside it) in the folder
        of ``path`` (atomically: shards first, the index last)."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        tensors: dict[str, torch.Tensor] = {}
        for name, e in self.modules.items():
            tensors.update(module_tensors(name, e))
        remove_tensor_files(folder, EIGEN_STEM)
        files = plan_shards({k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, EIGEN_STEM, max_shard_bytes)
        return write_eigen_store(folder, {f: {k: tensors[k] for k in ks} for f, ks in files.items()},
                                 list(self.modules), {}, self.metadata)

    @classmethod
    def load(cls, path: str | Path, modules: list[str] | None = None) -> KFACEigen:
        """Read bases from an eigen store (its folder, ``eigen.safetensors`` or its index); ``modules`` restricts
        which ones are loaded."""
        store, names, alias, metadata = open_eigen_store(path)
        if modules is not None:
            missing = [m for m in modules if m not in names]
            if missing:
                raise InputKeyError(f"{store.path} has no eigenbasis for modules {missing}; it holds {names}")
            names = [n for n in names if n in set(modules)]
        return cls({n: read_module(store, n, alias) for n in names}, metadata)


def write_eigen_store(folder: Path, shards: Mapping[str, Mapping[str, torch.Tensor]], names: list[str],
                      alias: Mapping[str, str], metadata: Mapping[str, Any]) -> Path:
    """Write an eigen store: one shard as the single ``eigen.safetensors``, several as shards and their index (last).
    Returns the single file or the index."""
    meta = eigen_store_metadata(names, alias, metadata)
    if len(shards) == 1:
        (tensors,) = shards.values()
        return save_safetensors(folder / EIGEN_FILENAME, dict(tensors),
                                {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    for name, tensors in shards.items():
        write_shard(folder, name, tensors, {"format": EIGEN_FORMAT + ".shard"})
    return write_index(folder, EIGEN_STEM, meta, shards)


def eigen_store_metadata(names: list[str], alias: Mapping[str, str], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What an eigen store records besides its tensors: its modules, their shared A bases, the factors' metadata."""
    return {"format": EIGEN_FORMAT, "modules": list(names), "a_alias": dict(alias), "metadata": dict(metadata)}


def eigen_folder(path: str | Path) -> Path:
    """The folder of an eigen store, given the folder, ``eigen.safetensors`` or its index."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def open_eigen_store(path: str | Path) -> tuple[TensorFiles, list[str], dict[str, str], dict[str, Any]]:
    """``(store, module names, shared A bases, the factors' metadata)`` of an eigen store."""
    folder = eigen_folder(path)
    if not TensorFiles.exists(folder, EIGEN_STEM):
        raise FileNotFoundError(f"{folder} holds no eigenbases ({EIGEN_FILENAME}); point at the folder of fitted "
                                "factors, or eigendecompose them first")
    store = TensorFiles(folder, EIGEN_STEM, "an hf-curvedit eigenbasis file", REBUILD_EIGEN)
    meta = store.metadata
    if meta.get("format") != EIGEN_FORMAT:
        raise DamagedFileError(store.path, "is not an hf-curvedit eigenbasis file", REBUILD_EIGEN)
    try:
        values = {k: json.loads(v) if isinstance(v, str) else v for k, v in meta.items() if k != "format"}
        return store, list(values["modules"]), dict(values.get("a_alias") or {}), dict(values.get("metadata") or {})
    except (KeyError, TypeError, ValueError) as err:
        raise DamagedFileError(store.path, f"its metadata is incomplete or unreadable ({err})", REBUILD_EIGEN) from None
