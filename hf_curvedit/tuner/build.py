"""`build_curvature_edit`: compute the edits of a model from K-FAC eigenbases and inject them as a PEFT adapter.

Edits reach the layers the way PEFT's data-driven initializations do (compare ``peft/tuners/lora/eva.py``): the edits
are computed first, from the base weights and the eigenbases (`compute_module_edits`); their buffer shapes are
recorded in ``config.edited_modules``; PEFT then injects empty layers through the same path that loading a saved
adapter takes; last, each layer is filled with its edit (`fill_edits`) and the digest of what it holds is recorded
(`record_digests`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ..curvature.decompose import EigenFile
from ..curvature.eigen import KFACEigen, ModuleEigen
from ..curvature.storage import KFACFactors
from ..edit import CurvatureEdit, ExpertsEdit, compute_edit, compute_experts_edit
from ..errors import InputError
from ..gguf import gguf_source_of
from .config import CurvatureEditConfig
from .locate import default_targets_for, edit_candidates, is_target, iter_layers, logical_weight, refuse_tied

__all__ = ["EigenSource", "build_curvature_edit", "compute_module_edits", "factor_provenance", "fill_edits",
           "open_eigen", "record_digests", "split_factor_sets"]


EigenSource = KFACFactors | KFACEigen | Mapping[str, ModuleEigen] | str | Path


def compute_module_edits(model: nn.Module, eigen: Mapping[str, ModuleEigen], config: CurvatureEditConfig,
                         protect_eigen: Mapping[str, Mapping[str, ModuleEigen]] | None = None,
                         ) -> dict[str, CurvatureEdit]:
    """Compute the edit of every module `config` targets in `model` (a transformers model or a `PeftModel`), with ρ
    per module from `CurvatureEditConfig.keep_mass_for`, and record their buffer shapes in ``config.edited_modules``.

    ``protect_eigen`` holds the eigenbases of each domain in ``config.protect`` (domain → module → eigenbasis).
    Nothing in the model changes. Raises a `ValueError` naming the module when its factors (or a protected domain's)
    are missing, when it is not a linear layer, or when its weight is tied to the input embeddings.
    """
    protect_eigen = dict(protect_eigen or {})
    if set(config.protect) != set(protect_eigen):
        raise InputError(f"config.protect lists the domains {sorted(config.protect)} but factors were given for "
                         f"{sorted(protect_eigen)}; give one factor set per protected domain")
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if config.target_modules is None:
        config.target_modules = default_targets_for(getattr(getattr(inner, "config", None), "model_type", None))
    targets = {name: (m, p) for name, m, p in edit_candidates(inner) if is_target(config, name, p is not None) is True}
    if not targets:
        raise InputError(f"target_modules={config.target_modules!r} matches no linear layer or expert projection of "
                         "this model; use names, name suffixes, globs or a regex that match some of its weights")
    edits: dict[str, CurvatureEdit | ExpertsEdit] = {}
    with torch.no_grad():
        for name, (module, param) in targets.items():
            if param is None:
                refuse_tied(inner, module, name)
            module_eigen = eigen.get(name)
            if module_eigen is None:
                known = list(eigen)
                raise InputError(
                    f"no K-FAC factors for module '{name}' (targeted by target_modules={config.target_modules!r}); "
                    f"the factors hold {len(known)} modules, e.g. {known[:4]}. Collect factors for it or narrow "
                    "target_modules / exclude_modules."
                )
            protect = {}
            for domain, domain_eigen in protect_eigen.items():
                if name not in domain_eigen:
                    raise InputError(f"the factors of protected domain {domain!r} have no module '{name}'; fit them "
                                     "on the same target modules as the general factors")
                protect[domain] = (domain_eigen[name], config.protect[domain])
            weight = logical_weight(module, param)
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            if param is not None:
                edits[name] = compute_experts_edit(weight, module_eigen, config.keep_mass_for(name), config.selection,
                                                   config.rank_cap, dtype, protect=protect or None,
                                                   min_expert_tokens=config.min_expert_tokens)
            else:
                edits[name] = compute_edit(weight, module_eigen, config.keep_mass_for(name), config.selection,
                                           config.rank_cap, dtype, protect=protect or None)
    config.edited_modules = {name: edited_entry(e) for name, e in edits.items()}
    # built here, not loaded: its digests are recorded once the layers hold it (`record_digests`)
    object.__setattr__(config, "_curvedit_building", True)
    return edits


def edited_entry(edit: CurvatureEdit | ExpertsEdit) -> dict[str, Any]:
    """What ``config.edited_modules`` records of one edit: the buffer shapes loading allocates, and for an expert
    projection which experts were edited and how many tokens each one's factors saw."""
    if isinstance(edit, ExpertsEdit):
        edited = edit.edited.tolist()
        return {"k": edit.rank, "experts": len(edited), "edited_experts": int(sum(edited)),
                "unedited_experts": [e for e, done in enumerate(edited) if not done],
                "expert_tokens": [int(t) for t in edit.num_tokens.tolist()]}
    return {"k": edit.rank, "q_side": edit.q_side, **({"protected": edit.protected} if edit.protected else {})}


def fill_edits(model: nn.Module, adapter_name: str, edits: Mapping[str, CurvatureEdit | ExpertsEdit]) -> None:
    """Hand each layer the edits of its units (by ``edited_modules`` name)."""
    for name, layer in iter_layers(model):
        for unit in layer.units_of(adapter_name):
            key = layer.unit_name(unit, name)
            if key in edits:
                layer.set_edit(adapter_name, edits[key], unit)


def record_digests(model: nn.Module, adapter_name: str, config: CurvatureEditConfig) -> None:
    """Record in ``config.edited_modules`` the digest of each edited tensor and the dtype it is stored in, as the
    layers hold them after the build: saved with the adapter, checked by every load before the edit is used."""
    from .. import __version__

    for _, layer in iter_layers(model):
        for key, record in layer.record_digests(adapter_name).items():
            if key in config.edited_modules:
                config.edited_modules[key].update(record)
    config.curvedit_version = __version__
    config.base_gguf = gguf_source_of(model) or config.base_gguf
    object.__setattr__(config, "_curvedit_building", False)


def factor_provenance(eigen: Any, path: str | Path | None = None) -> dict[str, Any]:
    meta = dict(getattr(eigen, "metadata", {}) or {})
    out: dict[str, Any] = {}
    if path is not None:
        out["path"] = str(path)
    for key in ("model_name_or_path", "model_info", "num_tokens", "factors_id", "factors_path", "factor_config"):
        if key in meta:
            out[key] = meta[key]
    return out


def _is_factor_set(value: Any) -> bool:
    return isinstance(value, (KFACFactors, KFACEigen, EigenFile, str, Path)) or (
        isinstance(value, Mapping) and all(isinstance(v, ModuleEigen) for v in value.values()))


def split_factor_sets(eigen: Any, config: CurvatureEditConfig) -> tuple[Any, dict[str, Any]]:
    """``(general factors, {protected domain: factors})`` from what `build_curvature_edit` was given."""
    sets = eigen if isinstance(eigen, Mapping) and not _is_factor_set(eigen) else None
    if sets is None:
        if config.protect:
            raise InputError(f"config.protect lists {sorted(config.protect)}, so pass one factor set per domain: "
                             f"build_curvature_edit(model, {{'general': eigen, {next(iter(config.protect))!r}: "
                             "eigen_domain}, config)")
        return eigen, {}
    bad = [k for k, v in sets.items() if not _is_factor_set(v)]
    if bad:
        raise TypeError(f"factor sets {bad} are not factors: give KFACFactors, KFACEigen, a mapping of module "
                        "name -> ModuleEigen, or the path of an eigen store (its folder, eigen.safetensors or its "
                        "index)")
    general = [k for k in sets if k not in config.protect]
    missing = [k for k in config.protect if k not in sets]
    if len(general) != 1 or missing:
        raise InputError(f"the factor sets are {sorted(sets)} and config.protect lists {sorted(config.protect)}: give "
                         "exactly one general set (e.g. 'general') plus one set per protected domain"
                         + (f"; missing {missing}" if missing else ""))
    return sets[general[0]], {k: sets[k] for k in config.protect}


def open_eigen(source: Any, provenance: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Eigenbases from a factor set (eigendecomposing fitted factors), with its provenance merged into
    ``provenance`` (what the caller set wins)."""
    if isinstance(source, KFACFactors):
        source = source.eigendecompose()
    if isinstance(source, (str, Path)):
        path = source
        source = EigenFile(path)
        return source, {**factor_provenance(source, path), **provenance}
    return source, provenance or factor_provenance(source)


def build_curvature_edit(
    model: nn.Module,
    eigen: EigenSource,
    config: CurvatureEditConfig | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Build a curvature edit from K-FAC eigenbases and return the edited `PeftModel`.

    Args:
        model (`torch.nn.Module` or `PeftModel`):
            A transformers model, or a `PeftModel` that already holds curvature edits (the new one is added next to
            them, not activated). The base weights must be the ones the factors were collected on.
        eigen ([`KFACFactors`], [`KFACEigen`], mapping, or path):
            Fitted factors (eigendecomposed here, using their on-disk cache), per-module eigenbases keyed by
            qualified module name, or the path of an eigen store (its folder, ``eigen.safetensors``, or
            ``eigen.safetensors.index.json`` when sharded; read one module at a time). With
            ``config.protect``, a dict of such factor sets: one general set plus one per protected domain, e.g.
            ``{"general": eigen, "arithmetic": eigen_math}``.
        config ([`CurvatureEditConfig`], *optional*):
            Which modules and how much mass to keep; defaults to ``CurvatureEditConfig()`` (MLP projections, ρ = 0.6).
        adapter_name (`str`):
            Name of the new adapter.

    Example:

    ```py
    >>> eigen = KFACEigen.load("factors/eigen.safetensors")
    >>> config = CurvatureEditConfig(keep_mass=0.6, target_modules=r".*layers\\.2.*mlp\\.(gate|up)_proj")
    >>> model = build_curvature_edit(base, eigen, config)
    >>> model.save_pretrained("edit-rho0.6")
    ```
    """
    config = CurvatureEditConfig() if config is None else config
    if config.edited_modules:
        raise InputError("this config was already used to build an edit (edited_modules is filled); pass a fresh one")
    general, domains = split_factor_sets(eigen, config)
    eigen, config.factor_source = open_eigen(general, config.factor_source)
    protect_eigen = {}
    for domain, source in domains.items():
        protect_eigen[domain], config.protect_factor_sources[domain] = open_eigen(
            source, config.protect_factor_sources.get(domain, {}))
    edits = compute_module_edits(model, eigen, config, protect_eigen)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    fill_edits(peft_model, adapter_name, edits)
    record_digests(peft_model, adapter_name, peft_model.peft_config[adapter_name])
    return peft_model
