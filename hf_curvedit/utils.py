"""Small shared helpers: atomic file writes (text and safetensors), dtype names, module names inside a PeftModel."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import InputError


def fill_unset_fields(config: Any) -> None:
    """Give every field of the dataclass ``config`` that holds None, and whose default is not None, its default.

    In the public configs None means "not set", as PEFT's configs take it for an unset mapping: a caller that forwards
    optional settings (``keep_mass_pattern=None``, ``allocation_steps=None``) gets the defaults instead of a crash in
    the checks that follow."""
    for f in dataclasses.fields(config):
        if getattr(config, f.name) is not None:
            continue
        if f.default_factory is not dataclasses.MISSING:
            setattr(config, f.name, f.default_factory())
        elif f.default is not dataclasses.MISSING and f.default is not None:
            setattr(config, f.name, f.default)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The mode a plain open() gives a new file. mkstemp creates files 0600; what we write must get the user's umask like
# every other file (a published folder is meant to be read by others).
FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` atomically.

    A crash mid-write leaves the previous file (or nothing) in place, never a half-written one. The file gets the
    mode the user's umask gives new files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with string ``metadata`` to a safetensors file, atomically.

    Tensors are made contiguous and moved to the CPU; tensors that share memory (e.g. gate and up projections that
    share one factor) are copied, because safetensors refuses shared storage. The metadata also records the digest of
    every tensor (`hf_curvedit.integrity.DIGESTS_KEY`), which readers check.
    """
    import json

    from safetensors.torch import save_file

    from .integrity import DIGESTS_KEY, tensor_digest

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().contiguous().cpu()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[key] = t
    metadata = {**metadata, DIGESTS_KEY: json.dumps({k: tensor_digest(t) for k, t in out.items()})}
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Give the memory the allocator holds free back to the operating system (glibc's ``malloc_trim``; a no-op
    elsewhere: macOS, Windows, musl).

    Between the batches of a long pass on the CPU, glibc keeps freed activations of a few MB in its heap, where later
    batches cannot always reuse them: without this the resident memory of a factor pass grows batch after batch (about
    30 MB per batch on the kronfluence comparison in ``benchmarks/``). The passes call it between batches only when
    the model runs on the CPU: on a GPU the activations live in the device's caching allocator, and a process-wide
    trim would only cost time."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def execution_device(module: torch.nn.Module, tensor: torch.Tensor) -> torch.device:
    """Where ``module`` computes with ``tensor`` (one of its weights): the tensor's device, or, for a module accelerate
    offloads (its weight waits on the meta device until its forward), the execution device of its hook."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if tensor.device.type == "meta" and device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return tensor.device


def heap_trim_helps(device: torch.device) -> bool:
    """Whether `release_free_memory` helps a pass whose model runs on ``device``: on the CPU with glibc only."""
    return device.type == "cpu" and _malloc_trim() is not None


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite. A NaN or inf entry makes the sum non-finite, and one summing pass
    costs a tenth of ``isfinite().all()`` on a large factor; only a sum that overflows needs the full check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"fp32"``/``torch.float32`` → ``torch.float32`` (and so on), with a clear error."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


# What wrappers put in front of a module's name: PEFT's PeftModel (``base_model.model.``) and torch.compile
# (``_orig_mod.``).
_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.")


def strip_wrapper_prefix(name: str) -> str:
    """The name a module has in the plain transformers model: PEFT's ``base_model.model.`` and torch.compile's
    ``_orig_mod.`` prefixes removed (``base_model.model.model.layers.0.mlp.up_proj`` →
    ``model.layers.0.mlp.up_proj``)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder next to ``folder``; when the block succeeds it replaces ``folder``.

    The staging folder (``.NAME.staging``) is renamed onto ``folder`` once complete; an existing ``folder`` is
    first renamed aside (``.NAME.old``) and deleted afterwards. A failure (a full disk, an error) removes the staging
    folder and leaves ``folder`` as it was; a kill leaves ``folder`` as it was or complete and new, never half written
    (between the two renames it is briefly absent, and the next call puts the old one back). The caller holds the
    folder's `hf_curvedit.integrity.output_lock`: leftovers of a killed run are cleaned up on entry.
    """
    import shutil

    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.staging"
    old = folder.parent / f".{folder.name}.old"
    if old.exists():  # a run killed between the two renames below
        if not folder.exists():
            os.replace(old, folder)
        else:
            shutil.rmtree(old)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for path in staging.rglob("*"):  # what other libraries wrote (safetensors creates 0600 files) gets the umask
        if path.is_file() and not path.is_symlink():
            os.chmod(path, FILE_MODE)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
