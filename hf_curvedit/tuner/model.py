"""`CurvatureEditModel` (the PEFT tuner) and `build_curvature_edit` (build an edit from K-FAC factors)."""

from __future__ import annotations

import contextlib
import contextvars
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ..curvature.eigen import KFACEigen, ModuleEigen
from ..curvature.factors import KFACFactors
from ..targets import DEFAULT_TARGET_MODULES
from .config import CurvatureEditConfig
from .layer import CurvatureEditLayer, CurvatureEditLinear, ModuleEditReport, WrongBaseModelError

__all__ = ["CurvatureEditModel", "build_curvature_edit", "curvature_edit_report", "check_base_model"]

# Factors handed to the tuner by `build_curvature_edit` for the duration of one injection. PEFT builds tuners from the
# config alone, and the factors (hundreds of MB) must not end up in the config, so they travel out of band.
_PENDING_FACTORS: contextvars.ContextVar[Optional[Mapping[str, ModuleEigen]]] = contextvars.ContextVar(
    "curvedit_pending_factors", default=None
)


@contextlib.contextmanager
def _pending_factors(factors: Mapping[str, ModuleEigen]) -> Iterator[None]:
    token = _PENDING_FACTORS.set(factors)
    try:
        yield
    finally:
        _PENDING_FACTORS.reset(token)


def _strip(name: str) -> str:
    for p in ("base_model.model.", "_orig_mod."):
        name = name.removeprefix(p)
    return name


class _LazyEigenFile(Mapping[str, ModuleEigen]):
    """Read bases from an eigen.safetensors file one module at a time (only the targeted ones are ever loaded)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"factors_path {self.path} does not exist; point it at an eigen.safetensors file")
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "hf_curvedit.eigen":
            raise ValueError(f"{self.path} is not an hf-curvedit eigenbasis file")
        self._names = json.loads(meta["modules"])
        self.metadata = json.loads(meta.get("metadata", "{}"))

    def __getitem__(self, name: str) -> ModuleEigen:
        if name not in self._names:
            raise KeyError(name)
        return KFACEigen.load(self.path, modules=[name])[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class CurvatureEditModel(BaseTuner):
    """
    Applies curvature edits (METHOD.md §2) to a model: each targeted linear layer's weight is replaced by its
    projection onto the high-curvature K-FAC components, stored as a fixed low-rank factorization (a replacement, not
    an additive delta). Use [`build_curvature_edit`] to build one from factors, `PeftModel.from_pretrained` to load one.

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
            model_type = model_config.get("model_type")
            default = DEFAULT_TARGET_MODULES.get(model_type)
            if default is None:
                raise ValueError(
                    f"hf-curvedit has no default target modules for model_type={model_type!r}; set "
                    "CurvatureEditConfig(target_modules=...) to the linear layers to edit (names, suffixes or a regex)."
                )
            peft_config.target_modules = default
        return peft_config

    def _factors(self, adapter_name: str, module_name: str) -> Optional[Mapping[str, ModuleEigen]]:
        pending = _PENDING_FACTORS.get()
        if pending is not None:
            return pending
        config = self.peft_config[adapter_name]
        if module_name in config.edited_modules:
            # a saved edit being loaded: the buffers come from adapter_model.safetensors, the factors are not needed
            # (factors_path may well point to a file on another machine)
            return None
        if config.factors_path:
            cache = self.__dict__.setdefault("_curvedit_factor_files", {})
            if config.factors_path not in cache:
                cache[config.factors_path] = _LazyEigenFile(config.factors_path)
                if not config.factor_source:
                    config.factor_source = _provenance(cache[config.factors_path], config.factors_path)
            return cache[config.factors_path]
        return None

    def _create_and_replace(
        self, peft_config: CurvatureEditConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: Optional[str] = None, **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current key shouldn't be `None`")
        module_name = _strip(current_key)
        factors = self._factors(adapter_name, module_name)
        eigen = None
        if factors is not None:
            eigen = factors.get(module_name)
            if eigen is None:
                eigen = factors.get(current_key)
            if eigen is None:
                known = list(factors)
                raise ValueError(
                    f"no K-FAC factors for module '{module_name}' (targeted by adapter '{adapter_name}'); the factors "
                    f"hold {len(known)} modules, e.g. {known[:4]}. Collect factors for it or narrow target_modules "
                    "/ exclude_modules."
                )
        self._refuse_tied(target, module_name)
        if isinstance(target, CurvatureEditLayer):
            target.update_layer(adapter_name, peft_config, module_name, eigen)
        else:
            new_module = self._create_new_module(peft_config, adapter_name, target, module_name, eigen)
            self._replace_module(parent, target_name, new_module, target)

    def _refuse_tied(self, target: nn.Module, module_name: str) -> None:
        # Editing (and above all merging) a weight shared with the input embeddings would edit the embeddings too.
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        get_emb = getattr(self.model, "get_input_embeddings", None)
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

    @staticmethod
    def _create_new_module(
        config: CurvatureEditConfig, adapter_name: str, target: nn.Module, module_name: str,
        eigen: Optional[ModuleEigen],
    ) -> CurvatureEditLinear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"module '{module_name}' is a {type(base).__name__}; curvature edits support torch.nn.Linear and "
                "transformers' Conv1D only. Narrow target_modules."
            )
        return CurvatureEditLinear(target, adapter_name, config, module_name, eigen)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = True) -> None:
        """Activate one edit (edits replace weights, so they do not stack)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(f"curvature edits replace weights and cannot be active together; pick one of {names}")
        # a merged edit of another adapter is undone by the layer's next forward
        super().set_adapter(adapter_name, inference_mode=True)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        # every module the saved edit covers must exist in this base (a base with fewer layers is a wrong base)
        config = self.peft_config[adapter_name]
        present = {name for name, layer in _iter_layers(model) if adapter_name in layer.curvedit_Q}
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

    def edit_report(self, adapter_name: Optional[str] = None) -> list[ModuleEditReport]:
        """Per-module report of `adapter_name` (default: the active one), in model order."""
        return curvature_edit_report(self.model, adapter_name or self.active_adapters[0])

    def check_base_model(self, adapter_name: Optional[str] = None) -> None:
        """Raise `WrongBaseModelError` if any edited module's base weight is not the one the edit was built for."""
        check_base_model(self.model, adapter_name or self.active_adapters[0])


