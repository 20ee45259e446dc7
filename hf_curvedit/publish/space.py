"""A gradio Space that shows a published curvature edit against its base: ``app.py``, ``requirements.txt`` and
``README.md`` (Space card), written next to the model's publish folder and pushed to a Space repo.

The Space loads the pushed adapter repo over its base with `PeftModel.from_pretrained` (one model in memory) and
serves `hf_curvedit.demo.build_app`. Pushes go through the model pushes' error handling (`PublishError`, naming the
step, with huggingface_hub's exception as ``__cause__``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, SpaceCard, SpaceCardData, constants

from .. import __version__
from ..errors import Fix, InputError
from ..integrity import output_lock
from ..utils import atomic_folder
from .card import is_hub_id
from .push import HubOptions, PublishResult, PushTarget, start_push
from .stage import OVERWRITE, list_files

__all__ = ["SPACE_FILES", "check_space", "default_space_dir", "default_space_id", "model_revision", "publish_space",
           "push_space", "space_base_model", "write_space"]

SPACE_FILES = ("README.md", "app.py", "requirements.txt")
# The embedded default is installed with hf-curvedit, so a Space loads it from the package, not from the Hub.
_EMBEDDED_DEFAULT_PARTS = ("hf_curvedit", "assets", "default_model")
_EMBEDDED_DEFAULT_NAMES = ("hf-curvedit/default-random-init",)

APP_TEMPLATE = '''"""Gradio Space: the curvature edit {model_repo} against its base model, side by side.

Written by `hf-curvedit publish --space`. One model is loaded: the base, with the edit on it as a PEFT adapter; the
"base" column runs with the adapter disabled. Run it locally with `pip install -r requirements.txt && python app.py`.
"""

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_curvedit  # noqa: F401  (registers the CURVEDIT PEFT method)
from hf_curvedit.default import load_default_model
from hf_curvedit.demo import build_app
from hf_curvedit.pipeline import default_recitation_sets

MODEL_REPO = {model_repo!r}  # the published adapter
MODEL_REVISION = {revision!r}
BASE_MODEL = {base_model!r}  # None: hf-curvedit's embedded default model
TITLE = {title!r}


def build(model_repo=MODEL_REPO, base_model=BASE_MODEL, revision=MODEL_REVISION):
    """Load the base model and the adapter on it, and build the gradio app."""
    if base_model is None:
        base, tokenizer = load_default_model()
        recitation = default_recitation_sets(tokenizer)  # the memorized set the embedded default ships
    else:
        base = AutoModelForCausalLM.from_pretrained(base_model).eval()
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        recitation = None
    model = PeftModel.from_pretrained(base, model_repo, revision=revision).eval()
    return build_app(model, tokenizer, recitation_set=recitation, title=TITLE)


if __name__ == "__main__":
    build().launch()
'''


def default_space_id(repo_id: str) -> str:
    """``<repo_id>-demo``: the Space of a model repo, in the same namespace."""
    return f"{repo_id}-demo"


def default_space_dir(model_folder: str | Path) -> Path:
    """``<publish folder>-space``, next to the model's publish folder (never inside it: that folder is uploaded)."""
    folder = Path(model_folder)
    return folder.parent / f"{folder.name}-space"


def space_base_model(model_folder: str | Path) -> str | None:
    """The base model the Space loads: the adapter's ``base_model_name_or_path`` when it is a Hub id, ``None`` for
    the embedded default (shipped inside hf-curvedit).

    Raises:
        ValueError: a merged publish folder (a Space compares base and edited from one adapter model), or a base
            that is a local folder the Space could not download.
    """
    cfg_path = Path(model_folder) / "adapter_config.json"
    if not cfg_path.exists():
        raise InputError(f"{model_folder} holds no adapter_config.json: a Space shows base and edited from one "
                         "adapter model, so publish the adapter (not --merged)")
    base = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if base in _EMBEDDED_DEFAULT_NAMES or (base and Path(base).parts[-3:] == _EMBEDDED_DEFAULT_PARTS):
        return None
    if not is_hub_id(base):
        raise InputError(f"the adapter's base model {base!r} is not a Hub repo id, so a Space cannot load it: publish "
                         "with CardOptions(base_model='org/name') (the Hub id of the base)")
    return base


