"""The one engine behind the data passes (the factor pass of `fit_factors`, the EK-FAC pass of
`fit_eigen_correction`): the partitions of a memory budget, which process collects which, checkpoints and resume,
the reduction of each partition's sums, and the finished partitions streamed to disk one by one.

A pass says what it collects (`PassSpec`); the engine runs each partition over the data:

- **Streamed.** A finished partition is reduced, finished (normalized) by the pass, written to its own shard
  (`hf_curvedit.shards`) and freed from the device and host memory before the next one starts, so a fit holds one
  partition at a time. The store is complete when its index is written, last (one partition: its one file).
- **Spread.** With N processes and P partitions, each process collects its own partitions over all the data:
  wall-clock passes drop to ⌈P/N⌉. With P < N, the processes of each partition split its data (and reduce its sums
  among themselves). Without an output folder, or with a sharded (FSDP) model, whose layers every process computes
  together, every process takes part in every partition and the data is split among all of them.
- **Resumable.** Each process checkpoints its partial sums of the partition it is collecting; a finished partition is
  its shard. A rerun skips the finished shards and resumes the partition in progress (with the same number of
  processes).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data import count_batches, iter_batches
from ..integrity import DamagedFileError, read_safetensors
from ..shards import shard_name, shards_of, write_index
from ..utils import save_safetensors
from .collector import collect_factor_sums
from .config import FactorConfig
from .distributed import ProcessGroups, dist_state, is_sharded_model
from .storage import checkpoint_file, load_checkpoint, save_checkpoint
from .tasks import FactorTask, PreparedData

__all__ = ["PassSpec", "run_pass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassSpec:
    """What one data pass collects; the engine does the rest.

    Attributes:
        desc: the progress bar's label.
        stem: the store it writes (``"factors"``, ``"ekfac"``): ``STEM.safetensors``, or shards and an index.
        checkpoint_dir: the folder of its checkpoints, inside the output folder.
        key: what a checkpoint or a shard must have been written with to be reused (settings, model, world size).
        collector: the collector of one partition (a list of module names or expert slices); it has the
            `FactorCollector` protocol plus ``sums()`` (named tensors to reduce and checkpoint), ``state()`` (JSON
            counts) and ``load(sums, state)``.
        finish: a partition's reduced ``(sums, state)`` → ``(tensors to store, JSON metadata of the partition)``.
        index_metadata: the metadata of each finished partition, in order → the metadata of the store.
    """

    desc: str
    stem: str
    checkpoint_dir: str
    key: dict[str, Any]
    collector: Callable[[list[str]], Any]
    finish: Callable[[list[str], dict[str, torch.Tensor], dict[str, Any]], tuple[dict[str, torch.Tensor],
                                                                               dict[str, Any]]]
    index_metadata: Callable[[list[dict[str, Any]]], dict[str, Any]]


def run_pass(model: nn.Module, spec: PassSpec, task: FactorTask, data: PreparedData, config: FactorConfig,
             partitions: list[list[str]], out: Path | None, *, progress: bool,
             device_of: Callable[[str], torch.device]) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None:
    """Run ``spec`` over ``data``, partition by partition.

    With ``out``, every finished partition goes to disk and the store is complete when this returns (``None``).
    Without it, the finished tensors and record of every partition are returned (on every process).
    """
    state = dist_state()
    parts = len(partitions)
    spread = out is not None and not is_sharded_model(model)
    groups = ProcessGroups(parts, state.num_processes, spread)
    n_batches = count_batches(data.rows, config.batch_size, data.max_rows)
    kept: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
    done = _finished_partitions(out, spec, parts) if out is not None else set()
    for p, part in enumerate(partitions):
        members = groups.members(p)
        if state.process_index not in members or p in done:
            continue
        rank, size = members.index(state.process_index), len(members)
        col = spec.collector(part)
        start, finished = 0, False
        ckpt = checkpoint_file(out, p, state.process_index, state.num_processes, spec.checkpoint_dir) if out else None
        if ckpt is not None and ckpt.exists():
            try:
                sums, col_state, start, finished = load_checkpoint(ckpt, spec.key, device_of)
            except DamagedFileError as err:
                logger.warning("%s; this part starts over", err)
                ckpt.unlink()
            else:
                col.load(sums, col_state)
                logger.info("resuming partition %d from batch %d", p, start)
        if not finished:
            label = f"{spec.desc}{f' [part {p + 1}/{parts}]' if parts > 1 else ''}"
            with _bar(label, task, data, config, n_batches, start, rank, size, progress) as bar:
                _collect(model, col, part, task, data, config, start, rank, size, groups.group(p), ckpt, spec,
                         bar, lockstep=is_sharded_model(model))
            if ckpt is not None:
                save_checkpoint(ckpt, col.sums(), col.state(), n_batches if n_batches is not None else 1 << 62, True,
                                spec.key)
        sums, col_state = _reduce(col, groups.group(p), size)
        del col
        tensors, meta = spec.finish(part, sums, col_state)
        del sums
        if out is None:
            kept.append(({k: t.cpu() for k, t in tensors.items()}, meta))
        elif rank == 0:  # the partition's first process writes it
            _write_partition(out, spec, p, parts, tensors, {**meta, "partition": p})
        del tensors
        _release(model)
    if out is None:
        return kept
    state.wait_for_everyone()
    if state.is_main_process:
        _write_store(out, spec, parts)
    state.wait_for_everyone()
    return None


# ---------------------------------------------------------------------------------------------------- the passes
def _collect(model: nn.Module, col: Any, part: list[str], task: FactorTask, data: PreparedData,
             config: FactorConfig, start: int, rank: int, size: int, group: Any, ckpt: Path | None, spec: PassSpec,
             bar: tqdm, lockstep: bool) -> None:
    since = [0]

    def on_batch_end(b: int, c: Any) -> None:
        since[0] += 1
        if ckpt is not None and config.checkpoint_every and since[0] % config.checkpoint_every == 0:
            save_checkpoint(ckpt, c.sums(), c.state(), b + 1, False, spec.key)

    batches = iter_batches(data.rows, config.batch_size, start_batch=start, max_blocks=data.max_rows, rank=rank,
                           world_size=size, to_tensors=data.to_tensors)
    if lockstep:
        batches = _in_lockstep(batches, group, task.example_batch(model, config))
    collect_factor_sums(model, batches, part, config, task=task, collector=col, on_batch_end=on_batch_end,
                        progress=bar)


def _in_lockstep(batches: Iterator[tuple[int, dict]], group: Any, spare: dict[str, torch.Tensor],
                 ) -> Iterator[tuple[int, dict]]:
    """The batches of this process, with muted steps (``(-1, batch)``: run, nothing collected) while another
    process of the group still has a batch: a sharded model computes every layer on all its processes together, so
    each must take as many steps as the others."""
    import torch.distributed as dist

    last = spare
    while True:
        nxt = next(batches, None)
        flag = torch.tensor([0 if nxt is None else 1], dtype=torch.int64, device=dist_state().device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if not int(flag.item()):
            return
        if nxt is None:
            yield -1, last
        else:
            last = nxt[1]
            yield nxt


def _bar(desc: str, task: FactorTask, data: PreparedData, config: FactorConfig, n_batches: int | None, start: int,
         rank: int, size: int, progress: bool) -> tqdm:
    """The progress bar of this process's share of a data pass (shown by each partition's first process), counted in
    the task's samples."""
    total = None
    if n_batches is not None:
        mine = len([b for b in range(start, n_batches) if b % size == rank])
        total = mine * config.batch_size * data.samples_per_row
    return tqdm(total=total, unit=task.unit, unit_scale=True, dynamic_ncols=True, desc=desc,
                disable=not (progress and rank == 0))


