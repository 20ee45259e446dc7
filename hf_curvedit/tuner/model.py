"""`CurvatureEditModel` (the PEFT tuner) and `build_curvature_edit` (build an edit from K-FAC factors).

Edits reach the layers the way PEFT's data-driven initializations do (compare ``peft/tuners/lora/eva.py``): the edits
are computed first, from the base weights and the eigenbases (`compute_module_edits`); their buffer shapes are
recorded in ``config.edited_modules``; PEFT then injects empty layers through the same path that loading a saved
adapter takes; last, each layer is filled with its edit (`CurvatureEditLayer.set_edit`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..curvature.eigen import KFACEigen, ModuleEigen
from ..curvature.storage import EigenFile, KFACFactors
from ..edit import CurvatureEdit, ExpertsEdit, ModuleEditReport, compute_edit, compute_experts_edit
from ..targets import (
    DEFAULT_TARGET_MODULES,
    NO_DEFAULT_REASON,
    default_target_modules,
    expert_parameter_names,
    is_experts_module,
    is_linear_like,
    module_matches,
)
from ..utils import strip_wrapper_prefix
from .config import CurvatureEditConfig
from .experts import CurvatureEditExperts
from .layer import CurvatureEditLayer, CurvatureEditLinear, WrongBaseModelError

__all__ = ["CurvatureEditModel", "build_curvature_edit", "check_base_model", "compute_module_edits",
           "curvature_edit_report"]

EigenSource = KFACFactors | KFACEigen | Mapping[str, ModuleEigen] | str | Path


def _default_targets(model_type: str | None) -> str:
    default = default_target_modules(model_type)
    if default is None:
        why = f" ({NO_DEFAULT_REASON[model_type]})" if model_type in NO_DEFAULT_REASON else ""
        raise ValueError(
            f"hf-curvedit has no default target modules for model_type={model_type!r}{why}; set "
            "CurvatureEditConfig(target_modules=...) to the linear layers or expert projections to edit (names, "
            "suffixes, globs or a regex)."
        )
    return default


def _is_target(config: CurvatureEditConfig, name: str) -> bool | _ExcludedModule:
    """Whether the weight called `name` (wrapper prefixes stripped) is one the config edits, in the one
    `target_modules` grammar of `hf_curvedit.targets.module_matches` (regex, names, suffixes, globs). An expert
    projection (``...experts.gate_up_proj``) is also selected by naming its experts module, as in
    `hf_curvedit.targets.resolve_target_modules`."""
    owner = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1] in _EXPERT_LEAVES else None

    def hit(spec: Any) -> bool:
        return module_matches(name, spec) or (owner is not None and module_matches(owner, spec))

    if config.exclude_modules and hit(config.exclude_modules):
        return _ExcludedModule()
    return config.target_modules is not None and hit(config.target_modules)


_EXPERT_LEAVES = ("gate_up_proj", "up_proj", "down_proj")


def _experts_of(module: nn.Module) -> nn.Module | None:
    """The experts module behind `module` (itself, or the one a `CurvatureEditExperts` wraps), else None."""
    if isinstance(module, CurvatureEditExperts):
        return module.base_layer
    return module if is_experts_module(module) else None


def _edit_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    # (name, module, parameter): linear layers and tuner layers seen as the linear layer they wrap (their children
    # are PEFT internals), with parameter None; each projection of an experts module (wrapped or not), named
    # `<module>.<parameter>`.
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        experts = _experts_of(module)
        if experts is not None:
            inside.append(name)
            for p in expert_parameter_names(experts):
                yield f"{strip_wrapper_prefix(name)}.{p}", module, p
        elif isinstance(module, BaseTunerLayer):
            inside.append(name)
            yield strip_wrapper_prefix(name), module, None
        elif is_linear_like(module):
            yield strip_wrapper_prefix(name), module, None


def _logical_weight(module: nn.Module, param: str | None = None) -> torch.Tensor:
    if param is not None:
        if isinstance(module, CurvatureEditExperts):
            return module.base_weight(param)
        w = getattr(module, param)
        return w.transpose(-1, -2) if module.is_transposed else w
    if isinstance(module, CurvatureEditLayer):
        return module.base_weight()
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def _refuse_tied(model: nn.Module, module: nn.Module, module_name: str) -> None:
    # Editing (and above all merging) a weight shared with the input embeddings would edit the embeddings too.
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    get_emb = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_emb() if callable(get_emb) else None
    except NotImplementedError:
        emb = None
    weight = getattr(base, "weight", None)
    if emb is not None and weight is not None and getattr(emb, "weight", None) is weight:
        raise ValueError(
            f"module '{module_name}' shares its weight with the input embeddings (tied lm_head); a curvature edit "
            "of it would also change the embeddings. Remove it from target_modules or add it to exclude_modules."
        )


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
        raise ValueError(f"config.protect lists the domains {sorted(config.protect)} but factors were given for "
                         f"{sorted(protect_eigen)}; give one factor set per protected domain")
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if config.target_modules is None:
        config.target_modules = _default_targets(getattr(getattr(inner, "config", None), "model_type", None))
    targets = {name: (m, p) for name, m, p in _edit_candidates(inner) if _is_target(config, name) is True}
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear layer or expert projection of "
                         "this model; use names, name suffixes, globs or a regex that match some of its weights")
    edits: dict[str, CurvatureEdit | ExpertsEdit] = {}
    with torch.no_grad():
        for name, (module, param) in targets.items():
            if param is None:
                _refuse_tied(inner, module, name)
            module_eigen = eigen.get(name)
            if module_eigen is None:
                known = list(eigen)
                raise ValueError(
                    f"no K-FAC factors for module '{name}' (targeted by target_modules={config.target_modules!r}); "
                    f"the factors hold {len(known)} modules, e.g. {known[:4]}. Collect factors for it or narrow "
                    "target_modules / exclude_modules."
                )
            protect = {}
            for domain, domain_eigen in protect_eigen.items():
                if name not in domain_eigen:
                    raise ValueError(f"the factors of protected domain {domain!r} have no module '{name}'; fit them "
                                     "on the same target modules as the general factors")
                protect[domain] = (domain_eigen[name], config.protect[domain])
            weight = _logical_weight(module, param)
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            if param is not None:
                edits[name] = compute_experts_edit(weight, module_eigen, config.keep_mass_for(name), config.selection,
                                                   config.rank_cap, dtype, protect=protect or None,
                                                   min_expert_tokens=config.min_expert_tokens)
            else:
                edits[name] = compute_edit(weight, module_eigen, config.keep_mass_for(name), config.selection,
                                           config.rank_cap, dtype, protect=protect or None)
    config.edited_modules = {name: _edited_entry(e) for name, e in edits.items()}
    return edits


def _edited_entry(edit: CurvatureEdit | ExpertsEdit) -> dict[str, Any]:
    """What ``config.edited_modules`` records of one edit: the buffer shapes loading allocates, and for an expert
    projection which experts were edited and how many tokens each one's factors saw."""
    if isinstance(edit, ExpertsEdit):
        edited = edit.edited.tolist()
        return {"k": edit.rank, "experts": len(edited), "edited_experts": int(sum(edited)),
                "unedited_experts": [e for e, done in enumerate(edited) if not done],
                "expert_tokens": [int(t) for t in edit.num_tokens.tolist()]}
    return {"k": edit.rank, "q_side": edit.q_side, **({"protected": edit.protected} if edit.protected else {})}


