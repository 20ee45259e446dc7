"""The texts an exposure is measured on: each task's items as one token sequence (prompt + gold answer).

lm-evaluation-harness tasks are read through lm-eval itself (`lm_eval_task_texts`), so the prompt and the gold
answer are exactly what lm-eval scores: for a multiple-choice task the context, the target delimiter and the gold
choice; for a generation task the context and the gold target. A memorized set contributes its prefixes and suffixes
(`recitation_texts`); any other text is a `TextSet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InputError
from ..evaluation.sets import RecitationSet, TextSet

__all__ = ["lm_eval_task_texts", "recitation_texts"]


def _gold_text(task: Any, doc: Any) -> str:
    """The context followed by the gold answer, as lm-eval scores the document."""
    context = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        gold = target[0] if isinstance(target, list) else target  # several gold answers: the first
        answer = choices[gold] if isinstance(gold, int) else str(gold)
        return f"{context}{task.config.target_delimiter}{answer}"
    if isinstance(target, list):
        target = target[0]
    if task.OUTPUT_TYPE == "generate_until":  # the model continues the context itself: no delimiter
        return f"{context}{target}"
    return f"{context}{task.config.target_delimiter}{target}"


def lm_eval_task_texts(config: Any, tokenizer: Any, limit: int | None = None) -> dict[str, TextSet]:
    """Each task of a `CapabilityConfig` (groups and tags expanded to their tasks) as a `TextSet` of its evaluation
    documents, prompt + gold answer, tokenized as lm-eval's ``HFLM`` does (no special tokens added).

    ``limit`` (or else ``config.limit``) keeps the first items of each task (a float below 1 is a fraction).
    Needs lm-eval (``pip install 'hf-curvedit[lm-eval]'``).
    """
    from ..evaluation.capabilities import _quiet_lm_eval, check_tasks

    manager = check_tasks(config)
    with _quiet_lm_eval():
        loaded = manager.load(list(config.tasks))
    limit = config.limit if limit is None else limit
    out: dict[str, TextSet] = {}
    for name, task in loaded["tasks"].items():
        docs = list(task.eval_docs)
        if limit is not None:
            docs = docs[: int(limit * len(docs)) if limit < 1 else int(limit)]
        if not docs:
            raise InputError(f"lm-eval task {name!r} has no evaluation documents (limit={limit})")
        texts = [_gold_text(task, doc) for doc in docs]
        out[name] = TextSet.from_texts(texts, tokenizer, add_special_tokens=False)
    return out


def recitation_texts(sets: Mapping[str, RecitationSet]) -> dict[str, TextSet]:
    """Each memorized set as a `TextSet` of its prefix + suffix sequences."""
    return {name: TextSet([list(p) + list(s) for p, s in zip(rs.prefixes, rs.suffixes)]) for name, rs in sets.items()}
