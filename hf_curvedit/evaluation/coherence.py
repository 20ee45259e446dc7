"""Coherence: nDCG@k of the edited model's top-k next tokens against the base model's top-k.

Relevance (graded by base rank): at one position let ``b_1, ..., b_k`` be the base model's top-k next
tokens, most likely first. A token's relevance is ``rel(b_i) = k - i + 1`` (so ``k`` for the base's
top-1 down to ``1`` for its k-th token) and ``0`` for any token outside the base's top-k. With
``e_1, ..., e_k`` the edited model's top-k::

    DCG  = sum_{i=1..k} rel(e_i) / log2(i + 1)
    IDCG = sum_{i=1..k} (k - i + 1) / log2(i + 1)      (the base's own ranking, the best possible)
    nDCG = DCG / IDCG  in [0, 1]

nDCG is 1 exactly when the edited top-k equals the base top-k in the same order, and it drops both
when the edited model swaps the order and when it brings in tokens the base did not rank. The
reported score is the mean over all scored positions of the held-out text (the positions that
predict a token, as in [`perplexity`]). Linear gains (not ``2^rel - 1``) keep a swap of ranks 9 and 10
from being negligible next to a swap of ranks 1 and 2 by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from .perplexity import coerce_sequences, score_text

DEFAULT_NDCG_K = 10


@dataclass
class CoherenceResult:
    """nDCG@k of an edited model against its base.

    Args:
        ndcg: mean nDCG@k over positions.
        k: cutoff.
        n_positions: number of positions averaged.
    """

    ndcg: float
    k: int
    n_positions: int


def _as_rank_tensor(rankings: Any, name: str) -> torch.Tensor:
    t = (rankings if isinstance(rankings, torch.Tensor)
         else torch.as_tensor([list(map(int, r)) for r in rankings], dtype=torch.long))
    if t.dim() != 2:
        raise InputError(f"{name} must be a 2-D array of ranked token ids (positions x k), got shape {tuple(t.shape)}")
    return t.long()


def ndcg_per_position(
    predicted: Sequence[Sequence[int]] | torch.Tensor,
    reference: Sequence[Sequence[int]] | torch.Tensor,
    k: int = DEFAULT_NDCG_K,
) -> torch.Tensor:
    """nDCG@k of each predicted ranking against the reference ranking at the same position.

    Args:
        predicted: ``(N, >=k)`` ranked token ids of the edited model, best first.
        reference: ``(N, >=k)`` ranked token ids of the base model, best first; relevance is graded by
            base rank (see the module docstring). Ids within one reference row must be distinct.
        k: cutoff.

    Returns:
        A float64 tensor of ``N`` scores in ``[0, 1]``.
    """
    if k <= 0:
        raise InputError(f"k must be positive, got {k}")
    pred, ref = _as_rank_tensor(predicted, "predicted"), _as_rank_tensor(reference, "reference")
    if pred.shape[0] != ref.shape[0]:
        raise InputError(f"got {pred.shape[0]} predicted rankings but {ref.shape[0]} reference rankings")
    if pred.shape[1] < k or ref.shape[1] < k:
        raise InputError(f"rankings need at least k={k} entries, got {pred.shape[1]} and {ref.shape[1]}")
    pred, ref = pred[:, :k], ref[:, :k]
    grades = torch.arange(k, 0, -1, dtype=torch.float64)  # k for base rank 1 ... 1 for base rank k
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    # rel[n, i] = grade of pred[n, i] in ref[n] (0 if absent); ids in a ranking are distinct, so at most one match.
    match = pred[:, :, None] == ref[:, None, :]
    rel = (match.double() * grades).sum(-1)
    idcg = float((grades * discounts).sum())
    return (rel * discounts).sum(-1) / idcg


def ndcg_at_k(
    predicted: Sequence[Sequence[int]] | torch.Tensor,
    reference: Sequence[Sequence[int]] | torch.Tensor,
    k: int = DEFAULT_NDCG_K,
) -> float:
    """Mean of [`ndcg_per_position`] over positions."""
    scores = ndcg_per_position(predicted, reference, k)
    if scores.numel() == 0:
        raise InputError("no positions to score")
    return float(scores.mean())


def next_token_topk(
    model: torch.nn.Module,
    data: Any,
    *,
    k: int = DEFAULT_NDCG_K,
    tokenizer: Any = None,
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """``(N, k)`` top-k next-token ids of ``model`` at every scored position of ``data`` (same positions and
    order as [`perplexity`] with the same block size and stride)."""
    if k <= 0:
        raise InputError(f"k must be positive, got {k}")
    sequences = coerce_sequences(data, tokenizer)
    _, _, topk = score_text(model, sequences, block_size=block_size, stride=stride, batch_size=batch_size,
                            top_k=k, pad_token_id=pad_token_id, show_progress=show_progress, desc="top-k")
    assert topk is not None
    return topk


def coherence_ndcg(
    edited_model: torch.nn.Module,
    base_model: torch.nn.Module,
    data: Any,
    *,
    k: int = DEFAULT_NDCG_K,
    **kwargs: Any,
) -> CoherenceResult:
    """nDCG@k of ``edited_model``'s next-token top-k against ``base_model``'s on held-out ``data``.

    For a `peft.PeftModel`, [`evaluate_edit`] computes this from one model with the adapter on and off;
    this function is for two separate models. Extra keyword arguments go to [`next_token_topk`].
    """
    base = next_token_topk(base_model, data, k=k, **kwargs)
    edited = next_token_topk(edited_model, data, k=k, **kwargs)
    return CoherenceResult(ndcg_at_k(edited, base, k), k, int(base.shape[0]))
