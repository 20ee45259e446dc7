"""Measuring exposure: one forward pass of the base model over each task's texts, with a hook on every edited linear
layer that compares the layer's output ``W a`` with the edited layer's ``W′ a`` for each candidate edit at once.

``W′ a`` comes from the edit's exact factorization (``B (Qᵀ a)`` or ``Q (Bᵀ a)``), so a candidate costs two thin
matrix products per layer and token; no candidate is built as an adapter and nothing is generated.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..edit import CurvatureEdit, ExpertsFactors
from ..errors import InputError
from ..evaluation._common import batched, model_device, progress, resolve_pad_id, right_pad
from ..evaluation.perplexity import resolve_block_size
from ..evaluation.sets import RecitationSet, TextSet
from .report import ExposureReport
from .texts import recitation_texts

__all__ = ["ExpertsFactors", "TaskTexts", "adapter_edits", "adapter_exposure", "measure_exposure", "predict_exposure",
           "task_text_set"]

# A task's texts: a TextSet, a RecitationSet (prefix + suffix), raw strings (with a tokenizer) or token-id lists.
TaskTexts = TextSet | RecitationSet | Sequence[str] | Sequence[Sequence[int]]


def task_text_set(name: str, texts: TaskTexts, tokenizer: Any = None) -> TextSet:
    """One task's texts (any form of `TaskTexts`) as a `TextSet`; raw text needs the tokenizer."""
    if isinstance(texts, TextSet):
        return texts
    if isinstance(texts, RecitationSet):
        return recitation_texts({name: texts})[name]
    items = list(texts)
    if not items:
        raise InputError(f"task {name!r} has no texts")
    if isinstance(items[0], str):
        if tokenizer is None:
            raise InputError(f"task {name!r} is given as raw text: pass tokenizer=, or token ids (a TextSet)")
        return TextSet.from_texts(items, tokenizer)
    return TextSet(items)


class _LayerProbe:
    """The hook of one linear layer: Σ‖W a‖² and, per candidate, Σ‖(W − W′) a‖² over the unmasked tokens (float64)."""

    def __init__(self, weight: torch.Tensor, edits: Mapping[str, CurvatureEdit]):
        self.dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.weight = weight.detach().to(self.dtype)
        self.edits = {c: (e.Q.to(weight.device, self.dtype), e.B.to(weight.device, self.dtype), e.q_side)
                      for c, e in edits.items()}
        self.mask: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        zero = lambda: torch.zeros((), dtype=torch.float64, device=self.weight.device)  # noqa: E731
        self.total = zero()
        self.removed = {c: zero() for c in self.edits}

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        a = args[0]
        assert self.mask is not None
        mask = self.mask.to(a.device)  # a model split over devices (device_map) has layers on each
        if a.shape[:-1] != mask.shape:
            if a.dim() != 2 or a.shape[0] != mask.numel():
                raise RuntimeError(f"a layer's input has shape {tuple(a.shape)}, not (batch, tokens, features) for "
                                   f"the batch's {tuple(mask.shape)} tokens: exposure measures token sequences")
            mask = mask.reshape(-1)  # a MoE block flattens (batch, tokens) before its shared expert
        a = a[mask].to(self.dtype)
        y = a @ self.weight.T
        self.total += y.double().square().sum()
        for c, (Q, B, side) in self.edits.items():
            kept = (a @ Q) @ B.T if side == "input" else (a @ B) @ Q.T
            self.removed[c] += (y - kept).double().square().sum()


class _ExpertsProbe:
    """The probe of one expert projection: over the unmasked tokens routed to each expert (a token counted once per
    expert it was routed to), Σ‖W_e a‖² and, per candidate, Σ‖(W_e − W′_e) a‖² (an unedited expert removes nothing).
    Fed by the experts module's recording forward (`hf_curvedit.curvature.experts`)."""

    def __init__(self, weight: torch.Tensor, edits: Mapping[str, ExpertsFactors]):
        self.dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.weight = weight.detach().to(self.dtype)  # (experts, d_out, d_in), logical
        self.edits = {c: (e.out.to(weight.device, self.dtype), e.inp.to(weight.device, self.dtype), e.edited)
                      for c, e in edits.items()}
        self.mask: torch.Tensor | None = None
        self.reset()

    reset = _LayerProbe.reset

    def record(self, expert: int, tokens: torch.Tensor, a: torch.Tensor) -> None:
        assert self.mask is not None
        keep = self.mask.reshape(-1).to(tokens.device)[tokens]
        a = a[keep].to(self.dtype)
        if not a.shape[0]:
            return
        y = a @ self.weight[expert].T
        self.total += y.double().square().sum()
        for c, (out, inp, edited) in self.edits.items():
            if bool(edited[expert]):
                self.removed[c] += (y - (a @ inp[expert]) @ out[expert].T).double().square().sum()


