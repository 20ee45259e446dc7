"""Sweeps: try several ρ and layer choices, compare with an SVD-truncation baseline, pick an edit.

Each candidate is built from the same eigenbases (factors of the unedited model), measured, and
removed again, so one model serves the whole sweep. The pick is the strongest suppression (lowest
Strict recitation on the primary set, then lowest perplexity) whose held-out perplexity rises by
no more than ``perplexity_budget``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .curvature.eigen import KFACEigen
from .evaluation import RecitationSet, TextSet, evaluate_recitation, perplexity
from .targets import linear_shape, resolve_target_modules
from .utils import atomic_write_text


@dataclass
class SweepPoint:
    """One measured candidate: a curvature edit (``keep_mass``) or an SVD truncation (``rank``)."""

    method: str  # "base", "curvedit" or "svd"
    layers: str  # label of the layer/module choice
    target_modules: str | None
    keep_mass: float | None
    rank: int | None
    recitation: dict[str, dict[str, float]]  # set -> {"strict", "loose", "avg_lev"}
    perplexity: float
    perplexity_change: float  # relative to the base, e.g. 0.12 = +12%


@dataclass
class SweepResult:
    """All points of a sweep, the base, and the chosen edit (None if nothing fits the budget)."""

    base: SweepPoint
    points: list[SweepPoint]
    perplexity_budget: float
    primary_set: str
    chosen: SweepPoint | None = None
    svd_match: SweepPoint | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepResult:
        """Inverse of :meth:`to_dict`; ``chosen`` and ``svd_match`` are the matching objects of ``points``."""
        points = [SweepPoint(**p) for p in data["points"]]

        def find(d: Mapping[str, Any] | None) -> SweepPoint | None:
            if d is None:
                return None
            point = SweepPoint(**d)
            return next((p for p in points if p == point), point)

        return cls(SweepPoint(**data["base"]), points, data["perplexity_budget"], data["primary_set"],
                   find(data.get("chosen")), find(data.get("svd_match")), dict(data.get("extra") or {}))

    def save(self, path: str | Path) -> Path:
        """Write the sweep as JSON (atomically)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Read a sweep written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def summary(self) -> str:
        """One line on the pick: its layers and ρ, Strict recitation on the primary set before → after, and the
        perplexity change; or that nothing fits the budget."""
        c = self.chosen
        if c is None:
            return f"no edit keeps the perplexity increase within {100 * self.perplexity_budget:.0f}%"
        s = self.primary_set
        return (f"chosen: {c.layers} ρ={c.keep_mass:g}: {s} Strict {100 * self.base.recitation[s]['strict']:.1f}% → "
                f"{100 * c.recitation[s]['strict']:.1f}%, perplexity {c.perplexity_change * 100:+.1f}%")

    def to_markdown(self) -> str:
        """A Markdown table: one row per point, Strict/Loose/AvgLev per set, perplexity and its change."""
        sets = list(self.base.recitation)
        head = ["method", "layers", "ρ / rank"] + [f"{s} {m}" for s in sets for m in ("Strict %", "Loose %", "AvgLev")]
        head += ["PPL", "ΔPPL"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in [self.base] + self.points:
            mark = " **(chosen)**" if p is self.chosen else (" (SVD at matched PPL)" if p is self.svd_match else "")
            knob = f"ρ={p.keep_mass:g}" if p.keep_mass is not None else (f"k={p.rank}" if p.rank is not None else "–")
            cells = [p.method + mark, p.layers, knob]
            for s in sets:
                r = p.recitation[s]
                cells += [f"{100 * r['strict']:.1f}", f"{100 * r['loose']:.1f}", f"{r['avg_lev']:.3f}"]
            cells += [f"{p.perplexity:.3f}", f"{100 * p.perplexity_change:+.1f}%"]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)


def _measure(model: nn.Module, sets: Mapping[str, RecitationSet], heldout: TextSet, batch_size: int,
             pad_token_id: int | None) -> tuple[dict[str, dict[str, float]], float]:
    rec = {}
    for name, s in sets.items():
        r = evaluate_recitation(model, s.prefixes, s.suffixes, batch_size=batch_size, pad_token_id=pad_token_id,
                                show_progress=False)
        rec[name] = {"strict": r.strict, "loose": r.loose, "avg_lev": r.avg_lev}
    ppl = perplexity(model, heldout.sequences, batch_size=batch_size, pad_token_id=pad_token_id, show_progress=False)
    return rec, ppl.perplexity


