"""Allocating ρ across layers: the groups a layer choice splits into, the `keep_mass_pattern` of an allocation, and
`search_allocation`, the local search over the groups' ρ that starts from the grid's pick (docs/method.md,
"Allocating ρ across layers")."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

from tqdm.auto import tqdm

from .result import SweepPoint

__all__ = ["ALLOCATIONS", "Allocation", "allocation_key", "allocation_pattern", "group_label", "module_groups",
           "point_allocation", "search_allocation"]

Allocation = Literal["uniform", "per_layer", "per_projection"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
# leaves that read the same input (a Llama MLP's gate and up share one A; an experts stack fuses them)
_GATE_UP = ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3")
_DIGITS = 10  # ρ is rounded to this many decimals, so that 0.8 + 0.05 is the 0.85 the grid measured


def group_label(name: str, allocation: str = "per_layer") -> str:
    """The group of module ``name``: its block index (``"2"``) for ``per_layer``; with ``per_projection`` also its
    kind (``"2 gate/up"``, ``"2 down"``). Routed and shared experts of a block share its groups. A module outside
    the numbered blocks is a group of its own (its name)."""
    found = re.search(r"\.(\d+)\.", name)
    if found is None:
        return name
    if allocation != "per_projection":
        return found.group(1)
    leaf = name.rsplit(".", 1)[-1]
    kind = "gate/up" if leaf in _GATE_UP else leaf.removesuffix("_proj")
    return f"{found.group(1)} {kind}"


def module_groups(names: Iterable[str], allocation: str = "per_layer") -> dict[str, list[str]]:
    """Group label → its module names (in the order of ``names``)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_label(name, allocation), []).append(name)
    return groups


def _group_regex(names: Sequence[str]) -> str:
    # the shared dotted prefix once, then the alternatives: readable in adapter_config.json and on the card
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    rest = [re.escape(".".join(p[common:])) for p in parts]
    body = rest[0] if len(rest) == 1 else f"({'|'.join(rest)})"
    return (re.escape(".".join(parts[0][:common])) + r"\." if common else "") + body


def allocation_pattern(groups: Mapping[str, Sequence[str]], allocation: Mapping[str, float]) -> dict[str, float]:
    """The `CurvatureEditConfig.keep_mass_pattern` that gives every module of each group the group's ρ: one regex per
    group that matches exactly its modules' names (a key is matched against the end of a module's name)."""
    return {_group_regex(groups[g]): float(rho) for g, rho in allocation.items()}


def point_allocation(point: SweepPoint, groups: Iterable[str]) -> dict[str, float]:
    """Group → ρ of a candidate: its own allocation, or its one ρ for every group (a grid point)."""
    if point.allocation:
        return dict(point.allocation)
    assert point.keep_mass is not None
    return {g: float(point.keep_mass) for g in groups}


def allocation_key(target_modules: str | None, allocation: Mapping[str, float]) -> tuple:
    """What makes two candidates the same edit: the modules and each group's ρ (a uniform allocation is the grid
    point of that ρ)."""
    return target_modules, tuple(sorted((g, round(r, _DIGITS)) for g, r in allocation.items()))


def _neighbours(allocation: Mapping[str, float], step: float) -> list[dict[str, float]]:
    """Each group's ρ one step down (more removed: less recitation) and one up (less removed: lower perplexity), then
    every trade of one step between two groups (one down, the other up).

    The trades are what moves along the floor of the pick rule: once Strict is 0 (or any level the budget holds), a
    single group's step down cannot lower it and a step up may bring recitation back, while moving removal from a
    layer where it costs perplexity to one where it does not can keep Strict and lower perplexity."""
    def moved(group: str, delta: float) -> float | None:
        rho = round(allocation[group] + delta, _DIGITS)
        return rho if 0.0 < rho <= 1.0 else None

    out = []
    for group in allocation:
        for delta in (-step, step):
            rho = moved(group, delta)
            if rho is not None:
                out.append({**allocation, group: rho})
    for down in allocation:
        for up in allocation:
            lower, higher = moved(down, -step), moved(up, step)
            if down != up and lower is not None and higher is not None:
                out.append({**allocation, down: lower, up: higher})
    return out


