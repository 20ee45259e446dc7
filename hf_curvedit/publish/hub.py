"""`publish`: write a curvature edit (adapter or merged) with its card, plots and evaluation to a folder, then push it.

`publish` is three steps, each usable alone: [`stage_folder`] writes the weights, ``curvedit_edit.json``,
``edit_report.json`` and the plots; [`write_card`] renders ``README.md``; [`push_folder`] uploads the folder. How to
push is one [`HubOptions`], what the card says beyond the edit is one [`CardOptions`]. The folder is always complete
on disk before any request, so a failed upload (bad token, server error, no connection) loses nothing: fix the cause
and call [`push_folder`] on the same folder.

Errors. A failed push raises [`PublishError`] (``.folder``, ``.stage``, ``.status_code``), one type for every cause,
so a caller can always retry with the folder it names. The cause is never remapped: huggingface_hub's own exception
(`HfHubHTTPError` or a subclass such as `RepositoryNotFoundError`, whose message already carries the status, the
Hub's message and the request id; a transport error of httpx/httpx2 when there is no connection;
`OfflineModeIsEnabled`) is the PublishError's ``__cause__``, unchanged in type. HTTP errors get our context (the
step, the fix for auth problems, the folder to retry with) appended with `HfHubHTTPError.append_to_message`, so
the same text is there whichever of the two is caught or logged. Wrapping rather than re-raising the hub error
keeps `except PublishError` as the one place that knows about the folder; branch on the hub type with
``isinstance(err.__cause__, RepositoryNotFoundError)``.

Size: about 490 lines, over the project's ~400, because publish's three steps share the folder format (file names,
`StagedFolder`, the edit summary) and read best together. The seams for a split are marked: the staging helpers
(which would go to a ``publish/stage.py``, the plot helpers to ``plots.py``) and the push errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from peft import PeftModel

from ..curvature.eigen import KFACEigen, ModuleEigen
from ..evaluation.report import EditReport
from ..tuner.summary import edit_summary, is_curvature_edit_config, module_rows_from_config, save_adapter, save_merged
from .card import CardOptions, base_license, card_inputs, is_hub_id, render_card

logger = logging.getLogger(__name__)

__all__ = ["EDIT_FILENAME", "REPORT_FILENAME", "SWEEP_FILENAME", "PLOTS_DIR", "CardOptions", "HubOptions",
           "PublishError", "PublishResult", "StagedFolder", "publish", "push_folder", "stage_folder", "write_card"]

EDIT_FILENAME = "curvedit_edit.json"
REPORT_FILENAME = "edit_report.json"
SWEEP_FILENAME = "edit_sweep.json"
PLOTS_DIR = "plots"
EigenLike = Union[KFACEigen, Mapping[str, ModuleEigen], str, Path]


class PublishError(RuntimeError):
    """Pushing a published folder to the Hub failed. The local folder is complete and was left in place.

    ``__cause__`` is huggingface_hub's exception (see the module docstring), with its type and message kept.

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


@dataclass
class HubOptions:
    """How to push: everything huggingface_hub needs.

    Args:
        private: visibility of a new repo (``None``: the Hub's default). An existing repo keeps its visibility.
        revision: branch to push to; created from the default branch if missing, as `push_to_hub` does.
        create_pr: open a pull request instead of committing to the branch.
        token: Hub token, as in huggingface_hub (``None``: the stored login or ``HF_TOKEN``).
        commit_message: commit title; [`publish`] derives one from the edit (kind and ρ) when ``None``.
        commit_description: commit body.
        endpoint: Hub endpoint; ``HF_ENDPOINT`` by default.
    """

    private: Optional[bool] = None
    revision: Optional[str] = None
    create_pr: bool = False
    token: Union[str, bool, None] = None
    commit_message: Optional[str] = None
    commit_description: Optional[str] = None
    endpoint: Optional[str] = None


@dataclass
class StagedFolder:
    """A folder written by [`stage_folder`], with what its card is rendered from (paths relative to `folder`)."""

    folder: Path
    edit: dict[str, Any]  # the curvedit_edit.json content: config, module rows, kind, the base_model to show
    local_base: Optional[str] = None  # where the base weights were loaded from, for the license lookup
    report: Optional[EditReport] = None
    spectrum_plots: list[tuple[str, str]] = field(default_factory=list)  # (module, PNG path)
    tradeoff_plot: Optional[str] = None


