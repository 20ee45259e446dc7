"""`publish`: write a curvature edit (adapter or merged) with its card, plots and evaluation to a folder, then push it.

The folder is always complete on disk before anything is sent, so a failed upload (bad token, server error, no
connection) loses nothing: fix the cause and call [`push_folder`] on the same folder.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from peft import PeftModel

from ..curvature.eigen import KFACEigen, ModuleEigen
from ..evaluation.report import EditReport
from ..tuner import curvature_edit_report
from ..tuner.config import PEFT_TYPE_NAME
from .card import (CardInputs, factor_data_from_source, is_hub_id, jsonable, module_rows, module_rows_from_config,
                   pipeline_tag_for, render_card)

logger = logging.getLogger(__name__)

EDIT_FILENAME = "curvedit_edit.json"
REPORT_FILENAME = "edit_report.json"
SWEEP_FILENAME = "edit_sweep.json"
PLOTS_DIR = "plots"


class PublishError(RuntimeError):
    """Pushing a published folder to the Hub failed. The local folder is complete and was left in place.

    Attributes:
        folder: the local folder that was to be uploaded (retry with [`push_folder`]).
        status_code: the HTTP status of the failed request, when there was one.
        stage: which step failed (``"create_repo"``, ``"create_branch"``, ``"upload_folder"``).
    """

    def __init__(self, message: str, *, folder: Path, stage: str, status_code: Optional[int] = None):
        super().__init__(message)
        self.folder = folder
        self.stage = stage
        self.status_code = status_code


@dataclass
class PublishResult:
    """What [`publish`] / [`push_folder`] did.

    Args:
        folder: the local folder (complete in every case).
        repo_id: the target repo.
        repo_url: URL of the repo (``None`` in a dry run).
        commit_url: URL of the commit (``None`` in a dry run).
        commit_oid: id of the commit (``None`` in a dry run).
        pr_url: URL of the pull request when ``create_pr=True``.
        files: paths of the files in the folder, relative to it.
    """

    folder: Path
    repo_id: str
    repo_url: Optional[str] = None
    commit_url: Optional[str] = None
    commit_oid: Optional[str] = None
    pr_url: Optional[str] = None
    files: list[str] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        return self.commit_url is None


def _list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} exists and is not a folder; pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # Everything in the folder is uploaded, so stale files from something else must not be there. Only a folder
        # that an earlier publish() wrote (it holds EDIT_FILENAME) is cleared, never an arbitrary one.
        if not overwrite:
            raise FileExistsError(f"out_dir {out_dir} is not empty; everything in it would be uploaded. Pass an empty "
                                  f"or new folder, or overwrite=True to replace an earlier publish() folder")
        if not (out_dir / EDIT_FILENAME).is_file():
            raise FileExistsError(f"out_dir {out_dir} is not empty and was not written by publish() (no "
                                  f"{EDIT_FILENAME}); refusing to delete it. Pass an empty or new folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _clean_merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # With the edit merged, base_layer.weight holds W'. Drop the adapter buffers and PEFT's wrapper level so the keys
    # are the plain transformers ones; the tensors are not copied, so save_pretrained still sees tied weights.
    out = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        if any(part.startswith("curvedit_") for part in key.split(".")):
            continue
        out[key.replace(".base_layer.", ".")] = tensor
    return out


def _save_merged(model: PeftModel, adapter_name: str, out_dir: Path, max_shard_size: Union[int, str]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules()):
        raise ValueError("the model already has merged adapters; call model.unmerge_adapter() before publishing "
                         "with merged=True (publish merges the chosen adapter itself and unmerges it afterwards)")
    # Merge in place and unmerge afterwards (bit-exact in fp32) rather than deep-copying a possibly large model.
    model.merge_adapter([adapter_name])
    try:
        inner = model.get_base_model()
        inner.save_pretrained(out_dir, state_dict=_clean_merged_state_dict(inner), safe_serialization=True,
                              max_shard_size=max_shard_size)
    finally:
        model.unmerge_adapter()


def _save_adapter(model: PeftModel, adapter_name: str, out_dir: Path, base_model: Optional[str]) -> None:
    model.save_pretrained(out_dir, selected_adapters=[adapter_name])
    sub = out_dir / adapter_name
    if adapter_name != "default" and sub.is_dir():
        # PEFT puts a non-default adapter in a sub-folder; the repo root must hold it for from_pretrained(repo_id)
        for p in sub.iterdir():
            shutil.move(str(p), out_dir / p.name)
        sub.rmdir()
    if base_model is not None:
        path = out_dir / "adapter_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = base_model
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _base_license(base_model: Optional[str], local_base: Optional[str], token: Any, endpoint: Optional[str],
                  lookup: bool) -> Optional[str]:
    # The license of the base model: from a local copy's README, else from the Hub when allowed. Failing to find it
    # is not an error: the card just has no license field.
    for candidate in (local_base, base_model):
        if candidate and (Path(candidate) / "README.md").is_file():
            try:
                return ModelCard.load(Path(candidate) / "README.md").data.license
            except Exception as err:  # a malformed README must not block publishing
                logger.warning("could not read the license from %s/README.md: %s", candidate, err)
    if lookup and is_hub_id(base_model):
        try:
            info = HfApi(endpoint=endpoint, token=token).model_info(base_model)
            data = info.card_data
            return getattr(data, "license", None) if data is not None else None
        except Exception as err:
            logger.info("could not look up the license of %s on the Hub (%s); the card will have none", base_model, err)
    return None


def publish(
    model_or_dir: Union[PeftModel, str, Path],
    repo_id: str,
    report: Optional[EditReport] = None,
    *,
    out_dir: Union[str, Path],
    merged: bool = False,
    adapter_name: Optional[str] = None,
    eigen: Optional[Union[KFACEigen, Mapping[str, ModuleEigen], str, Path]] = None,
    sweep: Optional[Mapping[float, EditReport]] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    factor_data: Optional[Mapping[str, Any]] = None,
    tokenizer: Any = None,
    tags: Optional[list[str]] = None,
    pipeline_tag: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    token: Union[str, bool, None] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    endpoint: Optional[str] = None,
    dry_run: bool = False,
    overwrite: bool = False,
    max_shard_size: Union[int, str] = "5GB",
) -> PublishResult:
    """Write a curvature edit to a local folder with its model card, plots and evaluation, then push it to the Hub.

    The folder gets the weights (`save_pretrained` of the adapter, or of the merged model), ``README.md`` (the card),
    ``plots/*.png``, ``curvedit_edit.json`` (the edit config and per-module report) and ``edit_report.json`` (the
    evaluation). Then the repo is created (``exist_ok=True``) and the folder is uploaded with `HfApi.upload_folder`
    in one commit. transformers' `push_to_hub` is not used: it would overwrite the card.

    Args:
        model_or_dir (`PeftModel`, `str` or `Path`):
            A `PeftModel` holding a curvature edit, or a folder written by `save_pretrained` (an adapter) or by an
            earlier `publish` (adapter or merged).
        repo_id (`str`):
            Target repo, e.g. ``"user/llama-curvedit-rho0.6"``.
        report ([`EditReport`], *optional*):
            Evaluation of the edit, base against edited; shown in the card and as ``model-index``.
        out_dir (`str` or `Path`):
            Local folder to write. Must be empty or new (or an earlier publish folder with ``overwrite=True``).
        merged (`bool`, defaults to `False`):
            Publish the edit merged into the weights (a plain transformers checkpoint, ``base_model_relation:
            finetune``) instead of the adapter. The given model is merged in place and unmerged afterwards.
        adapter_name (`str`, *optional*):
            Which adapter of the `PeftModel` to publish; the active one by default.
        eigen ([`KFACEigen`], mapping or path, *optional*):
            The eigenbases the edit was built from; when given, a spectrum plot per edited module goes in the card.
        sweep (`Mapping[float, EditReport]`, *optional*):
            Reports for several ρ; with two or more, a recitation-vs-perplexity plot goes in the card.
        base_model (`str`, *optional*):
            Hub id of the base model, for the card metadata and ``adapter_config.json``. By default the model's
            ``base_model_name_or_path``; local paths are left out of the metadata.
        license (`str`, *optional*):
            License of the base model; by default read from the base model's card when it can be found.
        factor_data (`Mapping`, *optional*):
            Overrides for the card's factor-data line (``dataset``, ``tokens``, ``label mode``).
        tokenizer (*optional*):
            Saved into the folder with `save_pretrained` when given.
        tags (`list[str]`, *optional*), pipeline_tag (`str`, *optional*):
            Extra Hub tags; the pipeline tag (derived from the task type by default).
        private (`bool`, *optional*):
            Visibility of a new repo (`None`: the Hub's default). An existing repo keeps its visibility.
        revision (`str`, *optional*):
            Branch to push to; created from the default branch if missing, as huggingface_hub's `push_to_hub` does.
        create_pr (`bool`, defaults to `False`):
            Open a pull request instead of committing to the branch.
        token (`str` or `bool`, *optional*):
            Hub token, as in huggingface_hub (`None`: the stored login or ``HF_TOKEN``).
        commit_message (`str`, *optional*), commit_description (`str`, *optional*):
            Commit text.
        endpoint (`str`, *optional*):
            Hub endpoint; ``HF_ENDPOINT`` by default.
        dry_run (`bool`, defaults to `False`):
            Only write the folder.
        overwrite (`bool`, defaults to `False`):
            Replace an earlier publish folder at `out_dir`.
        max_shard_size (`int` or `str`, defaults to ``"5GB"``):
            Shard size of merged checkpoints.

    Returns:
        [`PublishResult`]: the folder, its files and (unless a dry run) the repo, commit and PR URLs.

    Raises:
        [`PublishError`]: the upload failed (bad token, server error, no connection); the folder is left complete.

    Example:

    ```py
    >>> model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6))
    >>> report = evaluate_edit(model, ...)
    >>> publish(model, "me/llama-curvedit-rho0.6", report, out_dir="publish/rho0.6", eigen=eigen)
    ```
    """
    out_dir = Path(out_dir)
    if isinstance(model_or_dir, (str, Path)):
        source = Path(model_or_dir)
        if not source.is_dir():
            raise FileNotFoundError(f"{source} is not a folder; pass a PeftModel or a folder written by "
                                    f"save_pretrained/publish")
        if source.resolve() == out_dir.resolve():
            raise ValueError("out_dir must differ from the source folder: publish writes a fresh folder")
        if merged and (source / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(source).eval()
            return publish(model, repo_id, report, out_dir=out_dir, merged=True, adapter_name=adapter_name,
                           eigen=eigen, sweep=sweep, base_model=base_model, license=license, factor_data=factor_data,
                           tokenizer=tokenizer, tags=tags, pipeline_tag=pipeline_tag, private=private,
                           revision=revision, create_pr=create_pr, token=token, commit_message=commit_message,
                           commit_description=commit_description, endpoint=endpoint, dry_run=dry_run,
                           overwrite=overwrite, max_shard_size=max_shard_size)
        edit, kind, local_base = _edit_from_folder(source)
        if merged and kind != "merged":
            raise ValueError(f"{source} is not an adapter or merged curvature edit folder")
        _prepare_out_dir(out_dir, overwrite)
        shutil.copytree(source, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md", ".git", ".cache"))
        # an earlier publish folder brings its evaluation along unless a new one is given
        if report is None and (source / REPORT_FILENAME).is_file():
            report = EditReport.load(source / REPORT_FILENAME)
        if sweep is None and (source / SWEEP_FILENAME).is_file():
            sweep = {float(k): EditReport.from_dict(v) for k, v in _read_json(source / SWEEP_FILENAME).items()}
        if kind == "adapter" and base_model is not None:
            cfg = _read_json(out_dir / "adapter_config.json")
            cfg["base_model_name_or_path"] = base_model
            (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    elif isinstance(model_or_dir, PeftModel):
        model = model_or_dir
        name = adapter_name or model.active_adapter
        cfg = model.peft_config.get(name)
        if cfg is None or getattr(cfg.peft_type, "value", cfg.peft_type) != PEFT_TYPE_NAME:
            raise ValueError(f"adapter {name!r} of this PeftModel is not a curvature edit "
                             f"(adapters: {list(model.peft_config)})")
        edit = edit_summary(model, name)
        local_base = edit["base_model"]
        edit["base_model"] = base_model or local_base
        kind = "merged" if merged else "adapter"
        _prepare_out_dir(out_dir, overwrite)
        if merged:
            _save_merged(model, name, out_dir, max_shard_size)
        else:
            _save_adapter(model, name, out_dir, base_model)
    else:
        raise TypeError(f"model_or_dir must be a peft.PeftModel or a folder path, got {type(model_or_dir).__name__}")

    edit["kind"] = kind
    if base_model is not None:
        edit["base_model"] = base_model
        if kind == "adapter":
            edit["config"]["base_model_name_or_path"] = base_model
    hub_base = edit.get("base_model")
    if not is_hub_id(hub_base):
        logger.warning("the base model (%s) is not a Hub repo id: the card will have no base_model metadata. Pass "
                       "base_model='org/name' to publish() to link it", hub_base or "unknown")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / EDIT_FILENAME).write_text(json.dumps(edit, indent=2, default=str) + "\n", encoding="utf-8")
    if report is not None:
        report.save(out_dir / REPORT_FILENAME)
    spectrum_plots = _spectrum_plots(eigen, edit, out_dir)
    tradeoff = None
    if sweep is not None and len(sweep) >= 2:
        from .plots import plot_tradeoff  # matplotlib is imported only when a plot is drawn

        plot_tradeoff(sweep, out_dir / PLOTS_DIR / "recitation_vs_perplexity.png")
        tradeoff = f"{PLOTS_DIR}/recitation_vs_perplexity.png"
        (out_dir / SWEEP_FILENAME).write_text(
            json.dumps({str(k): v.to_dict() for k, v in sorted(sweep.items())}, indent=2), encoding="utf-8")
    if license is None:
        license = _base_license(hub_base, local_base, token, endpoint, lookup=not dry_run)
    config_for_card = dict(edit["config"])
    if edit.get("architectures"):
        config_for_card.setdefault("architectures", edit["architectures"])
    card = render_card(CardInputs(
        kind=kind, repo_id=repo_id, edit_config=edit["config"], modules=edit["modules"], report=report,
        base_model=hub_base, license=license,
        pipeline_tag=pipeline_tag_for(config_for_card, pipeline_tag),
        factor_data=factor_data_from_source(edit["config"].get("factor_source") or {}, factor_data),
        adapter_name=edit.get("adapter_name") or "default", spectrum_plots=spectrum_plots, tradeoff_plot=tradeoff,
        tags=list(tags or []),
    ), hub_url=endpoint or constants.ENDPOINT)
    card.save(out_dir / "README.md")

    if dry_run:
        return PublishResult(folder=out_dir, repo_id=repo_id, files=_list_files(out_dir))
    if commit_message is None:
        rho = sorted({m.get("keep_mass") for m in edit["modules"] if m.get("keep_mass") is not None})
        commit_message = f"Upload curvature edit ({kind}, ρ = {', '.join(f'{r:g}' for r in rho) or '?'})"
    return push_folder(out_dir, repo_id, private=private, revision=revision, create_pr=create_pr, token=token,
                       commit_message=commit_message, commit_description=commit_description, endpoint=endpoint)


def edit_summary(model: PeftModel, adapter_name: str = "default") -> dict[str, Any]:
    """The JSON-ready description of one curvature edit (config, per-module report, base, architectures) that
    publish writes as ``curvedit_edit.json`` and reads back from a folder."""
    config_dict = jsonable(model.peft_config[adapter_name].to_dict())
    base = model.get_base_model()
    # A model built from a config (not loaded) has no `architectures` yet; its class name says the same.
    architectures = list(getattr(base.config, "architectures", None) or [type(base).__name__])
    return {"adapter_name": adapter_name, "config": config_dict,
            "modules": module_rows(curvature_edit_report(model, adapter_name)),
            "base_model": config_dict.get("base_model_name_or_path"),
            "architectures": architectures,
            "kind": "adapter"}


def _edit_from_folder(source: Path) -> tuple[dict[str, Any], str, Optional[str]]:
    if (source / EDIT_FILENAME).is_file():
        edit = _read_json(source / EDIT_FILENAME)
        return edit, edit.get("kind", "adapter"), edit.get("config", {}).get("base_model_name_or_path")
    if (source / "adapter_config.json").is_file():
        cfg = _read_json(source / "adapter_config.json")
        if cfg.get("peft_type") != PEFT_TYPE_NAME:
            raise ValueError(f"{source} holds a {cfg.get('peft_type')} adapter, not a curvature edit (CURVEDIT)")
        base = cfg.get("base_model_name_or_path")
        edit = {"adapter_name": "default", "config": cfg, "modules": module_rows_from_config(cfg), "base_model": base}
        return edit, "adapter", base
    raise ValueError(f"{source} has neither adapter_config.json nor {EDIT_FILENAME}: it is not a curvature edit "
                     f"folder. Publish the PeftModel itself, or a folder written by save_pretrained/publish")


def _spectrum_plots(eigen: Any, edit: Mapping[str, Any], out_dir: Path) -> list[tuple[str, str]]:
    from .plots import safe_filename

    if eigen is None:
        # keep the spectra an earlier publish drew (when republishing its folder)
        found = [(m["module"], f"{PLOTS_DIR}/spectrum_{safe_filename(m['module'])}.png") for m in edit["modules"]]
        return [(name, rel) for name, rel in found if (out_dir / rel).is_file()]
    from .plots import eigen_for_module, plot_spectrum  # matplotlib only when a plot is drawn

    if isinstance(eigen, (str, Path)):
        eigen = KFACEigen.load(eigen)
    selection = edit["config"].get("selection", "curvature_mass")
    plots = []
    for m in edit["modules"]:
        name = m["module"]
        e = eigen_for_module(eigen, name)
        if e is None:
            logger.warning("no eigenbasis for edited module %s: its spectrum plot is skipped", name)
            continue
        rel = f"{PLOTS_DIR}/spectrum_{safe_filename(name)}.png"
        plot_spectrum(e, float(m["keep_mass"]), out_dir / rel, module=name, selection=selection)
        plots.append((name, rel))
    return plots


def push_folder(
    folder: Union[str, Path],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    token: Union[str, bool, None] = None,
    commit_message: str = "Upload curvature edit",
    commit_description: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> PublishResult:
    """Upload a folder written by [`publish`] (e.g. again, after a failed upload) in one commit.

    Creates the repo if needed (``exist_ok=True``) and the branch `revision` if needed (unless it is a PR ref), then
    calls `HfApi.upload_folder`. Arguments are as in [`publish`].

    Raises:
        [`PublishError`]: naming the failed step and the cause (authentication, permission, server error, connection);
        the folder is not modified.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    api = HfApi(endpoint=endpoint, token=token)
    stage = "create_repo"
    if constants.HF_HUB_OFFLINE:
        # huggingface_hub only blocks requests in sessions made while offline; say so before any request is tried
        raise _publish_error(OfflineModeIsEnabled("offline mode"), folder, repo_id, api.endpoint, stage)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and not revision.startswith("refs/pr"):
            stage = "create_branch"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        stage = "upload_folder"
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=commit_message,
                                 commit_description=commit_description)
    except (HfHubHTTPError, OfflineModeIsEnabled, *_transport_errors()) as err:
        raise _publish_error(err, folder, repo_id, api.endpoint, stage) from err
    return PublishResult(folder=folder, repo_id=repo_id, repo_url=str(repo_url), commit_url=info.commit_url,
                         commit_oid=info.oid, pr_url=info.pr_url, files=_list_files(folder))


def _transport_errors() -> tuple[type[Exception], ...]:
    # huggingface_hub 1.x talks HTTP through httpx and 2.x through httpx2; neither wraps a failed connection in an
    # HfHubHTTPError, so it surfaces as the client library's TransportError.
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except ImportError:
            continue
    return tuple(found)


def _publish_error(err: Exception, folder: Path, repo_id: str, endpoint: str, stage: str) -> PublishError:
    keep = f"The local folder {folder} is complete and unchanged; fix the cause and retry with push_folder()."
    if isinstance(err, OfflineModeIsEnabled):
        return PublishError(f"cannot publish {repo_id}: offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
                            f"to upload. {keep}", folder=folder, stage=stage)
    if isinstance(err, _transport_errors()):
        return PublishError(f"cannot publish {repo_id}: could not connect to the Hub at {endpoint} during {stage} "
                            f"({type(err).__name__}). Check the network and HF_ENDPOINT. {keep}",
                            folder=folder, stage=stage)
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    server_msg = getattr(err, "server_message", None) or ""
    detail = f" The Hub said: {server_msg.strip()}" if server_msg.strip() else ""
    if status == 401:
        msg = (f"cannot publish {repo_id}: authentication failed (401 Unauthorized) during {stage}. The token is missing "
               f"or invalid: pass token=<a write token>, set HF_TOKEN, or run `huggingface-cli login`.{detail}")
    elif status == 403:
        msg = (f"cannot publish {repo_id}: permission denied (403 Forbidden) during {stage}. The token cannot write to "
               f"the namespace {repo_id.split('/')[0]!r}: use a token with write access to it.{detail}")
    elif status == 404:
        msg = (f"cannot publish {repo_id}: not found (404) during {stage}: the repo or revision does not exist or the "
               f"token cannot see it.{detail}")
    elif status is not None and status >= 500:
        msg = (f"cannot publish {repo_id}: the Hub at {endpoint} had a server error ({status}) during {stage}. This is "
               f"not caused by the upload's content; retry later.{detail}")
    else:
        msg = f"cannot publish {repo_id}: {stage} failed ({status if status is not None else type(err).__name__}): {err}"
    return PublishError(f"{msg} {keep}", folder=folder, stage=stage, status_code=status)
