"""Factor tasks: how a model family turns a batch into the loss whose output-gradients are K-FAC's g.

K-FAC needs two things from a model family: the *summed* loss of a batch (so that ∂loss/∂y at a position is that
position's own gradient g) and the positions of each activation that count as samples. A `FactorTask` supplies both,
and prepares the data; the collector (`collector.py`) only hooks linear layers and accumulates. A new family
(sequence classification, a seq2seq decoder) is a new task class, passed as ``fit_factors(..., task=MyTask())``.

Shipped tasks:

- `CausalLMTask`: one sample per *valid* token position, i.e. a real token whose next position is a real token too
  (it has a next-token target). Labels are drawn from the model's own predictive distribution (true Fisher) or read
  from the data (the next token, empirical Fisher).
- `ImageClassificationTask`: one loss per image, the label sampled from the class distribution or read from the
  data. Samples are the class-token position of each image (``token_positions="cls"``, the paper's ViT setting) or
  every token position (``"all"``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DatasetLike, count_batches, image_batch_converter, pack_into_blocks, select_image_columns
from ..errors import InputError
from .config import FactorConfig, accumulator_dtype

__all__ = ["CausalLMTask", "FactorTask", "ImageClassificationTask", "PreparedData", "SamplePositions",
           "batch_generator", "default_task", "sample_labels", "task_for", "valid_position_mask"]

# Which positions of a (batch, tokens, features) activation are K-FAC samples: a (batch, tokens) bool mask, the class
# token of every sequence ("cls"), or every position ("all").
SamplePositions = torch.Tensor | Literal["cls", "all"]


@dataclass
class PreparedData:
    """Data ready for batching: rows of model inputs and how to turn a batch of rows into tensors.

    Attributes:
        rows: a `datasets` dataset whose rows are model inputs (token blocks, images or pixel values).
        to_tensors: turns a batch of rows (column -> list) into tensors; ``None`` reads
        ``input_ids``/``attention_mask``.
        max_rows: read at most this many rows (``None``: all).
        samples_per_row: the most K-FAC samples one row can give (for the progress bar's total).
    """

    rows: DatasetLike
    to_tensors: Callable[[dict[str, list]], dict[str, torch.Tensor]] | None
    max_rows: int | None
    samples_per_row: int


@runtime_checkable
class FactorTask(Protocol):
    """What K-FAC factor collection needs from a model family (compare kronfluence's ``Task``)."""

    name: str  # e.g. "causal-lm"
    unit: str  # what one sample is called on the progress bar, e.g. "tok"

    def validate(self, model: nn.Module, config: FactorConfig) -> None:
        """Raise a ``ValueError`` naming the fix when ``model`` or ``config`` cannot be used, before any data pass."""

    def prepare_data(self, model: nn.Module, data: DatasetLike, config: FactorConfig, processor: Any) -> PreparedData:
        """Turn raw data into rows of model inputs (``processor``: a tokenizer or an image processor, if needed)."""

    def sample_positions(self, batch: dict[str, torch.Tensor], config: FactorConfig) -> SamplePositions:
        """The positions of this batch that are K-FAC samples."""

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], config: FactorConfig,
                     batch_index: int) -> torch.Tensor:
        """The batch's loss, *summed* over its samples (labels sampled or read as ``config.label_mode`` says)."""

    def example_batch(self, model: nn.Module, config: FactorConfig) -> dict[str, torch.Tensor]:
        """The smallest input the model's forward takes (for `plan_factors`' shape-only pass on the meta device)."""