def publish(model_or_dir: Union[PeftModel, str, Path], repo_id: str, report: Optional[EditReport] = None, *,
            out_dir: Union[str, Path], merged: bool = False, adapter_name: Optional[str] = None,
            eigen: Optional[EigenLike] = None, sweep: Optional[Mapping[float, EditReport]] = None, tokenizer: Any = None,
            card: Optional[CardOptions] = None, hub: Optional[HubOptions] = None, dry_run: bool = False,
            overwrite: bool = False, max_shard_size: Union[int, str] = "5GB") -> PublishResult:
    """Write a curvature edit to a local folder with its model card, plots and evaluation, then push it to the Hub.

    The folder gets the weights (`save_pretrained` of the adapter, or of the merged model), ``README.md`` (the card),
    ``plots/*.png``, ``curvedit_edit.json`` (the edit config and per-module report) and ``edit_report.json`` (the
    evaluation). Then the repo is created (``exist_ok=True``) and the folder is uploaded with `HfApi.upload_folder`
    in one commit. transformers' `push_to_hub` is not used: it would overwrite the card.

    Args:
        model_or_dir (`PeftModel`, `str` or `Path`): a `PeftModel` holding a curvature edit, or a folder written by
            `save_pretrained` (an adapter) or by an earlier `publish` (adapter or merged). An earlier publish folder
            brings its evaluation (and sweep) along unless new ones are given.
        repo_id (`str`): target repo, e.g. ``"user/llama-curvedit-rho0.6"``.
        report ([`EditReport`], *optional*): evaluation of the edit, base against edited; shown in the card and as
            ``model-index``.
        out_dir (`str` or `Path`): local folder to write. Must be empty or new (or an earlier publish folder with
            ``overwrite=True``).
        merged (`bool`): publish the edit merged into the weights (a plain transformers checkpoint,
            ``base_model_relation: finetune``) instead of the adapter. A given model is merged in place and unmerged
            afterwards; an adapter folder is loaded with `AutoPeftModelForCausalLM` (base from its
            ``base_model_name_or_path``).
        adapter_name (`str`, *optional*): which adapter of the `PeftModel` to publish; the active one by default.
        eigen ([`KFACEigen`], mapping or path, *optional*): the eigenbases the edit was built from; when given, a
            spectrum plot per edited module goes in the card.
        sweep (`Mapping[float, EditReport]`, *optional*): reports for several ρ; with two or more, a
            recitation-vs-perplexity plot goes in the card.
        tokenizer (*optional*): saved into the folder with `save_pretrained` when given.
        card ([`CardOptions`], *optional*): base model id, license, factor-data line, tags and pipeline tag.
        hub ([`HubOptions`], *optional*): token, endpoint, visibility, branch, PR and commit text of the upload.
        dry_run (`bool`): only write the folder (no request at all: no license lookup on the Hub either).
        overwrite (`bool`): replace an earlier publish folder at `out_dir`.
        max_shard_size (`int` or `str`, defaults to ``"5GB"``): shard size of merged checkpoints.

    Returns:
        [`PublishResult`]: the folder, its files and (unless a dry run) the repo, commit and PR URLs.

    Raises:
        [`PublishError`]: the upload failed (bad token, server error, no connection); the folder is left complete.

    Example:

    ```py
    >>> model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6))
    >>> report = evaluate_edit(model, ...)
    >>> publish(model, "me/llama-curvedit-rho0.6", report, out_dir="publish/rho0.6", eigen=eigen,
    ...         card=CardOptions(license="apache-2.0"), hub=HubOptions(private=True))
    ```
    """
    card = card if card is not None else CardOptions()
    hub = hub if hub is not None else HubOptions()
    staged = stage_folder(model_or_dir, out_dir, report, merged=merged, adapter_name=adapter_name, eigen=eigen,
                          sweep=sweep, tokenizer=tokenizer, base_model=card.base_model, overwrite=overwrite,
                          max_shard_size=max_shard_size)
    write_card(staged, repo_id, card, hub, lookup_license=not dry_run)
    if dry_run:
        return PublishResult(folder=staged.folder, repo_id=repo_id, files=_list_files(staged.folder))
    if hub.commit_message is None:
        hub = dataclasses.replace(hub, commit_message=_commit_message(staged.edit))
    return push_folder(staged.folder, repo_id, hub)


def stage_folder(model_or_dir: Union[PeftModel, str, Path], out_dir: Union[str, Path],
                 report: Optional[EditReport] = None, *, merged: bool = False, adapter_name: Optional[str] = None,
                 eigen: Optional[EigenLike] = None, sweep: Optional[Mapping[float, EditReport]] = None,
                 tokenizer: Any = None, base_model: Optional[str] = None, overwrite: bool = False,
                 max_shard_size: Union[int, str] = "5GB") -> StagedFolder:
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
                       "card=CardOptions(base_model='org/name') to publish() to link it", edit.get("base_model") or "unknown")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / EDIT_FILENAME).write_text(json.dumps(edit, indent=2, default=str) + "\n", encoding="utf-8")
    if report is not None:
        report.save(out_dir / REPORT_FILENAME)
    return StagedFolder(folder=out_dir, edit=edit, local_base=local_base, report=report,
                        spectrum_plots=_spectrum_plots(eigen, edit, out_dir), tradeoff_plot=_tradeoff_plot(sweep, out_dir))


