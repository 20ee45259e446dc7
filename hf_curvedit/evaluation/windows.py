"""Finding memorized windows: prefix + suffix windows whose suffix the model predicts exactly.

A window at token offset ``o`` of a document is ``tokens[o : o + P + S]``. It is memorized iff, teacher
forced on the window, the model's argmax next token equals the gold token at every one of the ``S``
suffix positions (docs/method.md §7; the paper uses P = 64, S = 48). All windows have the same length, so
batches need no padding and one forward pass scores a whole batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import torch

from ..errors import InputError
from ._common import logits_of, model_device, progress, supported_kwargs
from .perplexity import coerce_sequences

DEFAULT_PREFIX_LEN = 64
DEFAULT_SUFFIX_LEN = 48
DEFAULT_CONTEXT_LEN = 20

WINDOW_FEATURES = datasets.Features(
    {
        "prefix_ids": datasets.Sequence(datasets.Value("int64")),
        "suffix_ids": datasets.Sequence(datasets.Value("int64")),
        # Up to `context_len` tokens that precede the prefix in the source document (for the stress test).
        "context_ids": datasets.Sequence(datasets.Value("int64")),
        "source_index": datasets.Value("int64"),
        "token_offset": datasets.Value("int64"),
        "suffix_matches": datasets.Value("int64"),
        "memorized": datasets.Value("bool"),
    }
)


def _lazy_batches(items: Iterator[tuple[int, int]], batch_size: int) -> Iterator[list[tuple[int, int]]]:
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    chunk: list[tuple[int, int]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _window_offsets(n_tokens: int, window: int, stride: int) -> range:
    return range(0, max(n_tokens - window + 1, 0), stride)


@torch.no_grad()
def find_memorized_windows(
    model: torch.nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    prefix_len: int = DEFAULT_PREFIX_LEN,
    suffix_len: int = DEFAULT_SUFFIX_LEN,
    stride: int | None = None,
    context_len: int = DEFAULT_CONTEXT_LEN,
    batch_size: int = 16,
    max_windows: int | None = None,
    return_all: bool = False,
    text_column: str = "text",
    input_ids_column: str = "input_ids",
    show_progress: bool = True,
) -> datasets.Dataset:
    """Scan documents for windows whose suffix the model reproduces under teacher forcing.

    Args:
        model: a causal LM.
        data: documents as raw texts (needs ``tokenizer``), token-id lists, or a `datasets.Dataset` with an
            ``input_ids`` or ``text`` column.
        prefix_len: ``P``, tokens of context before the suffix.
        suffix_len: ``S``, tokens that must all be predicted exactly.
        stride: step between window starts; defaults to ``P + S`` (disjoint windows).
        context_len: how many tokens before each window to keep as ``context_ids`` (for [`stress_test`]).
        max_windows: stop after scanning this many windows (for a quick look at a large corpus).
        return_all: keep every scanned window with its ``memorized`` flag, not only the memorized ones.

    Returns:
        A `datasets.Dataset` with columns ``prefix_ids``, ``suffix_ids``, ``context_ids``,
        ``source_index`` (row of ``data``), ``token_offset`` (start of the window in that row),
        ``suffix_matches`` (how many suffix positions matched) and ``memorized``. Save it with
        ``save_to_disk`` and reload it with `datasets.load_from_disk`.

    Example:
        ```py
        >>> ds = find_memorized_windows(model, train_ds, tokenizer=tok, prefix_len=64, suffix_len=48)
        >>> ds.save_to_disk("memorized")
        ```
    """
    if prefix_len <= 0 or suffix_len <= 0:
        raise InputError(f"prefix_len and suffix_len must be positive, got {prefix_len} and {suffix_len}")
    if context_len < 0:
        raise InputError(f"context_len must be non-negative, got {context_len}")
    window = prefix_len + suffix_len
    stride = window if stride is None else stride
    if stride <= 0:
        raise InputError(f"stride must be positive, got {stride}")
    sequences = coerce_sequences(data, tokenizer, text_column=text_column, input_ids_column=input_ids_column)
    total = sum(len(_window_offsets(len(s), window, stride)) for s in sequences)
    if max_windows is not None:
        total = min(total, max_windows)

    def locations() -> Iterator[tuple[int, int]]:
        count = 0
        for row, seq in enumerate(sequences):
            for offset in _window_offsets(len(seq), window, stride):
                if max_windows is not None and count >= max_windows:
                    return
                count += 1
                yield row, offset

    device = model_device(model)
    # Only the last S positions predict suffix tokens: skip the lm_head on the rest where the model allows it.
    extra = {"logits_to_keep": suffix_len} if "logits_to_keep" in supported_kwargs(model, ("logits_to_keep",)) else {}
    was_training = model.training
    model.eval()
    columns: dict[str, list] = {name: [] for name in WINDOW_FEATURES}
    bar = progress(range(total), show_progress, desc="memorized windows", unit="window")
    bar_update = getattr(bar, "update", None)
    try:
        # Lazily batched: with stride 1 on a large corpus the list of all windows would not fit in memory.
        for chunk in _lazy_batches(locations(), batch_size):
            ids = torch.tensor([sequences[r][o : o + window] for r, o in chunk], dtype=torch.long, device=device)
            # The last token is never an input that predicts a suffix token, so it is left out.
            logits = logits_of(model(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]), **extra))
            # Inputs have P + S - 1 tokens; the last S positions predict the suffix.
            pred = logits[:, -suffix_len:].argmax(dim=-1)
            matches = (pred == ids[:, prefix_len:]).sum(dim=-1).tolist()
            for (row, offset), n_match, win in zip(chunk, matches, ids.tolist()):
                memorized = n_match == suffix_len
                if not (memorized or return_all):
                    continue
                seq = sequences[row]
                columns["prefix_ids"].append(win[:prefix_len])
                columns["suffix_ids"].append(win[prefix_len:])
                columns["context_ids"].append(list(seq[max(offset - context_len, 0) : offset]))
                columns["source_index"].append(row)
                columns["token_offset"].append(offset)
                columns["suffix_matches"].append(int(n_match))
                columns["memorized"].append(memorized)
            if bar_update is not None:
                bar_update(len(chunk))
    finally:
        model.train(was_training)
        if hasattr(bar, "close"):
            bar.close()
    return datasets.Dataset.from_dict(columns, features=WINDOW_FEATURES)