def _index(points: list[SweepPoint], point: SweepPoint) -> int:
    return next(i for i, p in enumerate(points) if p is point)


def search_allocation(points: list[SweepPoint], pick: Callable[[list[SweepPoint]], SweepPoint | None],
                      measure: Callable[[SweepPoint, dict[str, float], int], SweepPoint],
                      groups_of: Callable[[str], Mapping[str, Sequence[str]]], steps: Sequence[float],
                      max_candidates: int, *, after_round: Callable[[list[SweepPoint]], Any] | None = None,
                      show_progress: bool = True) -> dict[str, Any]:
    """Move the ρ of each group of modules from the pick among ``points`` while the pick rule prefers the result.

    Steepest descent in rounds: a round measures every not yet measured neighbour of the current point (each group's ρ
    one step down and one up, and each trade of a step between two groups: one down, one up; the other groups
    unchanged), in that order, appends them to ``points``, and the current point becomes
    ``pick(points)``; when the pick stays, the next (finer) step of ``steps`` is tried, and the search ends when the
    last step finds nothing better or ``max_candidates`` have been measured. Since the end point is the pick over
    everything measured, the sweep's pick is reproducible from its points alone.

    ``measure(current, allocation, round)`` measures one candidate: the modules of ``current`` with that ρ per group
    (``groups_of(current.target_modules)``); ``after_round`` gets each round's new points (their exposure).

    Returns the record of the search (``sweep.json``'s ``extra["allocation_search"]``): the indices in ``points`` of
    the start and of every point it moved to, the number of candidates and rounds, the seconds it took and why it
    stopped (``"converged"``, ``"candidate cap"`` or ``"nothing within the budget"``).
    """
    started = time.perf_counter()
    record: dict[str, Any] = {"steps": [float(s) for s in steps], "max_candidates": max_candidates,
                              "candidates": 0, "rounds": 0, "start": None, "path": []}
    current = pick(points)
    if current is None:
        return {**record, "seconds": 0.0, "stopped": "nothing within the budget"}
    path = [_index(points, current)]
    seen = {allocation_key(p.target_modules, point_allocation(p, groups_of(p.target_modules)))
            for p in points if p.method == "curvedit" and p.target_modules is not None}
    stopped = "converged"
    bar = tqdm(total=max_candidates, desc="allocation search", unit="edit", disable=not show_progress)
    try:
        for step in steps:
            while stopped == "converged":
                assert current.target_modules is not None
                groups = groups_of(current.target_modules)
                fresh = [a for a in _neighbours(point_allocation(current, groups), step)
                         if allocation_key(current.target_modules, a) not in seen]
                if not fresh:  # every neighbour at this step is measured: the next, finer step
                    break
                room = max_candidates - record["candidates"]
                if room <= 0:
                    stopped = "candidate cap"
                    break
                record["rounds"] += 1
                measured = []
                for allocation in fresh[:room]:
                    seen.add(allocation_key(current.target_modules, allocation))
                    measured.append(measure(current, allocation, record["rounds"]))
                    record["candidates"] += 1
                    bar.update(1)
                points.extend(measured)
                if after_round is not None:
                    after_round(measured)
                best = pick(points)
                if best is current:  # no neighbour is preferred: the next step (unless some were left unmeasured)
                    stopped = "candidate cap" if len(fresh) > room else stopped
                    break
                assert best is not None
                current = best
                path.append(_index(points, current))
    finally:
        bar.close()
    return {**record, "start": path[0], "path": path, "seconds": round(time.perf_counter() - started, 3),
            "stopped": stopped}
