"""Allocating ρ across layers: the groups of modules a sweep's search moves (`SearchSpace`: every layer, or every
projection kind of a layer, of any layer choice), the `keep_mass_pattern` of an allocation, and the moves between
allocations (docs/method.md, "Allocating ρ across layers")."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from .result import SweepPoint

__all__ = ["ALLOCATIONS", "Allocation", "SearchSpace", "allocation_key", "allocation_pattern", "group_label",
           "module_groups", "removal_rho"]

Allocation = Literal["uniform", "per_layer", "per_projection"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
# leaves that read the same input (a Llama MLP's gate and up share one A; an experts stack fuses them)
_GATE_UP = ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3")
_DIGITS = 10  # ρ is rounded to this many decimals, so that the same edit reached two ways has one key
# The removed mass 1 − ρ a move may reach: above it every component of a module would soon be gone; below the floor a
# group's edit is dropped (ρ = 1) rather than made milder.
MAX_REMOVAL, MIN_REMOVAL = 0.9, 1e-5


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


def allocation_key(allocation: Mapping[str, float]) -> tuple:
    """What makes two candidates the same edit: each edited group's ρ (groups at ρ = 1 are not edited)."""
    return tuple(sorted((g, round(r, _DIGITS)) for g, r in allocation.items() if round(r, _DIGITS) < 1))


def removal_rho(removal: float) -> float:
    """ρ of a removed mass, the removal rounded to 3 significant digits (so that ×2 then ÷2 comes back home)."""
    return round(1.0 - float(f"{removal:.3g}"), _DIGITS)


def _layer_of(group: str) -> int | None:
    head = group.split(" ", 1)[0]
    return int(head) if head.isdigit() else None


