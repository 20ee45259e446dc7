"""Staging: write everything of a published edit but its card to a local folder, before anything is sent.

The folder gets the weights (`save_pretrained` of the adapter, or of the merged model), ``curvedit_edit.json`` (the
edit's config and per-module report), ``edit_report.json`` (the evaluation) and ``plots/*.png``. The spectrum plots
draw the staircase the adapter saved (``curvedit_cutoffs``) when the folder holds adapter weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open

from ..curvature.decompose import EigenFile
from ..curvature.eigen import KFACEigen, ModuleEigen
from ..errors import Fix, InputError
from ..evaluation.report import EditReport
from ..tuner.summary import edit_summary, is_curvature_edit_config, module_rows_from_config, save_adapter, save_merged
from ..utils import strip_wrapper_prefix
from .card import is_hub_id

logger = logging.getLogger(__name__)

__all__ = ["COMPARISON_FILENAME", "EDIT_FILENAME", "PLOTS_DIR", "REPORT_FILENAME", "SWEEP_FILENAME", "StagedFolder",
           "stage_folder"]

EDIT_FILENAME = "curvedit_edit.json"
REPORT_FILENAME = "edit_report.json"
SWEEP_FILENAME = "edit_sweep.json"
COMPARISON_FILENAME = "method_comparison.json"  # a SweepResult: the edit against the baselines at matched perplexity
PLOTS_DIR = "plots"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EigenLike = KFACEigen | Mapping[str, ModuleEigen] | str | Path

# how publishing replaces a folder it wrote before
OVERWRITE = Fix(python="pass overwrite=True", cli="pass --overwrite")


@dataclass
class StagedFolder:
    """A folder written by [`stage_folder`], with what its card is rendered from (paths relative to `folder`)."""

    folder: Path
    edit: dict[str, Any]  # the curvedit_edit.json content: config, module rows, kind, the base_model to show
    local_base: str | None = None  # where the base weights were loaded from, for the license lookup
    report: EditReport | None = None
    spectrum_plots: list[tuple[str, str]] = field(default_factory=list)  # (module, PNG path)
    tradeoff_plot: str | None = None
    comparison: Any = None  # a SweepResult with baselines, shown as the card's method comparison
    comparison_plot: str | None = None
    gguf: dict[str, Any] | None = None  # the edit as a GGUF file in the folder (`gguf_card_info`)


def stage_folder(model_or_dir: PeftModel | str | Path, out_dir: str | Path,
                 report: EditReport | None = None, *, merged: bool = False, adapter_name: str | None = None,
                 eigen: EigenLike | None = None, sweep: Mapping[float, EditReport] | None = None,
                 tokenizer: Any = None, base_model: str | None = None, overwrite: bool = False,
                 max_shard_size: int | str = "5GB", comparison: Any = None) -> StagedFolder:
    """Write everything but the card to `out_dir`: weights, ``curvedit_edit.json``, ``edit_report.json``, plots.

    Arguments are as in [`publish`] (`base_model` is ``CardOptions.base_model``: it is also written into the
    adapter config). Nothing is sent to the Hub.
    """
    out_dir = Path(out_dir)
    model, source = _open(model_or_dir, out_dir, merged)
    if source is not None:  # an earlier publish folder brings its evaluation along unless a new one is given
        if report is None and (source / REPORT_FILENAME).is_file():
            report = EditReport.load(source / REPORT_FILENAME)
        if sweep is None and (source / SWEEP_FILENAME).is_file():
            sweep = {float(k): EditReport.from_dict(v) for k, v in _read_json(source / SWEEP_FILENAME).items()}
        if comparison is None and (source / COMPARISON_FILENAME).is_file():
            comparison = source / COMPARISON_FILENAME
    comparison = _load_comparison(comparison)
    if comparison is not None:  # checked before anything is written
        mismatch = comparison.pick_mismatch(_edit_config(model, source, adapter_name))
        if mismatch:
            raise InputError(f"the comparison's sweep picked another edit than this one ({mismatch}); publish the "
                             "sweep's pick, or leave the comparison out")
    if model is not None:
        edit, local_base = _write_model(model, adapter_name, out_dir, merged, overwrite, max_shard_size)
    else:
        assert source is not None
        edit, local_base = _copy_folder(source, out_dir, merged, overwrite)
    if base_model is not None:
        edit["base_model"] = base_model
        if edit["kind"] == "adapter":
            edit["config"]["base_model_name_or_path"] = base_model
            _set_adapter_base(out_dir, base_model)
    if not is_hub_id(edit.get("base_model")):
        logger.warning("the base model (%s) is not a Hub repo id: the card will have no base_model metadata. Pass "
                       "card=CardOptions(base_model='org/name') to publish() to link it",
                       edit.get("base_model") or "unknown")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / EDIT_FILENAME).write_text(json.dumps(edit, indent=2, default=str) + "\n", encoding="utf-8")
    if report is not None:
        report.save(out_dir / REPORT_FILENAME)
    return StagedFolder(folder=out_dir, edit=edit, local_base=local_base, report=report,
                        spectrum_plots=_spectrum_plots(eigen, edit, out_dir),
                        tradeoff_plot=_tradeoff_plot(sweep, out_dir), comparison=comparison,
                        comparison_plot=_comparison_plot(comparison, out_dir))


def _open(model_or_dir: PeftModel | str | Path, out_dir: Path,
          merged: bool) -> tuple[PeftModel | None, Path | None]:
    # (the model to save, the source folder): a PeftModel is saved; a folder is copied, except that an adapter
    # folder published merged is loaded (base included) so that it can be merged.
    if isinstance(model_or_dir, PeftModel):
        return model_or_dir, None
    if not isinstance(model_or_dir, (str, Path)):
        raise TypeError(f"model_or_dir must be a peft.PeftModel or a folder path, got {type(model_or_dir).__name__}")
    source = Path(model_or_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder; pass a PeftModel or a folder written by "
                                f"save_pretrained/publish")
    if source.resolve() == out_dir.resolve():
        raise InputError("out_dir must differ from the source folder: publish writes a fresh folder")
    if merged and (source / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(source).eval(), source
    return None, source


def _write_model(model: PeftModel, adapter_name: str | None, out_dir: Path, merged: bool, overwrite: bool,
                 max_shard_size: int | str) -> tuple[dict[str, Any], str | None]:
    name = adapter_name or model.active_adapter
    edit = edit_summary(model, name)  # raises ValueError when the adapter is not a curvature edit
    edit["kind"] = "merged" if merged else "adapter"
    _prepare_out_dir(out_dir, overwrite)
    if merged:
        save_merged(model, name, out_dir, max_shard_size)
    else:
        save_adapter(model, name, out_dir)
    return edit, edit["base_model"]


def _copy_folder(source: Path, out_dir: Path, merged: bool, overwrite: bool) -> tuple[dict[str, Any], str | None]:
    if (source / "adapter_config.json").is_file():
        from ..tuner.summary import verify_adapter_folder

        verify_adapter_folder(source)  # a damaged adapter is never published
    edit, local_base = _edit_from_folder(source)
    if merged and edit["kind"] != "merged":
        raise InputError(f"{source} is not an adapter or merged curvature edit folder")
    _prepare_out_dir(out_dir, overwrite)
    shutil.copytree(source, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md", ".git", ".cache"))
    return edit, local_base


def _edit_from_folder(source: Path) -> tuple[dict[str, Any], str | None]:
    if (source / EDIT_FILENAME).is_file():
        edit = _read_json(source / EDIT_FILENAME)
        edit.setdefault("kind", "adapter")
        return edit, edit.get("config", {}).get("base_model_name_or_path")
    if (source / "adapter_config.json").is_file():
        cfg = _read_json(source / "adapter_config.json")
        if not is_curvature_edit_config(cfg):
            raise InputError(f"{source} holds a {cfg.get('peft_type')} adapter, not a curvature edit (CURVEDIT)")
        base = cfg.get("base_model_name_or_path")
        return {"adapter_name": "default", "config": cfg, "modules": module_rows_from_config(cfg),
                "base_model": base, "kind": "adapter"}, base
    raise InputError(f"{source} has neither adapter_config.json nor {EDIT_FILENAME}: it is not a curvature edit "
                     f"folder. Publish the PeftModel itself, or a folder written by save_pretrained/publish")


def check_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Whether `out_dir` holds an earlier publish folder to replace; raises when it may not be written: a file, a
    folder that is not empty without ``overwrite``, or a non-empty one that publish did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"the publish folder {out_dir} exists and is not a folder; pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # Everything in the folder is uploaded, so stale files from something else must not be there. Only a folder
        # that an earlier publish() wrote (it holds EDIT_FILENAME) is cleared, never an arbitrary one.
        if not overwrite:
            raise FileExistsError(f"the publish folder {out_dir} is not empty; everything in it would be uploaded. "
                                  f"Pass an empty or new folder, or {OVERWRITE} to replace an earlier publish "
                                  "folder")
        if not (out_dir / EDIT_FILENAME).is_file():
            raise FileExistsError(f"the publish folder {out_dir} is not empty and was not written by publish() (no "
                                  f"{EDIT_FILENAME}); refusing to delete it. Pass an empty or new folder")
        return True
    return False


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if check_out_dir(out_dir, overwrite):
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _set_adapter_base(out_dir: Path, base_model: str) -> None:
    path = out_dir / "adapter_config.json"
    cfg = _read_json(path)
    cfg["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _spectrum_plots(eigen: EigenLike | None, edit: Mapping[str, Any], out_dir: Path) -> list[tuple[str, str]]:
    from .plots import safe_filename

    if eigen is None:
        # keep the spectra an earlier publish drew (when republishing its folder)
        found = [(m["module"], f"{PLOTS_DIR}/spectrum_{safe_filename(m['module'])}.png") for m in edit["modules"]]
        return [(name, rel) for name, rel in found if (out_dir / rel).is_file()]
    from .plots import eigen_for_module, plot_spectrum  # matplotlib only when a plot is drawn

    if isinstance(eigen, (str, Path)):
        eigen = EigenFile(eigen)  # read one module at a time, an EK-FAC edit's kept set with it
    selection = edit["config"].get("selection", "curvature_mass")
    saved = _saved_cutoffs(out_dir)
    plots = []
    for m in edit["modules"]:
        name = m["module"]
        e = eigen_for_module(eigen, name)
        if e is None:
            logger.warning("no eigenbasis for edited module %s: its spectrum plot is skipped", name)
            continue
        cutoffs, label = saved.get(name), name
        if e.num_experts is not None:
            # one plot per expert projection: its most-used expert's spectrum and staircase
            busiest = int(e.num_tokens.argmax()) if e.num_tokens is not None else 0
            e, label = e.expert(busiest), f"{name} (expert {busiest}, the most-used)"
            cutoffs = cutoffs[busiest] if cutoffs is not None else None
        rel = f"{PLOTS_DIR}/spectrum_{safe_filename(name)}.png"
        plot_spectrum(e, float(m["keep_mass"]), out_dir / rel, module=label, selection=selection, cutoffs=cutoffs)
        plots.append((name, rel))
    return plots


def _saved_cutoffs(folder: Path) -> dict[str, torch.Tensor]:
    # The staircase each module's adapter kept, from the adapter weights in the folder (a merged checkpoint has none:
    # its plots select the staircase again from the spectra, which gives the same cut).
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return {}
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            prefix, _, leaf = key.rpartition(".")
            if leaf == "curvedit_cutoffs":
                out[strip_wrapper_prefix(prefix)] = f.get_tensor(key)
            elif leaf.startswith("curvedit_cutoffs_"):  # an experts module: one stack per expert projection
                out[f"{strip_wrapper_prefix(prefix)}.{leaf.removeprefix('curvedit_cutoffs_')}"] = f.get_tensor(key)
    return out


def _tradeoff_plot(sweep: Mapping[float, EditReport] | None, out_dir: Path) -> str | None:
    if sweep is None or len(sweep) < 2:
        return None
    from .plots import plot_tradeoff  # matplotlib is imported only when a plot is drawn

    rel = f"{PLOTS_DIR}/recitation_vs_perplexity.png"
    plot_tradeoff(sweep, out_dir / rel)
    (out_dir / SWEEP_FILENAME).write_text(
        json.dumps({str(k): v.to_dict() for k, v in sorted(sweep.items())}, indent=2), encoding="utf-8")
    return rel


def _edit_config(model: PeftModel | None, source: Path | None, adapter_name: str | None) -> dict[str, Any]:
    """The curvature-edit config (as in ``adapter_config.json``) of what is being published."""
    if model is not None:
        return model.peft_config[adapter_name or model.active_adapter].to_dict()
    assert source is not None
    if (source / "adapter_config.json").is_file():
        return _read_json(source / "adapter_config.json")
    return dict(_read_json(source / EDIT_FILENAME).get("config") or {}) if (source / EDIT_FILENAME).is_file() else {}


def _load_comparison(comparison: Any) -> Any:
    if comparison is None:
        return None
    from ..sweep import SweepResult

    if isinstance(comparison, (str, Path)):
        comparison = SweepResult.load(comparison)
    if not isinstance(comparison, SweepResult):
        raise TypeError("comparison must be a SweepResult or the path of a sweep.json, got "
                        f"{type(comparison).__name__}")
    if comparison.chosen is None:
        raise InputError("the comparison's sweep chose no edit (nothing fit its perplexity budget): nothing to compare")
    return comparison


def _comparison_plot(comparison: Any, out_dir: Path) -> str | None:
    if comparison is None:
        return None
    from .plots import plot_sweep

    rel = f"{PLOTS_DIR}/method_comparison.png"
    plot_sweep(comparison, out_dir / rel)
    comparison.save(out_dir / COMPARISON_FILENAME)
    return rel


def list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict[str, Any]:
    from ..integrity import read_json_file

    return read_json_file(path, f"the JSON that {path.name} is", "The folder is damaged: publish from the adapter "
                          "folder that `hf-curvedit edit` wrote (or the PeftModel) instead, or download it again")
