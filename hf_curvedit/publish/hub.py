"""`publish`: write a curvature edit (adapter or merged) with its card, plots and evaluation to a folder, then push it.

`publish` is three steps, each usable alone: [`stage_folder`] (in `stage.py`) writes the weights,
``curvedit_edit.json``, ``edit_report.json`` and the plots; [`write_card`] renders ``README.md``; [`push_folder`]
uploads the folder. How to push is one [`HubOptions`], what the card says beyond the edit is one [`CardOptions`].
The folder is always complete on disk before any request, so a failed upload (bad token, server error, no
connection) loses nothing: fix the cause and call [`push_folder`] on the same folder.

Errors: every failed push step raises [`PublishError`] (see `push.py`), which names the folder to retry with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, constants
from peft import PeftModel

from ..errors import InputError
from ..evaluation.report import EditReport
from ..integrity import output_lock
from ..utils import atomic_folder
from .card import CardOptions, base_license, card_inputs, render_card
from .push import HubOptions, PublishError, PublishResult, push_folder
from .space import check_space, model_revision, publish_space
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


def publish(model_or_dir: PeftModel | str | Path, repo_id: str, report: EditReport | None = None, *,
            out_dir: str | Path, merged: bool = False, adapter_name: str | None = None,
            eigen: EigenLike | None = None, sweep: Mapping[float, EditReport] | None = None, tokenizer: Any = None,
            card: CardOptions | None = None, hub: HubOptions | None = None, dry_run: bool = False,
            overwrite: bool = False, max_shard_size: int | str = "5GB", space: bool = False,
            space_id: str | None = None, comparison: Any = None, gguf_source: str | Path | None = None,
            gguf_type: str | None = None) -> PublishResult:
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
        gguf_source (`str` or `Path`, *optional*): the GGUF file the base was read from: the folder then also carries
            the edit as a GGUF file (`export_gguf`: the source's metadata and tokenizer, the edited tensors replaced
            and quantized in ``gguf_type``, by default their type in the source), and the card says how to run it.
        gguf_type (`str`, *optional*): ``Q4_0``, ``Q4_1``, ``Q8_0``, ``F16`` or ``F32``.

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
        raise InputError("out_dir must differ from the source folder: publish writes a fresh folder")
    check_out_dir(out_dir, overwrite)
    if gguf_source is not None:  # before anything is written
        from ..gguf import require_gguf

        require_gguf()
        if not Path(gguf_source).is_file():
            raise InputError(f"gguf_source {str(gguf_source)!r} is not a file: give the GGUF file the base was read "
                             "from")
    if space:  # refuse a merged edit or an occupied Space folder before anything is written
        space_dir = check_space(out_dir, merged=merged, overwrite=overwrite)
    with output_lock(out_dir, f"publish {repo_id}"):
        # staged next to out_dir and renamed onto it when complete: a full disk or a kill leaves the old folder or the
        # new one, never half of one
        with atomic_folder(out_dir) as staging:
            staged = stage_folder(model_or_dir, staging, report, merged=merged, adapter_name=adapter_name,
                                  eigen=eigen, sweep=sweep, tokenizer=tokenizer, base_model=card.base_model,
                                  overwrite=True, max_shard_size=max_shard_size, comparison=comparison)
            if gguf_source is not None:
                from .gguf import stage_gguf

                staged.gguf = stage_gguf(model_or_dir, gguf_source, staging, repo_id, gguf_type, adapter_name)
            write_card(staged, repo_id, card, hub, lookup_license=not dry_run)
        staged = dataclasses.replace(staged, folder=out_dir)
    if dry_run:
        result = PublishResult(folder=staged.folder, repo_id=repo_id, files=list_files(staged.folder))
    else:
        pushed_hub = hub if hub.commit_message is not None else dataclasses.replace(
            hub, commit_message=_commit_message(staged.edit))
        result = push_folder(staged.folder, repo_id, pushed_hub)
    if space:
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
        raise InputError(f"repo id {repo_id!r} is not a valid Hub repo id: {err}. Use the form user/name (letters, "
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
                         comparison=staged.comparison, comparison_plot=staged.comparison_plot, gguf=staged.gguf)
    rendered = render_card(inputs, hub_url=hub.endpoint or constants.ENDPOINT)
    rendered.save(staged.folder / "README.md")
    return rendered


def _commit_message(edit: Mapping[str, Any]) -> str:
    rho = sorted({m.get("keep_mass") for m in edit["modules"] if m.get("keep_mass") is not None})
    return f"Upload curvature edit ({edit['kind']}, ρ = {', '.join(f'{r:g}' for r in rho) or '?'})"


