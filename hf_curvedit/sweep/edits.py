"""`sweep_edits` and its `SweepConfig`: the stages of a sweep (check, the grid of edits, the allocation search, the
pick, the baselines at matched perplexity, the capabilities) over one model, each edit built from the same eigenbases
and removed again (`Measurements`); `pick_edit`, the pick rule."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..baselines import BASELINES, BalancedSubnetConfig
from ..curvature.eigen import KFACEigen
from ..errors import InputError, InputKeyError
from ..evaluation import RecitationSet, TextSet
from ..targets import resolve_target_modules, weight_targets
from ..utils import fill_unset_fields
from .allocation import ALLOCATIONS
from .measure import Measurements
from .result import SweepPoint, SweepResult
from .scale import default_layer_choices

__all__ = ["SweepConfig", "check_allocation", "pick_edit", "sweep_edits"]


def check_allocation(allocation: str, steps: tuple[float, ...], max_candidates: int) -> None:
    """Refuse allocation settings the search cannot run with, naming the fix."""
    if allocation not in ALLOCATIONS:
        raise InputError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if not steps or any(not s > 1 for s in steps):
        raise InputError(f"allocation_steps are the factors by which a move multiplies or divides a group's removed "
                         f"mass 1 − ρ, each > 1, coarse to fine, e.g. (2.0, 1.41); got {list(steps)}")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 1:
        raise InputError(f"allocation_max_candidates is the most candidates the search measures: a positive integer "
                         f"(e.g. 24), got {max_candidates!r}")


@dataclass
class SweepConfig:
    """The settings of a sweep (everything but the model, its factors and the data); saved in ``sweep.json``, so a
    sweep can be run again from its own output (``SweepConfig.from_dict(SweepResult.load(path).config)``).

    Any setting given as None takes its default.

    Args:
        keep_masses: the ρ values to try for every layer choice. Default (None): a ρ scale fitted to the model
            (`hf_curvedit.sweep.scale`): each layer choice is walked along removed masses 1 − ρ of 0.1, 0.05, 0.02,
            … (or 0.2, 0.5) until it brackets the perplexity budget, then refined there, so that the candidates land
            where the budget is, whether that is ρ = 0.7 or ρ = 0.999.
        layer_choices: label → ``target_modules`` regex. Default: `default_layer_choices`, windows of 2-3
            consecutive blocks across the depth, input-side projections (gate/up) and all projections (gate, up,
            down), among the modules that have an eigenbasis.
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
        allocation: ``"uniform"``: one ρ for every module of a candidate. ``"per_layer"`` (default): then a search
            gives each layer its own ρ (`search_allocation`), over every layer of every layer choice (a layer may
            stay unedited, ρ = 1), from several starts (`search_starts`): the pick so far, the strongest candidate
            just over the budget, and the best of each other layer choice. It steers by Strict and then the
            recitation margin (smooth where Strict is a step), and the pick rule decides over every candidate.
            ``"per_projection"``: each layer's gate/up and its down projection separately. Routed and shared experts
            go with their layer.
        allocation_steps: the search's moves: factors by which a group's removed mass 1 − ρ is multiplied (more
            removed) or divided (less), coarse to fine (each tried until it finds nothing better).
        allocation_max_candidates: the most candidates the search measures, shared by its starts.
        allocation_max_seconds: the most seconds the search may take (None: no limit).
        allocation_starts: the most starts of the search.
        scale_refinements: with the ρ scale, the midpoints measured per layer choice where its pick would be.
    """

    keep_masses: tuple[float, ...] | None = None
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
    allocation: str = "per_layer"
    allocation_steps: tuple[float, ...] = (2.0, 1.41)
    allocation_max_candidates: int = 24
    allocation_max_seconds: float | None = None
    allocation_starts: int = 4
    scale_refinements: int = 2

    def __post_init__(self) -> None:
        fill_unset_fields(self)
        from ..selection import SELECTIONS

        if self.pick_by not in ("recitation", "predicted_cost"):
            raise InputError(f"pick_by must be 'recitation' or 'predicted_cost', got {self.pick_by!r}")
        if not 0 <= self.recitation_tolerance <= 1:
            raise InputError(f"recitation_tolerance is a fraction in [0, 1] (0.02 = 2 points), got "
                             f"{self.recitation_tolerance}")
        if self.selection not in SELECTIONS:
            raise InputError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        self.keep_masses = tuple(self.keep_masses) if self.keep_masses else None
        bad = [r for r in self.keep_masses or () if not 0 < r <= 1]
        if bad:
            raise InputError(f"keep_masses are fractions of the curvature mass in (0, 1], got {bad[0]!r}; leave them "
                             "unset for a ρ scale fitted to the model")
        if self.allocation_starts < 1 or self.scale_refinements < 0:
            raise InputError("allocation_starts must be at least 1 and scale_refinements at least 0")
        if self.allocation_max_seconds is not None and not self.allocation_max_seconds > 0:
            raise InputError(f"allocation_max_seconds must be positive or None, got {self.allocation_max_seconds}")
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
        self.allocation_steps = tuple(float(s) for s in self.allocation_steps)
        check_allocation(self.allocation, self.allocation_steps, self.allocation_max_candidates)

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
        if any(s <= 1 for s in data.get("allocation_steps") or ()):
            # a sweep.json written when the search moved ρ by a step (0.05): what it measured reads the same, and a
            # rerun moves by the factors of today's default
            data.pop("allocation_steps")
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
    layer_choices = config.layer_choices or default_layer_choices(_shapes(model, general))
    measure = Measurements(model, recitation_sets, heldout, config, eigen, primary,
                           _exposure_sets(exposure_texts, tokenizer))
    points = measure.grid(layer_choices)
    extra = _extra(config)
    if config.layer_choices is None:
        extra["layer_choices"] = dict(layer_choices)
    if config.allocation != "uniform":
        search = measure.search(points, layer_choices, lambda pts: pick_edit(pts, primary, config))
        extra["allocation_search"] = {"allocation": config.allocation, **search}
    chosen = pick_edit(points, primary, config)
    result = SweepResult(measure.base, points, config.perplexity_budget, primary, chosen, extra=extra,
                         config=config.to_dict())
    if chosen is None:
        warnings.warn(result.miss_advice(), stacklevel=2)
    else:
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



def _shapes(model: nn.Module, names: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    targets = weight_targets(model)
    return {n: (targets[n].d_out, targets[n].d_in) for n in names if n in targets}


def _exposure_sets(texts: Mapping[str, Any] | None, tokenizer: Any) -> dict[str, Any] | None:
    # converted before the grid runs, so that texts that cannot be read fail before the first measurement; a
    # RecitationSet stays one (a memorized set, which the sweep measures directly and leaves out of the cost)
    from ..exposure.measure import task_text_set

    if not texts:
        return None
    return {name: t if isinstance(t, RecitationSet) else task_text_set(name, t, tokenizer) for name, t in texts.items()}


def pick_edit(points: list[SweepPoint], primary: str, config: SweepConfig) -> SweepPoint | None:
    """The chosen edit among the measured curvature edits of ``points`` (see `SweepConfig.pick_by`), or None when none
    fits the budget. The same rule picks from a saved sweep's points: ``pick_edit(r.points, r.primary_set,
    SweepConfig.from_dict(r.config)) is r.chosen``."""
    within = [p for p in points if p.method == "curvedit" and p.perplexity_change <= config.perplexity_budget]
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
