"""One batch's transient memory in a factor pass, planned without data or weights: what autograd keeps for the
backward, counted on fake tensors as it is saved (`plan.py` prints it next to the accumulators)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ..expert_layouts import DBRX, JETMOE, LLAMA4, LONGCAT, ExpertsLayout, experts_layout, sibling_router
from ..targets import experts_have_gate, experts_target, weight_targets
from ..utils import parse_dtype
from .collector import input_device
from .config import FactorConfig
from .tasks import FactorTask

__all__ = ["dense_routing", "shapes_only", "transient_bytes"]


def _model_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    archs = getattr(config, "architectures", None) or []
    return (AutoModelForImageClassification if any(a.endswith("ForImageClassification") for a in archs)
            else AutoModelForCausalLM)


@contextlib.contextmanager
def shapes_only(model_or_config: Any, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """The model to plan with. A config (or a model on the meta device) is built under torch's fake-tensor mode:
    parameters and activations carry shapes and a device but no memory, and, unlike meta tensors, they run the
    autocast regions of rotary embeddings in every transformers 5 release. A real model is used as it is."""
    from transformers import PretrainedConfig

    if isinstance(model_or_config, nn.Module):
        if not any(p.device.type == "meta" for p in model_or_config.parameters()):
            yield model_or_config
            return
        model_or_config = model_or_config.config
    if not isinstance(model_or_config, PretrainedConfig):
        raise TypeError(f"plan_factors takes a model or a transformers config, got {type(model_or_config).__name__}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield _model_class(model_or_config).from_config(model_or_config, **({"dtype": dtype} if dtype else {}))


def _dense_experts(module: nn.Module, layout: ExpertsLayout) -> Any:
    """A forward for an experts module on fake tensors: its first expert on every token, once per routed slot (what
    the real routing computes, in activation sizes), differentiable. Routing by values (which tokens reach which
    expert) is what a fake tensor cannot do, so each layout's computation runs densely."""
    from .experts import _project, expert_routing

    def weight(param: str) -> torch.Tensor:
        return experts_target(module, param).logical_weight()[0]

    if layout.kind == JETMOE:
        # JetMoeMoE routes inside its own forward, through its router, and its children see rows grouped by expert
        def jetmoe(layer_input: torch.Tensor) -> torch.Tensor:
            x = layer_input.reshape(-1, layer_input.shape[-1])
            out = torch.zeros_like(x)
            for _ in range(module.router.top_k):
                gate, up = _project(x, weight("input_linear"), None).chunk(2, dim=-1)
                out = out + _project(module.activation(gate) * up, weight("output_linear"), None)
            return (out + module.bias).view_as(layer_input)

        return jetmoe

    def expert(x: torch.Tensor) -> torch.Tensor:
        if layout.kind == DBRX:
            gate, up = _project(x, weight("w1"), None), _project(x, weight("v1"), None)
            return _project(module.mlp.activation_fn(gate) * up, weight("w2"), None)
        if layout.kind == LONGCAT:
            gate, up = _project(x, weight("gate_up_proj"), None).chunk(2, dim=-1)
            return _project(module.act_fn(gate) * up, weight("down_proj"), None)
        gated = experts_have_gate(module)
        h = _project(x, weight("gate_up_proj" if gated else "up_proj"), None)
        return _project(module._apply_gate(h) if gated else module.act_fn(h), weight("down_proj"), None)

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        slots = expert_routing(args, kwargs)[0].shape[-1]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = torch.zeros_like(x)
        for _ in range(slots):
            out = out + expert(x)
        # DbrxExperts takes (batch, seq, hidden) and returns (batch, tokens, hidden); the others keep the shape
        return out.view(hidden_states.shape[0], -1, x.shape[-1]) if layout.kind == DBRX else out.view_as(hidden_states)

    return forward


def _dense_llama4(module: nn.Module, top_k: int) -> Any:
    """Llama 4's experts on fake tensors. They are handed every token once per expert, but the recording forward
    (`hf_curvedit.curvature.experts`) computes only the rows the router picked, ``top_k`` per token: here the first
    expert computes one block of rows per routed slot, and the other rows are zero."""
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w_in = experts_target(module, "gate_up_proj").logical_weight()[0]
        w_out = experts_target(module, "down_proj").logical_weight()[0]
        x = hidden_states.view(module.num_experts, -1, hidden_states.shape[-1])
        out = []
        for block in x[:top_k]:
            gate, up = torch.nn.functional.linear(block, w_in).chunk(2, dim=-1)
            out.append(torch.nn.functional.linear(up * module.act_fn(gate), w_out))
        out.append(x.new_zeros((x.shape[0] - top_k) * x.shape[1], x.shape[-1]))
        return torch.cat(out)

    return forward


