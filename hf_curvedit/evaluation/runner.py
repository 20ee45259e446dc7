"""`evaluate_edit`: every measurement on the base and the edited model, in one call."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..utils import fill_unset_fields
from ._common import resolve_pad_id
from .capabilities import CapabilityConfig, evaluate_capabilities
from .classification import (
    ClassificationComparison,
    ClassificationMetrics,
    ImageClassificationSet,
    evaluate_classification,
)
from .coherence import DEFAULT_NDCG_K, CoherenceResult, ndcg_at_k
from .perplexity import PerplexityResult, perplexity_from_nll, resolve_block_size, score_text
from .recitation import DEFAULT_LOOSE_THRESHOLD, evaluate_recitation
from .report import (
    EditReport,
    PerplexityComparison,
    RecitationComparison,
    RecitationMetrics,
    ReportMetadata,
    StressComparison,
)
from .sets import EvalSetLike, RecitationSet, TextSet, as_eval_set
from .stress import DEFAULT_STRESS_STEPS, StressResult, stress_test


@dataclass
class EvalConfig:
    """Settings of [`evaluate_edit`] (recorded in the report's metadata).

    Args:
        batch_size: examples (or windows) per forward pass.
        loose_threshold: Loose counts ``1 - d/L >= loose_threshold``.
        block_size / stride: sliding window for perplexity and nDCG (see [`perplexity`]).
        ndcg_k: nDCG cutoff.
        stress: run the stress test on recitation sets.
        stress_extend / stress_shorten / stress_grid: stress-test variants (see [`stress_test`]).
        show_progress: tqdm progress bars.
    """

    batch_size: int = 16
    loose_threshold: float = DEFAULT_LOOSE_THRESHOLD
    block_size: int | None = None
    stride: int | None = None
    ndcg_k: int = DEFAULT_NDCG_K
    stress: bool = True
    stress_extend: tuple[int, ...] = DEFAULT_STRESS_STEPS
    stress_shorten: tuple[int, ...] = DEFAULT_STRESS_STEPS
    stress_grid: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        fill_unset_fields(self)
        if self.batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {self.batch_size}")
        if not 0.0 <= self.loose_threshold <= 1.0:
            raise InputError(f"loose_threshold must lie in [0, 1], got {self.loose_threshold}")
        if self.ndcg_k <= 0:
            raise InputError(f"ndcg_k must be positive, got {self.ndcg_k}")
        self.stress_extend = tuple(int(x) for x in self.stress_extend)
        self.stress_shorten = tuple(int(x) for x in self.stress_shorten)


@dataclass
class _Measurements:
    recitation: dict[str, RecitationMetrics] = field(default_factory=dict)
    stress: dict[str, StressResult] = field(default_factory=dict)
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    topk: dict[str, torch.Tensor] = field(default_factory=dict)
    classification: dict[str, ClassificationMetrics] = field(default_factory=dict)


def _measure(model: torch.nn.Module, sets: Mapping[str, RecitationSet | TextSet | ImageClassificationSet],
             cfg: EvalConfig, pad_id: int, label: str) -> _Measurements:
    out = _Measurements()
    common = dict(batch_size=cfg.batch_size, pad_token_id=pad_id, show_progress=cfg.show_progress)
    for name, s in sets.items():
        if isinstance(s, ImageClassificationSet):
            out.classification[name] = evaluate_classification(model, s, batch_size=cfg.batch_size,
                                                               show_progress=cfg.show_progress,
                                                               desc=f"{label} images '{name}'")
        elif isinstance(s, RecitationSet):
            res = evaluate_recitation(model, s.prefixes, s.suffixes, loose_threshold=cfg.loose_threshold, **common)
            out.recitation[name] = RecitationMetrics.from_result(res)
            if cfg.stress:
                out.stress[name] = stress_test(model, s.prefixes, s.suffixes, contexts=s.contexts,
                                               extend=cfg.stress_extend, shorten=cfg.stress_shorten,
                                               grid=cfg.stress_grid, **common)
        else:
            block, stride = resolve_block_size(model, cfg.block_size, cfg.stride)
            nll, n, topk = score_text(model, s.sequences, block_size=block, stride=stride, top_k=cfg.ndcg_k,
                                      desc=f"{label} text '{name}'", **common)
            out.perplexity[name] = PerplexityResult(perplexity_from_nll(nll, n), nll, n, block, stride)
            assert topk is not None
            out.topk[name] = topk
    return out


def _metadata(model: Any, base_model: Any, cfg: EvalConfig, extra: Mapping[str, Any] | None) -> ReportMetadata:
    from .. import __version__

    adapter_name = peft_type = None
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()  # type: ignore[assignment]
    if isinstance(model, PeftModel):
        adapter_name = model.active_adapter if isinstance(model.active_adapter, str) else str(model.active_adapter)
        pt = getattr(model.peft_config.get(adapter_name), "peft_type", None)
        peft_type = getattr(pt, "value", None) or (str(pt) if pt is not None else None)
        base = model.get_base_model()
    else:
        base = base_model
    return ReportMetadata(
        base_model=getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        adapter_name=adapter_name,
        peft_type=peft_type,
        library_version=__version__,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        settings=dataclasses.asdict(cfg),
        extra=dict(extra or {}),
    )


def evaluate_edit(
    model: torch.nn.Module,
    sets: Mapping[str, EvalSetLike],
    tokenizer: Any = None,
    *,
    base_model: torch.nn.Module | None = None,
    config: EvalConfig | None = None,
    metadata: Mapping[str, Any] | None = None,
    capabilities: CapabilityConfig | None = None,
    exposure: Mapping[str, Any] | None = None,
    **config_kwargs: Any,
) -> EditReport:
    """Measure an edit: recitation (+ stress test) on every recitation set, perplexity and nDCG@k on every
    held-out text set, memorized-label rate / true-label accuracy or accuracy on every image set, each on
    the base and on the edited model.

    Args:
        model: the edited model. If it is a `peft.PeftModel` (any adapter type), the edited model is
            ``model`` with its active adapter on and the base is the same model inside
            ``model.disable_adapter()``: nothing is loaded twice.
        sets: name -> set; see [`as_eval_set`] for what is accepted (e.g. the dataset returned by
            [`find_memorized_windows`], ``RecitationSet.from_texts(quotes, tok)``,
            ``TextSet.from_texts(heldout, tok)``, or for an image classifier
            ``ImageClassificationSet.from_dataset(ds, processor, true_label_column="true_label")``).
        tokenizer: needed only for sets given as text; also supplies the pad id (EOS if it has no pad token).
        base_model: the unedited model, required when ``model`` is not a `peft.PeftModel`.
        config: an [`EvalConfig`]; keyword arguments override its fields (e.g. ``batch_size=8``).
        metadata: extra JSON-serializable entries for ``report.metadata.extra``.
        capabilities: lm-evaluation-harness tasks to run on the base and the edited model (see
            [`evaluate_capabilities`]); their settings go to ``report.metadata.extra["capabilities"]``.
        exposure: task name → texts (e.g. `lm_eval_task_texts` of the capability tasks and of tasks not run): each
            task's exposure to the edit goes to ``report.exposure`` (`hf_curvedit.exposure.adapter_exposure`; needs
            ``model`` to be the curvature-edit `PeftModel`).

    Example:
        ```py
        >>> peft_model = PeftModel.from_pretrained(base, "user/edit")
        >>> sets = {"memorized": windows_ds, "heldout": TextSet.from_texts(texts, tok)}
        >>> report = evaluate_edit(peft_model, sets, tok)
        >>> report.save("report.json"); report.to_table_rows()
        ```
    """
    cfg = dataclasses.replace(config, **config_kwargs) if config is not None else EvalConfig(**config_kwargs)
    if not sets and capabilities is None and not exposure:
        raise InputError("no evaluation sets given (and no capability tasks)")
    eval_sets = {name: as_eval_set(s, tokenizer) for name, s in sets.items()}
    if capabilities is not None:
        from .capabilities import check_tasks

        check_tasks(capabilities)  # an unknown task or unreachable data fails before any measurement
    from peft import PeftModel

    if exposure and not isinstance(model, PeftModel):
        raise InputError("exposure is measured from the edit's adapter: pass the curvature-edit PeftModel as `model`")
    if isinstance(model, PeftModel):
        if base_model is not None:
            raise InputError("`model` is a PeftModel, whose base is the model with the adapter disabled; "
                             "do not pass `base_model` as well")
        base, edited = model, model
        base_ctx: Callable[[], contextlib.AbstractContextManager[Any]] = model.disable_adapter
    else:
        if base_model is None:
            raise InputError("`model` is not a PeftModel, so pass the unedited model as `base_model=`")
        if base_model is model:
            raise InputError("`base_model` is the same object as `model`; nothing would be compared")
        base, edited = base_model, model
        base_ctx = contextlib.nullcontext
    pad_id = resolve_pad_id(None, tokenizer=tokenizer, model=edited)

    with base_ctx():
        base_m = _measure(base, eval_sets, cfg, pad_id, "base")
    edited_m = _measure(edited, eval_sets, cfg, pad_id, "edited")

    extra = dict(metadata or {})
    if capabilities is not None:
        extra["capabilities"] = {k: v for k, v in dataclasses.asdict(capabilities).items() if k != "include_path"}
        report_caps = evaluate_capabilities(model, tokenizer, capabilities,
                                            base_model=base_model)
    report = EditReport(metadata=_metadata(model, base_model, cfg, extra))
    if capabilities is not None:
        report.capabilities = report_caps
    if exposure:
        from ..exposure import adapter_exposure

        report.exposure = adapter_exposure(model, exposure, tokenizer=tokenizer, batch_size=cfg.batch_size,
                                           show_progress=cfg.show_progress).exposures(model.active_adapter)
    for name in base_m.recitation:
        report.recitation[name] = RecitationComparison(base_m.recitation[name], edited_m.recitation[name])
    for name in base_m.stress:
        report.stress[name] = StressComparison(base_m.stress[name], edited_m.stress[name])
    for name in base_m.perplexity:
        report.perplexity[name] = PerplexityComparison(base_m.perplexity[name], edited_m.perplexity[name])
        b, e = base_m.topk[name], edited_m.topk[name]
        report.coherence[name] = CoherenceResult(ndcg_at_k(e, b, cfg.ndcg_k), cfg.ndcg_k, int(b.shape[0]))
    for name in base_m.classification:
        report.classification[name] = ClassificationComparison(base_m.classification[name],
                                                               edited_m.classification[name])
    return report
