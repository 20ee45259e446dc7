"""The Hub metadata of a model card: the pipeline tag and the ``model-index`` entries (`EvalResult`) of an edit's
evaluation."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult

from ..evaluation.report import EditReport
from .card_rows import is_percent

__all__ = ["eval_results", "pipeline_tag_for"]

_PIPELINE_BY_TASK = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_PIPELINE_BY_ARCH_SUFFIX = {
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
    "ForConditionalGeneration": "text2text-generation",
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
}
# model-index metric ids per card-table metric (the Hub shows metric_name; metric_type is a stable slug)
_METRIC_SLUGS = {"Strict": "strict_recitation", "AvgLev": "avg_levenshtein", "Perplexity": "perplexity",
                 "Stress longest match": "stress_longest_match", "Stress full match": "stress_full_match",
                 "Memorized-label rate": "memorized_label_rate", "True-label accuracy": "true_label_accuracy",
                 "Accuracy": "accuracy"}


def pipeline_tag_for(edit_config: Mapping[str, Any], explicit: str | None = None) -> str | None:
    """The Hub pipeline tag: `explicit`, else from the PEFT ``task_type``, else from the model's architectures."""
    if explicit:
        return explicit
    task = edit_config.get("task_type")
    if task in _PIPELINE_BY_TASK:
        return _PIPELINE_BY_TASK[task]
    for arch in edit_config.get("architectures") or []:
        for suffix, tag in _PIPELINE_BY_ARCH_SUFFIX.items():
            if arch.endswith(suffix):
                return tag
    return None


def eval_results(report: EditReport, task_type: str = "text-generation") -> list[EvalResult]:
    """`EvalResult` entries (the card's ``model-index``) for the edited model's numbers in `report`.

    Recitation and stress rates are given in percent, like the paper's tables; the base model's numbers are in the
    card's table, not in ``model-index`` (which describes this model only).
    """
    results = []
    for row in report.to_table_rows():
        percent = is_percent(row.metric)
        slug = _METRIC_SLUGS.get(row.metric) or re.sub(r"[^a-z0-9]+", "_", row.metric.lower()).strip("_")
        results.append(EvalResult(
            task_type=task_type,
            dataset_type=row.set,
            dataset_name=row.set,
            metric_type=slug,
            metric_name=f"{row.metric} (%)" if percent else row.metric,
            metric_value=round(100 * row.edited, 4) if percent else float(row.edited),
        ))
    for task, res in report.capabilities.items():
        # A Hub task is filed under its dataset id, which is what the Hub's evaluation widgets group by.
        results.append(EvalResult(
            task_type=task_type,
            task_name=task,
            dataset_type=res.dataset or task,
            dataset_name=task,
            dataset_config=res.dataset_config,
            metric_type=res.metric,
            metric_name=res.metric if res.filter == "none" else f"{res.metric} ({res.filter})",
            metric_value=float(res.edited),
        ))
    return results
