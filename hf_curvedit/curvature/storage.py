"""Factors on disk: `KFACFactors`, read one module at a time from the ``factors`` store of a folder, and the
resumable checkpoints of a data pass.

The store (`hf_curvedit.shards`) is ``factors.safetensors`` when a fit took one data pass, or one shard per pass
(``factors-00001-of-000NN.safetensors``) plus ``factors.safetensors.index.json`` when a memory budget split it. Tensors
are named ``<module>.A`` and ``<module>.G``, and one pair per expert for an expert projection (``<module>.A.<e>``).
Stores written before the sharded format (one file, an expert projection's factors stacked) read the same way.
Every file is written atomically with each tensor's digest; a checkpoint carries a key of the settings it was written
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

from ..errors import Fix, InputError
from ..integrity import DamagedFileError, read_safetensors
from ..shards import TensorFiles, plan_shards, remove_tensor_files, shard_name, write_index, write_shard
from ..targets import weight_targets
from ..utils import all_finite, save_safetensors
from .config import FactorConfig

__all__ = ["CHECKPOINT_DIR", "FACTORS_FILENAME", "FACTORS_STEM", "KFACFactors", "factor_tensors", "load_factors",
           "model_fingerprint"]

logger = logging.getLogger(__name__)

FACTORS_STEM = "factors"
FACTORS_FILENAME = f"{FACTORS_STEM}.safetensors"
CHECKPOINT_DIR = "checkpoint"
FORMAT = "hf_curvedit.factors"
# 1: one file, an expert projection's factors stacked; 2: sharded by data pass, one pair per expert
FORMAT_VERSION = "2"
# how a fit starts over instead of resuming
RESTART = Fix(python="pass resume=False", cli="pass --restart")
REFIT = Fix(python="Fit the factors again (fit_factors(..., resume=False) with the same output_dir), or restore the "
                   "file from a good copy",
            cli="Fit the factors again (hf-curvedit fit --restart with the same --output-dir), or restore the file "
                "from a good copy")
# the largest shard `KFACFactors.save` writes for factors held in memory
SAVE_SHARD_BYTES = 4 * 1024**3


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


def factor_tensors(name: str, A: torch.Tensor | None, G: torch.Tensor, experts: bool) -> dict[str, torch.Tensor]:
    """The stored tensors of one module's factors: ``<name>.A``/``.G``, or one per expert (``<name>.A.<e>``) for an
    expert projection (``A`` is ``None`` when the module shares another module's A)."""
    out: dict[str, torch.Tensor] = {}
    for kind, t in (("A", A), ("G", G)):
        if t is None:
            continue
        if experts:
            out.update({f"{name}.{kind}.{e}": t[e] for e in range(t.shape[0])})
        else:
            out[f"{name}.{kind}"] = t
    return out


class _LazyFactors(Mapping[str, torch.Tensor]):
    """One kind of factor (``"A"`` or ``"G"``) of a store, read one module at a time."""

    def __init__(self, factors: KFACFactors, kind: str):
        self._factors, self._kind = factors, kind

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._factors.factor(name, self._kind)

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors.module_names)

    def __len__(self) -> int:
        return len(self._factors.module_names)

    def __contains__(self, name: object) -> bool:
        return name in self._factors.num_tokens


