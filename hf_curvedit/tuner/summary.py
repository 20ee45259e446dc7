"""A curvature edit as seen from outside the tuner: a JSON-ready summary, and its saved forms (adapter or merged).

These are the tuner facts that publishing needs (`hf_curvedit.publish` writes the summary as ``curvedit_edit.json``,
the adapter folder, and the merged weights as a plain transformers checkpoint), kept here so that the publishing
code does not reach into adapter internals (the ``curvedit_`` buffers, ``edited_modules``, PEFT's ``base_layer``
wrapping and merge state, its sub-folder for non-default adapters).

This module must not import `hf_curvedit.publish` (publish depends on the tuner, not the other way round).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ..errors import InputError
from .config import CURVEDIT, CurvatureEditConfig

__all__ = ["edit_summary", "is_curvature_edit_config", "jsonable", "merged_state_dict", "module_rows",
           "module_rows_from_config", "save_adapter", "save_merged", "verify_adapter_folder"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_REDOWNLOAD = ("Download the adapter again (for a Hub repo: `hf download REPO --force-download`) or build the edit "
               "again (hf-curvedit edit)")


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (sets become sorted lists, anything else unknown becomes its ``str``)."""
    # peft configs hold sets (target_modules) and enums; YAML and JSON want plain lists and strings
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def module_rows(reports: Sequence[Any]) -> list[dict[str, Any]]:
    """Per-module rows from `ModuleEditReport` objects (or their dicts)."""
    return [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in reports]


