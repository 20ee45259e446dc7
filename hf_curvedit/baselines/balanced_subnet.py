"""BalancedSubnet (Sakarvadia et al., ICLR 2025): learn which few MLP weights to zero so that memorized text is
forgotten while clean text is kept.

Each targeted weight ``W`` gets a trainable score per entry. The forward pass uses ``W ∘ mask`` where ``mask`` zeroes
the ``ratio`` fraction of entries with the lowest scores (per module); the mask's gradient is passed straight through
to the scores (the edge-popup estimator). Only the scores are trained, with SGD (momentum 0.9), on

    loss = −(1 − λ) · CE(memorized) + λ · CE(clean),

and at the end the mask is baked into the weights. Unlike the curvature edit, it needs the memorized set itself as a
training signal. The model's own parameters are never touched during training: the masked weights are passed to
``torch.func.functional_call``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..integrity import read_safetensors
from ..targets import TargetSpec, resolve_target_modules, weight_targets
from ..utils import fill_unset_fields, save_safetensors

__all__ = ["BalancedSubnetConfig", "BalancedSubnetMasks", "train_balanced_subnet"]

MASKS_FORMAT = "hf_curvedit.balanced_subnet"
_RETRAIN = "Train the masks again (train_balanced_subnet), or restore the file from a good copy"


@dataclass
class BalancedSubnetConfig:
    """Settings of the BalancedSubnet baseline; the defaults are the published best for OLMo-2 7B.

    Args:
        ratio: fraction of each targeted weight's entries that the mask zeroes, in (0, 1).
        lam: λ, the weight of the clean-text loss (``1 − λ`` weighs the ascent on the memorized text).
        epochs: passes over the memorized set.
        lr: SGD learning rate of the scores.
        momentum: SGD momentum.
        batch_size: memorized sequences per step (each step also takes as many clean sequences).
        target_modules: the weights to mask, in the `target_modules` grammar; ``None``: the architecture's MLP
            projections in every layer (as published).
        seed: seeds the scores' initialization and the order of the data.
        max_length: longer sequences are cut into consecutive pieces of at most this many tokens (a document of the
            clean text can be far longer than the memorized items).
    """

    ratio: float = 0.0015
    lam: float = 0.7
    epochs: int = 5
    lr: float = 0.3
    momentum: float = 0.9
    batch_size: int = 16
    target_modules: TargetSpec = None
    seed: int = 0
    max_length: int = 256

    def __post_init__(self) -> None:
        fill_unset_fields(self)
        if not 0.0 < self.ratio < 1.0:
            raise InputError(f"ratio must be in (0, 1) (the fraction of weights to zero, e.g. 0.0015), got "
                             f"{self.ratio}")
        if not 0.0 <= self.lam <= 1.0:
            raise InputError(f"lam must be in [0, 1] (the weight of the clean loss), got {self.lam}")
        for name in ("epochs", "batch_size", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")


class _DropLowest(torch.autograd.Function):
    """Mask that zeroes the ``n_drop`` lowest scores; straight-through gradient to the scores."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, n_drop: int) -> torch.Tensor:  # type: ignore[override]
        mask = torch.ones_like(scores)
        if n_drop:
            mask.view(-1)[torch.argsort(scores.detach().reshape(-1), stable=True)[:n_drop]] = 0
        return mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def n_dropped(numel: int, ratio: float) -> int:
    """How many entries of a weight with ``numel`` entries the mask zeroes: ``round(ratio · numel)``."""
    return int(round(ratio * numel))


