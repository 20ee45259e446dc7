"""EK-FAC corrected eigenvalues on disk (``ekfac.safetensors``, beside ``eigen.safetensors``) and their union with
the eigenbases they were measured in.

K-FAC assumes the curvature of component ``(i, j)`` of a weight in its Kronecker eigenbasis is ``λ_G,i · λ_A,j``.
EK-FAC (George et al., 2018) measures it instead: ``Λ_ij = E[(u_G,iᵀ D u_A,j)²]`` over samples, where ``D = Σ_t g_t
a_tᵀ`` is one sample's gradient of the weight (a sample is a sequence for a language model, an image for a
classifier). `hf_curvedit.curvature.ekfac.fit_eigen_correction` measures it; this module stores it and attaches it to
the bases (`ModuleEigen.eigvals_corrected`), where ``selection="ekfac_mass"`` reads it.
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
from ..integrity import DamagedFileError, read_safetensors
from ..utils import save_safetensors
from .eigen import KFACEigen, ModuleEigen

__all__ = ["EKFAC_FILENAME", "EigenCorrection", "attach_correction", "with_correction_beside"]

logger = logging.getLogger(__name__)

EKFAC_FILENAME = "ekfac.safetensors"
EKFAC_FORMAT = "hf_curvedit.ekfac"
REFIT_EKFAC = Fix(python="Delete it and measure the corrected eigenvalues again (fit_eigen_correction(model, data, "
                         "factors_folder))",
                  cli="Delete it and measure the corrected eigenvalues again (hf-curvedit fit --ekfac with the same "
                      "--output-dir)")


class EigenCorrection(Mapping[str, torch.Tensor]):
    """EK-FAC corrected eigenvalues: per module a ``(d_out, d_in)`` matrix ``Λ`` in the order of the module's
    eigenbasis (rows: G's eigenvectors, columns: A's, both by descending eigenvalue).

    Attributes:
        values: module name → ``Λ`` (float32 or float64, as accumulated).
        num_samples: how many samples (sequences, images) the averages are over.
        factors_id: the factors whose eigenbases ``Λ`` was measured in.
        config: the settings of the data pass (`FactorConfig.to_dict`).
    """

    def __init__(self, values: Mapping[str, torch.Tensor], num_samples: int, factors_id: str,
                 config: Mapping[str, Any] | None = None, path: Path | None = None):
        self.values = dict(values)
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

    def save(self, folder: str | Path) -> Path:
        """Write ``ekfac.safetensors`` into ``folder`` (atomically; every tensor's digest recorded)."""
        path = Path(folder) / EKFAC_FILENAME
        meta = {"format": EKFAC_FORMAT, "modules": json.dumps(list(self.values)), "factors_id": self.factors_id,
                "num_samples": str(self.num_samples), "config": json.dumps(self.config)}
        save_safetensors(path, {f"{n}.lambda": t for n, t in self.values.items()}, meta)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, modules: list[str] | None = None) -> EigenCorrection:
        """Read ``ekfac.safetensors`` (a file, or the folder holding it); ``modules`` restricts what is read.

        Raises `DamagedFileError` when the file or a tensor does not verify."""
        path = Path(path)
        if path.is_dir():
            path = path / EKFAC_FILENAME
        with read_safetensors(path, "an hf-curvedit EK-FAC file", REFIT_EKFAC) as f:
            meta = f.metadata
            if meta.get("format") != EKFAC_FORMAT:
                raise f.damaged("is not an hf-curvedit EK-FAC file")
            try:
                names = json.loads(meta["modules"])
                num_samples, factors_id = int(meta["num_samples"]), meta["factors_id"]
                config = json.loads(meta.get("config", "{}"))
            except (KeyError, ValueError) as err:
                raise f.damaged(f"its metadata is incomplete or unreadable ({err})") from None
            wanted = names if modules is None else [n for n in names if n in set(modules)]
            values = {n: f.get(f"{n}.lambda") for n in wanted}
        return cls(values, num_samples, factors_id, config, path)


def attach_correction(eigen: Mapping[str, ModuleEigen], correction: EigenCorrection) -> KFACEigen:
    """The bases of ``eigen`` with the corrected eigenvalues of ``correction`` set (``eigvals_corrected``) on every
    module it covers; the shapes must match."""
    modules = dict(eigen.items())
    for name, values in correction.items():
        if name not in modules:
            continue
        e = modules[name]
        if tuple(values.shape) != e.shape:
            raise InputError(f"the corrected eigenvalues of {name} are {tuple(values.shape)} but its eigenbasis is "
                             f"for a {e.shape} weight; they were measured for other factors")
        modules[name] = replace(e, eigvals_corrected=values)
    metadata = dict(getattr(eigen, "metadata", {}) or {})
    metadata["ekfac"] = {"num_samples": correction.num_samples, "factors_id": correction.factors_id}
    return KFACEigen(modules, metadata)


def with_correction_beside(eigen: KFACEigen, folder: Path | None, factors_id: str | None,
                           modules: list[str] | None = None) -> KFACEigen:
    """``eigen`` with the corrected eigenvalues in ``folder`` attached (of ``modules``, or all), when there are any
    and they belong to the factors ``factors_id``: a file of other factors is ignored, a damaged one is reported and
    not used."""
    if folder is None or not (Path(folder) / EKFAC_FILENAME).exists():
        return eigen
    try:
        corr = EigenCorrection.load(folder, modules)
    except DamagedFileError as err:
        logger.warning("%s; the edit cannot use selection='ekfac_mass' until it is measured again", err)
        return eigen
    if factors_id is not None and corr.factors_id != factors_id:
        logger.warning("%s was measured for other factors (%s, not %s) and is not used", corr.path, corr.factors_id,
                       factors_id)
        return eigen
    return attach_correction(eigen, corr)
