"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only), kept in memory.

It implements what `HfApi.create_repo`, `create_branch`, `upload_folder` (regular and LFS files, PRs),
`model_info`/`repo_info`, `list_repo_tree` and `hf_hub_download` (hence `from_pretrained("user/repo")`) use, for
model repos and for Space repos (``repo_type="space"``: the same routes with ``spaces`` for ``models`` and a
``/spaces`` prefix on the git-style ones):

- ``POST /api/repos/create`` (409 with ``url`` when the repo exists; a Space needs an ``sdk``)
- ``POST /api/validate-yaml``
- ``POST /api/models/{repo}/preupload/{rev}``
- ``POST /{repo}.git/info/lfs/objects/batch`` and ``PUT /lfs-upload/{oid}``
- ``POST /api/models/{repo}/commit/{rev}`` (ndjson; ``?create_pr=1`` opens ``refs/pr/N``)
- ``POST /api/models/{repo}/branch/{branch}``
- ``GET /api/models/{repo}[/revision/{rev}]`` and ``GET /api/models/{repo}/tree/{rev}[/{path}]``
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and, for LFS
  files, ``X-Linked-Etag``/``X-Linked-Size``

Writes need ``Authorization: Bearer <token>`` with a token of the namespace's user (401 otherwise, 403 for another
namespace). `HubServer.fail` injects an HTTP error on matching requests, to test failure handling.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".png", ".jpg", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024
DROP = 0  # a `HubServer.fail` status: close the connection without an answer, as a server that dies would


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        # the Hub identifies LFS files by sha256, regular ones by their git blob sha1
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    files: dict[str, StoredFile]
    message: str
    parent: str | None


# repo type -> its segment in /api/{segment}/... and its prefix in the git-style URLs (/{prefix}{repo}/resolve/...)
REPO_TYPES = {"model": ("models", ""), "space": ("spaces", "spaces/")}


def repo_key(repo_id: str, repo_type: str = "model") -> str:
    """Where a repo lives in `HubState.repos`: a model under its id, a Space under ``spaces/<id>``."""
    return REPO_TYPES[repo_type][1] + repo_id


@dataclass
class Repo:
    repo_id: str
    private: bool
    repo_type: str = "model"
    sdk: str | None = None
    branches: dict[str, str] = field(default_factory=dict)  # ref name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    next_pr: int = 1

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


@dataclass
class FailRule:
    method: str
    path_regex: str
    status: int
    times: int | None


