"""The unmerged forward of an edited experts module, without a dense copy of the edited experts.

An edited expert's matrix is ``W'_e = out_e in_eᵀ`` (`hf_curvedit.edit.ExpertsEdit`), so its projection can run as
two thin products, ``(x in_e) out_eᵀ``, from the factors the adapter stores anyway. Each projection's experts fall in
three groups (`ExpertsProjection`): unedited experts multiply by the base parameter itself, edited experts whose
factorization is smaller than their matrix (``rank·(d_in + d_out) < d_in·d_out``) by their factors, and the others by
a dense ``W'_e`` built for them alone.

The computation follows the experts implementation the model was loaded with (``config._experts_implementation``):
``eager`` loops over the hit experts as transformers' eager dispatch does, ``batched_mm`` gathers each routed token's
matrices and multiplies them in one batch, and every other implementation (``grouped_mm`` and kernels of its kind)
sorts the tokens by expert and runs transformers' grouped matmul (``torch.nn.functional.grouped_mm`` where the device
has it) over each group of experts. Gate, activation, biases, the post-expert norm and the routing weights are the
experts class's own (``use_experts_implementation``'s flags and ``_apply_gate``). Llama 4's experts, which are handed
a block of rows per expert, multiply them by `ExpertsProjection.blocks`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..curvature.experts import expert_routing
from ..targets import experts_have_gate, experts_target

__all__ = ["BASE", "DENSE", "FACTORED", "ExpertsProjection", "edited_experts_forward", "grouped_matmul"]

BASE, FACTORED, DENSE = 0, 1, 2
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch's grouped_mm multiplies


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x[rows of group g] @ weight[g]`` for rows sorted by group, ``counts[g]`` rows each (rows past the last group
    are not computed); ``weight`` is ``(groups, d_in, d_out)``. Runs transformers' grouped matmul where it has one."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    kernel = _transformers_grouped_mm()
    if kernel is not None and weight.dtype in _GROUPED_MM_DTYPES:
        return kernel(x, weight, offsets)
    parts, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        parts.append(x[start:end].to(weight.dtype) @ weight[g])  # not mm(out=...): autograd may run through this
        start = end
    parts.append(x.new_zeros(x.shape[0] - start, weight.shape[-1], dtype=weight.dtype))
    return torch.cat(parts)


def _transformers_grouped_mm() -> Callable[..., torch.Tensor] | None:
    # transformers >= 5.2 picks torch's grouped_mm or its own fallback per device; older versions have no dispatcher
    try:
        from transformers.integrations.moe import _grouped_mm
    except ImportError:
        return None
    return _grouped_mm


@dataclass
class ExpertsProjection:
    """How the unmerged forward applies one edited expert projection.

    Attributes:
        kind: int64 ``(experts,)``: `BASE` (the base parameter's matrix), `FACTORED` (``(x first_s) second_s``) or
            `DENSE` (``x dense_s``), with ``s = slot[e]``.
        kinds: the kinds present, in that order (known on the host, so that the forward never syncs to find them).
        slot: int64 ``(experts,)``: each expert's index in the stacks of its kind (0 for `BASE`).
        first: ``(factored experts, d_in, k)``, the input side of their factors (``in``), or ``None``.
        second: ``(factored experts, k, d_out)``, the output side (``outᵀ``), or ``None``.
        dense: ``(dense experts, d_in, d_out)``, their ``W'_eᵀ``, or ``None``.
    """

    kind: torch.Tensor
    kinds: tuple[int, ...]
    slot: torch.Tensor
    first: torch.Tensor | None = None
    second: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def one(self, expert: int, kind: int, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Expert ``expert``'s projection of ``x``; ``base`` is the base parameter as ``(experts, d_out, d_in)``."""
        if kind == FACTORED:
            assert self.first is not None and self.second is not None
            s = int(self.slot[expert])
            return (x.to(self.first.dtype) @ self.first[s]) @ self.second[s]
        if kind == DENSE:
            assert self.dense is not None
            return x.to(self.dense.dtype) @ self.dense[int(self.slot[expert])]
        return F.linear(x.to(base.dtype), base[expert])

    def grouped(self, x: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The projection of rows ``x`` sorted by expert (``experts[i]`` is row i's, ``counts`` rows per expert)."""
        pieces = []
        for kind in self.kinds:
            here = self.kind == kind
            rows = here[experts] if len(self.kinds) > 1 else slice(None)
            xr = x[rows]
            if kind == FACTORED:
                assert self.first is not None and self.second is not None
                c = counts[here]
                y = grouped_matmul(grouped_matmul(xr, self.first, c), self.second, c)
            elif kind == DENSE:
                assert self.dense is not None
                y = grouped_matmul(xr, self.dense, counts[here])
            else:
                y = grouped_matmul(xr, base.mT, torch.where(here, counts, 0))
            pieces.append((rows, y))
        return _assemble(pieces, x.shape[0])

    def batched(self, x: torch.Tensor, experts: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The projection of each row of ``x`` by its own expert's matrix (``experts[i]``), as one batched product."""
        pieces = []
        for kind in self.kinds:
            rows = (self.kind == kind)[experts] if len(self.kinds) > 1 else slice(None)
            xr, ids = x[rows].unsqueeze(1), experts[rows]
            if kind == FACTORED:
                assert self.first is not None and self.second is not None
                s = self.slot[ids]
                y = torch.bmm(torch.bmm(xr.to(self.first.dtype), self.first[s]), self.second[s])
            elif kind == DENSE:
                assert self.dense is not None
                y = torch.bmm(xr.to(self.dense.dtype), self.dense[self.slot[ids]])
            else:
                y = torch.bmm(xr.to(base.dtype), base[ids].mT)
            pieces.append((rows, y.squeeze(1)))
        return _assemble(pieces, x.shape[0])

    def blocks(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Each expert's projection of its own block of rows, ``x`` ``(experts, rows, d_in)`` (how Llama 4's experts
        are handed their tokens), as one batched product per kind of expert."""
        pieces = []
        for kind in self.kinds:
            ids = (self.kind == kind).nonzero().squeeze(1) if len(self.kinds) > 1 else slice(None)
            xs = x[ids]
            if kind == FACTORED:
                assert self.first is not None and self.second is not None
                y = torch.bmm(torch.bmm(xs.to(self.first.dtype), self.first), self.second)
            elif kind == DENSE:
                assert self.dense is not None
                y = torch.bmm(xs.to(self.dense.dtype), self.dense)
            else:
                y = torch.bmm(xs.to(base.dtype), base[ids].mT)
            pieces.append((ids, y))
        return _assemble(pieces, x.shape[0])


def _assemble(pieces: list[tuple[Any, torch.Tensor]], num_rows: int) -> torch.Tensor:
    # (rows, result) per kind of expert: one kind's result is the whole projection, several fill their own rows
    if len(pieces) == 1:
        return pieces[0][1]
    first = pieces[0][1]
    out = first.new_zeros(num_rows, *first.shape[1:])
    for rows, y in pieces:
        out[rows] = y.to(out.dtype)
    return out


def edited_experts_forward(module: nn.Module, projections: Mapping[str, ExpertsProjection]) -> Callable[..., Any]:
    """A forward for the experts module ``module`` (``forward(hidden_states, top_k_index, top_k_weights)``) that
    applies ``projections`` (parameter name → `ExpertsProjection`) in place of those parameters, with the computation
    of the module's experts implementation. Parameters not in ``projections`` run as they are."""
    gated = experts_have_gate(module)
    first_param = "gate_up_proj" if gated else "up_proj"
    post_norm = module.post_expert_norm if getattr(module, "has_post_expert_norm", False) else None
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None) or "eager"

    def between(h: torch.Tensor) -> torch.Tensor:
        return module._apply_gate(h) if gated else module.act_fn(h)

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        top_k_index, top_k_weights = expert_routing(args, kwargs)
        weights = {p: experts_target(module, p).to_logical(getattr(module, p)) for p in (first_param, "down_proj")}
        biases = {p: getattr(module, f"{p}_bias") if module.has_bias else None for p in weights}
        run = _eager if implementation == "eager" else _batched if implementation == "batched_mm" else _grouped
        return run(module, hidden_states, top_k_index, top_k_weights, (first_param, "down_proj"), weights, biases,
                   projections, between, post_norm)

    return forward


def _eager(module, hidden, index, routing, params, weights, biases, projections, between, post_norm) -> torch.Tensor:
    # transformers' eager dispatch, one hit expert at a time
    out = torch.zeros_like(hidden)
    kinds = {p: proj.kind.tolist() for p, proj in projections.items()}
    for e in torch.unique(index[index < module.num_experts]).tolist():
        tokens, slot = torch.where(index == e)
        h = hidden[tokens]
        for i, p in enumerate(params):
            if i:
                h = between(h)
            proj = projections.get(p)
            if proj is None:
                h = F.linear(h.to(weights[p].dtype), weights[p][e])
            else:
                h = proj.one(e, kinds[p][e], h, weights[p])
            if biases[p] is not None:
                h = h + biases[p][e].to(h.dtype)
        if post_norm is not None:
            h = post_norm(h)
        out.index_add_(0, tokens, (h * routing[tokens, slot, None]).to(out.dtype))
    return out


def _grouped(module, hidden, index, routing, params, weights, biases, projections, between, post_norm) -> torch.Tensor:
    # transformers' grouped dispatch: the (token, expert) pairs sorted by expert, one grouped product per projection
    num_experts, top_k = module.num_experts, index.shape[-1]
    experts, perm = torch.sort(index.reshape(-1))
    valid = experts < num_experts  # expert-parallel sentinels sort to the tail and are not computed
    experts = experts.clamp(max=num_experts - 1)
    counts = torch.bincount(experts[valid], minlength=num_experts)
    h = hidden[perm // top_k]
    for i, p in enumerate(params):
        if i:
            h = between(h)
        proj = projections.get(p)
        h = grouped_matmul(h, weights[p].mT, counts) if proj is None else proj.grouped(h, experts, counts, weights[p])
        if biases[p] is not None:
            h = h + biases[p][experts].to(h.dtype)
    if post_norm is not None:
        h = post_norm(h)
    h = (h * routing.reshape(-1)[perm, None]).masked_fill(~valid[:, None], 0)
    unsorted = torch.empty_like(h)
    unsorted[perm] = h
    return unsorted.view(hidden.shape[0], top_k, -1).sum(dim=1).to(hidden.dtype)


def _batched(module, hidden, index, routing, params, weights, biases, projections, between, post_norm) -> torch.Tensor:
    # transformers' batched dispatch: every (token, expert) pair multiplied by its expert's matrix in one batch
    num_experts, top_k = module.num_experts, index.shape[-1]
    experts = index.reshape(-1)
    valid = experts < num_experts
    experts = experts.clamp(max=num_experts - 1)
    h = hidden.repeat_interleave(top_k, dim=0)
    for i, p in enumerate(params):
        if i:
            h = between(h)
        proj = projections.get(p)
        if proj is None:
            h = torch.bmm(h.to(weights[p].dtype).unsqueeze(1), weights[p][experts].mT).squeeze(1)
        else:
            h = proj.batched(h, experts, weights[p])
        if biases[p] is not None:
            h = h + biases[p][experts].to(h.dtype)
    if post_norm is not None:
        h = post_norm(h)
    h = (h * routing.reshape(-1)[:, None]).masked_fill(~valid[:, None], 0)
    return h.view(hidden.shape[0], top_k, -1).sum(dim=1).to(hidden.dtype)