def _fill(model: nn.Module, adapter_name: str, edits: Mapping[str, CurvatureEdit | ExpertsEdit]) -> None:
    for name, layer in _iter_layers(model):
        if not layer.has_edit(adapter_name):
            continue
        if isinstance(layer, CurvatureEditExperts):
            mine = {p: edits[f"{name}.{p}"] for p in layer.params_of(adapter_name) if f"{name}.{p}" in edits}
            if mine:
                layer.set_edit(adapter_name, mine)
        elif name in edits:
            layer.set_edit(adapter_name, edits[name])


def _record_digests(model: nn.Module, adapter_name: str, config: CurvatureEditConfig) -> None:
    """Record in ``config.edited_modules`` the digest of each edited module's tensors, as the layers hold them after
    the build: saved with the adapter, checked by every load before the edit is used."""
    for name, layer in _iter_layers(model):
        if isinstance(layer, CurvatureEditExperts):
            for p in layer.params_of(adapter_name):
                digest = layer.content_digest(adapter_name, p)
                config.edited_modules[f"{name}.{p}"]["digest"] = digest
                layer._curvedit_digests[(adapter_name, p)] = digest
        elif layer.has_edit(adapter_name) and name in config.edited_modules:
            digest = layer.content_digest(adapter_name)
            config.edited_modules[name]["digest"] = digest
            layer._curvedit_digests[adapter_name] = digest


def _edited_names(model: nn.Module, adapter_name: str) -> set[str]:
    """The weights (linear modules, expert parameters) that carry the edit `adapter_name` in `model`."""
    out = set()
    for name, layer in _iter_layers(model):
        if isinstance(layer, CurvatureEditExperts):
            out.update(f"{name}.{p}" for p in layer.params_of(adapter_name))
        elif layer.has_edit(adapter_name):
            out.add(name)
    return out


