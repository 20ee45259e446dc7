"""`publish`: write a curvature edit (adapter or merged) with its card, plots and evaluation to a folder, then push it.

`publish` is three steps, each usable alone: [`stage_folder`] (in `stage.py`) writes the weights,
``curvedit_edit.json``, ``edit_report.json`` and the plots; [`write_card`] renders ``README.md``; [`push_folder`]
uploads the folder. How to push is one [`HubOptions`], what the card says beyond the edit is one [`CardOptions`].
The folder is always complete on disk before any request, so a failed upload (bad token, server error, no
connection) loses nothing: fix the cause and call [`push_folder`] on the same folder.

Errors. A failed push raises [`PublishError`] (``.folder``, ``.stage``, ``.status_code``), one type for every cause,
so a caller can always retry with the folder it names. The cause is never remapped: huggingface_hub's own exception
(`HfHubHTTPError` or a subclass such as `RepositoryNotFoundError`, whose message already carries the status, the
Hub's message and the request id; a transport error of httpx/httpx2 when there is no connection;
`OfflineModeIsEnabled`) is the PublishError's ``__cause__``, unchanged in type. HTTP errors get our context (the
step, the fix for auth problems, the folder to retry with) appended with `HfHubHTTPError.append_to_message`, so
the same text is there whichever of the two is caught or logged. Wrapping rather than re-raising the hub error
keeps `except PublishError` as the one place that knows about the folder; branch on the hub type with
``isinstance(err.__cause__, RepositoryNotFoundError)``.

"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from peft import PeftModel

from ..evaluation.report import EditReport
from ..integrity import output_lock
from ..utils import atomic_folder
from .card import CardOptions, base_license, card_inputs, render_card
from .stage import (
    EDIT_FILENAME,
    PLOTS_DIR,
    REPORT_FILENAME,
    SWEEP_FILENAME,
    EigenLike,
    StagedFolder,
    check_out_dir,
    list_files,
    stage_folder,
)

__all__ = ["EDIT_FILENAME", "REPORT_FILENAME", "SWEEP_FILENAME", "PLOTS_DIR", "CardOptions", "HubOptions",
           "PublishError", "PublishResult", "StagedFolder", "publish", "push_folder", "stage_folder", "write_card"]


class PublishError(RuntimeError):
    """Pushing a published folder to the Hub failed. The local folder is complete and was left in place.

    ``__cause__`` is huggingface_hub's exception (see the module docstring), with its type and message kept.

    Attributes:
        folder: the local folder that was to be uploaded (retry with [`push_folder`]).
        status_code: the HTTP status of the failed request, when there was one.
        stage: which step failed (``"create_repo"``, ``"create_branch"``, ``"upload_folder"``).
    """

    def __init__(self, message: str, *, folder: Path, stage: str, status_code: int | None = None):
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
        space: what was done for the demo Space (``publish(..., space=True)``): its folder, repo and commit.
    """

    folder: Path
    repo_id: str
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    files: list[str] = field(default_factory=list)
    space: PublishResult | None = None

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

    private: bool | None = None
    revision: str | None = None
    create_pr: bool = False
    token: str | bool | None = None
    commit_message: str | None = None
    commit_description: str | None = None
    endpoint: str | None = None


