"""What a sweep measured: `SweepPoint` (one candidate) and `SweepResult` (all of them, the pick and the baselines at
matched perplexity), with its JSON and Markdown forms."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text

__all__ = ["SweepPoint", "SweepResult"]


@dataclass
class SweepPoint:
    """One measured candidate: a curvature edit (``keep_mass``, or one ρ per group of modules: ``allocation``), an
    SVD truncation (``rank``) or a BalancedSubnet mask (``ratio``)."""

    method: str  # "base", "curvedit", "svd" or "balanced_subnet"
    layers: str  # label of the layer/module choice
    target_modules: str | None
    keep_mass: float | None
    rank: int | None
    recitation: dict[str, dict[str, float]]  # set -> {"strict", "loose", "avg_lev"}
    perplexity: float
    perplexity_change: float  # relative to the base, e.g. 0.12 = +12%
    ratio: float | None = None  # BalancedSubnet: fraction of the masked weights zeroed
    ndcg: float | None = None  # nDCG@10 of the next-token top-10 against the base's
    capabilities: dict[str, float] | None = None  # lm-eval task -> score (the chosen edit, the base, the matches)
    exposure: dict[str, float] | None = None  # task -> predicted exposure (curvature edits, with exposure texts)
    # the allocation search's candidates: group ("2", or "2 gate/up") -> ρ, the keep_mass_pattern that gives every
    # module its group's ρ (keep_mass, the start's ρ, then matches none of target_modules), and the search's round
    allocation: dict[str, float] | None = None
    keep_mass_pattern: dict[str, float] | None = None
    search_round: int | None = None  # the search's candidates: the index of the start they were found from
    stage: str | None = None  # how a curvature edit was proposed: "grid", "scale" (the ρ scale) or "search"
    seconds: float | None = None  # building and measuring it
    kept: dict[str, list[float]] | None = None  # module -> [share of its components kept, share of ‖W‖² kept]

    @property
    def predicted_cost(self) -> float:
        """The predicted capability cost: the mean exposure over the tasks (NaN when none was measured)."""
        return sum(self.exposure.values()) / len(self.exposure) if self.exposure else math.nan

    @property
    def knob(self) -> str:
        """The point's setting in words: ``ρ=0.8``, ``ρ per layer 2: 0.85, 3: 0.8``, ``k=48``, ``ratio=0.01`` or
        ``–``."""
        if self.allocation:
            kind = "layer" if all(g.isdigit() for g in self.allocation) else "group"
            return f"ρ per {kind} " + ", ".join(f"{g}: {r:g}" for g, r in self.allocation.items())
        if self.keep_mass is not None:
            return f"ρ={self.keep_mass:g}"
        if self.rank is not None:
            return f"k={self.rank}"
        return f"ratio={self.ratio:g}" if self.ratio is not None else "–"

    def edit_settings(self) -> dict[str, Any]:
        """The `CurvatureEditConfig` fields that rebuild this curvature edit: ``keep_mass``, ``keep_mass_pattern``
        and ``target_modules`` (the sweep's protection and selection are in `SweepResult.extra`)."""
        return {"keep_mass": self.keep_mass, "keep_mass_pattern": dict(self.keep_mass_pattern or {}),
                "target_modules": self.target_modules}


def _span(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{100 * lo:.1f}%" if round(lo, 3) == round(hi, 3) else f"{100 * lo:.1f}–{100 * hi:.1f}%"


@dataclass
class SweepResult:
    """All points of a sweep, the base, and the chosen edit (None if nothing fits the budget)."""

    base: SweepPoint
    points: list[SweepPoint]
    perplexity_budget: float
    primary_set: str
    chosen: SweepPoint | None = None
    matches: dict[str, SweepPoint] = field(default_factory=dict)  # baseline -> its point at the chosen's perplexity
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the SweepConfig, as JSON (empty in an older sweep.json)

    @property
    def svd_match(self) -> SweepPoint | None:
        """The SVD truncation whose perplexity change is closest to the chosen edit's."""
        return self.matches.get("svd")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepResult:
        """Inverse of :meth:`to_dict`; ``chosen`` and ``matches`` are the matching objects of ``points``."""
        points = [SweepPoint(**p) for p in data["points"]]

        def find(d: Mapping[str, Any]) -> SweepPoint:
            point = SweepPoint(**d)
            return next((p for p in points if p == point), point)

        matches = {k: find(v) for k, v in (data.get("matches") or {}).items()}
        if data.get("svd_match"):  # written before BalancedSubnet joined the sweep
            matches["svd"] = find(data["svd_match"])
        chosen = find(data["chosen"]) if data.get("chosen") else None
        return cls(SweepPoint(**data["base"]), points, data["perplexity_budget"], data["primary_set"], chosen,
                   matches, dict(data.get("extra") or {}), dict(data.get("config") or {}))

    def save(self, path: str | Path) -> Path:
        """Write the sweep as JSON (atomically)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Read a sweep written by :meth:`save`."""
        from ..integrity import read_json_file

        return cls.from_dict(read_json_file(path, "a sweep's results (sweep.json)",
                                            "Run the sweep again (hf-curvedit sweep, or hf-curvedit run --force)"))

    def closest(self) -> SweepPoint | None:
        """The curvature edit of the lowest perplexity change (the one nearest the budget when none fits it)."""
        edits = [p for p in self.points if p.method == "curvedit"]
        return min(edits, key=lambda p: p.perplexity_change) if edits else None

    def miss_advice(self) -> str:
        """Why nothing was picked and what to try next: the closest candidate, its perplexity change and Strict, and
        the milder removed masses 1 − ρ to try (below the mildest it measured), fewer layers or a larger budget."""
        budget = f"+{100 * self.perplexity_budget:g}%"
        near = self.closest()
        if near is None:
            return f"no edit was measured, so none keeps the perplexity increase within {budget}"
        s = self.primary_set
        mildest = min(1 - p.keep_mass for p in self.points
                      if p.method == "curvedit" and p.layers == near.layers and p.keep_mass is not None)
        rhos = " ".join(f"{1 - mildest / d:.6g}" for d in (2, 5, 10))
        return (f"no edit keeps the perplexity increase within {budget}: the closest, {near.layers} {near.knob}, "
                f"costs {100 * near.perplexity_change:+.1f}% ({s} Strict {100 * near.recitation[s]['strict']:.1f}%). "
                f"Try milder edits, removing less than {mildest:g} of the curvature mass (keep_masses / --keep-mass "
                f"{rhos}), fewer layers (layer_choices / --layers), or a larger budget (perplexity_budget / "
                f"--ppl-budget {near.perplexity_change:.2g})")

    def summary(self) -> str:
        """One line on the pick: its layers and ρ, Strict recitation on the primary set before → after, and the
        perplexity change; or why nothing fits the budget and what to try (`miss_advice`)."""
        c = self.chosen
        if c is None:
            return self.miss_advice()
        s = self.primary_set
        protect = self.extra.get("protect") or {}
        kept = f" protecting {', '.join(f'{n} (ρ={r:g})' for n, r in protect.items())}" if protect else ""
        search = self.extra.get("allocation_search")
        searched = (f"; allocation search: {search['candidates']} candidates from {len(search.get('starts', []))} "
                    f"starts in {search['seconds']:.0f} s" if search else "")
        return (f"chosen: {c.layers} {c.knob}{kept}: {s} Strict {100 * self.base.recitation[s]['strict']:.1f}%"
                f" → {100 * c.recitation[s]['strict']:.1f}%, perplexity {c.perplexity_change * 100:+.1f}%"
                + (f", predicted capability cost {c.predicted_cost:.3f}" if c.exposure else "") + searched)

    def to_markdown(self, points: Sequence[SweepPoint] | None = None) -> str:
        """A Markdown table: one row per point (default: the base and every point), Strict/Loose/AvgLev per set,
        perplexity and its change, nDCG@10 and the capability scores where measured."""
        sets = list(self.base.recitation)
        tasks = list(self.base.capabilities or {})
        exposed = any(p.exposure for p in self.points)
        kept = any(p.kept for p in self.points)
        head = ["method", "layers", "setting"] + [f"{s} {m}" for s in sets for m in ("Strict %", "Loose %", "AvgLev")]
        head += ["PPL", "ΔPPL", "nDCG@10"] + (["‖W‖² kept"] if kept else []) + (["predicted cost"] if exposed else [])
        head += tasks
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        matched = {id(p): name for name, p in self.matches.items()}
        for p in [self.base, *self.points] if points is None else points:
            mark = " **(chosen)**" if p is self.chosen else (" (matched PPL)" if id(p) in matched else "")
            cells = [p.method + mark, p.layers, p.knob]
            for s in sets:
                r = p.recitation[s]
                cells += [f"{100 * r['strict']:.1f}", f"{100 * r['loose']:.1f}", f"{r['avg_lev']:.3f}"]
            cells += [f"{p.perplexity:.3f}", f"{100 * p.perplexity_change:+.1f}%",
                      "–" if p.ndcg is None else f"{p.ndcg:.3f}"]
            cells += ([_span([w for _, w in p.kept.values()]) if p.kept else "–"] if kept else [])
            cells += ([f"{p.predicted_cost:.3f}" if p.exposure else "–"] if exposed else [])
            cells += ["–" if not p.capabilities or t not in p.capabilities else f"{p.capabilities[t]:.3f}"
                      for t in tasks]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def ranked_by_cost(self) -> list[SweepPoint]:
        """The curvature edits with a predicted cost, cheapest first (see `SweepPoint.predicted_cost`)."""
        return sorted((p for p in self.points if p.exposure), key=lambda p: p.predicted_cost)

    def pick_mismatch(self, adapter_config: Mapping[str, Any]) -> str | None:
        """How an adapter's config (``adapter_config.json`` content) differs from the sweep's pick, or ``None`` when
        the adapter is the pick (same ρ, per-group ρ, modules, protection and selection, no rank cap)."""
        c = self.chosen
        if c is None:
            return "the sweep chose no edit"
        protect = dict(self.extra.get("protect") or {})
        checks = [
            ("keep_mass", adapter_config.get("keep_mass"), c.keep_mass),
            ("target_modules", adapter_config.get("target_modules"), c.target_modules),
            ("protect", dict(adapter_config.get("protect") or {}), protect),
            ("keep_mass_pattern", dict(adapter_config.get("keep_mass_pattern") or {}), dict(c.keep_mass_pattern or {})),
            ("selection", adapter_config.get("selection", "curvature_mass"),
             self.extra.get("selection", "curvature_mass")),
            ("rank_cap", adapter_config.get("rank_cap"), None),
        ]
        diffs = [f"{name} is {have!r}, the pick's is {want!r}" for name, have, want in checks if have != want]
        return "; ".join(diffs) or None

    def report_markdown(self) -> str:
        """Every point (`to_markdown`), what the pick keeps of each module (`kept_table`), then, when baselines were
        measured, the side-by-side `comparison`."""
        text = self.to_markdown()
        if self.chosen is not None and self.chosen.kept:
            text += "\n\nWhat the pick keeps, per module:\n\n" + self.kept_table(self.chosen)
        return text + "\n\nAt matched perplexity:\n\n" + self.comparison() if self.matches else text

    @staticmethod
    def kept_table(point: SweepPoint) -> str:
        """Per module of a curvature edit: its ρ, the share of its components and of its ‖W‖² the edit keeps."""
        from ..tuner import CurvatureEditConfig

        rho = CurvatureEditConfig(keep_mass=point.keep_mass or 1.0, keep_mass_pattern=point.keep_mass_pattern)
        rows = ["| module | ρ | components kept | ‖W‖² kept |", "|---|---|---|---|"]
        rows += [f"| `{m}` | {rho.keep_mass_for(m):g} | {100 * c:.2f}% | {100 * w:.2f}% |"
                 for m, (c, w) in (point.kept or {}).items()]
        return "\n".join(rows)

    def comparison(self) -> str:
        """The side-by-side table: the base, the chosen edit and each baseline at matched perplexity."""
        return self.to_markdown([self.base, *([self.chosen] if self.chosen else []), *self.matches.values()])
