"""Pushing a complete folder to the Hub: the options (`HubOptions`), the result (`PublishResult`) and the one error
type (`PublishError`) every failed step raises, for model repos (`push_folder`) and, through `PushTarget` and
`start_push`, for the demo Space (`space.py`).

Errors. A failed push raises [`PublishError`] (``.folder``, ``.stage``, ``.status_code``), one type for every cause,
so a caller can always retry with the folder it names. The cause is never remapped: huggingface_hub's own exception
(`HfHubHTTPError` or a subclass such as `RepositoryNotFoundError`, whose message already carries the status, the
Hub's message and the request id; a transport error of httpx/httpx2 when there is no connection;
`OfflineModeIsEnabled`; the RuntimeError of an upload that dies half-way) is the PublishError's ``__cause__``,
unchanged in type. HTTP errors get our context (the step, the fix for auth problems, the folder to retry with)
appended with `HfHubHTTPError.append_to_message`, so the same text is there whichever of the two is caught or logged.
"""

from __future__ import annotations

import contextlib
import importlib
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..errors import Fix, register_secret
from ..utils import fill_unset_fields
from .stage import list_files

__all__ = ["HubOptions", "PublishError", "PublishResult", "PushTarget", "push_folder", "start_push"]


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

    def __post_init__(self) -> None:
        fill_unset_fields(self)
        register_secret(self.token)  # no message, traceback or log line of the command line may show it


def push_folder(folder: str | Path, repo_id: str, hub: HubOptions | None = None) -> PublishResult:
    """Upload a folder written by [`publish`] (e.g. again, after a failed upload) in one commit.

    Creates the repo if needed (``exist_ok=True``) and the branch ``hub.revision`` if needed (unless it is a PR
    ref), then calls `HfApi.upload_folder`. The commit message is ``hub.commit_message`` or
    ``"Upload curvature edit"``.

    Raises:
        [`PublishError`]: naming the failed step, the cause and the fix; its ``__cause__`` is huggingface_hub's
        exception. The folder is not modified.
    """
    hub, api, target = start_push(folder, repo_id, hub, PushTarget)
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


def start_push(folder: str | Path, repo_id: str, hub: HubOptions | None,
                target_type: type[PushTarget]) -> tuple[HubOptions, HfApi, PushTarget]:
    """What every push starts with: the options, the client, and the target that turns failures into PublishErrors;
    refused at once when offline."""
    hub = hub if hub is not None else HubOptions()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    target = target_type(folder, repo_id, api.endpoint, hub.revision, hub.create_pr)
    if constants.HF_HUB_OFFLINE:
        # huggingface_hub only blocks requests in sessions made while offline; say so before any request is tried
        cause = OfflineModeIsEnabled("offline mode is enabled (HF_HUB_OFFLINE=1)")
        raise target.offline("create_repo") from cause
    return hub, api, target


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
class PushTarget:
    """Where a push goes; turns huggingface_hub's exceptions into a [`PublishError`] naming the step. A Space push
    subclasses it for its own retry advice (``keep``)."""

    folder: Path
    repo_id: str
    endpoint: str
    revision: str | None = None
    create_pr: bool = False

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
                f"{self.retry}.")

    @property
    def retry(self) -> Fix:
        """The call (or command) that pushes the same folder to the same repo, revision and PR flag again."""
        options = ", ".join([f"revision={self.revision!r}"] * (self.revision is not None)
                            + ["create_pr=True"] * self.create_pr)
        python = f"push_folder({str(self.folder)!r}, {self.repo_id!r}{f', HubOptions({options})' if options else ''})"
        return Fix(python=python, cli=f"`{self.upload_command('model')}`")

    def upload_command(self, repo_type: str) -> str:
        """The ``hf upload`` command line of this push (quoted for a POSIX shell)."""
        words = ["hf", "upload", self.repo_id, str(self.folder), "--repo-type", repo_type]
        words += ["--revision", self.revision] if self.revision is not None else []
        words += ["--create-pr"] if self.create_pr else []
        return " ".join(shlex.quote(w) for w in words)

    def fix(self, status: int | None) -> str:
        if status == 401:
            token = Fix(python="pass HubOptions(token=<a write token>)", cli="pass --token <a write token>")
            return f"The token is missing or invalid: {token}, set HF_TOKEN, or run `hf auth login`."
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