def _reduce(col: Any, group: Any, size: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The partition's sums and counts over the processes that collected it (in place, on their device). A process
    that saw no batch contributes zeros; the keys are agreed first, so every process reduces the same tensors."""
    sums, col_state = col.sums(), col.state()
    if size == 1:
        return sums, col_state
    import torch.distributed as dist

    shapes: list[Any] = [None] * size
    dist.all_gather_object(shapes, ({k: (tuple(t.shape), str(t.dtype)) for k, t in sums.items()}, col_state),
                           group=group)
    keys = sorted({k for s, _ in shapes for k in s})
    device = dist_state().device
    out = {}
    for k in keys:
        shape, dtype = next(s[k] for s, _ in shapes if k in s)
        t = sums.get(k)
        t = torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device) if t is None \
            else t.to(device)
        dist.all_reduce(t, group=group)
        out[k] = t
    return out, col.merge_states([s for _, s in shapes])


def _release(model: nn.Module) -> None:
    # a finished partition's memory back to the device and the system before the next pass starts
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from ..utils import release_free_memory

    release_free_memory()


# ---------------------------------------------------------------------------------------------- shards on disk
def partition_file(out: Path, stem: str, part: int, parts: int) -> Path:
    """Where partition ``part`` of ``parts`` goes: the store itself when there is one, else its shard."""
    return out / (f"{stem}.safetensors" if parts == 1 else shard_name(stem, part + 1, parts))


def _write_partition(out: Path, spec: PassSpec, part: int, parts: int, tensors: dict[str, torch.Tensor],
                     meta: dict[str, Any]) -> None:
    # a store of one partition is that partition's file, with the store's metadata; else a shard records its own
    # (the index is assembled from them at the end)
    if parts == 1:
        meta = spec.index_metadata([meta])
    else:
        meta = {"partition": meta, "key": spec.key}
    save_safetensors(partition_file(out, spec.stem, part, parts), tensors,
                     {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})


def _finished_partitions(out: Path, spec: PassSpec, parts: int) -> set[int]:
    """The partitions whose shard is on disk, verifies and was written with this pass's key (agreed by all
    processes: the main process decides)."""
    done: set[int] = set()
    state = dist_state()
    if parts > 1 and state.is_main_process:
        for p in range(parts):
            path = partition_file(out, spec.stem, p, parts)
            if path.exists() and _shard_key(path) == json.loads(json.dumps(spec.key, sort_keys=True)):
                done.add(p)
    if state.num_processes > 1:
        import torch.distributed as dist

        box = [sorted(done)]
        dist.broadcast_object_list(box, src=0)
        done = set(box[0])
    return done


def _shard_key(path: Path) -> Any:
    try:
        with read_safetensors(path, "a shard", "it is collected again") as f:
            for k in f.keys():
                f.get(k)  # every tensor verifies
            return json.loads(f.metadata.get("key", "null"))
    except (DamagedFileError, ValueError) as err:
        logger.warning("%s; that partition is collected again", err)
        return None


def _write_store(out: Path, spec: PassSpec, parts: int) -> None:
    """The index of a sharded store, from its shards' own records (the store of one partition is complete already);
    then the checkpoints and shards of other runs go."""
    if parts > 1:
        metas, files = [], []
        for p in range(parts):
            path = partition_file(out, spec.stem, p, parts)
            with read_safetensors(path, "a shard", "it is collected again") as f:
                metas.append(json.loads(f.metadata["partition"]))
            files.append(path.name)
        write_index(out, spec.stem, spec.index_metadata(metas), files)
    keep = {partition_file(out, spec.stem, p, parts) for p in range(parts)}
    for stray in shards_of(out, spec.stem):
        if stray not in keep:
            stray.unlink(missing_ok=True)
    shutil.rmtree(out / spec.checkpoint_dir, ignore_errors=True)

