"""Per-expert K-FAC samples from a fused experts module: a forward that shows each expert projection its own tokens.

transformers 5 runs a mixture-of-experts layer through one experts module whose projections are 3D parameters
(``gate_up_proj``: experts × 2·intermediate × hidden, ``down_proj``: experts × hidden × intermediate) and picks the
kernel from ``config._experts_implementation`` (``eager``, ``grouped_mm``, ``batched_mm``, ...). Grouped and batched
kernels never form one expert's input or output as a tensor of its own, so forward and gradient hooks cannot see them.

During collection the experts module therefore runs `recording_forward` instead: the computation of transformers'
generic eager dispatch (`integrations/moe.py`), one hit expert at a time, for every experts class marked by
``use_experts_implementation`` (it honours ``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm`` and
the class's own ``_apply_gate``). Each expert projection's input ``a`` (the routed tokens' hidden states, or the gated
intermediate for ``down_proj``) and output ``y`` (before the routing weight) are handed to a callback, which
accumulates A_e and registers the gradient hook for G_e. The routing weight multiplies ``down_proj``'s output after
the projection, so it reaches G through ``g = ∂loss/∂y`` and never A (docs/method.md, "Mixture-of-experts").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..targets import experts_have_gate, experts_target

__all__ = ["ExpertRecorder", "expert_routing", "recording_experts", "recording_forward", "replaced_forwards"]

# (parameter name, expert index, its token rows of the module's input, number of input rows, projection input,
# projection output)
ExpertRecorder = Callable[[str, int, torch.Tensor, int, torch.Tensor, torch.Tensor], None]


def expert_routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index, top_k_weights)`` of an experts module's call ``(hidden_states, top_k_index, top_k_weights)``,
    given the arguments after ``hidden_states`` (GPT-OSS names them ``router_indices``/``routing_weights``)."""
    values = list(args) + list(kwargs.values())
    if len(values) < 2:
        raise TypeError("an experts module is called as experts(hidden_states, top_k_index, top_k_weights)")
    index, weights = values[0], values[1]
    if weights.shape[-1] != index.shape[-1]:
        weights = weights.gather(-1, index.clamp(max=weights.shape[-1] - 1))
    return index, weights


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # ``weight``: one expert's matrix in the logical (d_out, d_in) layout (`TargetWeight.to_logical`)
    y = F.linear(x, weight)
    return y if bias is None else y + bias


def recording_forward(module: nn.Module, record: ExpertRecorder) -> Callable[..., torch.Tensor]:
    """A forward for the experts module ``module`` that computes what transformers' eager experts dispatch computes and
    calls ``record(param, expert, token_rows, num_rows, a, y)`` for each expert projection it runs."""
    gated = experts_have_gate(module)
    first = "gate_up_proj" if gated else "up_proj"

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        top_k_index, top_k_weights = expert_routing(args, kwargs)
        w_in = experts_target(module, first).logical_weight()
        w_out = experts_target(module, "down_proj").logical_weight()
        b_in = getattr(module, f"{first}_bias") if module.has_bias else None
        b_out = module.down_proj_bias if module.has_bias else None
        out = torch.zeros_like(hidden_states)
        hit = torch.unique(top_k_index[top_k_index < module.num_experts]).tolist()
        for e in hit:
            tokens, slot = torch.where(top_k_index == e)
            a = hidden_states[tokens]
            h = _project(a, w_in[e], None if b_in is None else b_in[e])
            record(first, e, tokens, hidden_states.shape[0], a, h)
            h = module._apply_gate(h) if gated else module.act_fn(h)
            y = _project(h, w_out[e], None if b_out is None else b_out[e])
            record("down_proj", e, tokens, hidden_states.shape[0], h, y)
            if getattr(module, "has_post_expert_norm", False):
                y = module.post_expert_norm(y)
            y = y * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    return forward


@contextlib.contextmanager
def recording_experts(modules: Mapping[nn.Module, ExpertRecorder]) -> Iterator[None]:
    """Run each experts module with `recording_forward` (and its recorder) inside the block (see
    `replaced_forwards`)."""
    with replaced_forwards({module: recording_forward(module, record) for module, record in modules.items()}):
        yield


@contextlib.contextmanager
def replaced_forwards(forwards: Mapping[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Run each module with the given forward inside the block; the class's forward (and with it
    ``config._experts_implementation``) is back afterwards, also after an error. Calling the module still runs its
    hooks.

    A module placed by accelerate (``device_map``, CPU or disk offload) keeps its hook: accelerate's forward brings
    the weights in and calls ``module._old_forward``, and that is what is replaced; the new forward runs inside the
    hooked call, never around it."""
    patched: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, what it held; _ABSENT: nothing)
    try:
        for module, forward in forwards.items():
            # accelerate's add_hook_to_module keeps the class's forward in `_old_forward` and puts its own wrapper in
            # the instance's `forward`; otherwise an instance attribute shadows the class's forward, and
            # nn.Module.__call__ (and its hooks) still run
            attr = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
            patched.append((module, attr, module.__dict__.get(attr, _ABSENT)))
            setattr(module, attr, forward)
        yield
    finally:
        for module, attr, held in reversed(patched):
            if held is _ABSENT:
                delattr(module, attr)
            else:
                setattr(module, attr, held)


_ABSENT = object()