def _check_space_dir(space_dir: Path, overwrite: bool) -> None:
    if not space_dir.exists() or not any(space_dir.iterdir()):
        return
    ours = {p.name for p in space_dir.iterdir()} <= set(SPACE_FILES)
    if not overwrite or not ours:
        raise FileExistsError(f"{space_dir} is not empty" + (f"; {OVERWRITE} to replace the Space folder an "
                              "earlier publish wrote" if ours else " and was not written by publish"))


def write_space(model_folder: str | Path, repo_id: str, out_dir: str | Path | None = None, *,
                revision: str | None = None, title: str | None = None,
                requirements: list[str] | None = None, endpoint: str | None = None, overwrite: bool = False) -> Path:
    """Write the Space folder of the model publish folder ``model_folder`` (pushed as ``repo_id``).

    Args:
        out_dir: the Space folder (default: [`default_space_dir`]); new or empty, or an earlier one with `overwrite`.
        revision: the model revision the Space loads (a branch or ``refs/pr/N``; default: main).
        title: the Space title (default: the model repo's name).
        requirements: lines of ``requirements.txt`` (default: this version of ``hf-curvedit[demo]``).
        endpoint: the Hub the card links to (default: ``HF_ENDPOINT``).

    Returns:
        The Space folder: ``app.py``, ``requirements.txt`` and ``README.md`` (front matter: ``sdk: gradio``,
        ``app_file: app.py``, ``models: [repo_id]``).
    """
    base = space_base_model(model_folder)
    folder = Path(out_dir) if out_dir is not None else default_space_dir(model_folder)
    _check_space_dir(folder, overwrite)
    title = title or f"{repo_id.split('/')[-1]} demo"
    reqs = requirements if requirements is not None else [f"hf-curvedit[demo]=={__version__}"]
    card = _space_card(model_folder, repo_id, title, base, endpoint or constants.ENDPOINT)
    with output_lock(folder, f"publish Space of {repo_id}"), atomic_folder(folder) as staging:
        (staging / "app.py").write_text(APP_TEMPLATE.format(model_repo=repo_id, revision=revision, base_model=base,
                                                            title=title), encoding="utf-8")
        (staging / "requirements.txt").write_text("".join(f"{r}\n" for r in reqs), encoding="utf-8")
        card.save(staging / "README.md")
    return folder


def _gradio_version() -> str | None:
    # the Space runs the gradio version of its card; pin the one the app was built with here, when installed
    try:
        import gradio
    except ImportError:
        return None
    return gradio.__version__


def _space_card(model_folder: str | Path, repo_id: str, title: str, base: str | None, endpoint: str) -> SpaceCard:
    license = None
    readme = Path(model_folder) / "README.md"
    if readme.exists():  # the model card's license applies to the weights the Space serves
        license = ModelCard.load(readme).data.license
    data = SpaceCardData(title=title, sdk="gradio", sdk_version=_gradio_version(), app_file="app.py",
                         models=[repo_id] + ([base] if base else []), license=license,
                         tags=["hf-curvedit", "curvature-edit", "memorization"], emoji="🔎", colorFrom="yellow",
                         colorTo="gray", pinned=False,
                         short_description="Base vs curvature-edited model, side by side")
    base_line = f"[{base}]({endpoint}/{base})" if base else "hf-curvedit's embedded default model"
    body = (f"# {title}\n\nThe curvature edit [{repo_id}]({endpoint}/{repo_id}) against its base model "
            f"({base_line}), side by side, for any prompt. One model is loaded: the base with the edit as a PEFT "
            "adapter; the base column runs with the adapter disabled. The longest run of tokens each continuation "
            "shares with the reference text is highlighted.\n\nRun it locally: `pip install 'hf-curvedit[demo]'` "
            f"and `hf-curvedit demo --adapter {repo_id}" + (f" --base {base}`." if base else "`.") + "\n")
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


