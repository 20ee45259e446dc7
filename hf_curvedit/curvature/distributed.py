"""The processes of a run: accelerate's process state (one process, or those of a ``torchrun`` / ``accelerate
launch``), how the partitions of a data pass are shared among them, and sharded (FSDP) models, whose weights live in
pieces across the processes."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

__all__ = ["ProcessGroups", "assign_weight", "dist_state", "full_weight", "is_sharded_model", "restore_weight",
           "wall_passes"]


def dist_state():
    """accelerate's process state (one process, or the processes of a torchrun / accelerate launch)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState only detects a multi-process CPU run (torchrun, debug_launcher) when told it is
    # on CPU; an existing Accelerator/PartialState singleton is reused as is.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def wall_passes(partitions: int, processes: int) -> int:
    """Data passes one after the other when ``processes`` share ``partitions`` (see `ProcessGroups`)."""
    return math.ceil(partitions / max(processes, 1))


class ProcessGroups:
    """Which processes collect each of ``parts`` partitions.

    Spread (``spread=True``): with at least as many partitions as processes, process ``r`` collects partitions ``r,
    r + N, ...`` alone, over all the data; with fewer, the processes ``r ≡ p (mod P)`` share partition ``p``'s data
    and reduce its sums in a group of their own. Not spread: every process takes part in every partition and the data
    is split among all of them. Creating the groups is collective: every process constructs this with the same
    arguments, in the same order.
    """

    def __init__(self, parts: int, world: int, spread: bool):
        self.parts, self.world, self.spread = parts, world, spread
        self._groups: dict[int, Any] = {}
        if world > 1 and spread and parts < world:
            import torch.distributed as dist

            for p in range(parts):
                self._groups[p] = dist.new_group(self.members(p))

    def members(self, part: int) -> list[int]:
        """The processes that collect partition ``part``, its first one writing it."""
        if self.world == 1 or not self.spread:
            return list(range(self.world))
        if self.parts >= self.world:
            return [part % self.world]
        return [r for r in range(self.world) if r % self.parts == part]

    def group(self, part: int) -> Any:
        """The torch.distributed group that reduces partition ``part`` (``None``: the default group of all)."""
        return self._groups.get(part)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether some weights of ``model`` are sharded across processes (FSDP2's ``fully_shard``: DTensor parameters)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def assign_weight(param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Give the weight ``param`` the values of ``values`` (a whole tensor in the weight's layout) and return what
    `restore_weight` puts back, bit for bit: the very tensor that was replaced, or, for a sharded (DTensor) weight,
    a copy of its shards (its own shard is overwritten in place, where FSDP gathers it from)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        original = param.detach().clone()
        # every process holds the whole new weight: each keeps its own shard, no communication
        mine = distribute_tensor(values.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        with torch.no_grad():
            param.to_local().copy_(mine.to_local())
        return original
    original = param.data
    param.data = values.to(param.dtype).contiguous()
    return original


def restore_weight(param: torch.Tensor, original: torch.Tensor) -> None:
    """Undo `assign_weight` with what it returned."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        with torch.no_grad():
            param.to_local().copy_(original.to_local())
    else:
        param.data = original


def full_weight(t: torch.Tensor) -> torch.Tensor:
    """A weight as one whole tensor: a sharded (DTensor) parameter is gathered from every process (collective: every
    process must ask for the same weights in the same order); any other tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