class CurvatureEditModel(BaseTuner):
    """
    Applies curvature edits (docs/method.md) to a model: each targeted linear layer's weight is replaced by its
    projection onto the high-curvature K-FAC components, stored as a fixed low-rank factorization (a replacement, not
    an additive delta). Use [`build_curvature_edit`] to build one from factors, `PeftModel.from_pretrained` to load one,
    or `peft.get_peft_model` with ``CurvatureEditConfig(factors_path=...)``.

    Several edits (e.g. ρ = 0.5 / 0.6 / 0.8) can live on one model; exactly one is active at a time
    (`set_adapter`), `disable_adapter()` gives the base model bit for bit, `merge_adapter` / `unmerge_adapter`
    round-trip the weights bit-exactly.

    Args:
        model (`torch.nn.Module`): The model to edit.
        config ([`CurvatureEditConfig`]): The configuration of the edit.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.
        low_cpu_mem_usage (`bool`): Passed through to PEFT (the edit has no parameters to put on meta).
    """

    prefix: str = "curvedit_"
    tuner_layer_cls = CurvatureEditLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: CurvatureEditConfig, model_config: dict) -> CurvatureEditConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = _default_targets(model_config.get("model_type"))
        return peft_config

    def _check_target_module_exists(self, peft_config: CurvatureEditConfig, key: str) -> bool | _ExcludedModule:
        # the same grammar as FactorConfig.target_modules and compute_module_edits (globs included); an experts
        # module is a target when one of its projections is
        name = strip_wrapper_prefix(key)
        try:
            experts = _experts_of(self.model.get_submodule(key))
        except AttributeError:
            experts = None
        if experts is None:
            return _is_target(peft_config, name)
        results = [_is_target(peft_config, f"{name}.{p}") for p in expert_parameter_names(experts)]
        if any(r is True for r in results):
            return True
        return next((r for r in results if isinstance(r, _ExcludedModule)), False)

    def _create_and_replace(
        self, peft_config: CurvatureEditConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str | None = None, **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current key shouldn't be `None`")
        module_name = strip_wrapper_prefix(current_key)
        _refuse_tied(self.model, target, module_name)
        if isinstance(target, CurvatureEditLayer):
            target.update_layer(adapter_name, peft_config, module_name)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if is_experts_module(base):
            self._replace_module(parent, target_name,
                                 CurvatureEditExperts(target, adapter_name, peft_config, module_name), target)
            return
        if not is_linear_like(base):
            raise TypeError(
                f"module '{module_name}' is a {type(base).__name__}; curvature edits support torch.nn.Linear, "
                "transformers' Conv1D and fused experts modules only. Narrow target_modules."
            )
        self._replace_module(parent, target_name, CurvatureEditLinear(target, adapter_name, peft_config, module_name),
                             target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(child, CurvatureEditExperts) and not isinstance(new_module, BaseTunerLayer):
            # unloading: the experts module goes back as it is (PEFT's default would copy a `weight` it has not got)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = True) -> None:
        """Activate one edit (edits replace weights, so they do not stack)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(f"curvature edits replace weights and cannot be active together; pick one of {names}")
        # a merged edit of another adapter is undone by the layer's next forward
        super().set_adapter(adapter_name, inference_mode=True)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        config = self.peft_config[adapter_name]
        edits = None
        if not config.edited_modules:
            # a new edit, not a saved one being loaded: compute it from the factors file before the layers exist
            if not config.factors_path:
                raise ValueError(
                    f"cannot build curvature edit '{adapter_name}': no K-FAC factors were given and the config records "
                    "no edit. Build it with hf_curvedit.build_curvature_edit(model, eigen, config) or set "
                    "config.factors_path to an eigen.safetensors file; to load a saved edit use "
                    "PeftModel.from_pretrained(base, adapter_dir)."
                )
            factors = EigenFile(config.factors_path)
            if not config.factor_source:
                config.factor_source = _provenance(factors, config.factors_path)
            protect_eigen = {}
            for domain in config.protect:
                path = config.protect_factor_sources.get(domain, {}).get("path")
                if not path:
                    raise ValueError(f"cannot build curvature edit '{adapter_name}': protected domain {domain!r} "
                                     f"has no factors; set config.protect_factor_sources[{domain!r}] = {{'path': "
                                     "'.../eigen.safetensors'} or use build_curvature_edit")
                protect_eigen[domain], config.protect_factor_sources[domain] = _open_eigen(
                    path, config.protect_factor_sources[domain])
            edits = compute_module_edits(model, factors, config, protect_eigen)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        if edits is not None:
            _fill(model, adapter_name, edits)
            _record_digests(model, adapter_name, config)
        # every module the saved edit covers must exist in this base (a base with fewer layers is a wrong base)
        present = _edited_names(model, adapter_name)
        missing = sorted(set(config.edited_modules) - present)
        if missing:
            raise WrongBaseModelError(
                f"curvature edit '{adapter_name}' edits {len(missing)} module(s) that this base model does not have "
                f"(or that target_modules no longer selects), e.g. {missing[:3]}. Load the adapter onto the base model "
                "it was made from (see base_model_name_or_path in its adapter_config.json)."
            )

    def unload(self) -> nn.Module:
        """Remove every edit and return the base model with its original weights (a merged edit is undone first,
        unlike LoRA's `unload`, because the original weight is at hand and bit-exact)."""
        for module in self.model.modules():
            if isinstance(module, CurvatureEditLayer) and module.merged:
                module.unmerge()
        return super().unload()

    def edit_report(self, adapter_name: str | None = None) -> list[ModuleEditReport]:
        """Per-module report of `adapter_name` (default: the active one), in model order."""
        return curvature_edit_report(self.model, adapter_name or self.active_adapters[0])

    def check_base_model(self, adapter_name: str | None = None) -> None:
        """Raise `WrongBaseModelError` if any edited module's base weight is not the one the edit was built for."""
        check_base_model(self.model, adapter_name or self.active_adapters[0])


def _iter_layers(model: nn.Module) -> Iterator[tuple[str, CurvatureEditLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, CurvatureEditLayer):
            yield strip_wrapper_prefix(name), module


def curvature_edit_report(model: nn.Module, adapter_name: str = "default") -> list[ModuleEditReport]:
    """Per-module [`ModuleEditReport`] of `adapter_name` for every edited module of `model` (PeftModel or not)."""
    reports = [r for name, layer in _iter_layers(model) if layer.has_edit(adapter_name)
               for r in layer.reports(adapter_name, name)]
    if not reports:
        raise ValueError(f"the model has no curvature edit named '{adapter_name}'")
    return reports


def check_base_model(model: nn.Module, adapter_name: str = "default") -> None:
    """Raise `WrongBaseModelError` naming the first module whose base weight differs from the one the edit was built
    for."""
    for name, layer in _iter_layers(model):
        if layer.has_edit(adapter_name):
            layer.check_base(adapter_name, name)


def _provenance(eigen: Any, path: str | Path | None = None) -> dict[str, Any]:
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


def _split_factor_sets(eigen: Any, config: CurvatureEditConfig) -> tuple[Any, dict[str, Any]]:
    """``(general factors, {protected domain: factors})`` from what `build_curvature_edit` was given."""
    sets = eigen if isinstance(eigen, Mapping) and not _is_factor_set(eigen) else None
    if sets is None:
        if config.protect:
            raise ValueError(f"config.protect lists {sorted(config.protect)}, so pass one factor set per domain: "
                             f"build_curvature_edit(model, {{'general': eigen, {next(iter(config.protect))!r}: "
                             "eigen_domain}, config)")
        return eigen, {}
    bad = [k for k, v in sets.items() if not _is_factor_set(v)]
    if bad:
        raise TypeError(f"factor sets {bad} are not factors: give KFACFactors, KFACEigen, a mapping of module "
                        "name -> ModuleEigen, or the path of an eigen.safetensors")
    general = [k for k in sets if k not in config.protect]
    missing = [k for k in config.protect if k not in sets]
    if len(general) != 1 or missing:
        raise ValueError(f"the factor sets are {sorted(sets)} and config.protect lists {sorted(config.protect)}: give "
                         "exactly one general set (e.g. 'general') plus one set per protected domain"
                         + (f"; missing {missing}" if missing else ""))
    return sets[general[0]], {k: sets[k] for k in config.protect}


def _open_eigen(source: Any, provenance: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Eigenbases from a factor set (eigendecomposing fitted factors), with its provenance merged into
    ``provenance`` (what the caller set wins)."""
    if isinstance(source, KFACFactors):
        source = source.eigendecompose()
    if isinstance(source, (str, Path)):
        path = source
        source = EigenFile(path)
        return source, {**_provenance(source, path), **provenance}
    return source, provenance or _provenance(source)


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
            qualified module name, or the path of an ``eigen.safetensors`` file (read one module at a time). With
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
        raise ValueError("this config was already used to build an edit (edited_modules is filled); pass a fresh one")
    general, domains = _split_factor_sets(eigen, config)
    eigen, config.factor_source = _open_eigen(general, config.factor_source)
    protect_eigen = {}
    for domain, source in domains.items():
        protect_eigen[domain], config.protect_factor_sources[domain] = _open_eigen(
            source, config.protect_factor_sources.get(domain, {}))
    edits = compute_module_edits(model, eigen, config, protect_eigen)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _fill(peft_model, adapter_name, edits)
    _record_digests(peft_model, adapter_name, peft_model.peft_config[adapter_name])
    return peft_model