def publish(model_or_dir: PeftModel | str | Path, repo_id: str, report: EditReport | None = None, *,
            out_dir: str | Path, merged: bool = False, adapter_name: str | None = None,
            eigen: EigenLike | None = None, sweep: Mapping[float, EditReport] | None = None, tokenizer: Any = None,
            card: CardOptions | None = None, hub: HubOptions | None = None, dry_run: bool = False,
            overwrite: bool = False, max_shard_size: int | str = "5GB", space: bool = False,
            space_id: str | None = None, comparison: Any = None) -> PublishResult:
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
        space (`bool`): also write a gradio Space (``app.py``, ``requirements.txt``, ``README.md``) that shows the
            edit against its base, in ``<out_dir>-space``, and push it after the model (see `publish/space.py`).
            Adapters only: the Space loads one `PeftModel` and disables the adapter for the base column.
        space_id (`str`, *optional*): the Space repo; ``<repo_id>-demo`` by default.
        comparison ([`SweepResult`] or path of a ``sweep.json``, *optional*): a sweep that measured baselines
            (`sweep_edits(..., baselines=[...])`); the card shows the edit next to each baseline at matched
            perplexity, with the sweep's plot.

    Returns:
        [`PublishResult`]: the folder, its files and (unless a dry run) the repo, commit and PR URLs; ``.space``
        holds the Space's.

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
    check_repo_id(repo_id)
    out_dir = Path(out_dir)
    if isinstance(model_or_dir, (str, Path)) and Path(model_or_dir).resolve() == out_dir.resolve():
        raise ValueError("out_dir must differ from the source folder: publish writes a fresh folder")
    check_out_dir(out_dir, overwrite)
    if space:  # refuse a merged edit or an occupied Space folder before anything is written
        from .space import check_space

        space_dir = check_space(out_dir, merged=merged, overwrite=overwrite)
    with output_lock(out_dir, f"publish {repo_id}"):
        # staged next to out_dir and renamed onto it when complete: a full disk or a kill leaves the old folder or the
        # new one, never half of one
        with atomic_folder(out_dir) as staging:
            staged = stage_folder(model_or_dir, staging, report, merged=merged, adapter_name=adapter_name,
                                  eigen=eigen, sweep=sweep, tokenizer=tokenizer, base_model=card.base_model,
                                  overwrite=True, max_shard_size=max_shard_size, comparison=comparison)
            write_card(staged, repo_id, card, hub, lookup_license=not dry_run)
        staged = dataclasses.replace(staged, folder=out_dir)
    if dry_run:
        result = PublishResult(folder=staged.folder, repo_id=repo_id, files=list_files(staged.folder))
    else:
        pushed_hub = hub if hub.commit_message is not None else dataclasses.replace(
            hub, commit_message=_commit_message(staged.edit))
        result = push_folder(staged.folder, repo_id, pushed_hub)
    if space:
        from .space import model_revision, publish_space

        result.space = publish_space(staged.folder, repo_id, space_id=space_id, out_dir=space_dir, hub=hub,
                                     revision=model_revision(result, hub), dry_run=dry_run, overwrite=overwrite)
    return result


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse (``user/name``, huggingface_hub's rules), before anything is written."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it has no namespace")
    except HFValidationError as err:
        raise ValueError(f"repo id {repo_id!r} is not a valid Hub repo id: {err}. Use the form user/name (letters, "
                         "digits, '-', '_' and '.')") from None


def write_card(staged: StagedFolder, repo_id: str, card: CardOptions | None = None,
               hub: HubOptions | None = None, *, lookup_license: bool = True) -> ModelCard:
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
                         spectrum_plots=staged.spectrum_plots, tradeoff_plot=staged.tradeoff_plot,
                         comparison=staged.comparison, comparison_plot=staged.comparison_plot)
    rendered = render_card(inputs, hub_url=hub.endpoint or constants.ENDPOINT)
    rendered.save(staged.folder / "README.md")
    return rendered


def push_folder(folder: str | Path, repo_id: str, hub: HubOptions | None = None) -> PublishResult:
    """Upload a folder written by [`publish`] (e.g. again, after a failed upload) in one commit.

    Creates the repo if needed (``exist_ok=True``) and the branch ``hub.revision`` if needed (unless it is a PR
    ref), then calls `HfApi.upload_folder`. The commit message is ``hub.commit_message`` or
    ``"Upload curvature edit"``.

    Raises:
        [`PublishError`]: naming the failed step, the cause and the fix; its ``__cause__`` is huggingface_hub's
        exception. The folder is not modified.
    """
    hub, api, target = _start_push(folder, repo_id, hub, _Target)
    folder = target.folder
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
                         commit_oid=info.oid, pr_url=info.pr_url, files=list_files(folder))


def _start_push(folder: str | Path, repo_id: str, hub: HubOptions | None,
                target_type: type[_Target]) -> tuple[HubOptions, HfApi, _Target]:
    """What every push starts with: the options, the client, and the target that turns failures into PublishErrors;
    refused at once when offline."""
    hub = hub if hub is not None else HubOptions()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    target = target_type(folder, repo_id, api.endpoint)
    if constants.HF_HUB_OFFLINE:
        # huggingface_hub only blocks requests in sessions made while offline; say so before any request is tried
        cause = OfflineModeIsEnabled("offline mode is enabled (HF_HUB_OFFLINE=1)")
        raise target.offline("create_repo") from cause
    return hub, api, target


def _commit_message(edit: Mapping[str, Any]) -> str:
    rho = sorted({m.get("keep_mass") for m in edit["modules"] if m.get("keep_mass") is not None})
    return f"Upload curvature edit ({edit['kind']}, ρ = {', '.join(f'{r:g}' for r in rho) or '?'})"


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
        except Exception as err:  # noqa: BLE001 - e.g. huggingface_hub's RuntimeError when an LFS upload dies
            raise PublishError(f"cannot publish {self.repo_id}: {stage} failed ({type(err).__name__}: {err}). "
                               f"{self.keep}", folder=self.folder, stage=stage) from err

    @property
    def keep(self) -> str:
        return (f"The local folder {self.folder} is complete and unchanged; fix the cause and retry with "
                f"push_folder({str(self.folder)!r}, {self.repo_id!r}).")

    def fix(self, status: int | None) -> str:
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