def module_rows_from_config(edit_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-module rows (``module``, ``keep_mass``, ``k``) from a saved config, for when the live model is not at hand.

    The modules and their ``k`` come from ``edited_modules``; ρ from `CurvatureEditConfig.keep_mass_for` (adapters
    saved by earlier versions also kept it in ``edited_modules``).
    """
    rho = {key: edit_config[key] for key in ("keep_mass", "keep_mass_pattern") if edit_config.get(key) is not None}
    keep_mass_for = CurvatureEditConfig(**rho).keep_mass_for
    rows = []
    for name, info in sorted((edit_config.get("edited_modules") or {}).items()):
        keep_mass = info["keep_mass"] if info.get("keep_mass") is not None else keep_mass_for(name)
        row = {"module": name, "keep_mass": keep_mass, "k": info.get("k")}
        if info.get("experts"):
            row.update(num_experts=info["experts"], edited_experts=info.get("edited_experts"),
                       expert_tokens=info.get("expert_tokens"), unedited_experts=info.get("unedited_experts"))
        rows.append(row)
    return rows


def is_curvature_edit_config(config: Any) -> bool:
    """Whether `config` (a `PeftConfig` or the dict of an ``adapter_config.json``) describes a curvature edit."""
    peft_type = config.get("peft_type") if isinstance(config, Mapping) else getattr(config, "peft_type", None)
    return peft_type is not None and getattr(peft_type, "value", peft_type) == CURVEDIT.value


def edit_summary(model: PeftModel, adapter_name: str = "default") -> dict[str, Any]:
    """The JSON-ready description of one curvature edit of `model`.

    Holds ``adapter_name``, ``config`` (the adapter config as plain JSON), ``modules`` (one `ModuleEditReport` dict
    per edited module), ``base_model`` (the config's ``base_model_name_or_path``), ``architectures`` and ``kind``
    (``"adapter"``). `hf_curvedit.publish` writes it as ``curvedit_edit.json`` and reads it back from a folder.

    Raises:
        `ValueError`: `adapter_name` is not a curvature edit of `model`.
    """
    config = model.peft_config.get(adapter_name)
    if config is None or not is_curvature_edit_config(config):
        raise InputError(f"adapter {adapter_name!r} of this PeftModel is not a curvature edit "
                         f"(adapters: {list(model.peft_config)})")
    # from the package, not .model: robust to the tuner's internal layout and to its __init__ importing this module
    from . import curvature_edit_report

    config_dict = jsonable(config.to_dict())
    base = model.get_base_model()
    # A model built from a config (not loaded) has no `architectures` yet; its class name says the same.
    architectures = list(getattr(base.config, "architectures", None) or [type(base).__name__])
    return {"adapter_name": adapter_name, "config": config_dict,
            "modules": module_rows(curvature_edit_report(model, adapter_name)),
            "base_model": config_dict.get("base_model_name_or_path"),
            "architectures": architectures,
            "kind": "adapter"}


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a base model whose curvature edit is merged, with the plain transformers keys.

    With the edit merged, ``base_layer.weight`` holds ``W'``. The adapter buffers (``curvedit_*``) are dropped and
    PEFT's wrapper level (``.base_layer.``) is removed from the keys. The tensors are not copied, so
    ``save_pretrained(state_dict=...)`` still sees tied weights.

    Args:
        model: the base model inside the `PeftModel` (``peft_model.get_base_model()``), after ``merge_adapter``.
    """
    out = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        if any(part.startswith("curvedit_") for part in key.split(".")):
            continue
        out[key.replace(".base_layer.", ".")] = tensor
    return out


def save_merged(model: PeftModel, adapter_name: str, folder: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Save `model` with the edit `adapter_name` merged as a plain transformers checkpoint (safetensors) in `folder`.

    The model is merged in place and unmerged afterwards (bit-exact in fp32) rather than deep-copied.

    Raises:
        `ValueError`: an adapter of `model` is already merged.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules()):
        raise InputError("the model already has merged adapters; call model.unmerge_adapter() before publishing "
                         "with merged=True (publish merges the chosen adapter itself and unmerges it afterwards)")
    model.merge_adapter([adapter_name])
    try:
        inner = model.get_base_model()
        inner.save_pretrained(folder, state_dict=merged_state_dict(inner), safe_serialization=True,
                              max_shard_size=max_shard_size)
    finally:
        model.unmerge_adapter()


def save_adapter(model: PeftModel, adapter_name: str, folder: str | Path) -> None:
    """Save the adapter `adapter_name` of `model` at the root of `folder`, where ``from_pretrained(repo_id)`` looks.

    (PEFT's `save_pretrained` puts a non-default adapter in a sub-folder named after it.)
    """
    folder = Path(folder)
    model.save_pretrained(folder, selected_adapters=[adapter_name])
    sub = folder / adapter_name
    if adapter_name != "default" and sub.is_dir():
        for p in sub.iterdir():
            shutil.move(str(p), folder / p.name)
        sub.rmdir()


def verify_adapter_folder(folder: str | Path) -> dict[str, Any]:
    """Check a saved curvature-edit adapter without loading any model: ``adapter_config.json`` parses and describes a
    curvature edit, ``adapter_model.safetensors`` reads, and every edited module's tensors match the digest the config
    recorded when the edit was built. Returns the config (a dict).

    Raises:
        `FileNotFoundError`: a file is missing.
        `DamagedFileError`: a file is not what it should be (invalid JSON, truncated or damaged weights), naming it
            and the fix.
    """
    from ..integrity import DamagedFileError, read_json_file, read_safetensors, tensor_set_problem
    from .stores import adapter_file_keys, digest_problem

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {ADAPTER_CONFIG}: give the folder that `hf-curvedit edit` "
                                "(save_pretrained) wrote")
    config = read_json_file(config_path, "an adapter config (a JSON object)", _REDOWNLOAD)
    if not isinstance(config, dict):
        raise DamagedFileError(config_path, "should hold an adapter config (a JSON object) but does not",
                               _REDOWNLOAD)
    if not is_curvature_edit_config(config):
        raise InputError(f"{config_path} describes a {config.get('peft_type')} adapter, not a curvature edit "
                         "(peft_type CURVEDIT)")
    entries = config.get("edited_modules") or {}
    with read_safetensors(weights_path, "the adapter's weights", _REDOWNLOAD) as f:
        expected = adapter_file_keys(entries)
        problem = tensor_set_problem(expected, f.keys(), by=f"in {ADAPTER_CONFIG}")
        if problem:
            raise f.damaged(problem)
        units: dict[str, dict[str, Any]] = {}
        for key, (entry, store) in expected.items():
            units.setdefault(entry, {})[store] = f.get(key)
        for name, info in entries.items():
            problem = digest_problem(info, units[name])
            if problem:
                raise f.damaged(f"the edit of module {name!r}: {problem}")
    return config