@dataclass
class BalancedSubnetMasks:
    """The learned masks (``True`` = kept) per module, with the settings and per-epoch losses."""

    masks: dict[str, torch.Tensor]
    config: BalancedSubnetConfig
    history: list[dict[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily zero the masked weights of ``model`` (restored on exit, also after an error)."""
        saved = {}
        targets = weight_targets(model)
        try:
            with torch.no_grad():
                for name, mask in self.masks.items():
                    w = targets[name].parameter()
                    saved[name] = w.detach().clone()
                    w.mul_(mask.to(w.device, w.dtype))
            yield model
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    targets[name].parameter().copy_(w)

    def bake(self, model: nn.Module) -> nn.Module:
        """Zero the masked weights of ``model`` in place (permanent) and return it."""
        targets = weight_targets(model)
        with torch.no_grad():
            for name, mask in self.masks.items():
                w = targets[name].parameter()
                w.mul_(mask.to(w.device, w.dtype))
        return model

    def save(self, path: str | Path) -> Path:
        """Write the masks (uint8) and settings to a safetensors file (atomically, with the digest of every mask)."""
        return save_safetensors(path, {n: m.to(torch.uint8) for n, m in self.masks.items()},
                                {"format": MASKS_FORMAT, "config": json.dumps(asdict(self.config), default=list),
                                 "history": json.dumps(self.history)})

    @classmethod
    def load(cls, path: str | Path) -> BalancedSubnetMasks:
        """Read masks written by `save`; a damaged file (or a missing, added or renamed mask) raises
        `hf_curvedit.integrity.DamagedFileError`."""
        with read_safetensors(path, "BalancedSubnet masks", _RETRAIN) as f:
            meta = f.metadata
            masks = {n: f.get(n).bool() for n in f.keys()}
            try:
                config = BalancedSubnetConfig(**json.loads(meta.get("config", "{}")))
                history = json.loads(meta.get("history", "[]"))
            except (TypeError, ValueError) as err:
                raise f.damaged(f"its settings are unreadable ({err})") from None
        return cls(masks, config, history)


def _batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, gen: torch.Generator
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(seqs), generator=gen).tolist()
    for i in range(0, len(order), batch_size):
        rows = [list(seqs[j]) for j in order[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :len(r)] = torch.tensor(r)
            attn[k, :len(r)] = 1
        yield ids, attn, ids.masked_fill(attn == 0, -100)


def _sequences(data: Any, what: str, max_length: int) -> list[list[int]]:
    if hasattr(data, "prefixes") and hasattr(data, "suffixes"):  # a RecitationSet: the whole memorized text
        seqs = [list(p) + list(s) for p, s in zip(data.prefixes, data.suffixes)]
    elif hasattr(data, "sequences"):  # a TextSet
        seqs = [list(s) for s in data.sequences]
    else:
        seqs = [list(s) for s in data]
    seqs = [piece for s in seqs for piece in (s[i:i + max_length] for i in range(0, len(s), max_length))
            if len(piece) >= 2]
    if not seqs:
        raise InputError(f"the {what} data has no sequence of 2 or more tokens; give token-id sequences, a "
                         "RecitationSet or a TextSet")
    return seqs


def train_balanced_subnet(model: nn.Module, memorized: Any, clean: Any,
                          config: BalancedSubnetConfig | None = None, *, pad_token_id: int | None = None,
                          show_progress: bool = True) -> BalancedSubnetMasks:
    """Learn BalancedSubnet masks for ``model`` (its weights are left as they are; see `BalancedSubnetMasks.bake`).

    Args:
        model: a causal language model (transformers), in any dtype; the scores are float32.
        memorized: the text to forget: a `RecitationSet` (prefix + suffix of each item), a `TextSet`, or token-id
            sequences.
        clean: text to keep, in the same forms (not the held-out text the edit is judged on).
        config: the settings (default: the published ones).
        pad_token_id: padding id (default: the model config's pad, else 0; padded positions are never scored).
    """
    config = config or BalancedSubnetConfig()
    mem = _sequences(memorized, "memorized", config.max_length)
    cln = _sequences(clean, "clean", config.max_length)
    names = resolve_target_modules(model, config.target_modules)
    if not names:
        raise InputError(f"target_modules={config.target_modules!r} selects no linear layer of this model")
    pad = pad_token_id if pad_token_id is not None else (getattr(model.config, "pad_token_id", None) or 0)
    gen = torch.Generator().manual_seed(config.seed)
    targets = weight_targets(model)
    weights = {n: targets[n].parameter() for n in names}
    # the parameter's own name: "<module>.weight" for a linear layer; an expert projection is named by its parameter
    param_names = {n: n if targets[n].is_experts else f"{n}.weight" for n in names}
    scores = {}
    for n, w in weights.items():
        bound = 1.0 / math.sqrt(w.shape[-1])  # kaiming_uniform(a=√5), the edge-popup initialization
        scores[n] = (torch.rand(w.shape, generator=gen) * 2 * bound - bound).to(w.device).requires_grad_(True)
    drops = {n: n_dropped(w.numel(), config.ratio) for n, w in weights.items()}
    opt = torch.optim.SGD(list(scores.values()), lr=config.lr, momentum=config.momentum)
    was_training = model.training
    model.eval()  # no dropout: the masks are the only thing that changes
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device

    def loss_on(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, attn, labels = (t.to(device) for t in batch)
        masked = {param_names[n]: w * _DropLowest.apply(scores[n], drops[n]).to(w.dtype) for n, w in weights.items()}
        out = torch.func.functional_call(model, masked, args=(), kwargs={"input_ids": ids, "attention_mask": attn,
                                                                          "labels": labels})
        return out.loss.float()

    history: list[dict[str, float]] = []
    steps_per_epoch = math.ceil(len(mem) / config.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="BalancedSubnet", unit="step", disable=not show_progress)
    try:
        clean_batches = itertools.cycle(list(_batches(cln, config.batch_size, pad, gen)))
        for epoch in range(config.epochs):
            sums = {"memorized_ce": 0.0, "clean_ce": 0.0}
            for batch in _batches(mem, config.batch_size, pad, gen):
                ce_mem, ce_clean = loss_on(batch), loss_on(next(clean_batches))
                loss = -(1 - config.lam) * ce_mem + config.lam * ce_clean
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["memorized_ce"] += float(ce_mem.detach()) / steps_per_epoch
                sums["clean_ce"] += float(ce_clean.detach()) / steps_per_epoch
                bar.update()
            history.append({"epoch": epoch + 1, **sums})
    finally:
        bar.close()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    with torch.no_grad():
        masks = {n: _DropLowest.apply(scores[n].detach(), drops[n]).bool().cpu() for n in names}
    return BalancedSubnetMasks(masks, config, history)
