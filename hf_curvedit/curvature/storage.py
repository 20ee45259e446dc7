"""Factors on disk: `KFACFactors` (``factors.safetensors``), resumable checkpoints, and a lazy eigenbasis reader.

Every file is safetensors with JSON metadata, written atomically by `hf_curvedit.utils.save_safetensors`: a crash
leaves the previous file or nothing, never half a file, and a checkpoint carries a key of the settings it was written
with, so a resume with other settings is refused instead of mixing two runs.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import Fix, InputError
from ..integrity import DamagedFileError, open_safetensors, output_lock, read_safetensors
from ..targets import weight_targets
from ..utils import all_finite, save_safetensors
from .config import FactorConfig, accumulator_dtype
from .correction import with_correction_beside
from .distributed import dist_state
from .eigen import EIGEN_FILENAME, EIGEN_FORMAT, REBUILD_EIGEN, KFACEigen, ModuleEigen, symmetric_eigh

__all__ = ["CHECKPOINT_DIR", "FACTORS_FILENAME", "EigenFile", "KFACFactors", "eigendecompose", "load_factors",
           "model_fingerprint"]

logger = logging.getLogger(__name__)

FACTORS_FILENAME = "factors.safetensors"
CHECKPOINT_DIR = "checkpoint"
FORMAT = "hf_curvedit.factors"
FORMAT_VERSION = "1"
# how a fit starts over instead of resuming
RESTART = Fix(python="pass resume=False", cli="pass --restart")
REFIT = Fix(python="Fit the factors again (fit_factors(..., resume=False) with the same output_dir), or restore the "
                   "file from a good copy",
            cli="Fit the factors again (hf-curvedit fit --restart with the same --output-dir), or restore the file "
                "from a good copy")


def model_fingerprint(model: nn.Module, module_names: Iterable[str]) -> dict[str, Any]:
    """What a factor file must agree with: model type and the shape of each target, ``(d_out, d_in)`` or
    ``(experts, d_out, d_in)``."""
    targets = weight_targets(model)
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "module_shapes": {n: list(targets[n].shape) for n in module_names},
    }


@dataclass
class KFACFactors:
    """K-FAC factors of a set of linear layers and expert projections.

    ``A[name]`` is E[a aᵀ] (d_in × d_in) and ``G[name]`` is E[g gᵀ] (d_out × d_out), averaged over
    ``num_tokens[name]`` samples (valid token positions; for an image classifier, class tokens or all token
    positions of the images). Modules that read the same input (gate and up projections) share one A tensor;
    ``a_alias`` maps such a module to the one that owns A. An expert projection (``...experts.gate_up_proj``) has one
    pair per expert, stacked as ``(experts, d, d)``, each averaged over the tokens routed to that expert, and
    ``num_tokens[name]`` is the list of those counts (an expert no token reached has zero factors).
    """

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    num_tokens: dict[str, int]
    config: FactorConfig
    model_info: dict[str, Any]
    a_alias: dict[str, str] = field(default_factory=dict)
    factors_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    path: Path | None = None

    @property
    def module_names(self) -> list[str]:
        """Names of the modules with factors, in model order."""
        return list(self.G)

    def __repr__(self) -> str:
        toks = max((max(v) if isinstance(v, list) else v for v in self.num_tokens.values()), default=0)
        return f"KFACFactors({len(self.G)} modules, {toks} tokens, label_mode={self.config.label_mode!r})"

    def save(self, output_dir: str | Path) -> Path:
        """Write ``factors.safetensors`` (atomically) with config, token counts and model info as metadata."""
        tensors: dict[str, torch.Tensor] = {}
        for name in self.G:
            if name not in self.a_alias:
                tensors[f"{name}.A"] = self.A[name]
            tensors[f"{name}.G"] = self.G[name]
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "factors_id": self.factors_id,
            "modules": json.dumps(self.module_names),
            "a_alias": json.dumps(self.a_alias),
            "num_tokens": json.dumps(self.num_tokens),
            "config": json.dumps(self.config.to_dict()),
            "model_info": json.dumps(self.model_info),
        }
        self.path = save_safetensors(Path(output_dir) / FACTORS_FILENAME, tensors, meta)
        return self.path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> KFACFactors:
        """Read factors from a folder or a ``factors.safetensors`` file; check them against ``model`` if given."""
        path = Path(path)
        if path.is_dir():
            path = path / FACTORS_FILENAME
        if not path.exists():
            partial = path.parent / CHECKPOINT_DIR
            hint = (f" A partial run exists in {partial}: run fit_factors again with the same output_dir to resume it."
                    if partial.exists() else "")
            raise FileNotFoundError(f"no factors at {path}.{hint}")
        with read_safetensors(path, "an hf-curvedit factor file", REFIT) as f:
            meta = f.metadata
            if meta.get("format") != FORMAT:
                raise f.damaged(f"is not an hf-curvedit factor file (format={meta.get('format')!r})")
            digests = f.digests
            try:
                names = json.loads(meta["modules"])
                alias = json.loads(meta["a_alias"])
                json.loads(meta["num_tokens"])
            except (KeyError, ValueError) as err:
                raise DamagedFileError(path, f"its metadata is incomplete or unreadable ({err})", REFIT) from None
            A: dict[str, torch.Tensor] = {}
            G: dict[str, torch.Tensor] = {}
            for n in names:
                G[n] = f.get(f"{n}.G")
                if n not in alias:
                    A[n] = f.get(f"{n}.A")
            for n, owner in alias.items():
                A[n] = A[owner]
        factors = cls(A=A, G=G, num_tokens=json.loads(meta["num_tokens"]),
                      config=FactorConfig.from_dict(json.loads(meta["config"])),
                      model_info=json.loads(meta["model_info"]), a_alias=alias,
                      factors_id=meta["factors_id"], path=path)
        if digests is None:  # written before files recorded digests: at least refuse NaN and inf
            for n in names:
                for kind, t in (("A", A[n]), ("G", G[n])):
                    if not all_finite(t):
                        raise DamagedFileError(path, f"factor {kind} of {n} has non-finite entries", REFIT)
        if model is not None:
            factors.check_model(model)
        return factors

    def check_model(self, model: nn.Module) -> None:
        """Raise a ValueError that lists every difference if these factors do not belong to ``model``."""
        targets = weight_targets(model)
        mods = dict(model.named_modules())
        problems: list[str] = []
        want_type = self.model_info.get("model_type")
        have_type = getattr(getattr(model, "config", None), "model_type", None)
        if want_type and have_type and want_type != have_type:
            problems.append(f"model_type: factors are for {want_type!r}, the model is {have_type!r}")
        shapes = self.model_info.get("module_shapes", {})
        missing = [n for n in self.module_names if n not in mods and n not in targets]
        if missing:
            problems.append(f"{len(missing)} module(s) not in the model: "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for n in self.module_names:
            if n in targets:
                have = list(targets[n].shape)
                want = shapes.get(n, [*self.G[n].shape[:-1], int(self.A[n].shape[-1])])
                if have != list(want):
                    what = "(experts, d_out, d_in)" if len(want) == 3 else "(d_out, d_in)"
                    problems.append(f"{n}: factors are for {what}={tuple(want)}, the model has {tuple(have)}")
            elif n in mods:
                problems.append(f"{n}: is a {type(mods[n]).__name__} in the model, not a linear layer")
        if problems:
            src = self.path or "these factors"
            raise InputError(
                f"{src} do not match this model ({self.model_info.get('name_or_path') or 'unknown source'}):\n  - "
                + "\n  - ".join(problems)
                + "\nFit factors for this model with fit_factors(model, ...), or load the model they were fitted on."
            )

    def eigendecompose(self, cache_dir: str | Path | None = None) -> KFACEigen:
        """See :func:`hf_curvedit.eigendecompose`."""
        return eigendecompose(self, cache_dir)


def eigendecompose(factors: KFACFactors, cache_dir: str | Path | None = None) -> KFACEigen:
    """Eigendecompose every factor in float64 (symmetrized, eigenvalues clamped at 0, descending).

    With ``cache_dir`` (default: the folder the factors were loaded from or saved to) the result
    is written to ``eigen.safetensors`` there and reused on the next call for the same factors.
    """
    if cache_dir is None and factors.path is not None:
        cache_dir = factors.path.parent
    cache = Path(cache_dir) / EIGEN_FILENAME if cache_dir is not None else None
    if cache is not None and cache.exists():
        try:
            cached = KFACEigen.load(cache)
        except Exception as e:  # a foreign or damaged cache is recomputed, never trusted
            logger.warning("the eigen cache %s does not verify and is recomputed: %s", cache, e)
        else:
            if cached.metadata.get("factors_id") == factors.factors_id and set(cached) == set(factors.G):
                return with_correction_beside(cached, cache.parent, factors.factors_id)
    if cache is None or not dist_state().is_main_process:
        # only the main process of a multi-process run writes; the others decompose for themselves
        return _decompose(factors, None)
    # the cache is written under the lock of its folder (the factors' folder, where a fit may be writing); a valid cache
    # is read without it
    with output_lock(cache.parent, "eigendecompose"):
        return _decompose(factors, cache)


def _decompose(factors: KFACFactors, cache: Path | None) -> KFACEigen:
    # Decomposed in float64; the eigenvectors are kept in the factors' own dtype (float32 unless they were
    # accumulated in float64, as kronfluence does), which halves the bases' memory and cache: every use casts them to
    # float64 for its own arithmetic, and an adapter stores float32 anyway.
    store = accumulator_dtype(factors.config)
    done_A: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, ModuleEigen] = {}
    for name in tqdm(factors.module_names, desc="eigendecompose", unit="module", leave=False):
        owner = factors.a_alias.get(name, name)
        if owner not in done_A:
            va, ua = symmetric_eigh(factors.A[owner])
            done_A[owner] = va, ua.to(store)
        va, ua = done_A[owner]
        vg, ug = symmetric_eigh(factors.G[name])
        ug = ug.to(store)
        count = factors.num_tokens.get(name)
        modules[name] = ModuleEigen(va, ua, vg, ug,
                                    torch.tensor(count, dtype=torch.int64) if isinstance(count, list) else None)
    meta = {
        "factors_id": factors.factors_id,
        "factor_config": factors.config.to_dict(),
        "num_tokens": factors.num_tokens,
        "model_info": factors.model_info,
        "factors_path": str(factors.path) if factors.path else None,
    }
    eig = KFACEigen(modules, meta)
    if cache is not None:
        eig.save(cache)
        eig = with_correction_beside(eig, cache.parent, factors.factors_id)
    return eig


def load_factors(path: str | Path, model: nn.Module | None = None) -> KFACFactors:
    """Load factors written by :func:`fit_factors`; see :meth:`KFACFactors.load`."""
    return KFACFactors.load(path, model)


# ------------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_file(output_dir: Path, part: int, rank: int, world: int) -> Path:
    """Where process ``rank`` of ``world`` keeps the partial sums of partition ``part``."""
    return output_dir / CHECKPOINT_DIR / f"part{part:03d}-rank{rank:03d}-of-{world:03d}.safetensors"


def save_checkpoint(path: Path, A: Mapping[str, torch.Tensor], G: Mapping[str, torch.Tensor], count: Mapping[str, int],
                    a_alias: Mapping[str, str], next_batch: int, done: bool, key: dict) -> None:
    """Write resumable partial sums; ``key`` (settings and model) must match on resume."""
    tensors = {f"{n}.A": t for n, t in A.items()}
    tensors.update({f"{n}.G": t for n, t in G.items()})
    meta = {"format": FORMAT + ".checkpoint", "next_batch": str(next_batch), "done": json.dumps(done),
            "count": json.dumps(dict(count)), "a_alias": json.dumps(dict(a_alias)),
            "key": json.dumps(key, sort_keys=True)}
    save_safetensors(path, tensors, meta)


def load_checkpoint(path: Path, key: dict, device_of: Callable[[str], torch.device]):
    """Read a checkpoint written with the same ``key``: (A, G, count, a_alias, next_batch, done).

    Raises `DamagedFileError` for a checkpoint that does not verify (the caller starts that part over)."""
    fix = "The partial run cannot resume from it; it is discarded and that part is collected again"
    with read_safetensors(path, "an hf-curvedit factor checkpoint", fix) as f:
        meta = f.metadata
        try:
            written_with = json.loads(meta["key"])
            count, alias = json.loads(meta["count"]), json.loads(meta["a_alias"])
            next_batch, done = int(meta["next_batch"]), json.loads(meta["done"])
        except (KeyError, ValueError) as err:
            raise DamagedFileError(path, f"its metadata is incomplete or unreadable ({err})", fix) from None
        if written_with != json.loads(json.dumps(key, sort_keys=True)):
            raise InputError(
                f"the checkpoint in {path.parent} was written with different settings or for a different model. "
                f"Use another output folder, or {RESTART} to start over (this deletes the partial results)."
            )
        A, G = {}, {}
        for k in f.keys():
            n, kind = k.rsplit(".", 1)
            (A if kind == "A" else G)[n] = f.get(k).to(device_of(n))
    return A, G, count, alias, next_batch, done


# ------------------------------------------------------------------------------------------------------ eigen reader
class EigenFile(Mapping[str, ModuleEigen]):
    """An ``eigen.safetensors`` file read one module at a time: only the bases that are asked for are loaded.

    Building an edit of a few modules of a 7B model from a file of all its MLP bases reads a few hundred MB instead of
    tens of GB.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist; point it at an eigen.safetensors file")
        with open_safetensors(self.path, "an hf-curvedit eigenbasis file", REBUILD_EIGEN) as f:
            meta = f.metadata() or {}
        if meta.get("format") != EIGEN_FORMAT:
            raise DamagedFileError(self.path, "is not an hf-curvedit eigenbasis file", REBUILD_EIGEN)
        self._names = json.loads(meta["modules"])
        self.metadata = json.loads(meta.get("metadata", "{}"))

    def __getitem__(self, name: str) -> ModuleEigen:
        if name not in self._names:
            raise KeyError(name)
        basis = KFACEigen.load(self.path, modules=[name])
        return with_correction_beside(basis, self.path.parent, self.metadata.get("factors_id"), modules=[name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"EigenFile({self.path}, {len(self)} modules)"
