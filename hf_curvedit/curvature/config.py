"""FactorConfig: how K-FAC curvature factors are collected."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import InputError
from ..utils import fill_unset_fields

LabelMode = Literal["sampled", "empirical"]
TokenPositions = Literal["cls", "all"]


@dataclass
class FactorConfig:
    """Settings for collecting K-FAC factors ``A = E[a aᵀ]`` and ``G = E[g gᵀ]``.

    Args:
        target_modules: Linear layers to collect factors for: a regex (``re.fullmatch`` on the
            qualified name) or a list of names, name suffixes or globs. ``None`` uses the
            architecture default (the MLP projections).
        exclude_modules: Same syntax; matching modules are skipped.
        label_mode: ``"sampled"`` draws each label from the model's own predictive distribution (the
            true Fisher, as in the paper); ``"empirical"`` uses the data's label (the empirical Fisher):
            the next token for a language model, ``label_column`` for an image classifier.
        seq_len: Tokens per block. Text is packed into blocks of exactly this length.
        batch_size: Blocks (or images) per forward/backward pass (per process).
        max_tokens: Stop after this many tokens (rounded down to whole blocks). ``None`` = all data.
        packing: Concatenate documents (separated by EOS) into full blocks. With ``False`` each
            document becomes its own block, truncated to ``seq_len`` and right-padded; padded
            positions are masked out of both factors.
        text_column: Column holding raw text. A column named ``input_ids`` is used as-is instead.
        accumulate_dtype: ``"float32"`` (default) or ``"float64"`` for the running sums.
        storage_dtype: The dtype the finished factors are kept and written in; ``None`` (default) keeps the
            accumulation dtype. ``"bfloat16"`` halves the factor file and the memory that holds it (its effect on
            the selection is measured in ``benchmarks/factor_dtype.py``); the sums are still accumulated in
            ``accumulate_dtype`` and eigendecomposed in float64.
        seed: Seed for label sampling. Each batch gets its own generator seeded from
            ``(seed, batch index)``, so results do not depend on resumes or process count.
        sample_chunk_size: Token positions per chunk when sampling labels, which bounds the size
            of the softmax held in memory.
        checkpoint_every: Save resumable partial sums every this many batches (0 disables).
        max_factor_memory_gb: Memory budget for the factor accumulators. When all target modules
            do not fit, they are split into partitions and the data is read once per partition.
        token_positions: Image classifiers only: which token positions are K-FAC samples.
            ``"cls"`` (the default for images, as in the paper's ViT experiment) takes the class
            token (position 0) of every image; ``"all"`` takes every token position. Models without
            a class token (Swin) need ``"all"``. Language models always use all valid positions.
        image_column: Image classifiers only: the column with the images (ignored when the data
            already has a ``pixel_values`` column).
        label_column: Image classifiers only: the column with the class labels, read when
            ``label_mode="empirical"``.
        max_examples: Image classifiers only: stop after this many images. ``None`` = all data.
        dataset: A description of the factor data (a dataset id, a path, or words), recorded with the factors
            and shown on model cards. It does not change what is collected.
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    label_mode: LabelMode = "sampled"
    seq_len: int = 512
    batch_size: int = 8
    max_tokens: int | None = None
    packing: bool = True
    text_column: str = "text"
    accumulate_dtype: Literal["float32", "float64"] = "float32"
    storage_dtype: Literal["float32", "float64", "bfloat16"] | None = None
    seed: int = 0
    sample_chunk_size: int = 2048
    checkpoint_every: int = 50
    max_factor_memory_gb: float | None = None
    token_positions: TokenPositions | None = None
    image_column: str = "image"
    label_column: str = "label"
    max_examples: int | None = None
    dataset: str | None = None

    def __post_init__(self) -> None:
        fill_unset_fields(self)
        if self.label_mode not in ("sampled", "empirical"):
            raise InputError(f"label_mode={self.label_mode!r}: use 'sampled' (true Fisher) or 'empirical'.")
        if self.accumulate_dtype not in ("float32", "float64"):
            raise InputError(f"accumulate_dtype={self.accumulate_dtype!r}: use 'float32' or 'float64'.")
        if self.storage_dtype not in (None, "float32", "float64", "bfloat16"):
            raise InputError(f"storage_dtype={self.storage_dtype!r}: use 'float32', 'float64', 'bfloat16' or None "
                             "(the accumulation dtype).")
        for name in ("seq_len", "batch_size", "sample_chunk_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.seq_len < 2:
            raise InputError("seq_len must be at least 2: the last position of a block has no target.")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise InputError(f"max_tokens={self.max_tokens} is smaller than one block (seq_len={self.seq_len}).")
        if self.token_positions not in (None, "cls", "all"):
            raise InputError(f"token_positions={self.token_positions!r}: use 'cls' (class token only) or 'all'.")
        if self.max_examples is not None and self.max_examples < 1:
            raise InputError(f"max_examples must be a positive integer or None, got {self.max_examples!r}.")
        if self.checkpoint_every < 0:
            raise InputError("checkpoint_every must be >= 0 (0 disables checkpoints).")
        if self.max_factor_memory_gb is not None and self.max_factor_memory_gb <= 0:
            raise InputError("max_factor_memory_gb must be positive, or None for no budget.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactorConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a clear error."""
        data = dict(data)
        # Factor files written before `dataset` was a field kept it in a free-form `extra` dict.
        legacy = data.pop("extra", None) or {}
        if "dataset" in legacy:
            data.setdefault("dataset", legacy["dataset"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown FactorConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def collection_key(self) -> dict[str, Any]:
        """The fields that change what is collected. A resume must match them exactly."""
        d = self.to_dict()
        for k in ("checkpoint_every", "max_factor_memory_gb", "dataset", "storage_dtype"):
            d.pop(k)
        # Image-only fields join the key only when set, so keys (and checkpoints) of text runs written
        # before these fields existed still match.
        for k, default in (("token_positions", None), ("image_column", "image"), ("label_column", "label"),
                           ("max_examples", None)):
            if d[k] == default:
                d.pop(k)
        return d


def accumulator_dtype(config: FactorConfig) -> torch.dtype:
    """The dtype of the running sums: float32 by default, float64 on request."""
    return torch.float64 if config.accumulate_dtype == "float64" else torch.float32