@dataclass(frozen=True)
class _SpaceTarget(PushTarget):
    """A Space push: the model pushes' error handling, with the Space's retry call."""

    @property
    def keep(self) -> str:
        return (f"The local Space folder {self.folder} is complete and unchanged; fix the cause and retry with "
                f"{self.retry}.")

    @property
    def retry(self) -> Fix:
        # a Space is always pushed to its main branch
        space = dataclasses.replace(self, revision=None, create_pr=False)
        return Fix(python=f"push_space({str(self.folder)!r}, {self.repo_id!r})",
                   cli=f"`{space.upload_command('space')}`")


def push_space(folder: str | Path, space_id: str, hub: HubOptions | None = None) -> PublishResult:
    """Create the gradio Space ``space_id`` if needed and upload ``folder`` to it in one commit.

    Uses ``hub``'s token, endpoint, visibility (``private``) and commit text; a Space is always pushed to its main
    branch (``revision`` and ``create_pr`` apply to the model repo).

    Raises:
        [`PublishError`]: naming the failed step; ``__cause__`` is huggingface_hub's exception.
    """
    hub, api, target = start_push(folder, space_id, hub, _SpaceTarget)
    folder = target.folder
    with target.step("create_repo"):
        repo_url = api.create_repo(space_id, private=hub.private, exist_ok=True, repo_type="space",
                                   space_sdk="gradio")
    with target.step("upload_folder"):
        info = api.upload_folder(repo_id=space_id, folder_path=folder, repo_type="space",
                                 commit_message=hub.commit_message or "Upload hf-curvedit demo Space",
                                 commit_description=hub.commit_description)
    return PublishResult(folder=folder, repo_id=space_id, repo_url=str(repo_url), commit_url=info.commit_url,
                         commit_oid=info.oid, pr_url=info.pr_url, files=list_files(folder))


def model_revision(result: PublishResult, hub: HubOptions | None = None) -> str | None:
    """The revision a Space should load after the model push ``result``: the PR ref it opened, else the branch."""
    if result.pr_url:
        m = re.search(r"/discussions/(\d+)$", result.pr_url)
        if m:
            return f"refs/pr/{m.group(1)}"
    return hub.revision if hub is not None else None


def publish_space(model_folder: str | Path, repo_id: str, *, space_id: str | None = None,
                  out_dir: str | Path | None = None, hub: HubOptions | None = None, revision: str | None = None,
                  dry_run: bool = False, overwrite: bool = False) -> PublishResult:
    """[`write_space`] then (unless ``dry_run``) [`push_space`] to ``space_id`` (default ``<repo_id>-demo``).

    ``hub.commit_message`` is meant for the model push, so the Space commit gets its own message.
    """
    space_id = space_id or default_space_id(repo_id)
    hub = hub if hub is not None else HubOptions()
    folder = write_space(model_folder, repo_id, out_dir, revision=revision, endpoint=hub.endpoint, overwrite=overwrite)
    if dry_run:
        return PublishResult(folder=folder, repo_id=space_id, files=list_files(folder))
    space_hub = HubOptions(private=hub.private, token=hub.token, endpoint=hub.endpoint)
    return push_space(folder, space_id, space_hub)


def check_space(model_out_dir: str | Path, *, merged: bool, overwrite: bool,
                out_dir: str | Path | None = None) -> Path:
    """Fail before the model is staged when its Space could not be written: a merged publish, or an occupied
    Space folder. Returns the Space folder."""
    if merged:
        raise InputError("a Space shows base and edited from one adapter model: publish the adapter (not merged) "
                         "with space=True / --space")
    folder = Path(out_dir) if out_dir is not None else default_space_dir(model_out_dir)
    _check_space_dir(folder, overwrite)
    return folder
