"""Perturbation stress test: does an edited model still recite when the prompt is nudged?

For each (prefix, suffix) example and each variant ``(e, s)``:

* left-extend: prepend the ``e`` tokens that precede the prefix in its source document
  (``context_ids`` of [`find_memorized_windows`]); variants needing more context than is known are skipped;
* right-shorten: drop the last ``s`` tokens of the prefix; they become the first tokens of the gold
  continuation, so the gold continuation is ``prefix[-s:] + suffix``.

The model continues each variant greedily for the gold continuation's length, and the score of a
variant is the length of the longest exact-match prefix (leading tokens equal to the gold). An
example's score is the max over its variants (docs/method.md §7): a suppressed memory should not come back
under any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ._common import as_id_list
from .recitation import greedy_generate

DEFAULT_STRESS_STEPS: tuple[int, ...] = (0, 5, 10, 15, 20)


@dataclass
class StressResult:
    """Stress-test summary plus per-example results.

    Args:
        mean_longest_match: mean over examples of the longest exact-match prefix (max over variants).
        full_match_rate: fraction of examples where some variant reproduced its whole gold continuation.
        longest_match: per example, the longest exact-match prefix over variants.
        best_variant: per example, the ``[extend, shorten]`` variant that reached it (first one on ties).
        target_length: per example, the gold continuation length of that variant.
        n_variants: number of variants evaluated (summed over examples).
    """

    mean_longest_match: float
    full_match_rate: float
    longest_match: list[int] = field(default_factory=list)
    best_variant: list[list[int]] = field(default_factory=list)
    target_length: list[int] = field(default_factory=list)
    n_variants: int = 0

    @property
    def n(self) -> int:
        return len(self.longest_match)


def exact_prefix_match(prediction: Sequence[int], reference: Sequence[int]) -> int:
    """Number of leading tokens on which ``prediction`` and ``reference`` agree."""
    n = 0
    for p, r in zip(prediction, reference):
        if p != r:
            break
        n += 1
    return n


def stress_variants(
    extend: Sequence[int] = DEFAULT_STRESS_STEPS, shorten: Sequence[int] = DEFAULT_STRESS_STEPS, grid: bool = False
) -> list[tuple[int, int]]:
    """The ``(extend, shorten)`` variants: each axis on its own (``grid=False``) or every combination."""
    if any(e < 0 for e in extend) or any(s < 0 for s in shorten):
        raise InputError("extend and shorten steps must be non-negative")
    if grid:
        variants = [(e, s) for e in extend for s in shorten]
    else:
        variants = [(e, 0) for e in extend] + [(0, s) for s in shorten]
    # The unperturbed prompt is always a variant: a max over variants should not be below the plain recitation.
    return sorted(set(variants) | {(0, 0)})


def stress_test(
    model: torch.nn.Module,
    prefixes: Sequence[Sequence[int]],
    suffixes: Sequence[Sequence[int]],
    *,
    contexts: Sequence[Sequence[int]] | None = None,
    extend: Sequence[int] = DEFAULT_STRESS_STEPS,
    shorten: Sequence[int] = DEFAULT_STRESS_STEPS,
    grid: bool = False,
    batch_size: int = 16,
    pad_token_id: int | None = None,
    show_progress: bool = True,
) -> StressResult:
    """Run the perturbation stress test (see the module docstring) and return a [`StressResult`].

    Args:
        prefixes / suffixes: token ids of each example.
        contexts: tokens preceding each prefix in its source (e.g. ``ds["context_ids"]``); without them
            only right-shortening variants run.
        extend / shorten: steps along each axis; the paper goes up to 20 tokens.
        grid: also combine extending and shortening (``len(extend) * len(shorten)`` variants).
    """
    if len(prefixes) != len(suffixes):
        raise InputError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
    if contexts is not None and len(contexts) != len(prefixes):
        raise InputError(f"got {len(contexts)} contexts for {len(prefixes)} examples")
    if not prefixes:
        raise InputError("no examples to stress-test")
    variants = stress_variants(extend, shorten, grid)
    prompts: list[list[int]] = []
    targets: list[list[int]] = []
    owners: list[tuple[int, tuple[int, int]]] = []
    for i, (pre, suf) in enumerate(zip(prefixes, suffixes)):
        pre_l, suf_l = as_id_list(pre, f"prefix {i}"), as_id_list(suf, f"suffix {i}")
        ctx = as_id_list(contexts[i], f"context {i}") if contexts is not None else []
        if not pre_l or not suf_l:
            raise InputError(f"example {i} has an empty prefix or suffix")
        for e, s in variants:
            if e > len(ctx) or s >= len(pre_l):
                continue
            prompts.append((ctx[len(ctx) - e :] if e else []) + pre_l[: len(pre_l) - s])
            targets.append(pre_l[len(pre_l) - s :] + suf_l if s else suf_l)
            owners.append((i, (e, s)))
    preds = greedy_generate(model, prompts, [len(t) for t in targets], batch_size=batch_size,
                            pad_token_id=pad_token_id, show_progress=show_progress, desc="stress test")
    n = len(prefixes)
    best = [-1] * n
    best_variant: list[list[int]] = [[0, 0] for _ in range(n)]
    target_len = [0] * n
    full = [False] * n
    for (i, (e, s)), pred, tgt in zip(owners, preds, targets):
        m = exact_prefix_match(pred, tgt)
        full[i] = full[i] or m == len(tgt)
        if m > best[i]:
            best[i], best_variant[i], target_len[i] = m, [e, s], len(tgt)
    return StressResult(
        mean_longest_match=sum(best) / n,
        full_match_rate=sum(full) / n,
        longest_match=best,
        best_variant=best_variant,
        target_length=target_len,
        n_variants=len(prompts),
    )
