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

Llama 4 (`_llama4_recording`) is the exception: its MoE block multiplies each token by the router's score *before*
the experts, so the scaled token is what expert e's ``gate_up_proj`` multiplies, and A_e is taken after the scaling;
the score cannot be moved to the output side, since the activation between ``gate_up_proj`` and ``down_proj`` is not
linear (``down_proj``'s input is the intermediate of the scaled token too). G_e has no routing weight then: the
expert's output joins the layer's output unscaled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..expert_layouts import DBRX, FUSED, JETMOE, LLAMA4, LONGCAT, experts_layout, sibling_router
from ..targets import experts_have_gate, experts_target

__all__ = [
    "ExpertRecorder", "expert_routing", "recording_experts", "recording_forward", "replaced_forwards",
    "replaced_methods",
]

# (parameter name, expert index, its token rows of the module's input, number of input rows, projection input,
# projection output)
ExpertRecorder = Callable[[str, int, torch.Tensor, int, torch.Tensor, torch.Tensor], None]


def expert_routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index, top_k_weights)`` of an experts module's call ``(hidden_states, top_k_index, top_k_weights)``,
    given the arguments after ``hidden_states`` (GPT-OSS names them ``router_indices``/``routing_weights``); the
    weights are those of the chosen experts, ``(tokens, top_k)``, whichever form the router gave them in."""
    values = list(args) + list(kwargs.values())
    if len(values) < 2:
        raise TypeError("an experts module is called as experts(hidden_states, top_k_index, top_k_weights)")
    index, weights = values[0], values[1]
    if weights.shape[-1] != index.shape[-1]:
        # a router that hands over its whole distribution over experts (DeepSeek-V2's style: HunYuan-MoE and Phi-MoE
        # on transformers 5.0), which transformers' kernels read at the chosen experts
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
def recording_experts(modules: Mapping[nn.Module, ExpertRecorder], root: nn.Module | None = None) -> Iterator[None]:
    """Run each experts module with its recording forward (`recording_forward`, or its class's own computation for
    the classes of `hf_curvedit.expert_layouts`) and recorder inside the block (see `replaced_forwards`). ``root``,
    the model that holds them, is needed where the routing is a sibling module's (Llama 4's router)."""
    forwards: dict[nn.Module, Callable[..., Any]] = {}
    with contextlib.ExitStack() as stack:
        for module, record in modules.items():
            layout = experts_layout(module)
            if layout is None:
                raise TypeError(f"{type(module).__name__} is not an experts module hf-curvedit knows")
            if layout.kind == FUSED:
                forwards[module] = recording_forward(module, record)
            elif layout.kind == LONGCAT:
                forwards[module] = _longcat_recording(module, record)
            elif layout.kind == JETMOE:
                forwards.update(_jetmoe_recording(module, record, stack))
            elif layout.kind == DBRX:
                forwards[module] = _dbrx_recording(module, record)
            elif layout.kind == LLAMA4:
                if root is None:
                    raise TypeError("recording Llama 4's experts needs the model that holds them (root=) to read "
                                    "their router")
                forwards[module] = _llama4_recording(module, record, sibling_router(root, module), stack)
            else:
                raise NotImplementedError(layout.kind)
        stack.enter_context(replaced_forwards(forwards))
        yield


def _jetmoe_recording(module: nn.Module, record: ExpertRecorder,
                      stack: contextlib.ExitStack) -> dict[nn.Module, Callable[..., torch.Tensor]]:
    # JetMoeMoE sorts its (token, expert) pairs by expert and hands them to two JetMoeParallelExperts children, which
    # see only the sorted rows: the router's output says which token each row is (`batch_index`)
    routing: dict[str, Any] = {}

    def routed(_module: nn.Module, inputs: tuple, output: tuple) -> None:
        routing["rows"], routing["tokens"] = inputs[0].shape[0], output[1]

    stack.enter_context(module.router.register_forward_hook(routed))

    def child(param: str) -> Callable[..., torch.Tensor]:
        def forward(inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
            w = experts_target(module, param).logical_weight()
            outs, start = [], 0
            for e, n in enumerate(expert_size):
                a = inputs[start:start + n]
                y = F.linear(a, w[e])
                if n:
                    record(param, e, routing["tokens"][start:start + n], routing["rows"], a, y)
                outs.append(y)
                start += n
            return torch.cat(outs, dim=0)
        return forward

    return {getattr(module, p): child(p) for p in ("input_linear", "output_linear")}


def _dbrx_recording(module: nn.Module, record: ExpertRecorder) -> Callable[..., torch.Tensor]:
    # DbrxExperts.forward: expert e is act(x w1_eᵀ) * (x v1_eᵀ) projected by w2; an index past the experts is an
    # expert-parallel sentinel (nothing computed here)
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        batch = hidden_states.shape[0]
        x = hidden_states.reshape(-1, module.hidden_size)
        w = {p: experts_target(module, p).logical_weight() for p in ("w1", "v1", "w2")}
        out = torch.zeros_like(x)
        for e in torch.unique(top_k_index[top_k_index < module.num_experts]).tolist():
            tokens, slot = torch.where(top_k_index == e)
            a = x[tokens]
            gate, up = F.linear(a, w["w1"][e]), F.linear(a, w["v1"][e])
            record("w1", e, tokens, x.shape[0], a, gate)
            record("v1", e, tokens, x.shape[0], a, up)
            z = module.mlp.activation_fn(gate) * up
            y = F.linear(z, w["w2"][e])
            record("w2", e, tokens, x.shape[0], z, y)
            out.index_add_(0, tokens, y * top_k_weights[tokens, slot, None])
        return out.view(batch, -1, module.hidden_size)

    return forward


def _llama4_recording(module: nn.Module, record: ExpertRecorder, router: nn.Module,
                      stack: contextlib.ExitStack) -> Callable[..., torch.Tensor]:
    # Llama4TextMoe hands its experts every token once per expert (one block of rows per expert), scaled by the
    # router's score, 0 where the router did not pick the expert; the experts multiply every row. Which rows are the
    # expert's samples is the router's top-k choice, read from its logits as Llama4Router picks it: not "the non-zero
    # rows" (a routed score can underflow to 0), and a non-routed row's output still gets a gradient at down_proj,
    # which must not enter G_e. The rows the router did not pick are zero in and out, as in the model.
    routing: dict[str, torch.Tensor] = {}

    def routed(_module: nn.Module, _inputs: tuple, output: tuple) -> None:
        routing["index"] = torch.topk(output[1], router.top_k, dim=1).indices

    stack.enter_context(router.register_forward_hook(routed))

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        index = routing.pop("index", None)
        if index is not None:  # a device_map may place the router on another device than the experts
            index = index.to(hidden_states.device)
        width = module.hidden_size
        x = hidden_states.view(module.num_experts, -1, width)
        rows = x.shape[1]
        if index is None or index.shape[0] != rows:
            raise RuntimeError(f"{type(module).__name__} was called without its router's choice for its {rows} "
                               "tokens (hf-curvedit reads it from the router Llama4TextMoe calls first)")
        w_in = experts_target(module, "gate_up_proj").logical_weight()
        w_out = experts_target(module, "down_proj").logical_weight()
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(index).tolist():
            tokens = torch.where(index == e)[0]
            a = x[e, tokens]  # the tokens as scaled by their score: what gate_up_proj multiplies
            h = F.linear(a, w_in[e])
            record("gate_up_proj", e, tokens, rows, a, h)
            gate, up = h.chunk(2, dim=-1)
            z = up * module.act_fn(gate)
            y = F.linear(z, w_out[e])
            record("down_proj", e, tokens, rows, z, y)
            out.index_add_(0, e * rows + tokens, y.to(out.dtype))
        return out

    return forward


def _longcat_recording(module: nn.Module, record: ExpertRecorder) -> Callable[..., torch.Tensor]:
    # LongcatFlashExperts.forward: a routed expert is a gated MLP on its tokens; an index past num_routed_experts is a
    # "zero" expert that returns its token (nothing to record)
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        w_in = experts_target(module, "gate_up_proj").logical_weight()
        w_out = experts_target(module, "down_proj").logical_weight()
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            tokens, slot = torch.where(top_k_index == e)
            y = hidden_states[tokens]
            if e < module.num_routed_experts:
                h = F.linear(y, w_in[e])
                record("gate_up_proj", e, tokens, hidden_states.shape[0], y, h)
                gate, up = h.chunk(2, dim=-1)
                z = module.act_fn(gate) * up
                y = F.linear(z, w_out[e])
                record("down_proj", e, tokens, hidden_states.shape[0], z, y)
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out

    return forward


def replaced_forwards(forwards: Mapping[nn.Module, Callable[..., Any]]) -> contextlib.AbstractContextManager[None]:
    """Run each module with the given forward inside the block; the class's forward (and with it
    ``config._experts_implementation``) is back afterwards, also after an error. Calling the module still runs its
    hooks.

    A module placed by accelerate (``device_map``, CPU or disk offload) keeps its hook: accelerate's forward brings
    the weights in and calls ``module._old_forward``, and that is what is replaced; the new forward runs inside the
    hooked call, never around it."""
    return replaced_methods({module: {"forward": forward} for module, forward in forwards.items()})


@contextlib.contextmanager
def replaced_methods(methods: Mapping[nn.Module, Mapping[str, Callable[..., Any]]]) -> Iterator[None]:
    """`replaced_forwards` for any methods: ``{module: {method name: function}}``, each set on the instance inside
    the block and the instance's own attribute (or none) back afterwards."""
    patched: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, what it held; _ABSENT: nothing)
    try:
        for module, named in methods.items():
            for name, function in named.items():
                # accelerate's add_hook_to_module keeps the class's forward in `_old_forward` and puts its own wrapper
                # in the instance's `forward`; otherwise an instance attribute shadows the class's method, and
                # nn.Module.__call__ (and its hooks) still run
                hooked = name == "forward" and hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__
                attr = "_old_forward" if hooked else name
                patched.append((module, attr, module.__dict__.get(attr, _ABSENT)))
                setattr(module, attr, function)
        yield
    finally:
        for module, attr, held in reversed(patched):
            if held is _ABSENT:
                delattr(module, attr)
            else:
                setattr(module, attr, held)


_ABSENT = object()