def write_card(staged: StagedFolder, repo_id: str, card: Optional[CardOptions] = None,
               hub: Optional[HubOptions] = None, *, lookup_license: bool = True) -> ModelCard:
    """Render the card of a staged folder and save it as its ``README.md``.

    Without ``card.license``, the base model's license is read from its local README or (when `lookup_license`)
    from the Hub, with ``hub.token`` and ``hub.endpoint``. Links in the card point at ``hub.endpoint``.
    """
    card = card if card is not None else CardOptions()
    hub = hub if hub is not None else HubOptions()
    license = card.license
    if license is None:
        license = base_license(staged.edit.get("base_model"), staged.local_base, token=hub.token,
                               endpoint=hub.endpoint, lookup=lookup_license)
    inputs = card_inputs(staged.edit, repo_id, card, report=staged.report, license=license,
                         spectrum_plots=staged.spectrum_plots, tradeoff_plot=staged.tradeoff_plot)
    rendered = render_card(inputs, hub_url=hub.endpoint or constants.ENDPOINT)
    rendered.save(staged.folder / "README.md")
    return rendered


def push_folder(folder: Union[str, Path], repo_id: str, hub: Optional[HubOptions] = None) -> PublishResult:
    """Upload a folder written by [`publish`] (e.g. again, after a failed upload) in one commit.

    Creates the repo if needed (``exist_ok=True``) and the branch ``hub.revision`` if needed (unless it is a PR
    ref), then calls `HfApi.upload_folder`. The commit message is ``hub.commit_message`` or
    ``"Upload curvature edit"``.

    Raises:
        [`PublishError`]: naming the failed step, the cause and the fix; its ``__cause__`` is huggingface_hub's
        exception. The folder is not modified.
    """
    hub = hub if hub is not None else HubOptions()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    target = _Target(folder, repo_id, api.endpoint)
    if constants.HF_HUB_OFFLINE:
        # huggingface_hub only blocks requests in sessions made while offline; say so before any request is tried
        cause = OfflineModeIsEnabled("offline mode is enabled (HF_HUB_OFFLINE=1)")
        raise target.offline("create_repo") from cause
    with target.step("create_repo"):
        repo_url = api.create_repo(repo_id, private=hub.private, exist_ok=True, repo_type="model")
    if hub.revision is not None and not hub.revision.startswith("refs/pr"):
        with target.step("create_branch"):
            api.create_branch(repo_id, branch=hub.revision, exist_ok=True, repo_type="model")
    with target.step("upload_folder"):
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=hub.revision,
                                 create_pr=hub.create_pr, commit_message=hub.commit_message or "Upload curvature edit",
                                 commit_description=hub.commit_description)
    return PublishResult(folder=folder, repo_id=repo_id, repo_url=str(repo_url), commit_url=info.commit_url,
                         commit_oid=info.oid, pr_url=info.pr_url, files=_list_files(folder))