@dataclass
class KFACFactors:
    """K-FAC factors of a set of linear layers and expert projections.

    ``A[name]`` is E[a aᵀ] (d_in × d_in) and ``G[name]`` is E[g gᵀ] (d_out × d_out), averaged over
    ``num_tokens[name]`` samples (valid token positions; for an image classifier, class tokens or all token
    positions of the images). Modules that read the same input (gate and up projections) share one A tensor;
    ``a_alias`` maps such a module to the one that owns A. An expert projection (``...experts.gate_up_proj``) has one
    pair per expert, stacked as ``(experts, d, d)``, each averaged over the tokens routed to that expert, and
    ``num_tokens[name]`` is the list of those counts (an expert no token reached has zero factors).

    Factors loaded from a folder (`load_factors`, or `fit_factors` with an ``output_dir``) are read when asked for, one
    module at a time (`factor` reads one expert's matrix): ``A`` and ``G`` hold no tensor until then.
    """

    A: Mapping[str, torch.Tensor]
    G: Mapping[str, torch.Tensor]
    num_tokens: dict[str, int | list[int]]
    config: FactorConfig
    model_info: dict[str, Any]
    a_alias: dict[str, str] = field(default_factory=dict)
    factors_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    path: Path | None = None
    _store: TensorFiles | None = field(default=None, repr=False, compare=False)

    @property
    def module_names(self) -> list[str]:
        """Names of the modules with factors, in model order."""
        return list(self.num_tokens)

    @property
    def folder(self) -> Path | None:
        """The folder the factors were read from or written to."""
        return self.path.parent if self.path is not None else None

    def __repr__(self) -> str:
        toks = max((max(v) if isinstance(v, list) else v for v in self.num_tokens.values()), default=0)
        return f"KFACFactors({len(self.num_tokens)} modules, {toks} tokens, label_mode={self.config.label_mode!r})"

    def num_experts(self, name: str) -> int | None:
        """The number of experts of an expert projection, ``None`` for a linear layer."""
        count = self.num_tokens[name]
        return len(count) if isinstance(count, list) else None

    def factor(self, name: str, kind: str, expert: int | None = None) -> torch.Tensor:
        """Factor ``kind`` (``"A"`` or ``"G"``) of module ``name``: the whole (stacked) factor, or one expert's
        matrix. From a store, only what is asked for is read."""
        if kind == "A":
            name = self.a_alias.get(name, name)
        if self._store is None:
            t = (self.A if kind == "A" else self.G)[name]
            return t if expert is None else t[expert]
        store, experts = self._store, self.num_experts(name)
        whole = f"{name}.{kind}"
        if experts is None or whole in store:  # a linear layer, or a stacked store written before sharding
            t = store[whole]
            return t if expert is None else t[expert]
        if expert is not None:
            return store[f"{whole}.{expert}"]
        return torch.stack(list(store.read(f"{whole}.{e}" for e in range(experts)).values()))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by its name in the store (each A once)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.module_names:
            experts = self.num_experts(name) is not None
            out.update(factor_tensors(name, None if name in self.a_alias else self.factor(name, "A"),
                                      self.factor(name, "G"), experts))
        return out

    def metadata(self) -> dict[str, Any]:
        """What the store records besides the tensors."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "factors_id": self.factors_id,
                "modules": self.module_names, "a_alias": self.a_alias, "num_tokens": self.num_tokens,
                "config": self.config.to_dict(), "model_info": self.model_info}

    def save(self, output_dir: str | Path) -> Path:
        """Write the factors into ``output_dir`` (atomically: shards first, the index last), replacing any there."""
        folder = Path(output_dir)
        tensors = self.tensors()
        remove_tensor_files(folder, FACTORS_STEM)
        files = plan_shards({k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, FACTORS_STEM,
                            SAVE_SHARD_BYTES)
        self.path = write_store(folder, {f: {k: tensors[k] for k in keys} for f, keys in files.items()},
                                self.metadata())
        self._store = None
        return self.path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> KFACFactors:
        """Open the factors of a folder (or of its ``factors.safetensors``); check them against ``model`` if given.
        Tensors are read when asked for."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if not TensorFiles.exists(folder, FACTORS_STEM):
            partial = folder / CHECKPOINT_DIR
            hint = (f" A partial run exists in {partial}: run fit_factors again with the same output_dir to resume it."
                    if partial.exists() else "")
            raise FileNotFoundError(f"no factors at {folder / FACTORS_FILENAME}.{hint}")
        store = TensorFiles(folder, FACTORS_STEM, "an hf-curvedit factor file", REFIT)
        meta = store.metadata
        if meta.get("format") != FORMAT:
            raise DamagedFileError(store.path, f"is not an hf-curvedit factor file (format={meta.get('format')!r})",
                                   REFIT)
        try:
            names = _meta(meta, "modules")
            alias, counts = _meta(meta, "a_alias"), _meta(meta, "num_tokens")
            config, info = FactorConfig.from_dict(_meta(meta, "config")), _meta(meta, "model_info")
            factors_id = meta["factors_id"]
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedFileError(store.path, f"its metadata is incomplete or unreadable ({err})", REFIT) from None
        factors = cls(A={}, G={}, num_tokens={n: counts[n] for n in names}, config=config, model_info=info,
                      a_alias=alias, factors_id=factors_id, path=store.path, _store=store)
        factors.A, factors.G = _LazyFactors(factors, "A"), _LazyFactors(factors, "G")
        if store.digests_missing():  # written before files recorded digests: at least refuse NaN and inf
            for n in names:
                for kind in ("A", "G"):
                    if not all_finite(factors.factor(n, kind)):
                        raise DamagedFileError(store.path, f"factor {kind} of {n} has non-finite entries", REFIT)
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
                want = shapes.get(n)
                if want is None:
                    G, A = self.factor(n, "G"), self.factor(n, "A")
                    want = [*G.shape[:-1], int(A.shape[-1])]
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

    def eigendecompose(self, cache_dir: str | Path | None = None) -> Any:
        """See :func:`hf_curvedit.eigendecompose`."""
        from .decompose import eigendecompose

        return eigendecompose(self, cache_dir)