def _dense_routed_attention(module: nn.Module) -> dict[str, Any]:
    """JetMoE's mixture of attention heads (``JetMoeMoA``, not an MLP and never a target) routes by value too: its
    ``map`` and ``reduce`` on fake tensors, the first query and output expert on every token for each routed slot."""
    w_in, w_out = module.input_linear.weight[0], module.output_linear.weight[0]

    def map(layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # noqa: A001 - JetMoeMoA's name
        bsz, length, width = layer_input.shape
        x = layer_input.reshape(-1, width)
        queries = torch.stack([torch.nn.functional.linear(x, w_in) for _ in range(module.top_k)], dim=1)
        return queries.view(bsz, length, module.top_k, -1), module.router.layer(x), None

    def reduce(layer_input: torch.Tensor, topo_info: None) -> torch.Tensor:
        bsz, length, k, _ = layer_input.shape
        rows = layer_input.reshape(bsz * length, k, -1)
        out = sum(torch.nn.functional.linear(rows[:, j], w_out) for j in range(k))
        return out.view(bsz, length, -1) + module.bias

    return {"map": map, "reduce": reduce}


def dense_routing(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Inside the block, every module of ``model`` that routes tokens by value (experts modules, JetMoE's mixture of
    attention heads) runs densely (`_dense_experts`), so that a pass on fake tensors needs no value; the modules'
    own methods (and accelerate's hooks around them) are back afterwards, also after an error."""
    from .experts import replaced_methods

    methods: dict[nn.Module, dict[str, Any]] = {}
    for m in model.modules():
        if (layout := experts_layout(m)) is not None:
            dense = _dense_llama4(m, sibling_router(model, m).top_k) if layout.kind == LLAMA4 else \
                _dense_experts(m, layout)
            methods[m] = {"forward": dense}
        elif type(m).__name__ == "JetMoeMoA":
            methods[m] = _dense_routed_attention(m)
    return replaced_methods(methods)


def transient_bytes(model: nn.Module, names: list[str], task: FactorTask, config: FactorConfig, dtype: Any) -> int:
    """`_backward_transient` on fake weights: a real model is rebuilt from its config (the same shapes), so that
    every weight has one fake tensor the count can leave out."""
    from torch._subclasses.fake_tensor import FakeTensor

    if any(isinstance(p, FakeTensor) for p in model.parameters()) or getattr(model, "config", None) is None:
        return _backward_transient(model, names, task, config)
    with shapes_only(model.config, parse_dtype(dtype) if dtype is not None else model.dtype) as fake:
        return _backward_transient(fake, names, task, config)


def _backward_transient(model: nn.Module, names: list[str], task: FactorTask, config: FactorConfig) -> int:
    """Bytes one batch (``batch_size`` × ``seq_len``) holds at the peak of a factor pass besides the accumulators and
    the model: what autograd keeps for the backward down to the first target (frozen weights, as in `fit_factors`),
    counted on fake tensors as it is saved; the gradients the backward holds at once (taken as twice the largest
    saved activation); the logits, which the loss keeps, with their gradient; and the collector's copies of one
    target's input and output-gradient rows. A module that routes by values a fake tensor does not have runs densely
    (`dense_routing`): the same activation sizes, without the real routing's index tensors and gathered rows. The
    allocator's own overhead is not counted."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from .roots import GradientRoots, frozen_parameters

    roots = GradientRoots()
    # the backward reaches every target: a linear layer's input, an expert projection's experts module's (JetMoE's
    # projections are named after children that the dense pass never calls)
    targets = weight_targets(model)
    owners = {id(t.module): t.module for n in names if (t := targets.get(n)) is not None}
    handles = [roots.register(m) for m in owners.values()]
    tensors = [*model.parameters(), *model.buffers()]
    # the pass runs in the fake mode of a model built from a config, else in one of its own, where each real weight has
    # one fake twin: the weights' storages there are the model's, never the batch's
    mode = next((t.fake_mode for t in tensors if isinstance(t, FakeTensor)), None) or \
        FakeTensorMode(allow_non_fake_inputs=True)
    # storages are told apart by address: the fake twins and every saved tensor are kept alive to the end of the
    # count, so that no address is freed and reused by another tensor (which would then be missed)
    twins = [t if isinstance(t, FakeTensor) else mode.from_tensor(t) for t in tensors]
    own = {t.untyped_storage()._cdata for t in twins}
    saved: dict[int, int] = {}
    alive: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in own:  # a weight the backward reads is the model's, not the batch's
            saved.setdefault(key, t.untyped_storage().nbytes())
            alive.append(t)
        return t

    try:
        example = task.example_batch(model, config)
        with mode:
            batch = _full_batch(example, config, input_device(model))
            with frozen_parameters(model), dense_routing(model), torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(**batch, **({"use_cache": False} if "input_ids" in batch else {}))
                logits = out.logits if hasattr(out, "logits") else out[0]
                logit_bytes = logits.numel() * logits.element_size()
                tokens = logits.numel() // logits.shape[-1]
    except Exception:  # noqa: BLE001 - a model the fake pass cannot run: the plan says nothing about the transient
        return 0
    finally:
        for h in handles:
            h.remove()
    # the collector's own copies: a target's selected input rows and output-gradient rows, in float32, one at a time
    copies = max((tokens * (targets[n].d_in + targets[n].d_out) * 4 for n in names if n in targets), default=0)
    return sum(saved.values()) + 2 * max(saved.values(), default=0) + 2 * logit_bytes + copies


def _full_batch(example: dict[str, torch.Tensor], config: FactorConfig, device: torch.device) -> dict:
    """The task's example batch grown to ``batch_size`` rows (and ``seq_len`` tokens for a language model)."""
    batch = {}
    for k, v in example.items():
        if k in ("input_ids", "attention_mask"):
            v = torch.ones(config.batch_size, config.seq_len, dtype=v.dtype)
        else:
            v = v.expand(config.batch_size, *v.shape[1:]).contiguous()
        batch[k] = v.to(device)
    if "input_ids" in batch:
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    return batch

