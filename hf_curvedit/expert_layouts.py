"""Which modules hold routed experts, and how each stores its per-expert matrices.

transformers 5 runs most mixture-of-experts layers through one fused experts module marked by
``use_experts_implementation`` (`FUSED`). Four families have experts classes of their own, each with its own forward:

- `LONGCAT` (``LongcatFlashExperts``): fused 3D ``gate_up_proj``/``down_proj`` like the generic ones, but the router
  also picks "zero" experts (indices past ``num_routed_experts``) that return their input unchanged; ``gate_up_proj``
  holds a matrix for them too, which no token ever multiplies.
- `JETMOE` (``JetMoeMoE``): two ``JetMoeParallelExperts`` children, ``input_linear`` and ``output_linear``, each a 3D
  ``weight`` (experts × out × in) multiplying the tokens grouped by expert. The MoE module itself is the experts
  module here (it holds the router that says which token each grouped row is); its projections are named after the
  children (``mlp.input_linear``, ``mlp.output_linear``).
- `DBRX` (``DbrxExperts``): its ``mlp`` (``DbrxExpertGLU``) holds ``w1``, ``v1``, ``w2`` as 2D stacks
  (experts·ffn × hidden). The projections are named after the experts module (``ffn.experts.w1``), stored in
  ``ffn.experts.mlp.w1``.

- `LLAMA4` (``Llama4TextExperts``): 3D ``gate_up_proj`` (experts × hidden × 2·intermediate) and ``down_proj``
  (experts × intermediate × hidden), both stored transposed. ``Llama4TextMoe`` hands it every token once per expert
  (a block of rows per expert), each scaled by its router score, zero for an expert the router did not pick; the
  experts module multiplies all rows. Which rows were routed is the choice of its sibling ``router``
  (`sibling_router`), which the recording forward reads.

This module only recognises them, describes their storage and finds Llama 4's router;
`hf_curvedit.targets.TargetWeight` turns a storage layout into the logical ``(experts, d_out, d_in)`` one, the
recording forwards live in `hf_curvedit.curvature`, the edited forwards in `hf_curvedit.tuner`.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["DBRX", "FUSED", "JETMOE", "LLAMA4", "LONGCAT", "ExpertsLayout", "experts_layout", "sibling_router"]

FUSED, LONGCAT, JETMOE, DBRX, LLAMA4 = "fused", "longcat_flash", "jetmoe", "dbrx", "llama4"
# The projections of transformers 5's fused experts modules (`integrations/moe.py`): 3D parameters, one matrix per
# expert. `gate_up_proj` (or `up_proj` in experts without a gate) reads the token, `down_proj` writes back.
EXPERT_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its projections.

    Attributes:
        kind: `FUSED`, `LONGCAT`, `JETMOE`, `DBRX` or `LLAMA4`.
        params: the projections (units), in forward order.
        transposed: the projections stored as ``(experts, d_in, d_out)`` rather than ``(experts, d_out, d_in)``.
        stacked: the parameters are 2D stacks ``(experts·rows, cols)`` of per-expert matrices.
        num_experts: the number of experts of a 2D stack (a 3D parameter says it itself).
    """

    kind: str
    params: tuple[str, ...]
    transposed: frozenset[str] = frozenset()
    stacked: bool = False
    num_experts: int | None = None

    def parameter(self, module: nn.Module, param: str) -> torch.Tensor:
        """The stored tensor of projection ``param`` of ``module`` (where this layout keeps it)."""
        if self.kind == JETMOE:
            return getattr(module, param).weight
        if self.kind == DBRX:
            return getattr(module.mlp, param)
        return getattr(module, param)


def _has_class(module: nn.Module, name: str) -> bool:
    return any(c.__name__ == name for c in type(module).__mro__)


def _param3d(module: nn.Module, name: str) -> torch.Tensor | None:
    p = module._parameters.get(name)
    return p if p is not None and p.dim() == 3 else None


def _fused(module: nn.Module) -> ExpertsLayout | None:
    if not (all(hasattr(module, a) for a in ("has_bias", "is_transposed", "num_experts"))
            and callable(getattr(module, "_apply_gate", None))):
        return None
    params = tuple(p for p in EXPERT_PROJECTIONS if _param3d(module, p) is not None)
    if not params:
        return None
    return ExpertsLayout(FUSED, params, frozenset(params) if module.is_transposed else frozenset())


@functools.cache
def _dbrx_transposes_w1(glu_class: type) -> bool:
    # transformers 5.0 (until huggingface/transformers#47671) computes `x @ w1_e`, `inter @ w2_eᵀ` in
    # DbrxExpertGLU.forward, later versions (and DBRX checkpoints) `x @ w1_eᵀ`, `inter @ w2_e`: the class's own
    # forward says which, on shapes where only one of the two runs
    probe = types.SimpleNamespace(activation_fn=torch.nn.functional.silu)
    x, w = torch.ones(1, 2), torch.ones(3, 2)
    try:
        glu_class.forward(probe, x, w, w, w)
    except RuntimeError:
        return False
    return True


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of ``module`` if it is an experts module hf-curvedit edits (see the module docstring), else None."""
    if _has_class(module, "LongcatFlashExperts"):
        if _param3d(module, "gate_up_proj") is None or _param3d(module, "down_proj") is None:
            return None  # no routed experts at all (only zero experts)
        return ExpertsLayout(LONGCAT, ("gate_up_proj", "down_proj"))
    if _has_class(module, "JetMoeMoE"):
        kids = [getattr(module, n, None) for n in ("input_linear", "output_linear")]
        if all(k is not None and _param3d(k, "weight") is not None for k in kids):
            return ExpertsLayout(JETMOE, ("input_linear", "output_linear"))
        return None
    if _has_class(module, "DbrxExperts"):
        glu = getattr(module, "mlp", None)
        if glu is None or not all(getattr(glu, p, None) is not None for p in ("w1", "v1", "w2")):
            return None
        # y = x w1_eᵀ (w1_e: ffn × hidden, the logical layout) and y = h w2_e (stored transposed); 5.0 the reverse
        new = _dbrx_transposes_w1(type(glu))
        return ExpertsLayout(DBRX, ("w1", "v1", "w2"), frozenset({"w2"} if new else {"w1", "v1"}), True,
                             int(module.num_experts))
    if _has_class(module, "Llama4TextExperts"):
        if _param3d(module, "gate_up_proj") is None or _param3d(module, "down_proj") is None:
            return None
        # y = x gate_up_proj[e], z @ down_proj[e]: both (experts, d_in, d_out)
        params = ("gate_up_proj", "down_proj")
        return ExpertsLayout(LLAMA4, params, frozenset(params))
    return _fused(module)


def sibling_router(root: nn.Module, experts: nn.Module) -> nn.Module:
    """The router of the Llama 4 MoE block (``Llama4TextMoe``) under ``root`` whose experts module is ``experts``
    (itself, or wrapped by a tuner layer as its ``base_layer``).

    Raises:
        LookupError: no module under ``root`` holds ``experts`` beside a ``router``.
    """
    for block in root.modules():
        held = getattr(block, "experts", None)
        if (held is experts or getattr(held, "base_layer", None) is experts) and \
                isinstance(getattr(block, "router", None), nn.Module):
            return block.router
    raise LookupError(f"no module of {type(root).__name__} holds this {type(experts).__name__} beside its router")