class HubState:
    """Everything the server holds: repos, LFS objects, tokens, failure rules and a request log."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.fail_rules: list[FailRule] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()

    def new_commit(self, repo: Repo, files: dict[str, StoredFile], message: str, parent: str | None) -> Commit:
        digest = hashlib.sha1(f"{repo.repo_id}|{parent}|{message}|{time.time_ns()}".encode())
        for path in sorted(files):
            digest.update(path.encode() + files[path].oid.encode())
        commit = Commit(digest.hexdigest(), files, message, parent)
        repo.commits[commit.oid] = commit
        return commit


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_API = r"/api/(?P<kind>models|spaces)"  # /api/models/... or /api/spaces/...
_GIT = r"/(?:(?P<prefix>spaces)/)?"  # /{repo}... for a model, /spaces/{repo}... for a Space


class HubHandler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    # ---------------------------------------------------------------- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        return self.server.url

    def _body(self) -> bytes:
        # read once and cache: a handler that fails before reading must not leave the body in the keep-alive stream
        if getattr(self, "_raw_body", None) is None:
            self._raw_body = self._read_body()
        return self._raw_body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else auth
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _require_write(self, namespace: str) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        if user != namespace:
            raise HubError(403, f"You don't have the rights to create or write to repos under {namespace!r}")
        return user

    def _repo(self, repo_id: str, write: bool = False, repo_type: str = "model") -> Repo:
        if write:
            self._require_write(repo_id.split("/")[0])
        repo = self.state.repos.get(repo_key(repo_id, repo_type))
        user = None if write else self._user()
        if repo is None or (repo.private and user != repo_id.split("/")[0] and not write):
            raise HubError(401 if not write and user is None else 404, "Repository Not Found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    def _dispatch(self) -> None:
        self._raw_body = None
        self._body()
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append((self.command, path))
            for rule in self.state.fail_rules:
                if rule.method == self.command and re.search(rule.path_regex, path) and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    self._body()
                    raise HubError(rule.status, f"injected failure {rule.status}")
        for method, pattern, handler in self.ROUTES:
            if method != self.command:
                continue
            m = re.fullmatch(pattern, path)
            if m:
                groups = m.groupdict()
                # the route's kind (/api/spaces/...) or prefix (/spaces/...) says which repo type it addresses
                kind, prefix = groups.pop("kind", None), groups.pop("prefix", None)
                if kind is not None or "prefix" in m.re.groupindex:
                    groups["repo_type"] = "space" if (kind == "spaces" or prefix == "spaces") else "model"
                handler(self, query=query, **groups)
                return
        self._body()
        raise HubError(404, f"no route for {self.command} {path}")

    def _handle(self) -> None:
        try:
            self._dispatch()
        except HubError as err:
            if err.status == DROP:  # the server dies mid-request: the connection closes with no answer
                import socket

                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message, **err.extra}, headers)
        except Exception as err:  # a bug in the server must show up in the test, not hang it
            self._json(500, {"error": f"hub_server bug: {type(err).__name__}: {err}"})

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    # ---------------------------------------------------------------- upload endpoints
    def create_repo(self, query) -> None:
        body = json.loads(self._body() or b"{}")
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"this test hub only holds model and space repos, not {repo_type!r}")
        if repo_type == "space" and body.get("sdk") not in ("gradio", "streamlit", "docker", "static"):
            raise HubError(400, "a Space needs an sdk")
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        namespace = body.get("organization") or user
        repo_id = f"{namespace}/{body['name']}"
        self._require_write(namespace)
        key = repo_key(repo_id, repo_type)
        url = f"{self.base}/{key}"
        with self.state.lock:
            if key in self.state.repos:
                raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
            # huggingface_hub 1.x sends `private`, 2.x sends `visibility`
            private = bool(body.get("private") or False) or body.get("visibility") == "private"
            repo = Repo(repo_id, private=private, repo_type=repo_type, sdk=body.get("sdk"))
            init = self.state.new_commit(repo, {".gitattributes": StoredFile(b"*.safetensors filter=lfs\n", False)},
                                         "initial commit", None)
            repo.branches["main"] = init.oid
            self.state.repos[key] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, query) -> None:
        body = json.loads(self._body() or b"{}")
        content = body.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if m is None:
            raise HubError(400, "no YAML metadata block found at the top of the card")
        try:
            meta = yaml.safe_load(m.group(1)) or {}
        except yaml.YAMLError as err:
            raise HubError(400, f"invalid YAML: {err}")
        if not isinstance(meta, dict):
            raise HubError(400, "the YAML metadata must be a mapping")
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, query, repo: str, rev: str, repo_type: str) -> None:
        r = self._repo(repo, write=True, repo_type=repo_type)
        commit = self._commit(r, rev)
        body = json.loads(self._body())
        files = []
        for f in body["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or int(f["size"]) >= LFS_MIN_SIZE
            existing = commit.files.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": existing.oid if existing is not None else None})
        self._json(200, {"files": files, "commitOid": commit.oid})

    def lfs_batch(self, query, repo: str, repo_type: str) -> None:
        self._repo(repo, write=True, repo_type=repo_type)
        body = json.loads(self._body())
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_put(self, query, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"LFS object does not match its oid {oid}")
        with self.state.lock:
            self.state.lfs[oid] = data
        self._send(200, b"")

    def commit(self, query, repo: str, rev: str, repo_type: str) -> None:
        r = self._repo(repo, write=True, repo_type=repo_type)
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        with self.state.lock:
            parent = self._commit(r, rev)
            header = next((ln["value"] for ln in lines if ln["key"] == "header"), {})
            if header.get("parentCommit") and header["parentCommit"] != parent.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for ln in lines:
                key, value = ln["key"], ln["value"]
                if key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = self.state.lfs.get(value["oid"])
                    if data is None or len(data) != int(value["size"]):
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                    files[value["path"]] = StoredFile(data, True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                elif key != "header":
                    raise HubError(400, f"unknown commit operation {key!r}")
            message = header.get("summary", "")
            new = self.state.new_commit(r, files, message, parent.oid)
            out = {"commitUrl": f"{self.base}/{repo_key(repo, repo_type)}/commit/{new.oid}", "commitOid": new.oid}
            if query.get("create_pr", ["0"])[0] in ("1", "true", "True"):
                num = r.next_pr
                r.next_pr += 1
                r.branches[f"refs/pr/{num}"] = new.oid
                out["pullRequestUrl"] = f"{self.base}/{repo_key(repo, repo_type)}/discussions/{num}"
            else:
                r.branches[unquote(rev)] = new.oid
        self._json(200, out)

    def create_branch(self, query, repo: str, branch: str, repo_type: str) -> None:
        r = self._repo(repo, write=True, repo_type=repo_type)
        body = json.loads(self._body() or b"{}")
        branch = unquote(branch)
        with self.state.lock:
            if branch in r.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._commit(r, body.get("startingPoint") or "main")
            r.branches[branch] = start.oid
        self._json(200, {})

    # ---------------------------------------------------------------- read endpoints
    def model_info(self, query, repo: str, repo_type: str, rev: str = "main") -> None:
        self._body()
        r = self._repo(repo, repo_type=repo_type)
        commit = self._commit(r, rev)
        extra = {"modelId": repo} if repo_type == "model" else {"sdk": r.sdk}
        self._json(200, {"id": repo, **extra, "sha": commit.oid, "private": r.private,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                         **self._card_data(commit)})

    @staticmethod
    def _card_data(commit: Commit) -> dict:
        readme = commit.files.get("README.md")
        if readme is None:
            return {}
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.data.decode("utf-8", "replace"), re.S)
        meta = yaml.safe_load(m.group(1)) if m else None
        return {"cardData": meta} if isinstance(meta, dict) else {}

    def tree(self, query, repo: str, rev: str, repo_type: str, subpath: str | None = None) -> None:
        self._body()
        r = self._repo(repo, repo_type=repo_type)
        commit = self._commit(r, rev)
        prefix = unquote(subpath or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, dirs = [], set()
        for p in sorted(commit.files):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1:] if prefix else p
            if "/" in rest and not recursive:
                dirs.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            f = commit.files[p]
            entry = {"type": "file", "path": p, "size": len(f.data), "oid": git_blob_sha1(f.data)}
            if f.lfs:
                entry["lfs"] = {"oid": f.oid, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                    for d in sorted(dirs)]
        self._json(200, entries)

    def resolve(self, query, repo: str, rev: str, filepath: str, repo_type: str) -> None:
        self._body()
        r = self._repo(repo, repo_type=repo_type)
        commit = self._commit(r, rev)
        f = commit.files.get(unquote(filepath))
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", extra={})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.oid}"', "X-Linked-Size": str(len(f.data))})
        self._send(200, f.data, headers, content_type="application/octet-stream")

    ROUTES = [
        ("POST", r"/api/repos/create", create_repo),
        ("POST", r"/api/validate-yaml", validate_yaml),
        ("POST", rf"{_API}/{_REPO}/preupload/(?P<rev>[^/]+)", preupload),
        ("POST", rf"{_GIT}{_REPO}\.git/info/lfs/objects/batch", lfs_batch),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", lfs_put),
        ("POST", rf"{_API}/{_REPO}/commit/(?P<rev>[^/]+)", commit),
        ("POST", rf"{_API}/{_REPO}/branch/(?P<branch>[^/]+)", create_branch),
        ("GET", rf"{_API}/{_REPO}", model_info),
        ("GET", rf"{_API}/{_REPO}/revision/(?P<rev>[^/]+)", model_info),
        ("GET", rf"{_API}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<subpath>.+))?", tree),
        ("HEAD", rf"{_GIT}{_REPO}/resolve/(?P<rev>[^/]+)/(?P<filepath>.+)", resolve),
        ("GET", rf"{_GIT}{_REPO}/resolve/(?P<rev>[^/]+)/(?P<filepath>.+)", resolve),
    ]


class HubServer(ThreadingHTTPServer):
    """The test Hub, serving on ``127.0.0.1`` (port 0 = any free port) from a daemon thread.

    Args:
        tokens: token → user name; a write needs the token of the namespace's user.
    """

    daemon_threads = True

    def __init__(self, tokens: dict[str, str] | None = None, port: int = 0):
        super().__init__(("127.0.0.1", port), HubHandler)
        self.state = HubState(tokens or {"hf_test_token": "user"})
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def fail(self, method: str, path_regex: str, status: int, times: int | None = None) -> None:
        """Answer `status` to requests whose method is `method` and path matches `path_regex` (`times` times, or
        always when ``None``); `DROP` closes the connection without an answer."""
        with self.state.lock:
            self.state.fail_rules.append(FailRule(method.upper(), path_regex, status, times))

    def clear_failures(self) -> None:
        with self.state.lock:
            self.state.fail_rules.clear()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of `repo_id` (a model, or a Space with ``repo_type="space"``) at `revision`, as stored."""
        commit = self.state.repos[repo_key(repo_id, repo_type)].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {revision!r}")
        return {p: f.data for p, f in commit.files.items()}

    def is_lfs(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bool:
        return self.state.repos[repo_key(repo_id, repo_type)].resolve(revision).files[path].lfs

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo (its type, visibility and, for a Space, its sdk)."""
        return self.state.repos[repo_key(repo_id, repo_type)]
