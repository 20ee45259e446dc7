"""EK-FAC corrected eigenvalues on disk (the ``ekfac`` store, beside the eigen cache) and their union with the
eigenbases they were measured in.

K-FAC assumes the curvature of component ``(i, j)`` of a weight in its Kronecker eigenbasis is ``λ_G,i · λ_A,j``.
EK-FAC (George et al., 2018) measures it instead: ``Λ_ij = E[(u_G,iᵀ D u_A,j)²]`` over samples, where ``D = Σ_t g_t
a_tᵀ`` is one sample's gradient of the weight (a sample is a sequence for a language model, an image for a
classifier). `hf_curvedit.curvature.ekfac.fit_eigen_correction` measures it; this module stores it
(``ekfac.safetensors``, or one shard per data pass and ``ekfac.safetensors.index.json``; a tensor ``<module>.lambda``
per module) and attaches it to the bases (`ModuleEigen.eigvals_corrected`), where ``selection="ekfac_mass"`` reads
it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import Fix, InputError
from ..integrity import DamagedFileError
from ..shards import TensorFiles, plan_shards, remove_tensor_files, write_index, write_shard
from ..utils import save_safetensors
from .eigen import KFACEigen, ModuleEigen

__all__ = ["EKFAC_FILENAME", "EKFAC_STEM", "EigenCorrection", "attach_correction", "attach_correction_to",
           "correction_beside"]

logger = logging.getLogger(__name__)

EKFAC_STEM = "ekfac"
EKFAC_FILENAME = f"{EKFAC_STEM}.safetensors"
EKFAC_FORMAT = "hf_curvedit.ekfac"
REFIT_EKFAC = Fix(python="Delete it and measure the corrected eigenvalues again (fit_eigen_correction(model, data, "
                         "factors_folder))",
                  cli="Delete it and measure the corrected eigenvalues again (hf-curvedit fit --ekfac with the same "
                      "--output-dir)")


class _StoredValues(Mapping[str, torch.Tensor]):
    """Λ of each module of a store, read when asked for (stacked for an expert projection, whose store holds one per
    expert)."""

    def __init__(self, store: TensorFiles, names: list[str], experts: Mapping[str, int]):
        self._store, self._names, self._experts = store, names, dict(experts)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        if name in self._experts:
            keys = [f"{name}.lambda.{e}" for e in range(self._experts[name])]
            return torch.stack(list(self._store.read(keys).values()))
        return self._store[f"{name}.lambda"]

    def expert(self, name: str, index: int) -> torch.Tensor:
        """Λ of one expert of an expert projection, read alone."""
        return self._store[f"{name}.lambda.{index}"]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class EigenCorrection(Mapping[str, torch.Tensor]):
    """EK-FAC corrected eigenvalues: per module a ``(d_out, d_in)`` matrix ``Λ`` in the order of the module's
    eigenbasis (rows: G's eigenvectors, columns: A's, both by descending eigenvalue).

    Attributes:
        values: module name → ``Λ`` (float32 or float64, as accumulated); read from disk one module at a time when the
            correction was loaded.
        num_samples: how many samples (sequences, images) the averages are over.
        factors_id: the factors whose eigenbases ``Λ`` was measured in.
        config: the settings of the data pass (`FactorConfig.to_dict`).
    """

    def __init__(self, values: Mapping[str, torch.Tensor], num_samples: int, factors_id: str,
                 config: Mapping[str, Any] | None = None, path: Path | None = None):
        self.values = values if isinstance(values, _StoredValues) else dict(values)
        self.num_samples = int(num_samples)
        self.factors_id = factors_id
        self.config = dict(config or {})
        self.path = path

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"EigenCorrection({len(self)} modules, {self.num_samples} samples)"

    def verify(self) -> None:
        """Read every stored tensor once against its digest (`DamagedFileError` for a damaged one); nothing to do
        for values held in memory."""
        if isinstance(self.values, _StoredValues):
            self.values._store.verify()

    def metadata(self) -> dict[str, Any]:
        """What the store records besides the tensors."""
        experts = {n: int(t.shape[0]) for n, t in self.values.items() if t.dim() == 3}
        return store_metadata(list(self.values), self.num_samples, self.factors_id, self.config, experts)

    def save(self, folder: str | Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
        """Write the ``ekfac`` store into ``folder`` (atomically: shards first, the index last; every tensor's digest
        recorded)."""
        folder = Path(folder)
        tensors: dict[str, torch.Tensor] = {}
        for n, t in self.values.items():
            if t.dim() == 3:  # an expert projection: one Λ per expert
                tensors.update({f"{n}.lambda.{e}": t[e] for e in range(t.shape[0])})
            else:
                tensors[f"{n}.lambda"] = t
        remove_tensor_files(folder, EKFAC_STEM)
        files = plan_shards({k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, EKFAC_STEM, max_shard_bytes)
        if len(files) == 1:
            self.path = save_safetensors(folder / EKFAC_FILENAME, tensors,
                                         {k: v if isinstance(v, str) else json.dumps(v)
                                          for k, v in self.metadata().items()})
        else:
            for f, keys in files.items():
                write_shard(folder, f, {k: tensors[k] for k in keys}, {"format": EKFAC_FORMAT + ".shard"})
            self.path = write_index(folder, EKFAC_STEM, self.metadata(), files)
        return self.path

    @classmethod
    def load(cls, path: str | Path, modules: list[str] | None = None) -> EigenCorrection:
        """Open the ``ekfac`` store of a folder (or of its ``ekfac.safetensors``); Λ is read when asked for
        (``modules`` restricts what it offers).

        Raises `DamagedFileError` when the store or a tensor does not verify."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        store = TensorFiles(folder, EKFAC_STEM, "an hf-curvedit EK-FAC file", REFIT_EKFAC)
        meta = store.metadata
        if meta.get("format") != EKFAC_FORMAT:
            raise DamagedFileError(store.path, "is not an hf-curvedit EK-FAC file", REFIT_EKFAC)
        try:
            names = _value(meta, "modules")
            num_samples, factors_id = int(_value(meta, "num_samples")), meta["factors_id"]
            config = _value(meta, "config") if "config" in meta else {}
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedFileError(store.path, f"its metadata is incomplete or unreadable ({err})", REFIT_EKFAC) \
                from None
        wanted = names if modules is None else [n for n in names if n in set(modules)]
        experts = _value(meta, "num_experts") if "num_experts" in meta else {}
        return cls(_StoredValues(store, wanted, experts), num_samples, factors_id, config, store.path)