def _iter_layers(model: nn.Module) -> Iterator[tuple[str, CurvatureEditLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, CurvatureEditLayer):
            yield _strip(name), module


def curvature_edit_report(model: nn.Module, adapter_name: str = "default") -> list[ModuleEditReport]:
    """Per-module [`ModuleEditReport`] of `adapter_name` for every edited module of `model` (PeftModel or not)."""
    reports = [layer.report(adapter_name, name) for name, layer in _iter_layers(model) if adapter_name in layer.curvedit_Q]
    if not reports:
        raise ValueError(f"the model has no curvature edit named '{adapter_name}'")
    return reports


def check_base_model(model: nn.Module, adapter_name: str = "default") -> None:
    """Raise `WrongBaseModelError` naming the first module whose base weight differs from the one the edit was built
    for."""
    for name, layer in _iter_layers(model):
        if adapter_name in layer.curvedit_Q:
            layer.check_base(adapter_name, name)


def _provenance(eigen: Any, path: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    meta = dict(getattr(eigen, "metadata", {}) or {})
    out: dict[str, Any] = {}
    if path is not None:
        out["path"] = str(path)
    for key in ("model_name_or_path", "model_info", "num_tokens", "factors_id", "factors_path", "factor_config"):
        if key in meta:
            out[key] = meta[key]
    return out


def build_curvature_edit(
    model: nn.Module,
    eigen: Union[KFACFactors, KFACEigen, Mapping[str, ModuleEigen], str, Path],
    config: Optional[CurvatureEditConfig] = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Build a curvature edit from K-FAC eigenbases and return the edited `PeftModel`.

    Args:
        model (`torch.nn.Module` or `PeftModel`):
            A transformers model, or a `PeftModel` that already holds curvature edits (the new one is added next to
            them, not activated). The base weights must be the ones the factors were collected on.
        eigen ([`KFACFactors`], [`KFACEigen`], mapping, or path):
            Fitted factors (eigendecomposed here, using their on-disk cache), per-module eigenbases keyed by
            qualified module name, or the path of an ``eigen.safetensors`` file.
        config ([`CurvatureEditConfig`], *optional*):
            Which modules and how much mass to keep; defaults to ``CurvatureEditConfig()`` (MLP projections, ρ = 0.6).
        adapter_name (`str`):
            Name of the new adapter.

    Example:

    ```py
    >>> eigen = KFACEigen.load("factors/eigen.safetensors")
    >>> model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6, target_modules=r".*layers\\.2.*mlp\\.(gate|up)_proj"))
    >>> model.save_pretrained("edit-rho0.6")
    ```
    """
    config = CurvatureEditConfig() if config is None else config
    if isinstance(eigen, KFACFactors):
        eigen = eigen.eigendecompose()
    if config.edited_modules:
        raise ValueError("this config was already used to build an edit (edited_modules is filled); pass a fresh one")
    if isinstance(eigen, (str, Path)):
        path = eigen
        eigen = _LazyEigenFile(path)
        config.factor_source = {**_provenance(eigen, path), **config.factor_source}
    elif not config.factor_source:
        config.factor_source = _provenance(eigen)
    with _pending_factors(eigen), torch.no_grad():
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config)
            return model
        return get_peft_model(model, config, adapter_name=adapter_name)
