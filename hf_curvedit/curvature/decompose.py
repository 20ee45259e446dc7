"""`eigendecompose`: every factor of a factor set in float64, streamed module by module (an expert projection expert
by expert) into a sharded eigen cache beside the factors, spread over the processes of a run; and `EigenFile`, the
cache read one module at a time.

Memory: one factor's decomposition (the figure `plan_factors` prints as the eigendecomposition peak) plus one cache
shard being filled (at most ``EIGEN_SHARD_BYTES``, or one basis when a single one is larger).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..integrity import DamagedFileError, output_lock
from ..shards import TensorFiles, plan_shards, remove_tensor_files, write_index, write_shard
from .config import accumulator_dtype
from .correction import attach_correction_to, correction_beside
from .distributed import dist_state
from .eigen import (
    EIGEN_FILENAME,
    EIGEN_FORMAT,
    EIGEN_STEM,
    KFACEigen,
    ModuleEigen,
    eigen_folder,
    eigen_store_metadata,
    open_eigen_store,
    read_module,
    symmetric_eigh,
    write_eigen_store,
)

__all__ = ["EIGEN_SHARD_BYTES", "EigenFile", "eigendecompose"]

logger = logging.getLogger(__name__)

# the largest eigen cache shard held in memory while it is filled
EIGEN_SHARD_BYTES = 1024**3


class EigenFile(Mapping[str, ModuleEigen]):
    """An eigen cache read one module at a time: only the bases that are asked for are loaded, with the EK-FAC
    corrected eigenvalues beside them (when they were measured for the same factors) attached.

    Building an edit of a few modules of a 7B model from a cache of all its MLP bases reads a few hundred MB instead
    of tens of GB. ``path`` is the cache's folder, its ``eigen.safetensors``, or its index.
    """

    def __init__(self, path: str | Path, factors: Any = None):
        self._factors = factors  # when known, a basis that does not verify is decomposed again from them
        self.folder = eigen_folder(path)
        self.path = Path(path)
        self._store, self._names, self._alias, self.metadata = open_eigen_store(path)
        self._correction = correction_beside(self.folder, self.metadata.get("factors_id"))
        if self._correction is not None:
            self.metadata["ekfac"] = {"num_samples": self._correction.num_samples,
                                      "factors_id": self._correction.factors_id}

    @property
    def store_path(self) -> Path:
        """The cache's ``eigen.safetensors``, or its index when it is sharded."""
        return self._store.path

    def __getitem__(self, name: str) -> ModuleEigen:
        if name not in self._names:
            raise KeyError(name)
        try:
            basis = read_module(self._store, name, self._alias)
        except DamagedFileError as err:
            if self._factors is None:
                raise
            # a damaged cache is never used: this module's basis is decomposed again (the next full decomposition
            # writes the cache anew)
            logger.warning("the eigen cache does not verify and is recomputed for %s: %s", name, err)
            basis = _decompose_module(self._factors, name)
        if self._correction is None:
            return basis
        try:
            return attach_correction_to(name, basis, self._correction)
        except DamagedFileError as err:  # reported and not used: ekfac_mass then refuses this module by name
            logger.warning("%s; the edit cannot use selection='ekfac_mass' until it is measured again", err)
            return basis

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __repr__(self) -> str:
        return f"EigenFile({self._store.path}, {len(self)} modules)"


def module_basis(eigen: Mapping[str, ModuleEigen], entry: str) -> ModuleEigen:
    """The basis of an entry of a data pass: a module's, or a slice of an expert projection's experts
    (``"...experts.gate_up_proj[0:4]"``); from an `EigenFile` only those experts are read."""
    from .partitions import split_expert_slice

    name, first, end = split_expert_slice(entry)
    if first is None:
        return eigen[name]
    if isinstance(eigen, EigenFile):
        return read_module(eigen._store, name, eigen._alias, first, end)
    whole = eigen[name]
    return ModuleEigen(whole.eigvals_A[first:end], whole.eigvecs_A[first:end], whole.eigvals_G[first:end],
                       whole.eigvecs_G[first:end], None if whole.num_tokens is None else whole.num_tokens[first:end])