# ------------------------------------------------------------------------------------------------- staging helpers
def _open(model_or_dir: Union[PeftModel, str, Path], out_dir: Path,
          merged: bool) -> tuple[Optional[PeftModel], Optional[Path]]:
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
        raise ValueError("out_dir must differ from the source folder: publish writes a fresh folder")
    if merged and (source / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(source).eval(), source
    return None, source


def _write_model(model: PeftModel, adapter_name: Optional[str], out_dir: Path, merged: bool, overwrite: bool,
                 max_shard_size: Union[int, str]) -> tuple[dict[str, Any], Optional[str]]:
    name = adapter_name or model.active_adapter
    edit = edit_summary(model, name)  # raises ValueError when the adapter is not a curvature edit
    edit["kind"] = "merged" if merged else "adapter"
    _prepare_out_dir(out_dir, overwrite)
    if merged:
        save_merged(model, name, out_dir, max_shard_size)
    else:
        save_adapter(model, name, out_dir)
    return edit, edit["base_model"]


def _copy_folder(source: Path, out_dir: Path, merged: bool, overwrite: bool) -> tuple[dict[str, Any], Optional[str]]:
    edit, local_base = _edit_from_folder(source)
    if merged and edit["kind"] != "merged":
        raise ValueError(f"{source} is not an adapter or merged curvature edit folder")
    _prepare_out_dir(out_dir, overwrite)
    shutil.copytree(source, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md", ".git", ".cache"))
    return edit, local_base


def _edit_from_folder(source: Path) -> tuple[dict[str, Any], Optional[str]]:
    if (source / EDIT_FILENAME).is_file():
        edit = _read_json(source / EDIT_FILENAME)
        edit.setdefault("kind", "adapter")
        return edit, edit.get("config", {}).get("base_model_name_or_path")
    if (source / "adapter_config.json").is_file():
        cfg = _read_json(source / "adapter_config.json")
        if not is_curvature_edit_config(cfg):
            raise ValueError(f"{source} holds a {cfg.get('peft_type')} adapter, not a curvature edit (CURVEDIT)")
        base = cfg.get("base_model_name_or_path")
        return {"adapter_name": "default", "config": cfg, "modules": module_rows_from_config(cfg),
                "base_model": base, "kind": "adapter"}, base
    raise ValueError(f"{source} has neither adapter_config.json nor {EDIT_FILENAME}: it is not a curvature edit "
                     f"folder. Publish the PeftModel itself, or a folder written by save_pretrained/publish")


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


def _set_adapter_base(out_dir: Path, base_model: str) -> None:
    path = out_dir / "adapter_config.json"
    cfg = _read_json(path)
    cfg["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _spectrum_plots(eigen: Optional[EigenLike], edit: Mapping[str, Any], out_dir: Path) -> list[tuple[str, str]]:
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


def _tradeoff_plot(sweep: Optional[Mapping[float, EditReport]], out_dir: Path) -> Optional[str]:
    if sweep is None or len(sweep) < 2:
        return None
    from .plots import plot_tradeoff  # matplotlib is imported only when a plot is drawn

    rel = f"{PLOTS_DIR}/recitation_vs_perplexity.png"
    plot_tradeoff(sweep, out_dir / rel)
    (out_dir / SWEEP_FILENAME).write_text(
        json.dumps({str(k): v.to_dict() for k, v in sorted(sweep.items())}, indent=2), encoding="utf-8")
    return rel


def _commit_message(edit: Mapping[str, Any]) -> str:
    rho = sorted({m.get("keep_mass") for m in edit["modules"] if m.get("keep_mass") is not None})
    return f"Upload curvature edit ({edit['kind']}, ρ = {', '.join(f'{r:g}' for r in rho) or '?'})"


def _list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------- push errors
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


# What failed, per HTTP status. The Hub's own message (status, reason, server message, request id) follows it.
_WHAT_FAILED = {401: "authentication failed", 403: "permission denied", 404: "not found"}


@dataclass(frozen=True)
class _Target:
    """Where a push goes; turns huggingface_hub's exceptions into a [`PublishError`] naming the step."""

    folder: Path
    repo_id: str
    endpoint: str

    @contextlib.contextmanager
    def step(self, stage: str) -> Iterator[None]:
        try:
            yield
        except HfHubHTTPError as err:
            raise self.http_error(err, stage) from err
        except OfflineModeIsEnabled as err:
            raise self.offline(stage) from err
        except _transport_errors() as err:
            raise PublishError(f"cannot publish {self.repo_id}: could not connect to the Hub at {self.endpoint} "
                               f"during {stage} ({type(err).__name__}: {err}). Check the network and HF_ENDPOINT. "
                               f"{self.keep}", folder=self.folder, stage=stage) from err

    @property
    def keep(self) -> str:
        return (f"The local folder {self.folder} is complete and unchanged; fix the cause and retry with "
                f"push_folder({str(self.folder)!r}, {self.repo_id!r}).")

    def fix(self, status: Optional[int]) -> str:
        if status == 401:
            return ("The token is missing or invalid: pass HubOptions(token=<a write token>), set HF_TOKEN, or run "
                    "`hf auth login`.")
        if status == 403:
            return (f"The token cannot write to the namespace {self.repo_id.split('/')[0]!r}: use a token with write "
                    f"access to it.")
        if status == 404:
            return "The repo or revision does not exist, or the token cannot see it."
        if status is not None and status >= 500:
            return f"The Hub at {self.endpoint} failed, not the upload's content; retry later."
        return ""

    def http_error(self, err: HfHubHTTPError, stage: str) -> PublishError:
        status = getattr(getattr(err, "response", None), "status_code", None)
        what = _WHAT_FAILED.get(status) or ("server error" if status and status >= 500 else "request failed")
        fix = self.fix(status)
        err.append_to_message(f"\n\n[hf-curvedit] {stage} failed.{' ' + fix if fix else ''} {self.keep}")
        return PublishError(f"cannot publish {self.repo_id}: {what} ({status}) during {stage}.\n{err}",
                            folder=self.folder, stage=stage, status_code=status)

    def offline(self, stage: str) -> PublishError:
        return PublishError(f"cannot publish {self.repo_id}: offline mode is on (HF_HUB_OFFLINE=1). Unset "
                            f"HF_HUB_OFFLINE to upload. {self.keep}", folder=self.folder, stage=stage)
