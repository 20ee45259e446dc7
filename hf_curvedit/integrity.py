"""Nothing damaged is ever used, and one writer per folder: content digests of tensors, checked reads of safetensors
files, and the output-folder lock.

- **Digests.** `tensor_digest` is a 128-bit xxHash (XXH3) of a tensor's dtype, shape and bytes: fast enough to check
  every read (several GB/s), and any flipped byte changes it. It guards against damage (a truncated download, a bad
  disk, a half-copied file), not against someone who means harm: the Hub's own sha256 of each file does that for
  downloads. Every safetensors file hf-curvedit writes records the digest of each tensor in its metadata
  (`DIGESTS_KEY`); adapters, which PEFT writes, record one digest per edited module in ``adapter_config.json``.
- **Checked reads.** `open_safetensors` turns safetensors' own errors (truncated file, bad header, not a safetensors
  file) into a `DamagedFileError` that names the file and the fix; `read_safetensors` also checks that the file holds
  exactly the tensors it recorded when it was written (none missing, none added or renamed) and each tensor against
  its digest as it is read.
- **One writer per folder.** `output_lock` takes a lock file next to the output folder (``.NAME.hf-curvedit.lock``
  beside ``NAME``: inside it, the lock would be uploaded with a published folder and block its atomic rename). It is
  the ``filelock`` package's OS lock, released by the kernel when its process dies, so a killed run never blocks the
  next one; the holder's pid is recorded beside it for the error a second writer gets.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from .errors import InputError

__all__ = ["DIGESTS_KEY", "CheckedSafetensors", "DamagedFileError", "FolderInUseError", "digest_of",
           "open_safetensors", "output_lock", "read_json_file", "read_safetensors", "read_tensor", "tensor_digest"]

DIGESTS_KEY = "hf_curvedit.digests"
LOCK_SUFFIX = ".hf-curvedit.lock"


class DamagedFileError(InputError):
    """A file hf-curvedit reads is damaged: truncated, not what it should be, or its content does not match the
    digest recorded when it was written. The message names the file and the fix.

    Attributes:
        path: the file.
    """

    def __init__(self, path: str | Path, problem: str, fix: str):
        super().__init__(f"{path}: {problem}. {fix}")
        self.path = Path(path)


class FolderInUseError(RuntimeError):
    """Another process is writing to the same output folder.

    Attributes:
        folder: the folder.
        owner: what the holder recorded about itself (``pid``, ``host``, ``command``), when readable.
    """

    def __init__(self, folder: Path, owner: Mapping[str, Any]):
        who = f"process {owner['pid']}" if owner.get("pid") else "another process"
        if owner.get("host") and owner.get("host") != socket.gethostname():
            who += f" on {owner['host']}"
        what = f" ({owner['command']})" if owner.get("command") else ""
        super().__init__(f"{folder} is in use: {who}{what} is writing to it. Wait for it to finish, or choose "
                         "another output folder.")
        self.folder = folder
        self.owner = dict(owner)


# ----------------------------------------------------------------------------------------------------------- digests
def tensor_digest(tensor: torch.Tensor) -> str:
    """A 128-bit digest (XXH3, hex) of a tensor's dtype, shape and bytes, in the dtype it has (a float64 tensor's low
    bits count)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = xxhash.xxh3_128()
    h.update(f"{t.dtype}:{tuple(t.shape)}|".encode())
    if t.numel():
        # bytes through a uint8 view of the flat tensor (a scalar has no last dimension to view): works for every
        # dtype numpy lacks (bfloat16) and copies nothing
        flat = t.reshape(-1)
        h.update(memoryview(flat.view(torch.uint8).numpy() if t.dtype != torch.bool else flat.numpy().view(np.uint8)))
    return h.hexdigest()