def store_metadata(names: list[str], num_samples: int, factors_id: str, config: Mapping[str, Any],
                   experts: Mapping[str, int] | None = None) -> dict[str, Any]:
    """What an EK-FAC store records besides its tensors (``experts``: each expert projection's number of experts)."""
    return {"format": EKFAC_FORMAT, "modules": names, "factors_id": factors_id, "num_samples": str(num_samples),
            "config": dict(config), "num_experts": dict(experts or {})}


def _value(meta: Mapping[str, Any], key: str) -> Any:
    value = meta[key]
    if isinstance(value, str) and key != "num_samples":
        return json.loads(value)
    return value


def attach_correction_to(name: str, basis: ModuleEigen, correction: Mapping[str, torch.Tensor]) -> ModuleEigen:
    """``basis`` (of module ``name``) with its corrected eigenvalues set, when ``correction`` has them; the shapes
    must match."""
    if name not in correction:
        return basis
    values = correction[name]
    if tuple(values.shape[-2:]) != basis.shape:
        raise InputError(f"the corrected eigenvalues of {name} are {tuple(values.shape)} but its eigenbasis is for a "
                         f"{basis.shape} weight; they were measured for other factors")
    return replace(basis, eigvals_corrected=values)


def attach_correction(eigen: Mapping[str, ModuleEigen], correction: EigenCorrection) -> KFACEigen:
    """The bases of ``eigen`` with the corrected eigenvalues of ``correction`` set (``eigvals_corrected``) on every
    module it covers; the shapes must match."""
    modules = {n: attach_correction_to(n, e, correction) for n, e in eigen.items()}
    metadata = dict(getattr(eigen, "metadata", {}) or {})
    metadata["ekfac"] = {"num_samples": correction.num_samples, "factors_id": correction.factors_id}
    return KFACEigen(modules, metadata)


def correction_beside(folder: Path | None, factors_id: str | None) -> EigenCorrection | None:
    """The corrected eigenvalues in ``folder``, when there are any and they belong to the factors ``factors_id``: a
    store of other factors is ignored, a damaged one is reported and not used."""
    if folder is None or not TensorFiles.exists(folder, EKFAC_STEM):
        return None
    try:
        corr = EigenCorrection.load(folder)
    except DamagedFileError as err:
        logger.warning("%s; the edit cannot use selection='ekfac_mass' until it is measured again", err)
        return None
    if factors_id is not None and corr.factors_id != factors_id:
        logger.warning("%s was measured for other factors (%s, not %s) and is not used", corr.path, corr.factors_id,
                       factors_id)
        return None
    return corr


def with_correction_beside(eigen: KFACEigen, folder: Path | None, factors_id: str | None,
                           modules: list[str] | None = None) -> KFACEigen:
    """``eigen`` with the corrected eigenvalues in ``folder`` attached (see `correction_beside`)."""
    corr = correction_beside(folder, factors_id)
    return eigen if corr is None else attach_correction(eigen, corr)
