"""`Measurements`: the stages of a sweep over one model (the base, the grid, the allocation search, the baselines at
matched perplexity, the capabilities). Every edit is built from the same eigenbases, measured and removed again."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..baselines import svd_truncation, train_balanced_subnet
from ..evaluation import RecitationSet, TextSet, evaluate_recitation
from ..evaluation.coherence import DEFAULT_NDCG_K, ndcg_at_k
from ..evaluation.perplexity import perplexity_from_nll, score_text
from ..targets import resolve_target_modules, weight_targets
from .allocation import allocation_pattern, module_groups, search_allocation
from .result import SweepPoint, SweepResult

__all__ = ["Measurements"]


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


class Measurements:
    """The sweep's stages over one model: the base, the grid of edits, the baselines at matched perplexity, the
    capabilities. Every edit is built on the model and removed again (``self.model`` is the model without adapter
    layers after each stage, also after an error)."""

    def __init__(self, model: nn.Module, sets: Mapping[str, RecitationSet], heldout: TextSet, config: Any,
                 eigen: Any, exposure_texts: Mapping[str, Any] | None = None):
        self.model, self.sets, self.heldout, self.config, self.eigen = model, sets, heldout, config, eigen
        self.exposure_texts = exposure_texts
        self.pending: list[tuple[SweepPoint, Any]] = []  # candidates whose exposure is still to be measured
        self.groups: dict[str, dict[str, list[str]]] = {}  # target_modules -> the allocation's groups
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

        edited = self.build(rho, regex, pattern)
        try:
            point = self.point("curvedit", label, regex, edited, keep_mass=rho)
            point.keep_mass_pattern = dict(pattern) if pattern else None
            for name, value in fields.items():
                setattr(point, name, value)
            if self.exposure_texts:
                self.pending.append((point, adapter_edits(edited, edited.active_adapter)))
        finally:  # the caller's model comes back without adapter layers, also after an error
            self.model = edited.unload()
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
        """Every ρ × layer choice, each with its exposure to each task when exposure texts are given."""
        grid = [(label, regex, rho) for label, regex in layer_choices.items() for rho in self.config.keep_masses]
        points = [self.candidate(label, regex, rho) for label, regex, rho in tqdm(grid, desc="sweep", unit="edit")]
        self.exposures()
        return points

    def groups_of(self, regex: str) -> dict[str, list[str]]:
        if regex not in self.groups:
            self.groups[regex] = module_groups(resolve_target_modules(self.model, regex), self.config.allocation)
        return self.groups[regex]

    def search(self, points: list[SweepPoint], pick: Callable[[list[SweepPoint]], SweepPoint | None]) -> dict[str, Any]:
        """The allocation search from ``pick(points)`` (`search_allocation`); its candidates join ``points``."""
        def measure(start: SweepPoint, allocation: dict[str, float], round_: int) -> SweepPoint:
            assert start.target_modules is not None and start.keep_mass is not None
            pattern = allocation_pattern(self.groups_of(start.target_modules), allocation)
            return self.candidate(start.layers, start.target_modules, start.keep_mass, pattern,
                                  allocation=allocation, search_round=round_)

        return search_allocation(points, pick, measure, self.groups_of,
                                 self.config.allocation_steps, self.config.allocation_max_candidates,
                                 after_round=lambda _: self.exposures())

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
