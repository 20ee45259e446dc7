"""Tensor files too large for one piece, the way transformers shards checkpoints: ``NAME-00001-of-000NN.safetensors``
files and ``NAME.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {tensor: file}, "shards": {file:
digest}}``), written shard by shard and read one tensor at a time.

Every shard is an hf-curvedit safetensors file (each tensor's digest in its metadata, `hf_curvedit.integrity`); the
index records the digest of each shard's digests, so a shard of another run or a damaged header is refused before any
tensor is read. The index is written last, atomically: a folder with shards and no index is an unfinished run, never
read as complete. A single ``NAME.safetensors`` (what hf-curvedit wrote before it sharded) is read the same way, as a
store of one shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .integrity import (
    DamagedFileError,
    open_safetensors,
    read_json_file,
    read_safetensors,
    recorded_digests,
    tensor_set_problem,
)
from .utils import atomic_write_text, save_safetensors

__all__ = ["TensorFiles", "index_path", "plan_shards", "remove_tensor_files", "shard_digest", "shard_name",
           "shards_of", "store_files", "write_index", "write_shard"]

INDEX_SUFFIX = ".safetensors.index.json"


def shard_name(stem: str, number: int, total: int) -> str:
    """The file name of shard ``number`` (1-based) of ``total``: ``NAME-00001-of-00004.safetensors``."""
    return f"{stem}-{number:05d}-of-{total:05d}.safetensors"


def store_files(stem: str) -> str:
    """The files of a store of ``stem`` in words, for help texts and docstrings: what the writers name them."""
    return f"{stem}.safetensors, or {stem}-NNNNN-of-MMMMM.safetensors shards and {stem}{INDEX_SUFFIX}"


def index_path(folder: str | Path, stem: str) -> Path:
    return Path(folder) / f"{stem}{INDEX_SUFFIX}"


def shards_of(folder: str | Path, stem: str) -> list[Path]:
    """Every shard file of ``stem`` in ``folder`` (of any total), written or half-written runs included."""
    return sorted(Path(folder).glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"))


def plan_shards(sizes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], stem: str,
                max_shard_bytes: int) -> dict[str, list[str]]:
    """Split tensors (name → (shape, dtype), in write order) into shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own), with huggingface_hub's splitter: file name → tensor names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    shapes = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in sizes.items()}
    split = split_torch_state_dict_into_shards(shapes, filename_pattern=stem + "{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    if not split.is_sharded:  # one shard: named like the others, so that every store has an index
        return {shard_name(stem, 1, 1): list(sizes)}
    return {f: list(names) for f, names in split.filename_to_tensors.items()}


def shard_digest(digests: Mapping[str, str]) -> str:
    """One digest of a shard: of its tensors' digests, by name (read from its header, no data)."""
    import xxhash

    h = xxhash.xxh3_128()
    for name, digest in sorted(digests.items()):
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()


def write_shard(folder: str | Path, filename: str, tensors: Mapping[str, torch.Tensor],
                metadata: Mapping[str, str]) -> Path:
    """Write one shard atomically (every tensor's digest recorded)."""
    return save_safetensors(Path(folder) / filename, dict(tensors), dict(metadata))


def write_index(folder: str | Path, stem: str, metadata: Mapping[str, Any], files: Iterable[str]) -> Path:
    """Write the index of the shards ``files`` (already written) last and atomically: their tensors, read from their
    headers, and the digest of each."""
    folder = Path(folder)
    weight_map: dict[str, str] = {}
    shards: dict[str, str] = {}
    for name in files:
        with open_safetensors(folder / name, "a shard", "Run the stage that writes it again") as f:
            digests = recorded_digests(f.metadata()) or {}
        shards[name] = shard_digest(digests)
        weight_map.update({k: name for k in digests})
    body = {"metadata": dict(metadata), "weight_map": weight_map, "shards": shards}
    return atomic_write_text(index_path(folder, stem), json.dumps(body, indent=1, sort_keys=False))


def remove_tensor_files(folder: str | Path, stem: str) -> None:
    """Delete a store (its index first, so that no half-deleted store reads as complete; then its shards and a single
    file of that name)."""
    folder = Path(folder)
    index_path(folder, stem).unlink(missing_ok=True)
    for shard in shards_of(folder, stem):
        shard.unlink(missing_ok=True)
    (folder / f"{stem}.safetensors").unlink(missing_ok=True)


class TensorFiles(Mapping[str, torch.Tensor]):
    """The tensors of one store, sharded (index + shards) or a single file, read one at a time with every check.

    Attributes:
        metadata: the store's metadata (the index's ``metadata``, or a single file's string metadata).
        path: the index, or the single file.
    """

    def __init__(self, folder: str | Path, stem: str, what: str, fix: Any):
        self.folder, self.stem, self.what, self.fix = Path(folder), stem, what, fix
        index = index_path(folder, stem)
        single = self.folder / f"{stem}.safetensors"
        self._where: dict[str, Path] = {}
        self._checked: set[Path] = set()
        if index.exists():
            self.path = index
            body = read_json_file(index, f"the index of {what}", fix)
            try:
                self.metadata = dict(body["metadata"])
                weight_map, self._shard_digests = dict(body["weight_map"]), dict(body["shards"])
            except (KeyError, TypeError, ValueError) as err:
                raise DamagedFileError(index, f"is not an index of {what} ({err})", fix) from None
            self._where = {k: self.folder / f for k, f in weight_map.items()}
            unlisted = sorted({f for f in weight_map.values()} - set(self._shard_digests))
            if unlisted:
                raise DamagedFileError(index, f"maps tensors to shards it does not list: {unlisted[:3]}", fix)
            for f in self._shard_digests:
                if not (self.folder / f).is_file():
                    raise FileNotFoundError(f"{self.folder / f}, a shard of {what} that {index.name} lists, is "
                                            f"missing. {fix}")
        elif single.exists():
            self.path = single
            with read_safetensors(single, what, fix) as f:
                self.metadata = dict(f.metadata)
                self._where = {k: single for k in f.keys()}
            self._shard_digests = {}
        else:
            raise FileNotFoundError(f"no {what} in {self.folder} ({index.name} or {single.name})")

    @staticmethod
    def exists(folder: str | Path, stem: str) -> bool:
        """Whether a complete store is there (an index, or a single file)."""
        return index_path(folder, stem).exists() or (Path(folder) / f"{stem}.safetensors").exists()

    def _check_shard(self, shard: Path) -> None:
        # once per shard: its header lists the tensors the index maps to it, with the digests the index recorded
        if shard in self._checked or shard == self.path:
            return
        with read_safetensors(shard, what=f"a shard of {self.what}", fix=self.fix) as f:
            digests = f.digests or {}
            want = [k for k, p in self._where.items() if p == shard]
            problem = tensor_set_problem(want, f.keys(), by=f"in {self.path.name}")
            if problem:
                raise f.damaged(problem)
            if shard_digest(digests) != self._shard_digests[shard.name]:
                raise f.damaged(f"its tensors are not those {self.path.name} recorded (a shard of another run, or a "
                                "damaged header)")
        self._checked.add(shard)

    def verify(self) -> None:
        """Read every tensor once (each against its digest) and keep none: `DamagedFileError` for the first damaged
        one."""
        for shard in dict.fromkeys(self._where.values()):
            self._check_shard(shard)
            with read_safetensors(shard, self.what, self.fix) as f:
                for key in f.keys():
                    f.get(key)

    def digests_missing(self) -> bool:
        """Whether the store was written before files recorded digests (then read unchecked)."""
        if self._shard_digests:
            return False
        with open_safetensors(self.path, self.what, self.fix) as f:
            return recorded_digests(f.metadata()) is None

    def shard_of(self, key: str) -> Path:
        """The file tensor ``key`` lives in."""
        return self._where[key]

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[key] if key in self._where else default

    def __getitem__(self, key: str) -> torch.Tensor:
        shard = self._where[key]
        self._check_shard(shard)
        with read_safetensors(shard, self.what, self.fix) as f:
            return f.get(key)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors, each shard opened once."""
        keys = list(keys)
        out: dict[str, torch.Tensor] = {}
        for shard in dict.fromkeys(self._where[k] for k in keys):
            self._check_shard(shard)
            with read_safetensors(shard, self.what, self.fix) as f:
                out.update({k: f.get(k) for k in keys if self._where[k] == shard})
        return {k: out[k] for k in keys}

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __repr__(self) -> str:
        return f"TensorFiles({self.path}, {len(self)} tensors)"