def _valid_cache(folder: Path, factors: Any) -> bool:
    if not TensorFiles.exists(folder, EIGEN_STEM):
        return False
    try:
        _, names, _, metadata = open_eigen_store(folder)
    except Exception as e:  # noqa: BLE001 - a foreign or damaged cache is recomputed, never trusted
        logger.warning("the eigen cache %s does not verify and is recomputed: %s", folder / EIGEN_FILENAME, e)
        return False
    return metadata.get("factors_id") == factors.factors_id and set(names) == set(factors.module_names)


def eigendecompose(factors: Any, cache_dir: str | Path | None = None) -> Mapping[str, ModuleEigen]:
    """Eigendecompose every factor in float64 (symmetrized, eigenvalues clamped at 0, descending).

    With ``cache_dir`` (default: the folder the factors were loaded from or saved to) the bases are written to the
    eigen cache there, streamed one basis at a time into shards, and an `EigenFile` over the cache is returned (bases
    read when asked for); the next call for the same factors reads the cache. Without a folder, a `KFACEigen` holds
    every basis in memory.

    Under ``torchrun``/``accelerate launch`` every process calls it: each decomposes its share of the cache's shards,
    and the main process writes the index.
    """
    if cache_dir is None and factors.folder is not None:
        cache_dir = factors.folder
    if cache_dir is None:
        return _in_memory(factors)
    folder = Path(cache_dir)
    state = dist_state()
    valid = [_valid_cache(folder, factors) if state.is_main_process else None]
    if state.num_processes > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(valid, src=0)
    if not valid[0]:
        # the cache is written under the lock of its folder (the factors' folder, where a fit may be writing)
        lock = output_lock(folder, "eigendecompose") if state.is_main_process else contextlib.nullcontext()
        with lock:
            _write_cache(factors, folder)
    return EigenFile(folder, factors)


def _metadata(factors: Any) -> dict[str, Any]:
    return {"factors_id": factors.factors_id, "factor_config": factors.config.to_dict(),
            "num_tokens": factors.num_tokens, "model_info": factors.model_info,
            "factors_path": str(factors.path) if factors.path else None}


def _in_memory(factors: Any) -> KFACEigen:
    store = accumulator_dtype(factors.config)
    modules: dict[str, ModuleEigen] = {}
    done_A: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in tqdm(factors.module_names, desc="eigendecompose", unit="module", leave=False):
        owner = factors.a_alias.get(name, name)
        if owner not in done_A:
            va, ua = symmetric_eigh(factors.factor(owner, "A"))
            done_A[owner] = va, ua.to(store)
        vg, ug = symmetric_eigh(factors.factor(name, "G"))
        count = factors.num_tokens.get(name)
        modules[name] = ModuleEigen(*done_A[owner], vg, ug.to(store),
                                    torch.tensor(count, dtype=torch.int64) if isinstance(count, list) else None)
    return KFACEigen(modules, _metadata(factors))


def _decompose_module(factors: Any, name: str) -> ModuleEigen:
    """One module's basis from its factors (in memory)."""
    vec_dtype = accumulator_dtype(factors.config)
    owner = factors.a_alias.get(name, name)
    va, ua = symmetric_eigh(factors.factor(owner, "A"))
    vg, ug = symmetric_eigh(factors.factor(name, "G"))
    count = factors.num_tokens.get(name)
    return ModuleEigen(va, ua.to(vec_dtype), vg, ug.to(vec_dtype),
                       torch.tensor(count, dtype=torch.int64) if isinstance(count, list) else None)


