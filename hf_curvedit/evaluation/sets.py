"""The evaluation sets: what to recite (`RecitationSet`), held-out text (`TextSet`), and `as_eval_set`, which reads
a dataset or a list as one of them (or `ImageClassificationSet`, defined with its metrics in `classification.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ._common import as_id_list
from .classification import ImageClassificationSet
from .perplexity import coerce_sequences
from .recitation import DEFAULT_QUOTE_SUFFIX_TOKENS, split_suffix

__all__ = ["EvalSetLike", "RecitationSet", "TextSet", "as_eval_set"]


@dataclass
class RecitationSet:
    """(prefix, suffix) token-id pairs to recite, with optional preceding context for the stress test."""

    prefixes: list[list[int]]
    suffixes: list[list[int]]
    contexts: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self.prefixes = [as_id_list(p, f"prefix {i}") for i, p in enumerate(self.prefixes)]
        self.suffixes = [as_id_list(s, f"suffix {i}") for i, s in enumerate(self.suffixes)]
        if len(self.prefixes) != len(self.suffixes):
            raise InputError(f"got {len(self.prefixes)} prefixes but {len(self.suffixes)} suffixes")
        if not self.prefixes:
            raise InputError("a RecitationSet needs at least one example")
        for i, (p, s) in enumerate(zip(self.prefixes, self.suffixes)):
            if not p or not s:
                raise InputError(f"example {i} has an empty prefix or suffix")
        if self.contexts is not None:
            self.contexts = [as_id_list(c, f"context {i}") for i, c in enumerate(self.contexts)]
            if len(self.contexts) != len(self.prefixes):
                raise InputError(f"got {len(self.contexts)} contexts for {len(self.prefixes)} examples")

    def __len__(self) -> int:
        return len(self.prefixes)

    @classmethod
    def from_dataset(cls, dataset: Any) -> RecitationSet:
        """From a dataset with ``prefix_ids`` and ``suffix_ids`` (and optionally ``context_ids``) columns, such as
        the output of [`find_memorized_windows`]."""
        cols = dataset.column_names
        if "prefix_ids" not in cols or "suffix_ids" not in cols:
            raise InputError(f"dataset needs 'prefix_ids' and 'suffix_ids' columns, has {cols}")
        return cls(dataset["prefix_ids"], dataset["suffix_ids"],
                   dataset["context_ids"] if "context_ids" in cols else None)

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> RecitationSet:
        """From ``[(prefix_ids, suffix_ids), ...]``."""
        return cls([p for p, _ in pairs], [s for _, s in pairs])

    @classmethod
    def from_texts(cls, texts: Sequence[str] | Sequence[Sequence[int]], tokenizer: Any = None,
                   suffix_tokens: int = DEFAULT_QUOTE_SUFFIX_TOKENS, add_special_tokens: bool = True) -> RecitationSet:
        """From raw texts such as famous quotes (or token-id lists): the last ``suffix_tokens`` tokens are the
        suffix."""
        prefixes, suffixes = split_suffix(texts, suffix_tokens, tokenizer=tokenizer,
                                          add_special_tokens=add_special_tokens)
        return cls(prefixes, suffixes)


@dataclass
class TextSet:
    """Held-out documents (token ids) for perplexity and nDCG."""

    sequences: list[list[int]]

    def __post_init__(self) -> None:
        self.sequences = [as_id_list(s, f"sequence {i}") for i, s in enumerate(self.sequences)]
        if not any(len(s) >= 2 for s in self.sequences):
            raise InputError("a TextSet needs at least one document with 2 or more tokens")

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Any, add_special_tokens: bool = True) -> TextSet:
        """Tokenize raw held-out texts."""
        return cls(coerce_sequences(list(texts), tokenizer, add_special_tokens=add_special_tokens))

    @classmethod
    def from_dataset(cls, dataset: Any, tokenizer: Any = None, text_column: str = "text",
                     input_ids_column: str = "input_ids") -> TextSet:
        """From a dataset with an ``input_ids`` column, or a ``text`` column plus a tokenizer."""
        return cls(coerce_sequences(dataset, tokenizer, text_column=text_column, input_ids_column=input_ids_column))


EvalSetLike = Any  # RecitationSet | TextSet | datasets.Dataset | list of (prefix, suffix) pairs | list of token lists


def as_eval_set(data: EvalSetLike, tokenizer: Any = None) -> RecitationSet | TextSet:
    """Interpret one entry of ``sets``: a dataset with ``prefix_ids``/``suffix_ids`` or a list of (prefix, suffix)
    pairs is a [`RecitationSet`]; a dataset with ``input_ids``/``text`` or a list of token-id lists is a [`TextSet`].
    Lists of raw strings are ambiguous (quotes to recite, or held-out text?) and must be wrapped explicitly."""
    if isinstance(data, (RecitationSet, TextSet, ImageClassificationSet)):
        return data
    cols = getattr(data, "column_names", None)
    if cols is not None:
        if "pixel_values" in cols or "image" in cols:
            raise TypeError("an image dataset needs its processor and label columns: wrap it in "
                            "ImageClassificationSet.from_dataset(dataset, image_processor, true_label_column=...)")
        if "prefix_ids" in cols and "suffix_ids" in cols:
            return RecitationSet.from_dataset(data)
        return TextSet.from_dataset(data, tokenizer)
    items = list(data)
    if not items:
        raise InputError("empty evaluation set")
    first = items[0]
    if isinstance(first, str):
        raise TypeError("a list of raw texts is ambiguous: wrap it in RecitationSet.from_texts(texts, tokenizer) "
                        "(quotes: the last tokens are the suffix) or TextSet.from_texts(texts, tokenizer) "
                        "(held-out text for perplexity and nDCG)")
    if (isinstance(first, (tuple, list)) and len(first) == 2 and not isinstance(first[0], int)
            and hasattr(first[0], "__len__")):
        return RecitationSet.from_pairs(items)
    return TextSet(items)