def digest_of(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One digest of named tensors (in the given order), e.g. every tensor of one edited module."""
    h = xxhash.xxh3_128()
    for name, t in tensors:
        h.update(f"{name}={tensor_digest(t)};".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- checked reads
@contextlib.contextmanager
def open_safetensors(path: str | Path, what: str, fix: str) -> Iterator[Any]:
    """``safe_open(path)`` whose failures name the file: a missing, truncated or foreign file raises
    `DamagedFileError` (``what``: what the file should be, e.g. "an hf-curvedit factor file"; ``fix``: what to do)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {fix[0].lower() + fix[1:]}")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        size = path.stat().st_size
        raise DamagedFileError(path, f"cannot be read as {what} ({size} bytes; safetensors says: {err}); the file is "
                               "truncated or damaged", fix) from None
    with handle as f:
        yield f


def recorded_digests(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    """The per-tensor digests a file's metadata records (``None`` for a file written before they were)."""
    raw = (metadata or {}).get(DIGESTS_KEY)
    return json.loads(raw) if raw else None


def read_tensor(f: Any, key: str, digests: Mapping[str, str] | None, path: str | Path, fix: str) -> torch.Tensor:
    """``f.get_tensor(key)``, checked against ``digests[key]`` when the file records digests."""
    from safetensors import SafetensorError

    try:
        t = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise DamagedFileError(path, f"tensor {key!r} cannot be read ({err}); the file is truncated or damaged",
                               fix) from None
    if digests is not None:
        want = digests.get(key)
        if want is None:
            raise DamagedFileError(path, f"tensor {key!r} is not among the tensors the file recorded when it was "
                                   "written", fix)
        if tensor_digest(t) != want:
            raise DamagedFileError(path, f"tensor {key!r} does not match the digest recorded when the file was "
                                   "written: its bytes are damaged", fix)
    return t


def tensor_set_problem(recorded: Iterable[str], present: Iterable[str], by: str = "when it was written") -> str | None:
    """What differs between the tensors a file recorded (``by`` says where or when) and the ones it holds (``None``:
    the same), naming them."""
    recorded, present = set(recorded), set(present)
    missing, extra = sorted(recorded - present), sorted(present - recorded)
    parts = []
    if missing:
        parts.append(f"has no tensor {_few(missing)} (recorded {by})")
    if extra:
        parts.append(f"holds tensor {_few(extra)}, not recorded {by} (added or renamed)")
    return " and ".join(parts) or None


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class CheckedSafetensors:
    """An open safetensors file (from `read_safetensors`) whose reads are checked against what it recorded when it was
    written.

    Attributes:
        path: the file.
        metadata: its string metadata.
        digests: tensor name → digest, or ``None`` for a file written before files recorded digests (read unchecked).
    """

    def __init__(self, handle: Any, path: Path, fix: str):
        self._f, self.path, self.fix = handle, path, fix
        self.metadata: dict[str, str] = handle.metadata() or {}
        self.digests = recorded_digests(self.metadata)

    def keys(self) -> list[str]:
        """The names of the tensors in the file."""
        return list(self._f.keys())

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key``, checked against its digest (`read_tensor`)."""
        return read_tensor(self._f, key, self.digests, self.path, self.fix)

    def damaged(self, problem: str) -> DamagedFileError:
        """The error for this file: ``problem``, and the fix."""
        return DamagedFileError(self.path, problem, self.fix)


@contextlib.contextmanager
def read_safetensors(path: str | Path, what: str, fix: str) -> Iterator[CheckedSafetensors]:
    """`open_safetensors` for a file hf-curvedit wrote: the tensors it holds must be exactly those it recorded when it
    was written (a missing, added or renamed tensor raises `DamagedFileError` naming them), and each tensor read is
    checked against its digest."""
    with open_safetensors(path, what, fix) as f:
        reader = CheckedSafetensors(f, Path(path), fix)
        if reader.digests is not None:
            problem = tensor_set_problem(reader.digests, reader.keys())
            if problem:
                raise reader.damaged(problem)
        yield reader


def read_json_file(path: str | Path, what: str, fix: str) -> Any:
    """``json.loads`` of a file hf-curvedit wrote, whose failure names the file: an empty, truncated or binary file
    raises `DamagedFileError` (``what``: what the file should hold; ``fix``: what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        size = path.stat().st_size
        state = "empty" if size == 0 else f"not valid JSON ({err})"
        raise DamagedFileError(path, f"should hold {what} but is {state}", fix) from None


# ------------------------------------------------------------------------------------------------------ the lock
_held: dict[Path, int] = {}
_held_lock = threading.Lock()


def lock_file(folder: Path) -> Path:
    """The lock file of an output folder: beside it, ``.NAME.hf-curvedit.lock``."""
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def _owner_file(folder: Path) -> Path:
    return lock_file(folder).with_name(lock_file(folder).name + ".owner")


def _read_owner(folder: Path) -> dict[str, Any]:
    try:
        return json.loads(_owner_file(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold the lock of an output folder for the block: one writer at a time.

    A second process gets `FolderInUseError` at once, naming the folder and the holder's pid. The lock is the
    kernel's (``filelock``), so a process that is killed releases it; the owner file it leaves behind is only ever
    read to word that error. Re-entrant within a process (a pipeline's steps write into folders it holds).
    """
    from filelock import FileLock, Timeout

    folder = Path(folder).resolve()
    with _held_lock:
        if folder in _held:
            _held[folder] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[folder] -= 1
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file(folder)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderInUseError(folder, _read_owner(folder)) from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
        # read only to word a second writer's error (a torn file reads as "another process"), so a plain write
        _owner_file(folder).write_text(json.dumps(owner), encoding="utf-8")
        with _held_lock:
            _held[folder] = 1
        try:
            yield
        finally:
            with _held_lock:
                _held.pop(folder, None)
            with contextlib.suppress(OSError):
                _owner_file(folder).unlink()
    finally:
        lock.release()
