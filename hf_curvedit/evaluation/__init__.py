"""Measuring what an edit did: memorized-window discovery, recitation, perplexity, nDCG coherence,
perturbation stress test, noisy-label memorization of image classifiers, capabilities through
lm-evaluation-harness tasks, and `evaluate_edit`, which runs them all on the base and the edited model.

Every metric is a plain function here and, for the aggregation step, a local `evaluate` module:
``evaluate.load(metric_path("recitation"))`` works offline.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .capabilities import (
    CapabilityConfig,
    CapabilityError,
    CapabilityResult,
    capability_scores,
    check_tasks,
    compare_results,
    evaluate_capabilities,
)
from .classification import (
    ClassificationComparison,
    ClassificationMetrics,
    ImageClassificationSet,
    classification_scores,
    evaluate_classification,
    predict_classes,
)
from .coherence import CoherenceResult, coherence_ndcg, ndcg_at_k, ndcg_per_position, next_token_topk
from .perplexity import PerplexityResult, perplexity, perplexity_from_nll, sliding_windows
from .recitation import (
    RecitationExample,
    RecitationMargins,
    RecitationResult,
    evaluate_recitation,
    evaluate_text_recitation,
    greedy_generate,
    recitation_margins,
    recitation_scores,
    split_suffix,
)
from .report import (
    EditReport,
    PerplexityComparison,
    RecitationComparison,
    RecitationMetrics,
    ReportMetadata,
    StressComparison,
    TableRow,
)
from .runner import EvalConfig, evaluate_edit
from .sets import RecitationSet, TextSet, as_eval_set
from .stress import StressResult, exact_prefix_match, stress_test, stress_variants
from .windows import find_memorized_windows

_METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def available_metrics() -> list[str]:
    """Names of the packaged `evaluate` modules."""
    return sorted(p.name for p in _METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> str:
    """Path of a packaged `evaluate` module, for ``evaluate.load(metric_path(name))`` (works offline).

    Raises:
        ValueError: if there is no such metric.
    """
    path = _METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise InputError(f"no packaged metric {name!r}; available: {available_metrics()}")
    return str(path)


__all__ = [
    "CapabilityConfig", "CapabilityError", "CapabilityResult", "capability_scores", "check_tasks", "compare_results",
    "evaluate_capabilities",
    "ClassificationComparison", "ClassificationMetrics", "ImageClassificationSet", "classification_scores",
    "evaluate_classification", "predict_classes",
    "CoherenceResult", "EditReport", "EvalConfig", "PerplexityComparison", "PerplexityResult",
    "RecitationComparison", "RecitationExample", "RecitationMargins", "RecitationMetrics", "RecitationResult",
    "RecitationSet",
    "ReportMetadata", "StressComparison", "StressResult", "TableRow", "TextSet", "as_eval_set",
    "available_metrics", "coherence_ndcg", "evaluate_edit", "evaluate_recitation", "evaluate_text_recitation",
    "exact_prefix_match", "find_memorized_windows", "greedy_generate", "metric_path", "ndcg_at_k",
    "ndcg_per_position", "next_token_topk", "perplexity", "perplexity_from_nll", "recitation_margins",
    "recitation_scores",
    "sliding_windows", "split_suffix", "stress_test", "stress_variants",
]