def valid_position_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions that are real tokens and whose next position is a real token too."""
    am = attention_mask.bool()
    valid = torch.zeros_like(am)
    valid[:, :-1] = am[:, :-1] & am[:, 1:]
    return valid


def sample_labels(logits: torch.Tensor, generator: torch.Generator, chunk_size: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one label per row of ``logits`` (N, V) (or per row ``rows`` names, in that order) from softmax(logits),
    ``chunk_size`` rows at a time.

    Chunking bounds the fp32 probability tensor to chunk_size × V instead of N × V, and ``rows`` picks the rows chunk
    by chunk instead of copying them all first.
    """
    n = logits.shape[0] if rows is None else rows.numel()
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    vocab = logits.shape[-1]
    for s in range(0, n, chunk_size):
        chunk = logits[s:s + chunk_size] if rows is None else logits.index_select(0, rows[s:s + chunk_size])
        # Inverse-CDF sampling needs one uniform draw per row; torch.multinomial draws one
        # exponential per vocabulary entry, which dominated collection time on CPU.
        cdf = torch.softmax(chunk.float(), dim=-1).cumsum_(dim=-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
        out[s:s + chunk_size] = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab - 1)
    return out


def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    """The label-sampling generator of one global batch.

    Labels depend only on ``(seed, batch_index)``, not on how many processes share the work or where a run resumed.
    """
    digest = hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def _targets(logits: torch.Tensor, gold: torch.Tensor | None, config: FactorConfig, batch_index: int) -> torch.Tensor:
    if config.label_mode == "empirical":
        assert gold is not None
        return gold
    with torch.no_grad():
        return sample_labels(logits.detach(), batch_generator(config.seed, batch_index, logits.device),
                             config.sample_chunk_size)


def _loss_dtype(logits: torch.Tensor, config: FactorConfig) -> torch.dtype:
    # The cross-entropy runs in at least float32, and in the accumulation dtype when that is wider: a float64 fit
    # of a float64 model must not pass its gradients through a float32 softmax.
    return torch.promote_types(torch.promote_types(logits.dtype, torch.float32), accumulator_dtype(config))


