"""`search_allocation`: the sweep's search over one ρ per group of modules (`SearchSpace`), from several starts,
steered by a smooth memorization score; the pick is still made by the pick rule over every candidate measured
(docs/method.md, "Allocating ρ across layers")."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from .allocation import SearchSpace, allocation_key
from .result import SweepPoint

__all__ = ["guide_key", "search_allocation", "search_starts"]

# The order in which a point's moves are tried, by where the point stands: over the budget the search relaxes (less
# removed); within it with recitation left it strengthens; once nothing is recited it looks for a milder edit.
_ORDER = {"over": ("down", "trade"), "recites": ("up", "add", "trade", "down"),
          "clean": ("down", "trade", "up", "add")}


def guide_key(point: SweepPoint, primary: str, budget: float) -> tuple:
    """What the search descends: over the budget, the perplexity change (relax toward the budget); within it, Strict
    recitation of the primary set, then the recitation margin (`RecitationMargins.margin`: smooth where Strict is a
    step, so that moves which bring recited items closer to the edge count), then perplexity."""
    if point.perplexity_change > budget:
        return (1, point.perplexity_change)
    rec = point.recitation[primary]
    return (0, rec["strict"], rec.get("margin", 0.0), point.perplexity)


def _state(point: SweepPoint, primary: str, budget: float) -> str:
    if point.perplexity_change > budget:
        return "over"
    return "recites" if point.recitation[primary]["strict"] > 0 else "clean"


def search_starts(points: Sequence[SweepPoint], choices: Sequence[str], pick: Callable[[list[SweepPoint]], Any],
                  primary: str, budget: float, limit: int) -> list[SweepPoint]:
    """Where the search starts: the pick over all ``points``, the strongest candidate just over the budget (the lowest
    Strict among those within twice the budget), then the best within-budget candidate of each other layer choice
    (by the pick rule), at most ``limit`` in all."""
    curvedit = [p for p in points if p.method == "curvedit"]
    starts: list[SweepPoint] = []
    best = pick(curvedit)
    if best is not None:
        starts.append(best)
    over = [p for p in curvedit if budget < p.perplexity_change <= 2 * budget]
    if over:
        starts.append(min(over, key=lambda p: (p.recitation[primary]["strict"], p.perplexity_change)))
    per_choice = [pick([p for p in curvedit if p.layers == label]) for label in choices]
    ranked = sorted((p for p in per_choice if p is not None), key=lambda p: guide_key(p, primary, budget))
    for p in ranked:
        if all(p is not s for s in starts):
            starts.append(p)
    return starts[:limit]


def search_allocation(points: list[SweepPoint], starts: Sequence[SweepPoint], space: SearchSpace,
                      allocation_of: Callable[[SweepPoint], dict[str, float] | None],
                      measure: Callable[[dict[str, float], int], SweepPoint], primary: str, budget: float,
                      steps: Sequence[float], max_candidates: int, *, max_seconds: float | None = None,
                      after_start: Callable[[list[SweepPoint]], Any] | None = None,
                      show_progress: bool = True) -> dict[str, Any]:
    """Move the ρ of each group of ``space`` from each of ``starts`` while `guide_key` improves.

    From a start, the moves of `SearchSpace.moves` are tried one by one, skipping any allocation measured before: the
    kinds in the order `_ORDER` gives for where the current point stands, each kind at every factor of ``steps``
    (coarse to fine) before the next kind. The first candidate that improves `guide_key` becomes the current point;
    the start ends when no move of any kind at any factor improves. The candidates (``measure(allocation,
    start)``) are appended to ``points``; the starts share ``max_candidates`` (each gets an equal share of what is
    left) and ``max_seconds``. Since the sweep's pick is the pick rule over everything measured, it is reproducible
    from the points alone.

    Returns the record of the search (``sweep.json``'s ``extra["allocation_search"]``): per start, the indices in
    ``points`` of the start and of every point it moved to, its candidates and why it stopped (``"converged"``,
    ``"candidate cap"``, ``"time cap"``); in all, the candidates, the seconds, and where the best point came from.
    """
    started = time.perf_counter()
    record: dict[str, Any] = {"steps": [float(s) for s in steps], "max_candidates": max_candidates,
                              "max_seconds": max_seconds, "candidates": 0, "starts": []}
    seen = {allocation_key(a) for p in points if p.method == "curvedit" and (a := allocation_of(p)) is not None}
    index = {id(p): i for i, p in enumerate(points)}
    bar = tqdm(total=max_candidates, desc="allocation search", unit="edit", disable=not show_progress)
    try:
        for n, start in enumerate(starts):
            here = allocation_of(start)
            if here is None:
                continue
            share = (max_candidates - record["candidates"]) // (len(starts) - n)
            run = {"start": index[id(start)], "path": [index[id(start)]], "candidates": 0, "stopped": "converged"}
            record["starts"].append(run)
            current, measured = start, []
            while run["stopped"] == "converged":
                key = guide_key(current, primary, budget)
                improved = None
                # each kind of move at every factor, coarse to fine, before the next kind: a single group's finer
                # step is a handful of candidates, where a round of trades is the square of the groups
                for kind in _ORDER[_state(current, primary, budget)]:
                    for factor in steps:
                        for allocation in space.moves(here, factor)[kind]:
                            if allocation_key(allocation) in seen or not allocation:
                                continue
                            if run["candidates"] >= share:
                                run["stopped"] = "candidate cap"
                                break
                            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                                run["stopped"] = "time cap"
                                break
                            seen.add(allocation_key(allocation))
                            point = measure(allocation, n)
                            index[id(point)] = len(points)
                            points.append(point)
                            measured.append(point)
                            run["candidates"] += 1
                            record["candidates"] += 1
                            bar.update(1)
                            if guide_key(point, primary, budget) < key:
                                improved = point
                                break
                        if improved is not None or run["stopped"] != "converged":
                            break
                    if improved is not None or run["stopped"] != "converged":
                        break
                if improved is None:
                    break  # no move of any kind at any factor improves (or a cap stopped it)
                current, here = improved, dict(improved.allocation or {})
                run["path"].append(index[id(current)])
            if after_start is not None and measured:
                after_start(measured)
    finally:
        bar.close()
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record
