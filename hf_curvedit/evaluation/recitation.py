"""Recitation: greedy continuation of a prefix and how close it comes to the gold suffix.

With ``d`` the token-level Levenshtein distance between the gold suffix (length ``L``) and the greedy
continuation, the paper's metrics (docs/method.md §7) are::

    Strict = 1[d = 0]      Loose = 1[1 - d/L >= threshold]      AvgLev = mean(d / L)

Strict and Loose are "still memorized" rates (lower after an edit is better); AvgLev is higher when
the model recites less.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rapidfuzz.distance import Levenshtein

from ..errors import InputError
from ._common import (
    as_id_list,
    batched,
    left_pad,
    logits_of,
    model_device,
    progress,
    resolve_pad_id,
    supported_kwargs,
    tokenize_texts,
)

DEFAULT_LOOSE_THRESHOLD = 0.75
DEFAULT_QUOTE_SUFFIX_TOKENS = 8


@dataclass
class RecitationExample:
    """Per-example recitation result.

    Args:
        distance: token-level Levenshtein distance ``d`` between prediction and reference.
        length: ``L``, the length of the reference suffix.
        prediction: the greedy continuation (token ids), when it was generated here.
    """

    distance: int
    length: int
    prediction: list[int] | None = None

    @property
    def normalized(self) -> float:
        """``d / L``."""
        return self.distance / self.length

    def strict(self) -> bool:
        """``d == 0``."""
        return self.distance == 0

    def loose(self, threshold: float = DEFAULT_LOOSE_THRESHOLD) -> bool:
        """``1 - d/L >= threshold``."""
        return 1.0 - self.normalized >= threshold


@dataclass
class RecitationResult:
    """Aggregate recitation metrics plus the per-example results they were computed from.

    Args:
        strict: fraction of examples recited exactly (``d = 0``).
        loose: fraction with ``1 - d/L >= loose_threshold``.
        avg_lev: mean of ``d / L`` (higher = less memorization).
        loose_threshold: the threshold used for ``loose``.
        examples: one [`RecitationExample`] per input, in input order.
    """

    strict: float
    loose: float
    avg_lev: float
    loose_threshold: float
    examples: list[RecitationExample] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.examples)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"loose_threshold must lie in [0, 1], got {threshold}")


def recitation_scores(
    predictions: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    loose_threshold: float = DEFAULT_LOOSE_THRESHOLD,
) -> RecitationResult:
    """Strict / Loose / AvgLev of predicted continuations against gold suffixes (both token ids).

    ``L`` is the length of each reference. Predictions are compared as they are, so pass continuations
    of length ``L`` to get the paper's metric (``d/L`` then lies in ``[0, 1]``).

    Raises:
        ValueError: on different numbers of predictions and references, an empty input, an empty
            reference, or a threshold outside ``[0, 1]``.
    """
    _check_threshold(loose_threshold)
    if len(predictions) != len(references):
        raise InputError(f"got {len(predictions)} predictions but {len(references)} references")
    if len(references) == 0:
        raise InputError("no examples to score")
    examples = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        pred_l, ref_l = as_id_list(pred, "prediction"), as_id_list(ref, "reference")
        if not ref_l:
            raise InputError(f"reference {i} is empty; the suffix length L must be positive")
        examples.append(RecitationExample(Levenshtein.distance(pred_l, ref_l), len(ref_l), pred_l))
    return _aggregate(examples, loose_threshold)


def _aggregate(examples: list[RecitationExample], loose_threshold: float) -> RecitationResult:
    n = len(examples)
    return RecitationResult(
        strict=sum(e.strict() for e in examples) / n,
        loose=sum(e.loose(loose_threshold) for e in examples) / n,
        avg_lev=sum(e.normalized for e in examples) / n,
        loose_threshold=loose_threshold,
        examples=examples,
    )


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    batch_size: int = 16,
    pad_token_id: int | None = None,
    show_progress: bool = True,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched with left padding.

    Prompts are left-padded, the attention mask hides the pads and position ids are counted from each
    prompt's first real token, so a prompt gets the same continuation alone or in a padded batch. No
    early stop at EOS: every continuation has exactly its requested length, as Levenshtein-based
    metrics need. Prompts are sorted by length inside the call to keep padding small; the result is
    in input order.

    Args:
        model: a causal LM (any `transformers` model or `peft.PeftModel` returning ``logits``).
        prompts: token-id prompts, each non-empty.
        max_new_tokens: continuation length ``L``, one for all or one per prompt.
        batch_size: prompts per forward pass.
        pad_token_id: id written into padded positions (masked, so any valid id works).
    """
    n = len(prompts)
    lengths = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
    if len(lengths) != n:
        raise InputError(f"got {len(lengths)} continuation lengths for {n} prompts")
    if any(length <= 0 for length in lengths):
        raise InputError(f"continuation length L must be positive, got {min(lengths)}")
    prompt_ids = [as_id_list(p, f"prompt {i}") for i, p in enumerate(prompts)]
    for i, p in enumerate(prompt_ids):
        if not p:
            raise InputError(f"prompt {i} is empty; greedy continuation needs at least one token")
    pad_id = resolve_pad_id(pad_token_id, model=model)
    device = model_device(model)
    was_training = model.training
    model.eval()
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]), reverse=True)
    out: list[list[int] | None] = [None] * n
    try:
        for chunk in progress(list(batched(order, batch_size)), show_progress, desc=desc, unit="batch"):
            gen = _greedy_batch(model, [prompt_ids[i] for i in chunk], max(lengths[i] for i in chunk), pad_id, device)
            for row, i in enumerate(chunk):
                out[i] = gen[row][: lengths[i]]
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _greedy_batch(
    model: torch.nn.Module, prompts: list[list[int]], steps: int, pad_id: int, device: torch.device
) -> list[list[int]]:
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    # Positions count real tokens only, so a left-padded prompt sees the positions it would see alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    optional = supported_kwargs(model, ("position_ids", "logits_to_keep"))
    generated: list[torch.Tensor] = []
    past = None
    step_ids, step_pos = input_ids, position_ids
    for _ in range(steps):
        extra: dict[str, Any] = {}
        if "position_ids" in optional:
            extra["position_ids"] = step_pos
        if "logits_to_keep" in optional:
            extra["logits_to_keep"] = 1  # only the last position is decoded: skip the (B, T, V) prompt logits
        output = model(input_ids=step_ids, attention_mask=attention_mask, past_key_values=past, use_cache=True, **extra)
        next_tok = logits_of(output)[:, -1, :].argmax(dim=-1)
        generated.append(next_tok)
        past = getattr(output, "past_key_values", None)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
        if past is None:
            # A model without a KV cache gets the whole sequence again.
            input_ids = torch.cat([input_ids, next_tok[:, None]], dim=1)
            step_ids, step_pos = input_ids, position_ids
        else:
            step_ids, step_pos = next_tok[:, None], position_ids[:, -1:]
    return torch.stack(generated, dim=1).tolist()


