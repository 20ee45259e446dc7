"""Perplexity on held-out text: ``exp(total NLL / total scored tokens)``, pads masked.

Long documents are scored with a sliding window as in the Hugging Face perplexity guide: windows of
``block_size`` tokens start every ``stride`` tokens, and each window scores only the tokens that the
previous window did not score. With ``stride < block_size`` every token after a document's first is
scored exactly once, and tokens beyond the first window see at least ``block_size - stride`` tokens of
context. The default, ``stride = block_size - 1``, covers every token at about the cost of disjoint
blocks; a smaller stride buys more context with more compute. ``stride == block_size`` gives truly
disjoint blocks, as when a corpus is packed into fixed-length chunks: then the first token of every
block has no context and is not scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ._common import as_id_list, batched, logits_of, model_device, progress, resolve_pad_id, right_pad, tokenize_texts

DEFAULT_BLOCK_SIZE = 1024


@dataclass
class PerplexityResult:
    """Perplexity and the sums it was computed from.

    Args:
        perplexity: ``exp(nll_sum / n_tokens)``.
        nll_sum: total negative log-likelihood (nats) over the scored tokens.
        n_tokens: number of scored tokens (pads and each document's first token are not scored, nor each
            block's first token when ``stride == block_size``).
        block_size: window length used.
        stride: window step used.
    """

    perplexity: float
    nll_sum: float
    n_tokens: int
    block_size: int
    stride: int


@dataclass
class _Window:
    ids: list[int]
    first_scored: int  # index inside the window of the first token whose NLL counts


def perplexity_from_nll(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)``, with a clear error when nothing was scored."""
    if n_tokens <= 0:
        raise InputError("no token was scored: every sequence needs at least 2 tokens")
    return math.exp(nll_sum / n_tokens)


def resolve_block_size(model: Any, block_size: int | None, stride: int | None) -> tuple[int, int]:
    """Default the block size to the model's context length (capped at 1024) and the stride to
    ``block_size - 1`` (every token scored once); validate both."""
    if block_size is None:
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_pos = max_pos or getattr(getattr(model, "config", None), "n_positions", None)
        block_size = min(int(max_pos), DEFAULT_BLOCK_SIZE) if max_pos else DEFAULT_BLOCK_SIZE
    if block_size < 2:
        raise InputError(f"block_size must be at least 2 (one context token plus one scored token), got {block_size}")
    stride = block_size - 1 if stride is None else stride
    if not 1 <= stride <= block_size:
        raise InputError(f"stride must lie in [1, block_size={block_size}], got {stride}")
    return block_size, stride


def sliding_windows(sequence: Sequence[int], block_size: int, stride: int) -> list[_Window]:
    """The sliding windows of one document. Every token from index 1 on is scored in exactly one window if
    ``stride < block_size``; with ``stride == block_size`` the first token of each block is skipped."""
    windows: list[_Window] = []
    prev_end = 0
    n = len(sequence)
    for begin in range(0, n, stride):
        end = min(begin + block_size, n)
        # A window's first token has no prediction, so position 0 of the document is never scored.
        first = max(prev_end, begin + 1) - begin
        if end - begin >= 2 and first < end - begin:
            windows.append(_Window(list(sequence[begin:end]), first))
        prev_end = end
        if end == n:
            break
    return windows


def coerce_sequences(data: Any, tokenizer: Any = None, *, text_column: str = "text",
                     input_ids_column: str = "input_ids", add_special_tokens: bool = True) -> list[list[int]]:
    """Token-id lists from raw texts, token-id lists, or a `datasets.Dataset` with an ``input_ids`` or
    ``text`` column."""
    column_names = getattr(data, "column_names", None)
    if column_names is not None:
        if input_ids_column in column_names:
            return [as_id_list(x, "input_ids row") for x in data[input_ids_column]]
        if text_column in column_names:
            return tokenize_texts(data[text_column], tokenizer, add_special_tokens)
        raise InputError(f"dataset has neither a {input_ids_column!r} nor a {text_column!r} column: {column_names}")
    if isinstance(data, str):
        data = [data]
    data = list(data)
    if data and isinstance(data[0], str):
        return tokenize_texts(data, tokenizer, add_special_tokens)
    return [as_id_list(x, f"sequence {i}") for i, x in enumerate(data)]


@torch.no_grad()
def score_text(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    top_k: int = 0,
    pad_token_id: int | None = None,
    show_progress: bool = True,
    desc: str = "scoring",
) -> tuple[float, int, torch.Tensor | None]:
    """One forward pass over sliding windows: summed NLL, scored-token count and, if ``top_k > 0``, the
    model's top-k next tokens (``(n_tokens, top_k)`` long tensor, CPU) at each position that predicts a
    scored token, in a deterministic order. Perplexity and nDCG share this pass."""
    block_size, stride = resolve_block_size(model, block_size, stride)
    windows = [w for seq in sequences for w in sliding_windows(as_id_list(seq), block_size, stride)]
    pad_id = resolve_pad_id(pad_token_id, model=model)
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    topk_parts: list[torch.Tensor] = []
    try:
        for chunk in progress(list(batched(windows, batch_size)), show_progress, desc=desc, unit="batch"):
            ids, mask = right_pad([w.ids for w in chunk], pad_id, device)
            logits = logits_of(model(input_ids=ids, attention_mask=mask))[:, :-1]
            if top_k > logits.shape[-1]:
                raise InputError(f"top_k={top_k} exceeds the vocabulary size {logits.shape[-1]}")
            targets = ids[:, 1:]
            # score[b, t] says whether the token at t + 1 is scored: real (not a pad) and new in this window.
            score = mask[:, 1:].bool().clone()
            for row, w in enumerate(chunk):
                score[row, : w.first_scored - 1] = False
            # Row by row in float32: a (B, T, V) float32 log-softmax at once is the memory peak for large vocabularies.
            for row in range(logits.shape[0]):
                keep = score[row]
                row_logits = logits[row][keep].float()
                logp = torch.log_softmax(row_logits, dim=-1).gather(-1, targets[row][keep][:, None])
                nll_sum -= float(logp.sum(dtype=torch.float64))
                n_tokens += int(keep.sum())
                if top_k > 0:
                    topk_parts.append(row_logits.topk(top_k, dim=-1).indices.cpu())
    finally:
        model.train(was_training)
    topk = (torch.cat(topk_parts) if top_k > 0 and topk_parts
            else (torch.empty((0, top_k), dtype=torch.long) if top_k > 0 else None))
    return nll_sum, n_tokens, topk


def perplexity(
    model: torch.nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity ``exp(total NLL / total scored tokens)`` of ``model`` on held-out text.

    Args:
        model: a causal LM.
        data: raw texts (needs ``tokenizer``), token-id lists, or a `datasets.Dataset` with an
            ``input_ids`` or ``text`` column. Each item is one document.
        block_size: window length; defaults to the model's context length, at most 1024.
        stride: window step (``1 <= stride <= block_size``); defaults to ``block_size - 1``, which scores
            every token but the document's first exactly once.

    Example:
        ```py
        >>> perplexity(model, ["The quick brown fox."], tokenizer=tok, block_size=512, stride=256).perplexity
        ```
    """
    sequences = coerce_sequences(data, tokenizer)
    block_size, stride = resolve_block_size(model, block_size, stride)
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = resolve_pad_id(None, tokenizer=tokenizer, model=model)
    nll, n, _ = score_text(model, sequences, block_size=block_size, stride=stride, batch_size=batch_size,
                           pad_token_id=pad_token_id, show_progress=show_progress, desc="perplexity")
    return PerplexityResult(perplexity_from_nll(nll, n), nll, n, block_size, stride)
