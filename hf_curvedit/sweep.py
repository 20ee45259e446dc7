"""Sweeps: try several ρ and layer choices, pick an edit, and measure the baselines at matched perplexity.

Each candidate is built from the same eigenbases (factors of the unedited model), measured, and
removed again, so one model serves the whole sweep. The pick is the strongest suppression (lowest
Strict recitation on the primary set, then lowest perplexity) whose held-out perplexity rises by
no more than ``perplexity_budget``. The baselines (`hf_curvedit.baselines`: SVD truncation, BalancedSubnet) are
each swept over their own knob; the point whose perplexity change is closest to the pick's stands for the method
in the side-by-side comparison.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .baselines import BASELINES, BalancedSubnetConfig, svd_truncation, train_balanced_subnet
from .curvature.eigen import KFACEigen
from .evaluation import RecitationSet, TextSet, evaluate_recitation
from .evaluation.coherence import DEFAULT_NDCG_K, ndcg_at_k
from .evaluation.perplexity import perplexity_from_nll, score_text
from .targets import resolve_target_modules, weight_targets
from .utils import atomic_write_text


@dataclass
class SweepPoint:
    """One measured candidate: a curvature edit (``keep_mass``), an SVD truncation (``rank``) or a BalancedSubnet
    mask (``ratio``)."""

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

    @property
    def knob(self) -> str:
        """The point's setting in words: ``ρ=0.8``, ``k=48``, ``ratio=0.01`` or ``–``."""
        if self.keep_mass is not None:
            return f"ρ={self.keep_mass:g}"
        if self.rank is not None:
            return f"k={self.rank}"
        return f"ratio={self.ratio:g}" if self.ratio is not None else "–"


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
                   matches, dict(data.get("extra") or {}))

    def save(self, path: str | Path) -> Path:
        """Write the sweep as JSON (atomically)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Read a sweep written by :meth:`save`."""
        from .integrity import read_json_file

        return cls.from_dict(read_json_file(path, "a sweep's results (sweep.json)",
                                            "Run the sweep again (hf-curvedit sweep, or hf-curvedit run --force)"))

    def summary(self) -> str:
        """One line on the pick: its layers and ρ, Strict recitation on the primary set before → after, and the
        perplexity change; or that nothing fits the budget."""
        c = self.chosen
        if c is None:
            return f"no edit keeps the perplexity increase within {100 * self.perplexity_budget:.0f}%"
        s = self.primary_set
        protect = self.extra.get("protect") or {}
        kept = f" protecting {', '.join(f'{n} (ρ={r:g})' for n, r in protect.items())}" if protect else ""
        return (f"chosen: {c.layers} ρ={c.keep_mass:g}{kept}: {s} Strict {100 * self.base.recitation[s]['strict']:.1f}%"
                f" → {100 * c.recitation[s]['strict']:.1f}%, perplexity {c.perplexity_change * 100:+.1f}%")

    def to_markdown(self, points: Sequence[SweepPoint] | None = None) -> str:
        """A Markdown table: one row per point (default: the base and every point), Strict/Loose/AvgLev per set,
        perplexity and its change, nDCG@10 and the capability scores where measured."""
        sets = list(self.base.recitation)
        tasks = list(self.base.capabilities or {})
        head = ["method", "layers", "setting"] + [f"{s} {m}" for s in sets for m in ("Strict %", "Loose %", "AvgLev")]
        head += ["PPL", "ΔPPL", "nDCG@10"] + tasks
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
            cells += ["–" if not p.capabilities or t not in p.capabilities else f"{p.capabilities[t]:.3f}"
                      for t in tasks]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def pick_mismatch(self, adapter_config: Mapping[str, Any]) -> str | None:
        """How an adapter's config (``adapter_config.json`` content) differs from the sweep's pick, or ``None`` when
        the adapter is the pick (same ρ, modules and protection, default selection, no rank cap)."""
        c = self.chosen
        if c is None:
            return "the sweep chose no edit"
        protect = dict(self.extra.get("protect") or {})
        checks = [
            ("keep_mass", adapter_config.get("keep_mass"), c.keep_mass),
            ("target_modules", adapter_config.get("target_modules"), c.target_modules),
            ("protect", dict(adapter_config.get("protect") or {}), protect),
            ("keep_mass_pattern", dict(adapter_config.get("keep_mass_pattern") or {}), {}),
            ("selection", adapter_config.get("selection", "curvature_mass"), "curvature_mass"),
            ("rank_cap", adapter_config.get("rank_cap"), None),
        ]
        diffs = [f"{name} is {have!r}, the pick's is {want!r}" for name, have, want in checks if have != want]
        return "; ".join(diffs) or None

    def report_markdown(self) -> str:
        """Every point (`to_markdown`), then, when baselines were measured, the side-by-side `comparison`."""
        text = self.to_markdown()
        return text + "\n\nAt matched perplexity:\n\n" + self.comparison() if self.matches else text

    def comparison(self) -> str:
        """The side-by-side table: the base, the chosen edit and each baseline at matched perplexity."""
        return self.to_markdown([self.base, *([self.chosen] if self.chosen else []), *self.matches.values()])


