"""Shared helpers for the evaluation stage: token-id coercion, padding, device lookup, progress bars."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from ..errors import InputError

T = TypeVar("T")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for parameter-free modules)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def as_id_list(ids: Any, what: str = "sequence") -> list[int]:
    """Turn a token-id sequence (list, tuple, numpy array, 1-D tensor) into a ``list[int]``."""
    if isinstance(ids, str):
        raise TypeError(f"{what} is a string; pass token ids, or text together with a tokenizer")
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise InputError(f"{what} must be 1-D token ids, got a tensor of shape {tuple(ids.shape)}")
        return [int(x) for x in ids.tolist()]
    try:
        return [int(x) for x in ids]
    except TypeError:
        raise TypeError(f"{what} must be a sequence of token ids, got {type(ids).__name__}") from None


def tokenize_texts(texts: Sequence[str], tokenizer: Any, add_special_tokens: bool = True) -> list[list[int]]:
    """Tokenize raw texts into token-id lists, with a clear error when no tokenizer was given."""
    if tokenizer is None:
        raise InputError("got raw text but no tokenizer; pass `tokenizer=` or give token ids instead")
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens)
    return [list(map(int, ids)) for ids in enc["input_ids"]]


def resolve_pad_id(pad_token_id: int | None = None, tokenizer: Any = None, model: Any = None) -> int:
    """Pick the id written into padded positions.

    Padded positions are always masked out (attention mask and loss mask), so the id only has to be a
    valid vocabulary index. Tokenizers without a pad token (GPT-2, Llama) are therefore fine: we fall
    back to their EOS token, then to the model config, then to 0.
    """
    vocab = vocab_size(model)
    if pad_token_id is not None:
        if pad_token_id < 0 or (vocab is not None and pad_token_id >= vocab):
            raise InputError(f"pad_token_id {pad_token_id} is outside the model's vocabulary of size {vocab}")
        return int(pad_token_id)
    for source in (tokenizer, getattr(model, "config", None)):
        if source is None:
            continue
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            # Configs of shrunken test models keep the original EOS id (e.g. GPT-2's 50256): skip ids
            # the embedding cannot look up.
            if value is not None and 0 <= int(value) and (vocab is None or int(value) < vocab):
                return int(value)
    return 0


def vocab_size(model: Any) -> int | None:
    """Rows of the model's input embedding, or ``config.vocab_size``; ``None`` if neither is known."""
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
            if emb is not None and hasattr(emb, "num_embeddings"):
                return int(emb.num_embeddings)
        except (NotImplementedError, AttributeError):
            pass
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(value) if isinstance(value, int) else None


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists into ``(input_ids, attention_mask)`` tensors of shape ``(B, T_max)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists into ``(input_ids, attention_mask)`` tensors of shape ``(B, T_max)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def batched(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``batch_size`` elements."""
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def progress(iterable: Iterable[T], show: bool, **kwargs: Any) -> Iterable[T]:
    """``tqdm`` when ``show`` is true, the bare iterable otherwise."""
    return tqdm(iterable, **kwargs) if show else iterable


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output (``ModelOutput``, tuple or tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if logits is None:
        raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
    return logits


def _forward_of(model: Any) -> Any:
    # A PeftModel forwards extra keyword arguments to the transformers model underneath; what that model
    # accepts is what counts.
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    return getattr(inner, "forward", None)


def supported_kwargs(model: Any, names: Sequence[str]) -> set[str]:
    """The subset of ``names`` that the model's ``forward`` declares explicitly.

    Optional inputs (``position_ids``, ``logits_to_keep``) are only passed where declared: some
    architectures (e.g. Bloom, ALiBi positions) reject ``position_ids`` through their ``**kwargs``.
    """
    import inspect

    forward = _forward_of(model)
    if forward is None:
        return set()
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n in names if n in params}