@contextlib.contextmanager
def _probes(model: nn.Module, candidates: Mapping[str, Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    from ..curvature.experts import recording_experts
    from ..tuner.locate import edit_candidates, experts_of, logical_weight

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = {name: (module, param) for name, module, param in edit_candidates(inner)}
    names = list(dict.fromkeys(n for edits in candidates.values() for n in edits))
    missing = [n for n in names if n not in found]
    if missing:
        raise InputError(f"the edits name modules this model lacks (or that are not linear layers or expert "
                         f"projections): {missing[:4]}")
    probes: dict[str, Any] = {}
    recorders: dict[nn.Module, dict[str, Any]] = {}
    handles = []
    try:
        for name in names:
            module, param = found[name]
            edits = {c: e[name] for c, e in candidates.items() if name in e}
            if param is None:
                probe: Any = _LayerProbe(logical_weight(module), edits)
                base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                handles.append(base.register_forward_hook(probe))
            else:
                probe = _ExpertsProbe(logical_weight(module, param), edits)
                recorders.setdefault(experts_of(module), {})[param] = probe
            probes[name] = probe

        def recorder(params: dict[str, Any]) -> Any:
            def record(param: str, expert: int, tokens: torch.Tensor, num_rows: int, a: torch.Tensor,
                       y: torch.Tensor) -> None:
                if param in params:
                    params[param].record(expert, tokens, a)
            return record

        with recording_experts({m: recorder(params) for m, params in recorders.items()}, model):
            yield probes
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure_exposure(
    model: nn.Module,
    candidates: Mapping[str, Mapping[str, CurvatureEdit]],
    tasks: Mapping[str, TaskTexts],
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    pad_token_id: int | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    show_progress: bool = True,
) -> ExposureReport:
    """The exposure of each task to each candidate edit, from one forward pass of the base model per task.

    Args:
        model: the unedited model (a `PeftModel` runs with its adapters disabled).
        candidates: candidate label → module name → its `CurvatureEdit` (what `compute_module_edits` returns, or
            the edits an adapter holds).
        tasks: task name → its texts (see `TaskTexts`); sequences longer than the model's context are cut. A
            `RecitationSet` (prefix + suffix) is measured as a memorized set, outside the predicted cost.
        tokenizer: for tasks given as raw text; also gives the pad id.
        settings: candidate label → what the edit was, kept in the report.
    """
    if not candidates:
        raise InputError("no candidate edits to measure")
    if not tasks:
        raise InputError("no tasks to measure: give at least one task's texts")
    text_sets = {name: task_text_set(name, t, tokenizer) for name, t in tasks.items()}
    pad_id = resolve_pad_id(pad_token_id, tokenizer=tokenizer, model=model)
    max_len, _ = resolve_block_size(model, None, None)
    device = model_device(model)
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    shares: dict[str, dict[str, dict[str, float]]] = {c: {} for c in candidates}
    tokens: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        with disable, _probes(model, candidates) as probes:
            for task, text_set in text_sets.items():
                for p in probes.values():
                    p.reset()
                n = 0
                # sums do not depend on the order: batching texts of similar length wastes less on padding
                seqs = sorted((s[:max_len] for s in text_set.sequences if s), key=len)
                for chunk in progress(list(batched(seqs, batch_size)), show_progress, desc=f"exposure {task}",
                                      unit="batch"):
                    ids, mask = right_pad(chunk, pad_id, device)
                    for p in probes.values():
                        p.mask = mask.bool()
                    model(input_ids=ids, attention_mask=mask)
                    n += int(mask.sum())
                tokens[task] = n
                for c in candidates:
                    shares[c][task] = {name: float(p.removed[c] / p.total) if p.total > 0 else 0.0
                                       for name, p in probes.items() if c in p.removed}
    finally:
        model.train(was_training)
    memorized = [name for name, t in tasks.items() if isinstance(t, RecitationSet)]
    return ExposureReport(shares, tokens, {c: dict(v) for c, v in (settings or {}).items()}, memorized)


def _as_measured(edits: Mapping[str, Any]) -> dict[str, Any]:
    # a linear layer's edit as it is; an expert projection's as its stacked factors
    return {name: e if isinstance(e, CurvatureEdit) else ExpertsFactors.of(e) for name, e in edits.items()}


def _edit_settings(config: Any) -> dict[str, Any]:
    """What a report records of a candidate's `CurvatureEditConfig`."""
    return {"keep_mass": config.keep_mass, "target_modules": config.target_modules, "protect": dict(config.protect),
            "selection": config.selection}


def predict_exposure(
    model: nn.Module,
    eigen: Any,
    tasks: Mapping[str, TaskTexts],
    keep_masses: Sequence[float],
    config: Any = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> ExposureReport:
    """Predict, before any edit exists, how much of each task's signal the edit at each ρ would remove.

    Args:
        model: the model the factors were fitted on.
        eigen: its eigenbases, as for `build_curvature_edit` (with ``config.protect``, a dict of factor sets).
        tasks: task name → texts (`TaskTexts`), e.g. `lm_eval_task_texts(CapabilityConfig(...), tokenizer)`.
        keep_masses: the ρ values to compare (one candidate each, labelled ``ρ=0.9``).
        config: a `CurvatureEditConfig` for everything but ρ (target modules, protected domains, selection, rank
            cap); default ``CurvatureEditConfig()``.

    Example:
        ```py
        >>> tasks = lm_eval_task_texts(CapabilityConfig(tasks=["curvedit_skills"], include_path=[...]), tok)
        >>> report = predict_exposure(model, eigen, tasks, [0.95, 0.9, 0.8], CurvatureEditConfig(target_modules=...))
        >>> print(report.to_markdown())
        ```
    """
    from ..tuner import CurvatureEditConfig
    from ..tuner.build import compute_module_edits, open_eigen, split_factor_sets

    if not keep_masses:
        raise InputError("give at least one ρ (keep_masses)")
    config = config if config is not None else CurvatureEditConfig()
    general, domains = split_factor_sets(eigen, config)
    general, _ = open_eigen(general, {})
    protect_eigen = {d: open_eigen(src, {})[0] for d, src in domains.items()}
    candidates, settings = {}, {}
    for rho in keep_masses:
        cfg = dataclasses.replace(config, keep_mass=float(rho), edited_modules={})
        label = f"ρ={float(rho):g}"
        candidates[label] = _as_measured(compute_module_edits(model, general, cfg, protect_eigen))
        settings[label] = _edit_settings(cfg)
    return measure_exposure(model, candidates, tasks, tokenizer=tokenizer, batch_size=batch_size, settings=settings,
                            show_progress=show_progress)


def adapter_edits(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """The edits the curvature-edit adapter ``adapter_name`` holds in ``model``, as exposure reads them: weight name
    → `CurvatureEdit` (a linear layer) or `ExpertsFactors` (an expert projection)."""
    from ..tuner.locate import iter_layers

    edits: dict[str, Any] = {}
    for module_name, layer in iter_layers(model):
        for unit in layer.units_of(adapter_name):
            edits[layer.unit_name(unit, module_name)] = layer.measured_edit(adapter_name, unit)
    return edits


def adapter_exposure(
    model: nn.Module,
    tasks: Mapping[str, TaskTexts],
    adapter_name: str | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> ExposureReport:
    """The exposure of each task to an edit that exists: the curvature-edit adapter ``adapter_name`` (default: the
    active one) of a `PeftModel`, measured on the base model's activations (adapters disabled during the pass)."""
    name = adapter_name or model.active_adapter
    edits = adapter_edits(model, name)
    if not edits:
        raise InputError(f"adapter {name!r} holds no curvature edit to measure")
    return measure_exposure(model, {name: edits}, tasks, tokenizer=tokenizer, batch_size=batch_size,
                            settings={name: _edit_settings(model.peft_config[name])}, show_progress=show_progress)