def _measure(model: nn.Module, sets: Mapping[str, RecitationSet], heldout: TextSet, batch_size: int,
             pad_token_id: int | None, base_topk: torch.Tensor | None = None,
             ) -> tuple[dict[str, dict[str, float]], float, float | None, torch.Tensor]:
    rec = {}
    for name, s in sets.items():
        r = evaluate_recitation(model, s.prefixes, s.suffixes, batch_size=batch_size, pad_token_id=pad_token_id,
                                show_progress=False)
        rec[name] = {"strict": r.strict, "loose": r.loose, "avg_lev": r.avg_lev}
    nll, n, topk = score_text(model, heldout.sequences, batch_size=batch_size, top_k=DEFAULT_NDCG_K,
                              pad_token_id=pad_token_id, show_progress=False)
    assert topk is not None
    ndcg = ndcg_at_k(topk, base_topk) if base_topk is not None else None
    return rec, perplexity_from_nll(nll, n), ndcg, topk


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
    protect: Mapping[str, float] | None = None,
    baselines: Sequence[str] | None = None,
    balanced_subnet: BalancedSubnetConfig | None = None,
    balanced_subnet_ratios: Sequence[float] = (0.0015, 0.005, 0.01, 0.02, 0.05),
    clean: TextSet | None = None,
    capabilities: Any = None,
    tokenizer: Any = None,
) -> SweepResult:
    """Measure every ρ × layer choice and the baselines, and pick the best edit within budget.

    Args:
        model: the unedited model the eigenbases were computed on.
        eigen: eigenbases from :func:`~hf_curvedit.eigendecompose`.
        recitation_sets: name → set of (prefix, suffix) pairs to recite.
        heldout: held-out text for perplexity and nDCG@10 (against the base's top-10).
        keep_masses: the ρ values to try.
        layer_choices: label → ``target_modules`` regex; default: every module that has an eigenbasis.
        perplexity_budget: the largest relative perplexity increase allowed for the pick (0.15 = +15%).
        svd_ranks: ranks for the SVD-truncation baseline on the chosen edit's modules.
        primary_set: the recitation set the pick minimizes (default: the first).
        protect: protected domains (name → ρ) for every candidate, as `CurvatureEditConfig.protect`; ``eigen`` is then
            a dict of factor sets, ``{"general": eigen, name: eigen_domain, ...}``.
        baselines: which of `hf_curvedit.baselines.BASELINES` to measure: ``"svd"`` (over ``svd_ranks``) and
            ``"balanced_subnet"`` (one mask per ratio of ``balanced_subnet_ratios``, trained on all recitation sets
            against ``clean``). Default: ``["svd"]`` when ``svd_ranks`` is given. For each, the point whose perplexity
            change is closest to the chosen edit's is ``result.matches[name]``.
        balanced_subnet: the BalancedSubnet settings (default: the published ones; ``ratio`` comes from the grid).
        balanced_subnet_ratios: the ratios tried.
        clean: text BalancedSubnet keeps (its λ term); not the held-out text, which judges every method.
        capabilities: a `CapabilityConfig`: lm-eval tasks scored on the base, the chosen edit and each match (needs
            ``tokenizer``).
    """
    from .tuner import CurvatureEditConfig, build_curvature_edit
    from .tuner.model import _split_factor_sets

    protect = dict(protect or {})
    general, _ = _split_factor_sets(eigen, CurvatureEditConfig(protect=protect))
    baselines = list(baselines if baselines is not None else (["svd"] if svd_ranks else []))
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    if "svd" in baselines and not svd_ranks:
        raise ValueError("the svd baseline needs svd_ranks (e.g. [16, 32, 64])")
    if "balanced_subnet" in baselines and clean is None:
        raise ValueError("the balanced_subnet baseline needs `clean`: a TextSet of text to keep (e.g. the factor "
                         "data), which its loss balances against the memorized sets")
    subnet_configs = []
    if "balanced_subnet" in baselines:  # every ratio is checked before the first measurement
        settings = balanced_subnet or BalancedSubnetConfig()
        subnet_configs = [dataclasses.replace(settings, ratio=ratio) for ratio in balanced_subnet_ratios]
    if capabilities is not None and tokenizer is None:
        raise ValueError("capabilities need the tokenizer")
    if not recitation_sets:
        raise ValueError("a sweep needs at least one recitation set")
    primary = primary_set or next(iter(recitation_sets))
    if primary not in recitation_sets:
        raise KeyError(f"primary_set {primary!r} is not one of {list(recitation_sets)}")
    if not 0 < perplexity_budget:
        raise ValueError("perplexity_budget must be positive (e.g. 0.15 for +15%)")
    if layer_choices is None:
        layer_choices = {"all": "|".join(re.escape(n) for n in general)}
    for label, regex in layer_choices.items():
        names = resolve_target_modules(model, regex)
        missing = [n for n in names if n not in general]
        if missing:
            raise ValueError(f"layer choice {label!r} selects modules without factors: {missing[:4]}; fit factors "
                             "for them or narrow the regex")
    if capabilities is not None:
        from .evaluation.capabilities import check_tasks

        check_tasks(capabilities)  # before any measurement

    model.eval()
    rec, ppl, _, base_topk = _measure(model, recitation_sets, heldout, batch_size, pad_token_id)
    base = SweepPoint("base", "–", None, None, None, rec, ppl, 0.0, ndcg=1.0)

    def point(method: str, label: str, regex: str | None, m: nn.Module, **knob: Any) -> SweepPoint:
        rec, p, ndcg, _ = _measure(m, recitation_sets, heldout, batch_size, pad_token_id, base_topk)
        return SweepPoint(method, label, regex, knob.get("keep_mass"), knob.get("rank"), rec, p,
                          p / base.perplexity - 1, ratio=knob.get("ratio"), ndcg=ndcg)

    def build(m: nn.Module, rho: float, regex: str) -> Any:
        return build_curvature_edit(m, eigen, CurvatureEditConfig(keep_mass=rho, target_modules=regex, protect=protect))

    points: list[SweepPoint] = []
    grid = [(label, regex, rho) for label, regex in layer_choices.items() for rho in keep_masses]
    current: nn.Module = model
    for label, regex, rho in tqdm(grid, desc="sweep", unit="edit"):
        edited = build(current, rho, regex)
        try:
            points.append(point("curvedit", label, regex, edited, keep_mass=rho))
        finally:  # the caller's model comes back without adapter layers, also after an error
            current = edited.unload()

    within = [p for p in points if p.perplexity_change <= perplexity_budget]
    chosen = min(within, key=lambda p: (p.recitation[primary]["strict"], p.perplexity)) if within else None
    result = SweepResult(base, points, perplexity_budget, primary, chosen,
                         extra={"protect": protect} if protect else {})
    if chosen is None:
        return result

    # Each baseline: its grid, then the point nearest the chosen edit's perplexity change, and how to recreate it.
    recreate: dict[int, Any] = {}
    if "svd" in baselines:
        names = resolve_target_modules(current, chosen.target_modules)
        targets = weight_targets(current)
        max_rank = min(min(targets[n].d_out, targets[n].d_in) for n in names)
        svd_points = []
        for k in tqdm([k for k in svd_ranks or () if 0 < k < max_rank], desc="svd baseline", unit="rank"):
            with svd_truncation(current, names, k):
                svd_points.append(point("svd", chosen.layers, chosen.target_modules, current, rank=k))
            recreate[id(svd_points[-1])] = lambda m=current, names=names, k=k: svd_truncation(m, names, k)
        result.points.extend(svd_points)
        if svd_points:
            result.matches["svd"] = min(svd_points, key=lambda q: abs(q.perplexity_change - chosen.perplexity_change))
    if subnet_configs:
        memorized = [list(p) + list(s) for rs in recitation_sets.values() for p, s in zip(rs.prefixes, rs.suffixes)]
        subnet_points = []
        for cfg in tqdm(subnet_configs, desc="BalancedSubnet baseline", unit="ratio"):
            masks = train_balanced_subnet(current, memorized, clean, cfg, pad_token_id=pad_token_id,
                                          show_progress=False)
            label = "all MLP" if cfg.target_modules is None else str(cfg.target_modules)
            with masks.applied(current):
                subnet_points.append(point("balanced_subnet", label, None, current, ratio=cfg.ratio))
            recreate[id(subnet_points[-1])] = lambda m=current, masks=masks: masks.applied(m)
        result.points.extend(subnet_points)
        if subnet_points:
            result.matches["balanced_subnet"] = min(
                subnet_points, key=lambda q: abs(q.perplexity_change - chosen.perplexity_change))

    if capabilities is not None:
        from .evaluation.capabilities import capability_scores

        base.capabilities = capability_scores(current, tokenizer, capabilities)
        edited = build(current, chosen.keep_mass, chosen.target_modules)
        try:
            chosen.capabilities = capability_scores(edited, tokenizer, capabilities)
        finally:
            current = edited.unload()
        for match in result.matches.values():
            with recreate[id(match)]():
                match.capabilities = capability_scores(current, tokenizer, capabilities)
    return result
