"""The unmerged forwards of edited experts modules whose class has a forward of its own (`hf_curvedit.expert_layouts`):
the class's computation, each edited projection applied by its `ExpertsProjection` (factored where smaller, dense
``W'_e`` otherwise, the base matrix for an unedited expert)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..expert_layouts import DBRX, FUSED, JETMOE, LLAMA4, LONGCAT, experts_layout
from ..targets import experts_target
from .experts_forward import ExpertsProjection, edited_experts_forward

__all__ = ["edited_forwards"]


def edited_forwards(module: nn.Module, projections: Mapping[str, ExpertsProjection]) -> dict[nn.Module, Callable]:
    """The forwards to run in place of the experts module's own (``{module: forward}``; for some layouts its children's)
    so that ``projections`` (parameter → `ExpertsProjection`) replace those parameters."""
    layout = experts_layout(module)
    if layout is None:
        raise TypeError(f"{type(module).__name__} is not an experts module")
    if layout.kind == FUSED:
        return {module: edited_experts_forward(module, projections)}
    if layout.kind == LONGCAT:
        return {module: _longcat(module, projections)}
    if layout.kind == JETMOE:
        return {getattr(module, p): _jetmoe(module, projections, p) for p in layout.params}
    if layout.kind == DBRX:
        return {module: _dbrx(module, projections)}
    if layout.kind == LLAMA4:
        return {module: _llama4(module, projections)}
    raise NotImplementedError(layout.kind)


def _apply(module: nn.Module, projections: Mapping[str, ExpertsProjection], param: str) -> Callable:
    # expert e's projection `param` of rows x: by its edit where it has one, else by the base matrix
    weight = experts_target(module, param).logical_weight()
    proj = projections.get(param)
    kinds = proj.kind.tolist() if proj is not None else None

    def run(e: int, x: torch.Tensor) -> torch.Tensor:
        if proj is None or kinds is None:
            return F.linear(x, weight[e])
        return proj.one(e, kinds[e], x, weight)

    return run


def _longcat(module: nn.Module, projections: Mapping[str, ExpertsProjection]) -> Callable[..., Any]:
    # LongcatFlashExperts.forward: routed experts are gated MLPs, indices past num_routed_experts return the token
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        if top_k_index.numel() == 0:
            return out
        first, second = _apply(module, projections, "gate_up_proj"), _apply(module, projections, "down_proj")
        for e in torch.unique(top_k_index).tolist():
            tokens, slot = torch.where(top_k_index == e)
            h = hidden_states[tokens]
            if e < module.num_routed_experts:
                gate, up = first(e, h).chunk(2, dim=-1)
                h = second(e, module.act_fn(gate) * up)
            out.index_add_(0, tokens, (h * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out

    return forward


def _jetmoe(module: nn.Module, projections: Mapping[str, ExpertsProjection], param: str) -> Callable[..., Any]:
    # JetMoeParallelExperts.forward: the rows arrive grouped by expert, `expert_size` rows each
    def forward(inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        project = _apply(module, projections, param)
        return torch.cat([project(e, x) for e, x in enumerate(inputs.split(expert_size, dim=0))], dim=0)

    return forward


def _dbrx(module: nn.Module, projections: Mapping[str, ExpertsProjection]) -> Callable[..., Any]:
    # DbrxExperts.forward: act(x w1_eᵀ) * (x v1_eᵀ), then w2; indices past the experts are expert-parallel sentinels
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        batch = hidden_states.shape[0]
        x = hidden_states.reshape(-1, module.hidden_size)
        w1, v1, w2 = (_apply(module, projections, p) for p in ("w1", "v1", "w2"))
        out = torch.zeros_like(x)
        for e in torch.unique(top_k_index[top_k_index < module.num_experts]).tolist():
            tokens, slot = torch.where(top_k_index == e)
            a = x[tokens]
            y = w2(e, module.mlp.activation_fn(w1(e, a)) * v1(e, a))
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out.view(batch, -1, module.hidden_size)

    return forward


def _llama4(module: nn.Module, projections: Mapping[str, ExpertsProjection]) -> Callable[..., Any]:
    # Llama4TextExperts.forward: expert e multiplies its own block of rows (every token, scaled by its router score,
    # zero where the router did not pick e), all experts in one batched product per projection
    def project(param: str, x: torch.Tensor) -> torch.Tensor:
        stored = getattr(module, param)  # (experts, d_in, d_out)
        proj = projections.get(param)
        if proj is None:  # after an edited projection x may be in the edit's compute dtype
            return torch.bmm(x.to(stored.dtype), stored)
        return proj.blocks(x, experts_target(module, param).to_logical(stored))

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.view(module.num_experts, -1, module.hidden_size)
        gate, up = project("gate_up_proj", x).chunk(2, dim=-1)
        y = project("down_proj", up * module.act_fn(gate))
        return y.reshape(-1, module.hidden_size).to(hidden_states.dtype)

    return forward