@dataclass
class RecitationMargins:
    """How firmly a model holds each memorized suffix, from one teacher-forced pass over prefix + suffix.

    Args:
        min_margin: per example, the smallest margin over the suffix positions between the gold token's logit and
            the best other token's. It is positive exactly when greedy decoding recites the whole suffix (ties
            aside): its sign is Strict, its size how far the example is from losing (or regaining) it.
        mean_logprob: per example, the mean log-probability of the suffix tokens.
    """

    min_margin: list[float]
    mean_logprob: list[float]

    @property
    def margin(self) -> float:
        """The mean over examples of ``max(min_margin, 0)``: 0 when no example is recited, and smooth where Strict
        is a step (the sweep's search steers by it)."""
        return sum(max(m, 0.0) for m in self.min_margin) / len(self.min_margin)

    @property
    def logprob(self) -> float:
        """The mean over examples of the suffix's mean log-probability."""
        return sum(self.mean_logprob) / len(self.mean_logprob)


@torch.no_grad()
def recitation_margins(
    model: torch.nn.Module,
    prefixes: Sequence[Sequence[int]],
    suffixes: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    pad_token_id: int | None = None,
) -> RecitationMargins:
    """Teacher-forced margins and log-probabilities of each gold suffix after its prefix (`RecitationMargins`):
    one forward pass per batch instead of one per generated token."""
    if len(prefixes) != len(suffixes) or not len(prefixes):
        raise InputError(f"got {len(prefixes)} prefixes and {len(suffixes)} suffixes; give the same non-zero number")
    rows = [as_id_list(p, f"prefix {i}") + as_id_list(s, f"suffix {i}")
            for i, (p, s) in enumerate(zip(prefixes, suffixes))]
    lengths = [len(as_id_list(s)) for s in suffixes]
    pad_id = resolve_pad_id(pad_token_id, model=model)
    device = model_device(model)
    optional = supported_kwargs(model, ("position_ids", "logits_to_keep"))
    was_training = model.training
    model.eval()
    margins: list[float] = [0.0] * len(rows)
    logprobs: list[float] = [0.0] * len(rows)
    try:
        for chunk in batched(list(range(len(rows))), batch_size):
            input_ids, attention_mask = left_pad([rows[i] for i in chunk], pad_id, device)
            keep = max(lengths[i] for i in chunk) + 1
            extra: dict[str, Any] = {}
            if "position_ids" in optional:
                extra["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            if "logits_to_keep" in optional:
                extra["logits_to_keep"] = keep
            logits = logits_of(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                     **extra))[:, -keep:].float()
            for row, i in enumerate(chunk):
                n = lengths[i]
                pred = logits[row, -n - 1:-1]  # the positions that predict the suffix's tokens
                gold = input_ids[row, -n:].to(pred.device)
                gold_logit = pred.gather(1, gold[:, None]).squeeze(1)
                others = pred.scatter(1, gold[:, None], float("-inf")).amax(dim=1)
                margins[i] = float((gold_logit - others).min())
                logprobs[i] = float(pred.log_softmax(-1).gather(1, gold[:, None]).mean())
    finally:
        model.train(was_training)
    return RecitationMargins(margins, logprobs)


