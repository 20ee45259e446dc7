"""How the factor accumulators are split into data passes under a memory budget: `plan_partitions`, the one
function `fit_factors` and `plan_factors` both use, and the expert slices it names when an expert projection's stack
does not fit on its own."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.nn as nn

from ..errors import InputError
from ..targets import TargetWeight, weight_targets
from .config import FactorConfig, accumulator_dtype

__all__ = ["factor_bytes", "plan_partitions", "split_expert_slice"]


def split_expert_slice(name: str) -> tuple[str, int | None, int | None]:
    """``"...experts.gate_up_proj[0:64]"`` → ``("...experts.gate_up_proj", 0, 64)``; a plain name → ``(name, None,
    None)``. A partition names a slice of an expert projection's experts this way when the whole stack of its factors
    does not fit the memory budget."""
    match = _SLICE.fullmatch(name)
    if match is None:
        return name, None, None
    return match.group(1), int(match.group(2)), int(match.group(3))


_SLICE = re.compile(r"(.+)\[(\d+):(\d+)\]")


def factor_bytes(d_out: int, d_in: int, config: FactorConfig, num_experts: int | None = None) -> int:
    """Bytes of one target's two accumulators (A: d_in², G: d_out², once per expert for an expert projection) in the
    accumulation dtype."""
    return (d_in * d_in + d_out * d_out) * (num_experts or 1) * accumulator_dtype(config).itemsize


def plan_partitions(model: nn.Module, names: list[str], config: FactorConfig,
                    unit_bytes: Callable[[TargetWeight], int] | None = None) -> list[list[str]]:
    """Split ``names`` into groups whose accumulators fit ``config.max_factor_memory_gb`` (one data pass each).

    ``unit_bytes`` is what one target (one expert of an expert projection) holds during the pass; by default its two
    factor accumulators (`factor_bytes`). An expert projection whose stack does not fit the budget on its own is split
    across its experts: the partitions then name slices of it (``"...experts.gate_up_proj[0:64]"``, see
    `split_expert_slice`).
    """
    if config.max_factor_memory_gb is None:
        return [names]
    targets = weight_targets(model)
    budget = config.max_factor_memory_gb * 1024**3
    units: list[tuple[str, int]] = []
    for n in names:
        t = targets[n]
        one = unit_bytes(t) if unit_bytes is not None else factor_bytes(t.d_out, t.d_in, config)
        if one > budget:
            what = "one expert's factors" if t.is_experts else "its factors alone"
            raise InputError(
                f"max_factor_memory_gb={config.max_factor_memory_gb} is too small for {n}: {what} need "
                f"{one / 1024**3:.3g} GiB. Raise the budget to at least that."
            )
        if t.is_experts and one * t.num_experts > budget:
            per = max(1, int(budget // one))
            units += [(f"{n}[{e}:{min(e + per, t.num_experts)}]", one * (min(e + per, t.num_experts) - e))
                      for e in range(0, t.num_experts, per)]
        else:
            units.append((n, one * (t.num_experts or 1)))
    parts: list[list[str]] = [[]]
    used = 0.0
    for n, need in units:
        if used + need > budget and parts[-1]:
            parts.append([])
            used = 0.0
        parts[-1].append(n)
        used += need
    return parts
