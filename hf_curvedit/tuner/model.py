"""`CurvatureEditModel`: the PEFT tuner of curvature edits (``PeftType.CURVEDIT``). It injects, loads, merges and
unloads the layers; `build.py` computes new edits, `locate.py` finds where they go."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from torch import nn

from ..curvature.decompose import EigenFile
from ..edit import ModuleEditReport
from ..errors import InputError
from ..integrity import tensor_set_problem
from ..target_defaults import DEFAULT_TARGET_MODULES
from ..targets import expert_parameter_names, is_experts_module, is_linear_like
from ..utils import strip_wrapper_prefix
from .build import compute_module_edits, factor_provenance, fill_edits, open_eigen, record_digests
from .config import CurvatureEditConfig
from .experts import CurvatureEditExperts
from .layer import CurvatureEditLayer, WrongBaseModelError
from .linear import CurvatureEditLinear
from .locate import (
    check_base_model,
    curvature_edit_report,
    default_targets_for,
    edited_names,
    experts_of,
    is_target,
    refuse_tied,
)
from .stores import DamagedAdapterError, adapter_file_keys, damaged_message, warn_if_unchecked

__all__ = ["CurvatureEditModel"]


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
            peft_config.target_modules = default_targets_for(model_config.get("model_type"))
        return peft_config

    def _check_target_module_exists(self, peft_config: CurvatureEditConfig, key: str) -> bool | _ExcludedModule:
        # the same grammar as FactorConfig.target_modules and compute_module_edits (globs included); an experts
        # module is a target when one of its projections is
        name = strip_wrapper_prefix(key)
        try:
            experts = experts_of(self.model.get_submodule(key))
        except AttributeError:
            # a module inside an experts module already wrapped (JetMoE's expert children, its router): part of that
            # experts module's edit, never a target of its own
            return False
        if experts is None:
            return is_target(peft_config, name, expert=False)
        results = [is_target(peft_config, f"{name}.{p}", expert=True) for p in expert_parameter_names(experts)]
        if any(r is True for r in results):
            return True
        return next((r for r in results if isinstance(r, _ExcludedModule)), False)

    def _create_and_replace(
        self, peft_config: CurvatureEditConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str | None = None, **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise InputError("Current key shouldn't be `None`")
        module_name = strip_wrapper_prefix(current_key)
        refuse_tied(self.model, target, module_name)
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
            raise InputError(f"curvature edits replace weights and cannot be active together; pick one of {names}")
        # a merged edit of another adapter is undone by the layer's next forward
        super().set_adapter(adapter_name, inference_mode=True)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        config = self.peft_config[adapter_name]
        edits = None
        if not config.edited_modules:
            # a new edit, not a saved one being loaded: compute it from the factors file before the layers exist
            if not config.factors_path:
                raise InputError(
                    f"cannot build curvature edit '{adapter_name}': no K-FAC factors were given and the config records "
                    "no edit. Build it with hf_curvedit.build_curvature_edit(model, eigen, config) or set "
                    "config.factors_path to an eigen store (its folder, eigen.safetensors or its index); to load a "
                    "saved edit use PeftModel.from_pretrained(base, adapter_dir)."
                )
            factors = EigenFile(config.factors_path)
            if not config.factor_source:
                config.factor_source = factor_provenance(factors, config.factors_path)
            protect_eigen = {}
            for domain in config.protect:
                path = config.protect_factor_sources.get(domain, {}).get("path")
                if not path:
                    raise InputError(f"cannot build curvature edit '{adapter_name}': protected domain {domain!r} "
                                     f"has no factors; set config.protect_factor_sources[{domain!r}] = {{'path': "
                                     "'.../factors'} (an eigen store) or use build_curvature_edit")
                protect_eigen[domain], config.protect_factor_sources[domain] = open_eigen(
                    path, config.protect_factor_sources[domain])
            edits = compute_module_edits(model, factors, config, protect_eigen)
        elif not getattr(config, "_curvedit_building", False):
            warn_if_unchecked(adapter_name, config)  # a saved edit being loaded
            _check_gguf_base(model, adapter_name, config)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        if edits is not None:
            fill_edits(model, adapter_name, edits)
            record_digests(model, adapter_name, config)
        # every module the saved edit covers must exist in this base (a base with fewer layers is a wrong base)
        present = edited_names(model, adapter_name)
        missing = sorted(set(config.edited_modules) - present)
        if missing:
            raise WrongBaseModelError(
                f"curvature edit '{adapter_name}' edits {len(missing)} module(s) that this base model does not have "
                f"(or that target_modules no longer selects), e.g. {missing[:3]}. Load the adapter onto the base model "
                "it was made from (see base_model_name_or_path in its adapter_config.json)."
            )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: Any, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # PEFT's loading path, with the whole file at hand: it must hold exactly the tensors of the edits its config
        # records (the layers then check each tensor's digest as it is loaded)
        problem = tensor_set_problem(adapter_file_keys(config.edited_modules),
                                     [k for k in state_dict if ".curvedit_" in k], by="in adapter_config.json")
        if problem:
            raise DamagedAdapterError(damaged_message(adapter_name, "", f"the adapter {problem}",
                                                      getattr(config, "_curvedit_source", None)))
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

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


def _check_gguf_base(model: nn.Module, adapter_name: str, config: CurvatureEditConfig) -> None:
    """Refuse a saved edit built on one GGUF file for a base read from another one (by SHA-256)."""
    from ..gguf import gguf_source_of

    built_on = config.base_gguf
    if not built_on:
        return
    source = gguf_source_of(model)
    if source is not None and source.get("sha256") != built_on.get("sha256"):
        raise WrongBaseModelError(
            f"curvature edit '{adapter_name}' was built on the GGUF file {built_on.get('file')} (sha256 "
            f"{built_on.get('sha256', '')[:12]}…), and this base was read from {source.get('file')} (sha256 "
            f"{source.get('sha256', '')[:12]}…). Load the adapter onto a base read from the file it was built on.")