def _meta(meta: Mapping[str, Any], key: str) -> Any:
    # a single file's metadata are strings (JSON inside); an index's are JSON values
    value = meta[key]
    return json.loads(value) if isinstance(value, str) else value


def write_store(folder: Path, shards: Mapping[str, Mapping[str, torch.Tensor]], metadata: Mapping[str, Any]) -> Path:
    """Write a factor store: one shard as the single ``factors.safetensors`` (its metadata in the file), several as
    shards and their index (written last). Returns the single file or the index."""
    if len(shards) == 1:
        (tensors,) = shards.values()
        return save_safetensors(folder / FACTORS_FILENAME, dict(tensors),
                                {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    for name, tensors in shards.items():
        write_shard(folder, name, tensors, {"format": FORMAT + ".shard"})
    return write_index(folder, FACTORS_STEM, metadata, shards)


def load_factors(path: str | Path, model: nn.Module | None = None) -> KFACFactors:
    """Load factors written by :func:`fit_factors`; see :meth:`KFACFactors.load`."""
    return KFACFactors.load(path, model)


def partition_shard(folder: Path, part: int, parts: int) -> Path:
    """Where the finished factors of data pass ``part`` (0-based) of ``parts`` go."""
    return folder / shard_name(FACTORS_STEM, part + 1, parts)


# ------------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_file(output_dir: Path, part: int, rank: int, world: int, directory: str = CHECKPOINT_DIR) -> Path:
    """Where process ``rank`` of ``world`` keeps the partial sums of partition ``part``."""
    return output_dir / directory / f"part{part:03d}-rank{rank:03d}-of-{world:03d}.safetensors"


def save_checkpoint(path: Path, sums: Mapping[str, torch.Tensor], state: Mapping[str, Any], next_batch: int,
                    done: bool, key: dict) -> None:
    """Write resumable partial sums (any named tensors) and the collector's ``state`` (JSON); ``key`` (settings and
    model) must match on resume."""
    meta = {"format": FORMAT + ".checkpoint", "next_batch": str(next_batch), "done": json.dumps(done),
            "state": json.dumps(dict(state)), "key": json.dumps(key, sort_keys=True)}
    save_safetensors(path, dict(sums), meta)


def load_checkpoint(path: Path, key: dict, device_of: Callable[[str], torch.device],
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], int, bool]:
    """Read a checkpoint written with the same ``key``: (sums, state, next_batch, done).

    Raises `DamagedFileError` for a checkpoint that does not verify (the caller starts that part over)."""
    fix = "The partial run cannot resume from it; it is discarded and that part is collected again"
    with read_safetensors(path, "an hf-curvedit checkpoint", fix) as f:
        meta = f.metadata
        try:
            written_with = json.loads(meta["key"])
            state = json.loads(meta["state"])
            next_batch, done = int(meta["next_batch"]), json.loads(meta["done"])
        except (KeyError, ValueError) as err:
            raise DamagedFileError(path, f"its metadata is incomplete or unreadable ({err})", fix) from None
        if written_with != json.loads(json.dumps(key, sort_keys=True)):
            raise InputError(
                f"the checkpoint in {path.parent} was written with different settings or for a different model. "
                f"Use another output folder, or {RESTART} to start over (this deletes the partial results)."
            )
        sums = {k: f.get(k).to(device_of(k)) for k in f.keys()}
    return sums, state, next_batch, done