@contextlib.contextmanager
def svd_truncation(model: nn.Module, module_names: Sequence[str], rank: int) -> Iterator[None]:
    """Temporarily replace each module's weight by its best rank-``rank`` approximation (the baseline)."""
    mods = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for n in module_names:
                w = mods[n].weight
                saved[n] = w.detach().clone()
                u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
                k = min(rank, s.numel())
                w.copy_(((u[:, :k] * s[:k]) @ vh[:k]).to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                mods[n].weight.copy_(w)


def sweep_edits(
    model: nn.Module,
    eigen: KFACEigen | Mapping[str, Any],
    recitation_sets: Mapping[str, RecitationSet],
    heldout: TextSet,
    *,
    keep_masses: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
    layer_choices: Mapping[str, str] | None = None,
    perplexity_budget: float = 0.15,
    svd_ranks: Sequence[int] | None = None,
    primary_set: str | None = None,
    batch_size: int = 16,
    pad_token_id: int | None = None,
) -> SweepResult:
    """Measure every ρ × layer choice (and optionally an SVD baseline) and pick the best edit within budget.

    Args:
        model: the unedited model the eigenbases were computed on.
        eigen: eigenbases from :func:`~hf_curvedit.eigendecompose`.
        recitation_sets: name → set of (prefix, suffix) pairs to recite.
        heldout: held-out text for perplexity.
        keep_masses: the ρ values to try.
        layer_choices: label → ``target_modules`` regex; default: every module that has an eigenbasis.
        perplexity_budget: the largest relative perplexity increase allowed for the pick (0.15 = +15%).
        svd_ranks: ranks for the SVD-truncation baseline on the chosen edit's modules; the point whose
            perplexity change is closest to the chosen edit's is reported as ``svd_match``.
        primary_set: the recitation set the pick minimizes (default: the first).
    """
    from .tuner import CurvatureEditConfig, build_curvature_edit

    if not recitation_sets:
        raise ValueError("a sweep needs at least one recitation set")
    primary = primary_set or next(iter(recitation_sets))
    if primary not in recitation_sets:
        raise KeyError(f"primary_set {primary!r} is not one of {list(recitation_sets)}")
    if not 0 < perplexity_budget:
        raise ValueError("perplexity_budget must be positive (e.g. 0.15 for +15%)")
    if layer_choices is None:
        layer_choices = {"all": "|".join(re.escape(n) for n in eigen)}
    for label, regex in layer_choices.items():
        names = resolve_target_modules(model, regex)
        missing = [n for n in names if n not in eigen]
        if missing:
            raise ValueError(f"layer choice {label!r} selects modules without factors: {missing[:4]}; fit factors "
                             "for them or narrow the regex")

    model.eval()
    rec, ppl = _measure(model, recitation_sets, heldout, batch_size, pad_token_id)
    base = SweepPoint("base", "–", None, None, None, rec, ppl, 0.0)
    points: list[SweepPoint] = []
    grid = [(label, regex, rho) for label, regex in layer_choices.items() for rho in keep_masses]
    current: nn.Module = model
    for label, regex, rho in tqdm(grid, desc="sweep", unit="edit"):
        edited = build_curvature_edit(current, eigen, CurvatureEditConfig(keep_mass=rho, target_modules=regex))
        rec, p = _measure(edited, recitation_sets, heldout, batch_size, pad_token_id)
        points.append(SweepPoint("curvedit", label, regex, rho, None, rec, p, p / base.perplexity - 1))
        current = edited.unload()

    within = [p for p in points if p.perplexity_change <= perplexity_budget]
    chosen = min(within, key=lambda p: (p.recitation[primary]["strict"], p.perplexity)) if within else None
    result = SweepResult(base, points, perplexity_budget, primary, chosen)

    if svd_ranks and chosen is not None:
        names = resolve_target_modules(current, chosen.target_modules)
        mods = dict(current.named_modules())
        max_rank = min(min(linear_shape(mods[n])) for n in names)
        svd_points = []
        for k in tqdm([k for k in svd_ranks if 0 < k < max_rank], desc="svd baseline", unit="rank"):
            with svd_truncation(current, names, k):
                rec, p = _measure(current, recitation_sets, heldout, batch_size, pad_token_id)
            svd_points.append(SweepPoint("svd", chosen.layers, chosen.target_modules, None, k, rec, p,
                                         p / base.perplexity - 1))
        result.points.extend(svd_points)
        if svd_points:
            result.svd_match = min(svd_points, key=lambda q: abs(q.perplexity_change - chosen.perplexity_change))
    return result
