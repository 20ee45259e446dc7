"""`sweep_edits` and its `SweepConfig`: the stages of a sweep (check, the grid of edits, the pick, the baselines at
matched perplexity, the capabilities) over one model, each edit built from the same eigenbases and removed again."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..baselines import BASELINES, BalancedSubnetConfig, svd_truncation, train_balanced_subnet
from ..curvature.eigen import KFACEigen
from ..errors import InputError, InputKeyError
from ..evaluation import RecitationSet, TextSet, evaluate_recitation
from ..evaluation.coherence import DEFAULT_NDCG_K, ndcg_at_k
from ..evaluation.perplexity import perplexity_from_nll, score_text
from ..targets import resolve_target_modules, weight_targets
from .result import SweepPoint, SweepResult

__all__ = ["SweepConfig", "sweep_edits"]


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


@dataclass
class SweepConfig:
    """The settings of a sweep (everything but the model, its factors and the data); saved in ``sweep.json``, so a
    sweep can be run again from its own output (``SweepConfig.from_dict(SweepResult.load(path).config)``).

    Args:
        keep_masses: the ρ values to try.
        layer_choices: label → ``target_modules`` regex; default: every module that has an eigenbasis.
        perplexity_budget: the largest relative perplexity increase allowed for the pick (0.15 = +15%).
        svd_ranks: ranks for the SVD-truncation baseline on the chosen edit's modules.
        primary_set: the recitation set the pick minimizes (default: the first).
        batch_size: sequences per forward pass of the measurements.
        pad_token_id: padding id of the measurements (default: the model's).
        protect: protected domains (name → ρ) for every candidate, as `CurvatureEditConfig.protect`; the eigenbases
            are then a dict of factor sets, ``{"general": eigen, name: eigen_domain, ...}``.
        baselines: which of `hf_curvedit.baselines.BASELINES` to measure: ``"svd"`` (over ``svd_ranks``) and
            ``"balanced_subnet"`` (one mask per ratio of ``balanced_subnet_ratios``, trained on all recitation sets
            against ``clean``). Default: ``["svd"]`` when ``svd_ranks`` is given. For each, the point whose perplexity
            change is closest to the chosen edit's is ``result.matches[name]``.
        balanced_subnet: the BalancedSubnet settings (default: the published ones; ``ratio`` comes from the grid).
        balanced_subnet_ratios: the ratios tried.
        capabilities: a `CapabilityConfig`: lm-eval tasks scored on the base, the chosen edit and each match (needs
            the tokenizer).
        selection: which components every candidate keeps, as `CurvatureEditConfig.selection` (``"ekfac_mass"``
            needs the EK-FAC corrected eigenvalues beside the bases).
        pick_by: ``"recitation"``: the lowest Strict recitation of the primary set within the perplexity budget (ties:
            the lower perplexity). ``"predicted_cost"``: among the candidates within the budget whose Strict is at most
            ``recitation_tolerance`` above that lowest one, the one of lowest predicted capability cost (the mean
            exposure of ``sweep_edits(exposure_texts=...)``), so that lm-eval runs on the pick alone.
        recitation_tolerance: how much more Strict recitation (a fraction: 0.02 = 2 points) ``"predicted_cost"`` may
            accept for a lower cost.
    """

    keep_masses: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    layer_choices: dict[str, str] | None = None
    perplexity_budget: float = 0.15
    svd_ranks: tuple[int, ...] | None = None
    primary_set: str | None = None
    batch_size: int = 16
    pad_token_id: int | None = None
    protect: dict[str, float] = field(default_factory=dict)
    baselines: tuple[str, ...] | None = None
    balanced_subnet: BalancedSubnetConfig | None = None
    balanced_subnet_ratios: tuple[float, ...] = (0.0015, 0.005, 0.01, 0.02, 0.05)
    capabilities: Any = None
    selection: str = "curvature_mass"
    pick_by: str = "recitation"
    recitation_tolerance: float = 0.02

    def __post_init__(self) -> None:
        from ..selection import SELECTIONS

        if self.pick_by not in ("recitation", "predicted_cost"):
            raise InputError(f"pick_by must be 'recitation' or 'predicted_cost', got {self.pick_by!r}")
        if not 0 <= self.recitation_tolerance <= 1:
            raise InputError(f"recitation_tolerance is a fraction in [0, 1] (0.02 = 2 points), got "
                             f"{self.recitation_tolerance}")
        if self.selection not in SELECTIONS:
            raise InputError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        self.keep_masses = tuple(self.keep_masses)
        self.svd_ranks = tuple(self.svd_ranks) if self.svd_ranks else None
        self.protect = dict(self.protect or {})
        self.baselines = tuple(self.baselines if self.baselines is not None else (["svd"] if self.svd_ranks else []))
        self.balanced_subnet_ratios = tuple(self.balanced_subnet_ratios)
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise InputError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
        if "svd" in self.baselines and not self.svd_ranks:
            raise InputError("the svd baseline needs svd_ranks (e.g. [16, 32, 64])")
        if not 0 < self.perplexity_budget:
            raise InputError("perplexity_budget must be positive (e.g. 0.15 for +15%)")

    def subnet_configs(self) -> list[BalancedSubnetConfig]:
        """One BalancedSubnet setting per ratio (each checked when made), or none without that baseline."""
        if "balanced_subnet" not in self.baselines:
            return []
        settings = self.balanced_subnet or BalancedSubnetConfig()
        return [dataclasses.replace(settings, ratio=ratio) for ratio in self.balanced_subnet_ratios]

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON types."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("balanced_subnet", "capabilities"):
            if out[key] is not None:
                out[key] = json.loads(json.dumps(asdict(out[key]), default=str))
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepConfig:
        """Inverse of `to_dict`."""
        data = dict(data)
        if data.get("balanced_subnet") is not None:
            data["balanced_subnet"] = BalancedSubnetConfig(**data["balanced_subnet"])
        if data.get("capabilities") is not None:
            from ..evaluation.capabilities import CapabilityConfig

            data["capabilities"] = CapabilityConfig(**data["capabilities"])
        return cls(**data)


_LEGACY_KEYWORDS = {f.name for f in dataclasses.fields(SweepConfig)}


def sweep_edits(
    model: nn.Module,
    eigen: KFACEigen | Mapping[str, Any],
    recitation_sets: Mapping[str, RecitationSet],
    heldout: TextSet,
    config: SweepConfig | None = None,
    *,
    clean: TextSet | None = None,
    tokenizer: Any = None,
    exposure_texts: Mapping[str, Any] | None = None,
    **legacy: Any,
) -> SweepResult:
    """Measure every ρ × layer choice and the baselines, and pick the best edit within budget.

    Args:
        model: the unedited model the eigenbases were computed on.
        eigen: eigenbases from :func:`~hf_curvedit.eigendecompose` (a dict of factor sets with protected domains).
        recitation_sets: name → set of (prefix, suffix) pairs to recite.
        heldout: held-out text for perplexity and nDCG@10 (against the base's top-10).
        config: the settings (`SweepConfig`). The settings' names as keywords (``keep_masses=...``, as before the
            config existed) still work, with a DeprecationWarning.
        clean: text BalancedSubnet keeps (its λ term); not the held-out text, which judges every method.
        tokenizer: needed by ``config.capabilities`` (and by ``exposure_texts`` given as raw text).
        exposure_texts: task name → texts (`hf_curvedit.exposure.TaskTexts`, e.g. from `lm_eval_task_texts`): every
            candidate gets each task's exposure (``point.exposure``) and its predicted capability cost, their mean
            (``point.predicted_cost``); forward passes only. Needed by ``pick_by="predicted_cost"``.
    """
    if legacy:
        unknown = sorted(set(legacy) - _LEGACY_KEYWORDS)
        if unknown:
            raise TypeError(f"sweep_edits() got unexpected keyword arguments {unknown}")
        if config is not None:
            raise TypeError("give the settings either as config=SweepConfig(...) or as keywords, not both")
        warnings.warn("sweep_edits(..., keep_masses=..., ...) is deprecated: pass config=SweepConfig(...)",
                      DeprecationWarning, stacklevel=2)
        config = SweepConfig(**legacy)
    config = config or SweepConfig()
    general, primary = _check(model, eigen, recitation_sets, config, clean, tokenizer)
    if config.pick_by == "predicted_cost" and not exposure_texts:
        raise InputError("pick_by='predicted_cost' ranks candidates by their exposure: pass exposure_texts (task name "
                         "-> texts, e.g. lm_eval_task_texts(CapabilityConfig(...), tokenizer))")
    layer_choices = config.layer_choices or {"all": "|".join(re.escape(n) for n in general)}
    measure = _Measure(model, recitation_sets, heldout, config, eigen)
    points = measure.grid(layer_choices, _exposure_sets(exposure_texts, tokenizer))
    chosen = _pick(points, primary, config)
    result = SweepResult(measure.base, points, config.perplexity_budget, primary, chosen,
                         extra=_extra(config), config=config.to_dict())
    if chosen is not None:
        recreate = measure.baselines(result, clean)
        if config.capabilities is not None:
            measure.capabilities(result, recreate, tokenizer)
    return result


def _check(model: nn.Module, eigen: Any, recitation_sets: Mapping[str, RecitationSet], config: SweepConfig,
           clean: TextSet | None, tokenizer: Any) -> tuple[Any, str]:
    """Everything that can be refused before the first measurement: ``(general eigenbases, primary set)``."""
    from ..tuner import CurvatureEditConfig
    from ..tuner.build import split_factor_sets

    general, _ = split_factor_sets(eigen, CurvatureEditConfig(protect=config.protect))
    if "balanced_subnet" in config.baselines and clean is None:
        raise InputError("the balanced_subnet baseline needs `clean`: a TextSet of text to keep (e.g. the factor "
                         "data), which its loss balances against the memorized sets")
    config.subnet_configs()  # every ratio is checked before the first measurement
    if config.capabilities is not None and tokenizer is None:
        raise InputError("capabilities need the tokenizer")
    if not recitation_sets:
        raise InputError("a sweep needs at least one recitation set")
    primary = config.primary_set or next(iter(recitation_sets))
    if primary not in recitation_sets:
        raise InputKeyError(f"primary_set {primary!r} is not one of {list(recitation_sets)}")
    for label, regex in (config.layer_choices or {}).items():
        names = resolve_target_modules(model, regex)
        missing = [n for n in names if n not in general]
        if missing:
            raise InputError(f"layer choice {label!r} selects modules without factors: {missing[:4]}; fit factors "
                             "for them or narrow the regex")
    if config.capabilities is not None:
        from ..evaluation.capabilities import check_tasks

        check_tasks(config.capabilities)
    return general, primary



def _exposure_sets(texts: Mapping[str, Any] | None, tokenizer: Any) -> dict[str, Any] | None:
    # converted before the grid runs, so that texts that cannot be read fail before the first measurement; a
    # RecitationSet stays one (a memorized set, which the sweep measures directly and leaves out of the cost)
    from ..exposure.measure import task_text_set

    if not texts:
        return None
    return {name: t if isinstance(t, RecitationSet) else task_text_set(name, t, tokenizer) for name, t in texts.items()}


def _pick(points: list[SweepPoint], primary: str, config: SweepConfig) -> SweepPoint | None:
    """The chosen edit among the measured ones (see `SweepConfig.pick_by`), or None when none fits the budget."""
    within = [p for p in points if p.perplexity_change <= config.perplexity_budget]
    if not within:
        return None
    strict = lambda p: p.recitation[primary]["strict"]  # noqa: E731
    if config.pick_by == "recitation":
        return min(within, key=lambda p: (strict(p), p.perplexity))
    best = min(strict(p) for p in within)
    near = [p for p in within if strict(p) <= best + config.recitation_tolerance]
    return min(near, key=lambda p: (p.predicted_cost, strict(p), p.perplexity))


def _extra(config: SweepConfig) -> dict[str, Any]:
    """What an edit must share with the pick besides ρ and modules (checked by `SweepResult.pick_mismatch`)."""
    extra: dict[str, Any] = {"protect": config.protect} if config.protect else {}
    if config.selection != "curvature_mass":
        extra["selection"] = config.selection
    return extra

class _Measure:
    """The sweep's stages over one model: the base, the grid of edits, the baselines at matched perplexity, the
    capabilities. Every edit is built on the model and removed again (``self.model`` is the model without adapter
    layers after each stage, also after an error)."""

    def __init__(self, model: nn.Module, sets: Mapping[str, RecitationSet], heldout: TextSet, config: SweepConfig,
                 eigen: Any):
        self.model, self.sets, self.heldout, self.config, self.eigen = model, sets, heldout, config, eigen
        model.eval()
        rec, ppl, _, self.base_topk = _measure(model, sets, heldout, config.batch_size, config.pad_token_id)
        self.base = SweepPoint("base", "–", None, None, None, rec, ppl, 0.0, ndcg=1.0)

    def point(self, method: str, label: str, regex: str | None, m: nn.Module, **knob: Any) -> SweepPoint:
        rec, p, ndcg, _ = _measure(m, self.sets, self.heldout, self.config.batch_size, self.config.pad_token_id,
                                   self.base_topk)
        return SweepPoint(method, label, regex, knob.get("keep_mass"), knob.get("rank"), rec, p,
                          p / self.base.perplexity - 1, ratio=knob.get("ratio"), ndcg=ndcg)

    def build(self, rho: float, regex: str) -> Any:
        from ..tuner import CurvatureEditConfig, build_curvature_edit

        return build_curvature_edit(self.model, self.eigen, CurvatureEditConfig(
            keep_mass=rho, target_modules=regex, protect=self.config.protect, selection=self.config.selection))

    def grid(self, layer_choices: Mapping[str, str], exposure_texts: Mapping[str, Any] | None,
             ) -> list[SweepPoint]:
        """Every ρ × layer choice, with each task's exposure when ``exposure_texts`` are given: every candidate's
        edits are kept until one forward pass per task has measured them all."""
        from ..exposure.measure import adapter_edits, measure_exposure

        points, edits = [], {}
        grid = [(label, regex, rho) for label, regex in layer_choices.items() for rho in self.config.keep_masses]
        for label, regex, rho in tqdm(grid, desc="sweep", unit="edit"):
            edited = self.build(rho, regex)
            try:
                points.append(self.point("curvedit", label, regex, edited, keep_mass=rho))
                if exposure_texts:
                    edits[len(points) - 1] = adapter_edits(edited, edited.active_adapter)
            finally:  # the caller's model comes back without adapter layers, also after an error
                self.model = edited.unload()
        if exposure_texts:
            report = measure_exposure(self.model, {str(i): e for i, e in edits.items()}, exposure_texts,
                                      batch_size=self.config.batch_size, show_progress=False)
            for i in edits:
                points[i].exposure = {t: v for t, v in report.exposures(str(i)).items() if t not in report.memorized}
        return points

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
        edited = self.build(chosen.keep_mass, chosen.target_modules)
        try:
            chosen.capabilities = capability_scores(edited, tokenizer, tasks)
        finally:
            self.model = edited.unload()
        for match in result.matches.values():
            with recreate[id(match)]():
                match.capabilities = capability_scores(self.model, tokenizer, tasks)
