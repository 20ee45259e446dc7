"""The ρ scale of a sweep that fits the model: candidates spaced in the removed mass 1 − ρ (geometric: 0.5, 0.2,
0.1, 0.05, …), each layer choice walked along them until it brackets the perplexity budget, and finer steps where the
frontier is; and the default layer choices of a deep model: windows of a few consecutive blocks across its depth.

Why: the curvature spectra of a real pretrained model are far more concentrated than those of a small model trained
from scratch, so the ρ that keeps a layer's perplexity cost within a budget ranges from 0.6 to 0.999 across models and
layers (docs/method.md, "The ρ scale").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

from .allocation import group_label, removal_rho
from .result import SweepPoint

__all__ = ["LADDER", "default_layer_choices", "scale_layer_choice"]

# The removed masses 1 − ρ the scale walks, strongest first (1-2-5 steps, each about 2-2.5 times the next).
LADDER = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4, 2e-4, 1e-4)
# the MLP leaves of transformers' families that write a block's result back, and those that read its input
_WRITES = ("down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "wo", "w2", "output_linear", "proj_down", "Wo")
_READS = ("gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "wi", "w1", "w3",
          "input_linear", "proj_up", "proj_up_gate", "Wi")


def _layer(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def default_layer_choices(shapes: Mapping[str, tuple[int, int]], *, max_windows: int = 5) -> dict[str, str]:
    """Layer choices for a model whose modules with eigenbases have ``shapes`` (name → (d_out, d_in)): windows of
    consecutive blocks (3 in a model of 12 blocks or more, else 2) spread evenly across its depth, the top one
    included, each with its input-side projections only (gate/up, ``c_fc``) and with every projection (the down
    projection too), as the method's paper searched. A model without numbered blocks, or with one block, gets one
    choice of every module."""
    everything = {"all": "|".join(re.escape(n) for n in shapes)}
    layers = sorted({layer for n in shapes if (layer := _layer(n)) is not None})
    if len(layers) < 2:
        return everything
    width = 3 if len(layers) >= 12 else 2
    last = len(layers) - width
    count = min(max_windows, last + 1)
    firsts = sorted({round(i * last / (count - 1)) for i in range(count)}) if count > 1 else [last]
    # the output side writes the block's result back: a down projection by its name, else a matrix that shrinks
    # (d_out < d_in; a mixture-of-experts down projection can be square); the input side reads the block's input
    writes = {n for n, (d_out, d_in) in shapes.items() if n.rsplit(".", 1)[-1] in _WRITES or (
        n.rsplit(".", 1)[-1] not in _READS and d_out < d_in)}
    kinds = [("in", lambda n: n not in writes), ("all", lambda n: True)] if writes else [("all", lambda n: True)]
    choices: dict[str, str] = {}
    for first in firsts:
        window = set(layers[first:first + width])
        members = [n for n in shapes if _layer(n) in window]
        for kind, keep in kinds:
            names = [n for n in members if keep(n)]
            leaves = "+".join(dict.fromkeys(group_label(n, "per_projection").split(" ", 1)[-1] for n in names))
            label = f"layers {min(window)}–{max(window)} {leaves}"
            choices.setdefault(label, "|".join(re.escape(n) for n in names))
    return choices


def scale_layer_choice(measure: Callable[[float], SweepPoint], primary: str, budget: float,
                       refinements: int = 2, start: float = 0.1) -> list[SweepPoint]:
    """Walk one layer choice along `LADDER` from the removed mass ``start`` (the rung nearest it; 0.1 is ρ = 0.9)
    until it brackets the budget, then refine where the pick would be. Returns the candidates measured
    (``measure(rho)`` measures one).

    A candidate that recites within the budget sends the walk stronger (a larger removal), one over the budget or
    reciting nothing sends it milder; a candidate over twenty times the budget moves it two rungs at once. It stops
    at the first candidate that is neither (the budget's edge, or the edge where recitation ends), or at one that
    recites nothing for less than a twentieth of the budget. Then
    ``refinements`` geometric midpoints in the removed mass: between the strongest candidate within the budget and
    the next stronger one while it still recites, else between the mildest that recites nothing and the next milder
    one (a milder edit that still recites nothing is better)."""
    measured: dict[float, SweepPoint] = {}

    def at(removal: float) -> SweepPoint:
        if removal not in measured:
            measured[removal] = measure(removal_rho(removal))
        return measured[removal]

    within = lambda p: p.perplexity_change <= budget  # noqa: E731
    strict = lambda p: p.recitation[primary]["strict"]  # noqa: E731
    state = lambda p: "over" if not within(p) else ("recites" if strict(p) > 0 else "clean")  # noqa: E731
    i = min(range(len(LADDER)), key=lambda k: abs(math.log(LADDER[k] / start)))
    first = state(at(LADDER[i]))
    step = -1 if first == "recites" else 1
    # reciting nothing, a milder edit is only worth its measurement while the perplexity it costs is worth saving
    negligible = lambda p: state(p) == "clean" and p.perplexity_change <= budget / 20  # noqa: E731
    while 0 <= i + step < len(LADDER) and state(measured[LADDER[i]]) == first and not negligible(measured[LADDER[i]]):
        far = first == "over" and measured[LADDER[i]].perplexity_change > 20 * budget
        i = min(i + 2, len(LADDER) - 1) if far else i + step
        at(LADDER[i])
    for _ in range(refinements):
        inside = [r for r, p in measured.items() if within(p)]
        if not inside:
            break
        least = min(strict(measured[r]) for r in inside)
        if least > 0:  # the strongest edit within the budget at its Strict, and the next stronger one
            edge = max(r for r in inside if strict(measured[r]) == least)
            other = min([r for r in measured if r > edge] or [r for r in LADDER if r > edge] or [None])
        else:  # the mildest edit that recites nothing, and the next milder one
            edge = min(r for r in inside if strict(measured[r]) == 0)
            other = max([r for r in measured if r < edge] or [r for r in LADDER if r < edge] or [None])
        if other is None:
            break
        if other not in measured:  # the ladder's next rung brackets the edge first
            at(other)
            continue
        middle = float(f"{math.sqrt(edge * other):.3g}")
        if middle in measured or removal_rho(middle) in (removal_rho(edge), removal_rho(other)):
            break
        at(middle)
    return list(measured.values())
