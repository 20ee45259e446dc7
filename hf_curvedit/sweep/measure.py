"""`Measurements`: the stages of a sweep over one model (the base, the grid or the ρ scale, the allocation search,
the baselines at matched perplexity, the capabilities). Every edit is built from the same eigenbases, measured and
removed again."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..baselines import svd_truncation, train_balanced_subnet
from ..evaluation import RecitationSet, TextSet, evaluate_recitation, recitation_margins
from ..evaluation.coherence import DEFAULT_NDCG_K, ndcg_at_k
from ..evaluation.perplexity import perplexity_from_nll, score_text
from ..targets import resolve_target_modules, weight_targets
from .allocation import SearchSpace, allocation_pattern
from .result import SweepPoint, SweepResult
from .scale import scale_layer_choice
from .search import search_allocation, search_starts

__all__ = ["Measurements"]


def _measure(model: nn.Module, sets: Mapping[str, RecitationSet], heldout: TextSet, batch_size: int,
             pad_token_id: int | None, base_topk: torch.Tensor | None = None,
             ) -> tuple[dict[str, dict[str, float]], float, float | None, torch.Tensor]:
    rec = {}
    for name, s in sets.items():
        r = evaluate_recitation(model, s.prefixes, s.suffixes, batch_size=batch_size, pad_token_id=pad_token_id,
                                show_progress=False)
        m = recitation_margins(model, s.prefixes, s.suffixes, batch_size=batch_size, pad_token_id=pad_token_id)
        rec[name] = {"strict": r.strict, "loose": r.loose, "avg_lev": r.avg_lev, "margin": m.margin,
                     "logprob": m.logprob}
    nll, n, topk = score_text(model, heldout.sequences, batch_size=batch_size, top_k=DEFAULT_NDCG_K,
                              pad_token_id=pad_token_id, show_progress=False)
    assert topk is not None
    ndcg = ndcg_at_k(topk, base_topk) if base_topk is not None else None
    return rec, perplexity_from_nll(nll, n), ndcg, topk


def _kept(edited: Any) -> dict[str, list[float]]:
    """Per edited module: the share of its components the edit keeps and the share of ‖W‖² it keeps."""
    return {r.module.removeprefix("base_model.model."): [round(r.kept_component_fraction, 6),
                                                         round(r.kept_norm_fraction ** 2, 6)]
            for r in edited.edit_report()}


class Measurements:
    """The sweep's stages over one model: the base, the grid of edits, the baselines at matched perplexity, the
    capabilities. Every edit is built on the model and removed again (``self.model`` is the model without adapter
    layers after each stage, also after an error)."""

    def __init__(self, model: nn.Module, sets: Mapping[str, RecitationSet], heldout: TextSet, config: Any,
                 eigen: Any, primary: str, exposure_texts: Mapping[str, Any] | None = None):
        self.model, self.sets, self.heldout, self.config, self.eigen = model, sets, heldout, config, eigen
        self.primary, self.exposure_texts = primary, exposure_texts
        self.pending: list[tuple[SweepPoint, Any]] = []  # candidates whose exposure is still to be measured
        self.choice_modules: dict[str, list[str]] = {}  # layer choice -> its modules
        model.eval()
        rec, ppl, _, self.base_topk = _measure(model, sets, heldout, config.batch_size, config.pad_token_id)
        self.base = SweepPoint("base", "–", None, None, None, rec, ppl, 0.0, ndcg=1.0)

    def point(self, method: str, label: str, regex: str | None, m: nn.Module, **knob: Any) -> SweepPoint:
        rec, p, ndcg, _ = _measure(m, self.sets, self.heldout, self.config.batch_size, self.config.pad_token_id,
                                   self.base_topk)
        return SweepPoint(method, label, regex, knob.get("keep_mass"), knob.get("rank"), rec, p,
                          p / self.base.perplexity - 1, ratio=knob.get("ratio"), ndcg=ndcg)

    def build(self, rho: float, regex: str, pattern: Mapping[str, float] | None = None) -> Any:
        from ..tuner import CurvatureEditConfig, build_curvature_edit

        return build_curvature_edit(self.model, self.eigen, CurvatureEditConfig(
            keep_mass=rho, keep_mass_pattern=dict(pattern or {}), target_modules=regex, protect=self.config.protect,
            selection=self.config.selection))

    def candidate(self, label: str, regex: str, rho: float, pattern: Mapping[str, float] | None = None,
                  **fields: Any) -> SweepPoint:
        """Build, measure and drop one curvature edit; with exposure texts its edits wait for `exposures`."""
        from ..exposure.measure import adapter_edits

        started = time.perf_counter()
        edited = self.build(rho, regex, pattern)
        try:
            point = self.point("curvedit", label, regex, edited, keep_mass=rho)
            point.keep_mass_pattern = dict(pattern) if pattern else None
            point.kept = _kept(edited)
            for name, value in fields.items():
                setattr(point, name, value)
            if self.exposure_texts:
                self.pending.append((point, adapter_edits(edited, edited.active_adapter)))
        finally:  # the caller's model comes back without adapter layers, also after an error
            self.model = edited.unload()
        point.seconds = round(time.perf_counter() - started, 3)
        return point

    def exposures(self) -> None:
        """Each waiting candidate's exposure to each task: one forward pass per task measures them all."""
        from ..exposure.measure import measure_exposure

        if not self.pending:
            return
        edits = {str(i): e for i, (_, e) in enumerate(self.pending)}
        report = measure_exposure(self.model, edits, self.exposure_texts, batch_size=self.config.batch_size,
                                  show_progress=False)
        for i, (point, _) in enumerate(self.pending):
            point.exposure = {t: v for t, v in report.exposures(str(i)).items() if t not in report.memorized}
        self.pending = []

    def grid(self, layer_choices: Mapping[str, str]) -> list[SweepPoint]:
        """Every layer choice's candidates, each with its exposure to each task when exposure texts are given: the
        grid of ``config.keep_masses``, or without one the ρ scale fitted to each choice (`scale_layer_choice`)."""
        if self.config.keep_masses:
            grid = [(label, regex, rho) for label, regex in layer_choices.items() for rho in self.config.keep_masses]
            points = [self.candidate(label, regex, rho, stage="grid")
                      for label, regex, rho in tqdm(grid, desc="sweep", unit="edit")]
        else:
            points, start = [], 0.1
            for label, regex in tqdm(layer_choices.items(), desc="sweep (ρ scale)", unit="layer choice"):
                measured = scale_layer_choice(
                    lambda rho, label=label, regex=regex: self.candidate(label, regex, rho, stage="scale"),
                    self.primary, self.config.perplexity_budget, self.config.scale_refinements, start)
                points += measured
                # the next choice's walk starts where this one found the budget: models differ by orders of
                # magnitude in the ρ they bear, the layer choices of one model by far less
                inside = [p for p in measured if p.perplexity_change <= self.config.perplexity_budget]
                if inside:
                    start = 1 - min(p.keep_mass for p in inside)
        self.exposures()
        return points

    def space(self, layer_choices: Mapping[str, str]) -> SearchSpace:
        """The search space of ``layer_choices`` (every group of every choice), with each choice's modules."""
        self.choice_modules = {label: resolve_target_modules(self.model, regex)
                               for label, regex in layer_choices.items()}
        return SearchSpace.of(self.choice_modules, self.config.allocation)

    def search(self, points: list[SweepPoint], layer_choices: Mapping[str, str],
               pick: Callable[[list[SweepPoint]], SweepPoint | None]) -> dict[str, Any]:
        """The allocation search (`search_allocation`) from `search_starts`; its candidates join ``points``."""
        space = self.space(layer_choices)
        budget = self.config.perplexity_budget

        def allocation_of(point: SweepPoint) -> dict[str, float] | None:
            if point.allocation:
                return dict(point.allocation)
            names = self.choice_modules.get(point.layers)
            return None if names is None or point.keep_mass is None else space.allocation_of(names, point.keep_mass)

        def measure(allocation: dict[str, float], start: int) -> SweepPoint:
            edited = {g: space.groups[g] for g in allocation}
            regex = "|".join(re.escape(n) for n in space.modules(allocation))
            return self.candidate(space.describe(allocation), regex, min(allocation.values()),
                                  allocation_pattern(edited, allocation), allocation=dict(allocation),
                                  search_round=start, stage="search")

        starts = search_starts(points, list(layer_choices), pick, self.primary, budget,
                               self.config.allocation_starts)
        record = search_allocation(points, starts, space, allocation_of, measure, self.primary, budget,
                                   self.config.allocation_steps, self.config.allocation_max_candidates,
                                   max_seconds=self.config.allocation_max_seconds,
                                   after_start=lambda _: self.exposures())
        record["groups"] = {g: list(members) for g, members in space.groups.items()}
        return record

    def baselines(self, result: SweepResult, clean: TextSet | None) -> dict[int, Any]:
        """Each baseline over its knob; the point nearest the chosen edit's perplexity change is its match. Returns
        how to recreate each point (for the capabilities)."""
        chosen, recreate = result.chosen, {}
        assert chosen is not None
        nearest = lambda pts: min(pts, key=lambda q: abs(q.perplexity_change - chosen.perplexity_change))  # noqa: E731
        m = self.model
        if "svd" in self.config.baselines:
            names = resolve_target_modules(m, chosen.target_modules)
            targets = weight_targets(m)
            max_rank = min(min(targets[n].d_out, targets[n].d_in) for n in names)
            svd_points = []
            for k in tqdm([k for k in self.config.svd_ranks or () if 0 < k < max_rank], desc="svd baseline",
                          unit="rank"):
                with svd_truncation(m, names, k):
                    svd_points.append(self.point("svd", chosen.layers, chosen.target_modules, m, rank=k))
                recreate[id(svd_points[-1])] = lambda names=names, k=k: svd_truncation(m, names, k)
            result.points.extend(svd_points)
            if svd_points:
                result.matches["svd"] = nearest(svd_points)
        subnet_configs = self.config.subnet_configs()
        if subnet_configs:
            memorized = [list(p) + list(s) for rs in self.sets.values() for p, s in zip(rs.prefixes, rs.suffixes)]
            subnet_points = []
            for cfg in tqdm(subnet_configs, desc="BalancedSubnet baseline", unit="ratio"):
                masks = train_balanced_subnet(m, memorized, clean, cfg, pad_token_id=self.config.pad_token_id,
                                              show_progress=False)
                label = "all MLP" if cfg.target_modules is None else str(cfg.target_modules)
                with masks.applied(m):
                    subnet_points.append(self.point("balanced_subnet", label, None, m, ratio=cfg.ratio))
                recreate[id(subnet_points[-1])] = lambda masks=masks: masks.applied(m)
            result.points.extend(subnet_points)
            if subnet_points:
                result.matches["balanced_subnet"] = nearest(subnet_points)
        return recreate

    def capabilities(self, result: SweepResult, recreate: Mapping[int, Any], tokenizer: Any) -> None:
        """lm-eval scores of the base, the chosen edit and each match."""
        from ..evaluation.capabilities import capability_scores

        tasks, chosen = self.config.capabilities, result.chosen
        assert chosen is not None and chosen.keep_mass is not None and chosen.target_modules is not None
        result.base.capabilities = capability_scores(self.model, tokenizer, tasks)
        edited = self.build(chosen.keep_mass, chosen.target_modules, chosen.keep_mass_pattern)
        try:
            chosen.capabilities = capability_scores(edited, tokenizer, tasks)
        finally:
            self.model = edited.unload()
        for match in result.matches.values():
            with recreate[id(match)]():
                match.capabilities = capability_scores(self.model, tokenizer, tasks)