class _SummedCrossEntropy(torch.autograd.Function):
    """``Σ_rows CE(logits[row], targets[row])`` (rows with target -100 ignored) in ``dtype``, a chunk of rows at a
    time, whose backward writes ``softmax − onehot`` over the logits it saved.

    The logits of a causal LM are its largest activation (tokens × vocabulary). `F.cross_entropy` keeps a log-softmax
    of that size for the backward and builds two more there; this keeps the logits (which the model made anyway) and
    builds only their gradient, so the loss costs one tokens × vocabulary buffer instead of three at the peak. The
    temporaries of a chunk of rows hold about 4M entries.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=dtype, device=logits.device)
        rows = (targets != -100).nonzero().squeeze(1)
        for s in range(0, rows.numel(), chunk):
            r = rows[s:s + chunk]
            z = logits.index_select(0, r).to(dtype)
            total += (torch.logsumexp(z, dim=-1) - z.gather(1, targets[r, None]).squeeze(1)).sum()
        ctx.save_for_backward(logits, targets)
        ctx.dtype, ctx.chunk = dtype, chunk
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_out.to(ctx.dtype)
        for s in range(0, grad.shape[0], ctx.chunk):
            t = targets[s:s + ctx.chunk]
            p = torch.softmax(logits[s:s + ctx.chunk].to(ctx.dtype), dim=-1)
            valid = t != -100
            p[valid, t[valid]] -= 1.0
            p[~valid] = 0.0
            grad[s:s + ctx.chunk] = p.mul_(scale)
        return grad, None, None, None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The summed loss of ``logits`` (N, V) against ``targets`` (N,; -100: ignored), computed in ``dtype`` without a
    log-softmax buffer of the logits' size (see `_SummedCrossEntropy`)."""
    return _SummedCrossEntropy.apply(logits, targets, dtype, max(1, (1 << 22) // max(1, logits.shape[-1])))


def _input_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def check_causal_lm(model: nn.Module) -> None:
    """Raise a ``ValueError`` naming ``task=`` when ``model`` is a transformers model whose head is not a causal
    language model (a classifier, a masked LM, an encoder-decoder): the built-in task's next-token loss means nothing
    for it. Models that are not transformers models are taken at their word."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    cls = type(model).__name__
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        head = "an encoder-decoder (seq2seq) model"
    elif cls in _causal_lm_class_names() or cls.endswith(("ForCausalLM", "LMHeadModel")):
        return
    elif "MaskedLM" in cls:
        head = "a masked language model"
    elif "SequenceClassification" in cls:
        head = "a sequence classifier"
    elif "TokenClassification" in cls:
        head = "a token classifier"
    else:
        head = "not a causal language model"
    raise InputError(
        f"{cls} is {head}, and no built-in factor task covers its head (CausalLMTask needs next-token logits, "
        "ImageClassificationTask pixel_values). Pass task= to fit_factors with a FactorTask of your own "
        "(hf_curvedit.curvature.FactorTask: its summed loss and which positions are samples; a subclass of "
        "CausalLMTask keeps its tokenization and packing and overrides compute_loss and sample_positions), or load "
        "the model with its causal-LM head (AutoModelForCausalLM)."
    )


class CausalLMTask:
    """Causal language models (``model(input_ids, attention_mask).logits``): per-token samples at valid positions."""

    name = "causal-lm"
    unit = "tok"

    def validate(self, model: nn.Module, config: FactorConfig) -> None:
        # the head is checked where this task is picked for the model (`task_for`), not here: a subclass of the
        # user's own that computes another loss on the same tokens is meant for other heads
        if config.token_positions is not None:
            raise InputError(f"token_positions={config.token_positions!r} is for image classifiers; a language model "
                             "uses every position that has a next-token target. Leave token_positions unset.")
        if config.max_examples is not None:
            raise InputError("max_examples counts images; for a language model limit the data with max_tokens=")

    def prepare_data(self, model: nn.Module, data: DatasetLike, config: FactorConfig, processor: Any) -> PreparedData:
        rows = pack_into_blocks(data, processor, config.seq_len, text_column=config.text_column,
                                packing=config.packing)
        max_rows = config.max_tokens // config.seq_len if config.max_tokens is not None else None
        if count_batches(rows, config.batch_size, max_rows) == 0:
            raise InputError(f"the data yields no block of seq_len={config.seq_len} tokens; provide more text or "
                             "lower seq_len")
        return PreparedData(rows, None, max_rows, config.seq_len - 1)

    def sample_positions(self, batch: dict[str, torch.Tensor], config: FactorConfig) -> SamplePositions:
        if "input_ids" not in batch:
            raise InputError(f"a causal language model takes input_ids, but the batch has {sorted(batch)}")
        return valid_position_mask(batch["attention_mask"])

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], config: FactorConfig,
                     batch_index: int) -> torch.Tensor:
        valid = self.sample_positions(batch, config)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        flat = logits.reshape(-1, logits.shape[-1])
        flat_idx = valid.reshape(-1).nonzero().squeeze(1).to(logits.device)
        # The loss runs over every position, the others' targets ignored: a copy of the valid rows' logits (and its
        # scatter back in the backward pass) would cost two more (tokens × vocabulary) buffers at the peak.
        targets = torch.full((flat.shape[0],), -100, dtype=torch.long, device=logits.device)
        if config.label_mode == "empirical":
            gold = batch["input_ids"].roll(-1, dims=1).reshape(-1).to(logits.device)
            targets[flat_idx] = gold.index_select(0, flat_idx)
        else:
            with torch.no_grad():
                targets[flat_idx] = sample_labels(flat.detach(), batch_generator(config.seed, batch_index,
                                                                                logits.device),
                                                  config.sample_chunk_size, rows=flat_idx)
        return summed_cross_entropy(flat, targets, _loss_dtype(flat, config))

    def example_batch(self, model: nn.Module, config: FactorConfig) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(1, 2, dtype=torch.long)}


def has_class_token(model: nn.Module) -> bool:
    """Whether the model prepends a learned class token (ViT, DeiT, BEiT, DINOv2 do; Swin does not)."""
    return any(n.split(".")[-1] == "cls_token" for n, _ in model.named_parameters())


class ImageClassificationTask:
    """Single-label image classifiers (``model(pixel_values).logits``): one loss per image; samples are the class
    token of each image (``token_positions="cls"``, the default) or every token position (``"all"``)."""

    name = "image-classification"
    unit = "img"
    zero_gradient_hint = " For an image classifier whose head does not read the class token, use token_positions='all'."

    @staticmethod
    def positions(config: FactorConfig) -> Literal["cls", "all"]:
        """The position rule in force: ``config.token_positions``, by default ``"cls"``."""
        return config.token_positions or "cls"

    def validate(self, model: nn.Module, config: FactorConfig) -> None:
        if config.max_tokens is not None:
            raise InputError("max_tokens counts text tokens; for an image classifier limit the data with max_examples=")
        cfg = getattr(model, "config", None)
        problem = getattr(cfg, "problem_type", None)
        if problem not in (None, "single_label_classification") or getattr(cfg, "num_labels", 2) < 2:
            raise InputError(f"K-FAC factors for image models need a single-label classifier (softmax over >= 2 "
                             f"classes); this one has problem_type={problem!r}, "
                             f"num_labels={getattr(cfg, 'num_labels', None)}.")
        positions = self.positions(config)
        if positions == "cls" and not has_class_token(model):
            raise InputError(f"{type(model).__name__} has no class token, so token_positions='cls' has nothing to "
                             "take; use token_positions='all'.")
        if positions == "cls" and getattr(cfg, "use_mean_pooling", False):
            # The head reads the mean of the patch tokens, so the last blocks get no gradient at the class token.
            raise InputError(f"{type(model).__name__} classifies from the mean of its patch tokens "
                             "(use_mean_pooling=True), not from the class token; use token_positions='all'.")

    def prepare_data(self, model: nn.Module, data: DatasetLike, config: FactorConfig, processor: Any) -> PreparedData:
        with_labels = config.label_mode == "empirical"
        rows = select_image_columns(data, image_column=config.image_column, label_column=config.label_column,
                                    with_labels=with_labels)
        to_tensors = image_batch_converter(processor, image_column=config.image_column,
                                           label_column=config.label_column, with_labels=with_labels,
                                           num_channels=getattr(model.config, "num_channels", 3))
        if count_batches(rows, config.batch_size, config.max_examples) == 0:
            raise InputError("the image data is empty")
        return PreparedData(rows, to_tensors, config.max_examples, 1)

    def sample_positions(self, batch: dict[str, torch.Tensor], config: FactorConfig) -> SamplePositions:
        if "pixel_values" not in batch:
            raise InputError(f"an image classifier takes pixel_values, but the batch has {sorted(batch)}")
        return self.positions(config)

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], config: FactorConfig,
                     batch_index: int) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"].to(_input_dtype(model))).logits
        if logits.dim() != 2:
            raise InputError(f"expected (batch, classes) logits from an image classifier, got shape "
                             f"{tuple(logits.shape)}")
        gold = None
        if config.label_mode == "empirical":
            gold = batch["labels"].to(logits.device)
            if gold.numel() and (gold.min() < 0 or gold.max() >= logits.shape[-1]):
                raise InputError(f"labels must lie in [0, {logits.shape[-1]}) (the model's num_labels); batch "
                                 f"{batch_index} has labels in [{int(gold.min())}, {int(gold.max())}]")
        return F.cross_entropy(logits.to(_loss_dtype(logits, config)), _targets(logits, gold, config, batch_index),
                               reduction="sum")

    def example_batch(self, model: nn.Module, config: FactorConfig) -> dict[str, torch.Tensor]:
        cfg = model.config
        size = getattr(cfg, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return {"pixel_values": torch.zeros(1, getattr(cfg, "num_channels", 3), height, width,
                                            dtype=_input_dtype(model))}


def default_task(model: nn.Module) -> FactorTask:
    """The task for ``model``: `ImageClassificationTask` for models that take ``pixel_values``, else `CausalLMTask`."""
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return ImageClassificationTask()
    return CausalLMTask()


def task_for(model: nn.Module, task: FactorTask | None) -> FactorTask:
    """The task a data pass over ``model`` runs: ``task`` if given (taken at its word), else `default_task`, whose
    head is checked first (`check_causal_lm`: a classifier, masked LM or encoder-decoder is refused by name)."""
    if task is not None:
        return task
    chosen = default_task(model)
    if isinstance(chosen, CausalLMTask):
        check_causal_lm(model)
    return chosen