def _units(factors: Any, vec_dtype: torch.dtype) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The cache's tensors in write order, grouped in units decomposed together (a factor's eigenvalues and
    eigenvectors), with their shapes: unit → tensor name → (shape, dtype)."""
    units: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    shapes = factors.model_info.get("module_shapes", {})
    for name in factors.module_names:
        experts = factors.num_experts(name)
        d_out, d_in = shapes[name][-2:] if name in shapes else (None, None)
        if d_out is None:
            d_out, d_in = int(factors.factor(name, "G", 0 if experts else None).shape[-1]), \
                int(factors.factor(name, "A", 0 if experts else None).shape[-1])
        sides = ([("A", d_in)] if name not in factors.a_alias else []) + [("G", d_out)]
        for e in range(experts) if experts else [None]:
            suffix = "" if e is None else f".{e}"
            for side, d in sides:
                units[f"{name}|{side}{suffix}"] = {f"{name}.eigvals_{side}{suffix}": ((d,), torch.float64),
                                                   f"{name}.eigvecs_{side}{suffix}": ((d, d), vec_dtype)}
        if experts:
            units[f"{name}|tokens"] = {f"{name}.num_tokens": ((experts,), torch.int64)}
    return units


def _write_cache(factors: Any, folder: Path) -> None:
    """Decompose into the cache: the shards are planned from the shapes, each process fills its share one shard at a
    time, and the main process writes the index (or the one file) last."""
    state = dist_state()
    vec_dtype = accumulator_dtype(factors.config)
    units = _units(factors, vec_dtype)
    # a shard holds whole units (a factor's values and vectors stay together): each unit is one meta tensor of its
    # size for huggingface_hub's splitter
    unit_bytes = {u: (sum(torch.Size(s).numel() * d.itemsize for s, d in ts.values()),) for u, ts in units.items()}
    total = sum(n for (n,) in unit_bytes.values())
    # several processes: about two shards each, so that every one has work
    shard_bytes = EIGEN_SHARD_BYTES if state.num_processes == 1 else \
        max(1, min(EIGEN_SHARD_BYTES, total // (2 * state.num_processes)))
    plan = plan_shards({u: (n, torch.uint8) for u, n in unit_bytes.items()}, EIGEN_STEM, shard_bytes)
    files = list(plan)
    if state.is_main_process:
        remove_tensor_files(folder, EIGEN_STEM)
    state.wait_for_everyone()
    mine = _share(plan, units, state.num_processes)[state.process_index]
    single = len(files) == 1
    written: dict[str, dict[str, torch.Tensor]] = {}
    for f in tqdm(mine, desc="eigendecompose", unit="shard", leave=False, disable=len(mine) < 2):
        tensors = {}
        for unit in plan[f]:
            tensors.update(_decompose_unit(factors, unit, vec_dtype))
        if single:
            written[f] = tensors
        else:
            write_shard(folder, f, tensors, {"format": EIGEN_FORMAT + ".shard"})
        del tensors
    state.wait_for_everyone()
    if state.is_main_process:
        if single:
            write_eigen_store(folder, written, factors.module_names, factors.a_alias, _metadata(factors))
        else:
            write_index(folder, EIGEN_STEM, eigen_store_metadata(factors.module_names, factors.a_alias,
                                                                 _metadata(factors)), files)
    state.wait_for_everyone()


def _share(plan: dict[str, list[str]], units: dict[str, dict], processes: int) -> list[list[str]]:
    """The shards each process decomposes: the costliest first, each to the process with the least work so far (an
    eigendecomposition of a d × d factor costs ~d³)."""
    cost = {f: sum(max(s[0] for s, _ in units[u].values()) ** 3 for u in us) for f, us in plan.items()}
    load = [0] * processes
    share: list[list[str]] = [[] for _ in range(processes)]
    for f in sorted(plan, key=lambda f: (-cost[f], f)):
        least = min(range(processes), key=lambda r: (load[r], r))
        share[least].append(f)
        load[least] += cost[f]
    return [sorted(s) for s in share]


def _decompose_unit(factors: Any, unit: str, vec_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    name, what = unit.split("|")
    if what == "tokens":
        return {f"{name}.num_tokens": torch.tensor(factors.num_tokens[name], dtype=torch.int64)}
    side, _, expert = what.partition(".")
    e = int(expert) if expert else None
    values, vectors = symmetric_eigh(factors.factor(name, side, e))
    suffix = "" if e is None else f".{e}"
    return {f"{name}.eigvals_{side}{suffix}": values, f"{name}.eigvecs_{side}{suffix}": vectors.to(vec_dtype)}