def _part_names(parts: list[list[str]], allocation: str) -> list[str]:
    """Names for the parts of one group that the layer choices split: their projection kinds (``gate/up``,
    ``down``), else the modules that hold them (a layer's routed ``experts`` and its ``shared_expert``), else their
    leaves; the first of these that tells every part apart."""
    def joined(part: list[str], key) -> str:
        return "+".join(dict.fromkeys(key(n) for n in part))

    kind = lambda n: group_label(n, "per_projection").split(" ", 1)[-1]  # noqa: E731
    parent = lambda n: n.rsplit(".", 2)[-2] if n.count(".") >= 2 else n  # noqa: E731
    namings = [] if allocation == "per_projection" else [lambda p: joined(p, kind)]
    namings += [lambda p: joined(p, parent) if allocation == "per_projection" else
                f"{joined(p, parent)} {joined(p, kind)}", lambda p: joined(p, lambda n: n.rsplit(".", 1)[-1])]
    for naming in namings:
        names = [naming(p) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{names[0]} {i}" for i in range(len(parts))]


@dataclass
class SearchSpace:
    """The groups of modules a search may give a ρ of their own: every layer (``per_layer``) or every projection
    kind of a layer (``per_projection``) of any layer choice, split further where a layer choice takes part of a
    group, so that every grid candidate is an allocation of whole groups. A group at ρ = 1 is not edited."""

    groups: dict[str, list[str]]

    @classmethod
    def of(cls, choices: Mapping[str, Sequence[str]], allocation: str) -> SearchSpace:
        """The space of ``choices`` (label → its module names)."""
        names = list(dict.fromkeys(n for members in choices.values() for n in members))
        groups: dict[str, list[str]] = {}
        for label, members in module_groups(names, allocation).items():
            # modules of one group that not every layer choice takes together get groups of their own
            split: dict[tuple, list[str]] = {}
            for n in members:
                split.setdefault(tuple(n in set(m) for m in choices.values()), []).append(n)
            if len(split) == 1:
                groups[label] = members
            else:
                for name, part in zip(_part_names(list(split.values()), allocation), split.values()):
                    groups[f"{label} {name}"] = part
        return cls(groups)

    def allocation_of(self, names: Iterable[str], rho: float) -> dict[str, float] | None:
        """The allocation that gives ``rho`` to the modules ``names`` (a grid candidate), or None when they are not
        whole groups of this space."""
        wanted = set(names)
        edited = {g for g, members in self.groups.items() if wanted & set(members)}
        if {n for g in edited for n in self.groups[g]} != wanted:
            return None
        return {g: float(rho) for g in self.groups if g in edited}

    def point_allocation(self, point: SweepPoint, names: Iterable[str]) -> dict[str, float] | None:
        """Group → ρ of a measured candidate (its own allocation, or its one ρ for its modules ``names``)."""
        if point.allocation:
            return dict(point.allocation)
        return None if point.keep_mass is None else self.allocation_of(names, point.keep_mass)

    def modules(self, allocation: Mapping[str, float]) -> list[str]:
        """The modules an allocation edits, in the space's order."""
        return [n for g, members in self.groups.items() if allocation.get(g, 1.0) < 1 for n in members]

    def adjacent(self, group: str, other: str) -> bool:
        """Neighbouring groups: the same layer, or the next layer with the same kind."""
        a, b = _layer_of(group), _layer_of(other)
        if a is None or b is None:
            return False
        kind = lambda g: g.split(" ", 1)[1] if " " in g else ""  # noqa: E731
        return a == b or (abs(a - b) == 1 and kind(group) == kind(other))

    def moves(self, allocation: Mapping[str, float], factor: float) -> dict[str, list[dict[str, float]]]:
        """The allocations one move away, by kind of move (each allocation holds only edited groups):

        - ``"up"``: one group's removed mass 1 − ρ times ``factor`` (more removed: less recitation, more perplexity);
        - ``"down"``: one group's removed mass divided by ``factor`` (dropping the group below `MIN_REMOVAL`);
        - ``"add"``: an unedited group next to an edited one joins at its neighbour's removed mass;
        - ``"trade"``: one group down and another up (or added) in the same move, which is what moves along the floor
          of the pick rule: removal shifted from a layer where it costs perplexity to one where it does not."""
        edited = {g: 1.0 - r for g, r in allocation.items() if r < 1}

        def scaled(group: str, by: float) -> float | None:
            removal = edited[group] * by
            if removal > MAX_REMOVAL:
                return None
            return 1.0 if removal < MIN_REMOVAL else removal_rho(removal)

        entry = {g: next(removal_rho(r) for e, r in edited.items() if self.adjacent(g, e))
                 for g in self.groups if g not in edited and any(self.adjacent(g, e) for e in edited)}
        up = {g: rho for g in edited if (rho := scaled(g, factor)) is not None}
        down = {g: rho for g in edited if (rho := scaled(g, 1 / factor)) is not None and (rho < 1 or len(edited) > 1)}

        def make(changes: Mapping[str, float]) -> dict[str, float]:
            out = {g: removal_rho(r) for g, r in edited.items()}
            out.update(changes)
            return {g: out[g] for g in self.groups if g in out and out[g] < 1}

        moves: dict[str, list[dict[str, float]]] = {
            "up": [make({g: rho}) for g, rho in up.items()],
            "down": [make({g: rho}) for g, rho in down.items()],
            "add": [make({g: rho}) for g, rho in entry.items()],
            "trade": [make({d: down[d], u: rho}) for d in down for u, rho in {**up, **entry}.items()
                      if u != d and self.adjacent(d, u)]
            + [make({d: down[d], u: rho}) for d in down for u, rho in {**up, **entry}.items()
               if u != d and not self.adjacent(d, u)],
        }
        return moves

    def describe(self, allocation: Mapping[str, float]) -> str:
        """A label for an allocation's modules, e.g. ``layers 20–22 gate/up+down``."""
        layers = sorted({layer for g in allocation if (layer := _layer_of(g)) is not None})
        kinds = list(dict.fromkeys(group_label(n, "per_projection").split(" ", 1)[-1]
                                   for n in self.modules(allocation)))
        if not layers:
            return "+".join(allocation)
        if len(layers) == 1:
            return f"layer {layers[0]} {'+'.join(kinds)}"
        span = (f"{layers[0]}–{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1))
                else ",".join(map(str, layers)))
        return f"layers {span} {'+'.join(kinds)}"
