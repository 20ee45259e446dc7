"""Where a curvature edit lives in a model: which weights a config targets (linear layers, expert projections, also
inside tuner layers), their logical weights, and the curvature-edit layers of a model with their reports and base
checks. Shared by the tuner (`model.py`) and the builder (`build.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..curvature.distributed import full_weight
from ..edit import ModuleEditReport
from ..errors import InputError
from ..targets import (
    default_target_modules,
    expert_parameter_names,
    experts_target,
    is_experts_module,
    is_linear_like,
    no_default_message,
    target_selected,
)
from ..utils import strip_wrapper_prefix
from .config import CurvatureEditConfig
from .experts import CurvatureEditExperts
from .layer import CurvatureEditLayer

__all__ = ["check_base_model", "curvature_edit_report", "edit_candidates", "edited_names", "experts_of", "is_target",
           "iter_layers", "logical_weight", "refuse_tied"]


def default_targets_for(model_type: str | None) -> str:
    default = default_target_modules(model_type)
    if default is None:
        raise InputError(
            f"{no_default_message(model_type)}; set "
            "CurvatureEditConfig(target_modules=...) to the linear layers or expert projections to edit (names, "
            "suffixes, globs or a regex)."
        )
    return default


def is_target(config: CurvatureEditConfig, name: str, expert: bool) -> bool | _ExcludedModule:
    """Whether the weight called `name` (wrapper prefixes stripped; ``expert``: an expert projection) is one the
    config edits, by `hf_curvedit.targets.target_selected`, the rule `resolve_target_modules` follows too."""
    if config.exclude_modules and target_selected(name, config.exclude_modules, expert):
        return _ExcludedModule()
    return target_selected(name, config.target_modules, expert)


def experts_of(module: nn.Module) -> nn.Module | None:
    """The experts module behind `module` (itself, or the one a `CurvatureEditExperts` wraps), else None."""
    if isinstance(module, CurvatureEditExperts):
        return module.base_layer
    return module if is_experts_module(module) else None


def edit_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    # (name, module, parameter): linear layers and tuner layers seen as the linear layer they wrap (their children
    # are PEFT internals), with parameter None; each projection of an experts module (wrapped or not), named
    # `<module>.<parameter>`.
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        experts = experts_of(module)
        if experts is not None:
            inside.append(name)
            for p in expert_parameter_names(experts):
                yield f"{strip_wrapper_prefix(name)}.{p}", module, p
        elif isinstance(module, BaseTunerLayer):
            inside.append(name)
            yield strip_wrapper_prefix(name), module, None
        elif is_linear_like(module):
            yield strip_wrapper_prefix(name), module, None


def logical_weight(module: nn.Module, param: str | None = None) -> torch.Tensor:
    """The unedited weight of a target as one whole ``(d_out, d_in)`` (or ``(experts, d_out, d_in)``) tensor; a
    sharded weight is gathered (collective: every process asks for the same weights in the same order)."""
    if isinstance(module, CurvatureEditLayer):
        return full_weight(module.base_weight(param or ""))
    if param is not None:
        target = experts_target(module, param)
        return target.to_logical(full_weight(target.parameter()))
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    w = full_weight(base.weight)
    return w.T if isinstance(base, Conv1D) else w


def refuse_tied(model: nn.Module, module: nn.Module, module_name: str) -> None:
    # Editing (and above all merging) a weight shared with the input embeddings would edit the embeddings too.
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    get_emb = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_emb() if callable(get_emb) else None
    except NotImplementedError:
        emb = None
    weight = getattr(base, "weight", None)
    if emb is not None and weight is not None and getattr(emb, "weight", None) is weight:
        raise InputError(
            f"module '{module_name}' shares its weight with the input embeddings (tied lm_head); a curvature edit "
            "of it would also change the embeddings. Remove it from target_modules or add it to exclude_modules."
        )


def iter_layers(model: nn.Module) -> Iterator[tuple[str, CurvatureEditLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, CurvatureEditLayer):
            yield strip_wrapper_prefix(name), module


def edited_names(model: nn.Module, adapter_name: str) -> set[str]:
    """The weights (linear modules, expert parameters) that carry the edit `adapter_name` in `model`."""
    return {layer.unit_name(u, name) for name, layer in iter_layers(model) for u in layer.units_of(adapter_name)}


def curvature_edit_report(model: nn.Module, adapter_name: str = "default") -> list[ModuleEditReport]:
    """Per-module [`ModuleEditReport`] of `adapter_name` for every edited module of `model` (PeftModel or not)."""
    reports = [r for name, layer in iter_layers(model) if layer.has_edit(adapter_name)
               for r in layer.reports(adapter_name, name)]
    if not reports:
        raise InputError(f"the model has no curvature edit named '{adapter_name}'")
    return reports


def check_base_model(model: nn.Module, adapter_name: str = "default") -> None:
    """Raise `WrongBaseModelError` naming the first module whose base weight differs from the one the edit was built
    for."""
    for name, layer in iter_layers(model):
        if layer.has_edit(adapter_name):
            layer.check_base(adapter_name, name)