def split_suffix(
    sequences: Sequence[Sequence[int]] | Sequence[str],
    suffix_tokens: int = DEFAULT_QUOTE_SUFFIX_TOKENS,
    *,
    tokenizer: Any = None,
    add_special_tokens: bool = True,
) -> tuple[list[list[int]], list[list[int]]]:
    """Split raw texts (e.g. quotes) or token-id sequences into (prefixes, suffixes): the last
    ``suffix_tokens`` tokens are the suffix.

    Raises:
        ValueError: if ``suffix_tokens <= 0`` or a sequence has no token left for the prefix.
    """
    if suffix_tokens <= 0:
        raise InputError(f"suffix_tokens must be positive, got {suffix_tokens}")
    if len(sequences) and isinstance(sequences[0], str):
        ids = tokenize_texts(sequences, tokenizer, add_special_tokens=add_special_tokens)  # type: ignore[arg-type]
    else:
        ids = [as_id_list(s, f"sequence {i}") for i, s in enumerate(sequences)]
    prefixes, suffixes = [], []
    for i, seq in enumerate(ids):
        if len(seq) <= suffix_tokens:
            raise InputError(
                f"sequence {i} has {len(seq)} tokens, too short for a {suffix_tokens}-token suffix plus a "
                "non-empty prefix"
            )
        prefixes.append(seq[:-suffix_tokens])
        suffixes.append(seq[-suffix_tokens:])
    return prefixes, suffixes


def evaluate_recitation(
    model: torch.nn.Module,
    prefixes: Sequence[Sequence[int]],
    suffixes: Sequence[Sequence[int]],
    *,
    loose_threshold: float = DEFAULT_LOOSE_THRESHOLD,
    batch_size: int = 16,
    pad_token_id: int | None = None,
    show_progress: bool = True,
) -> RecitationResult:
    """Greedily continue each prefix for ``L = len(suffix)`` tokens and score it against the suffix.

    Example:
        ```py
        >>> result = evaluate_recitation(model, ds["prefix_ids"], ds["suffix_ids"])
        >>> result.strict, result.loose, result.avg_lev
        ```
    """
    _check_threshold(loose_threshold)
    if len(prefixes) != len(suffixes):
        raise InputError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
    refs = [as_id_list(s, f"suffix {i}") for i, s in enumerate(suffixes)]
    for i, r in enumerate(refs):
        if not r:
            raise InputError(f"suffix {i} is empty; the continuation length L must be positive")
    preds = greedy_generate(
        model, prefixes, [len(r) for r in refs], batch_size=batch_size, pad_token_id=pad_token_id,
        show_progress=show_progress, desc="recitation",
    )
    return recitation_scores(preds, refs, loose_threshold)


def evaluate_text_recitation(
    model: torch.nn.Module,
    texts: Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer: Any = None,
    suffix_tokens: int = DEFAULT_QUOTE_SUFFIX_TOKENS,
    add_special_tokens: bool = True,
    **kwargs: Any,
) -> RecitationResult:
    """[`evaluate_recitation`] on raw texts (e.g. famous quotes): the last ``suffix_tokens`` tokens are the
    suffix, the rest is the prompt. Extra keyword arguments go to [`evaluate_recitation`]."""
    prefixes, suffixes = split_suffix(texts, suffix_tokens, tokenizer=tokenizer, add_special_tokens=add_special_tokens)
    if tokenizer is not None and "pad_token_id" not in kwargs:
        kwargs["pad_token_id"] = resolve_pad_id(None, tokenizer=tokenizer, model=model)
    return evaluate_recitation(model, prefixes, suffixes, **kwargs)
