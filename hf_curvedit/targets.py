"""Choosing which weights to edit (linear layers and expert projections): names, globs, regexes and
architecture defaults."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .errors import InputError
from .expert_layouts import experts_layout
from .target_defaults import default_target_modules, no_default_message

TargetSpec = str | Sequence[str] | None

_GLOB_CHARS = set("*?[")

def is_linear_like(module: nn.Module) -> bool:
    """True for `nn.Linear` and GPT-2's `Conv1D` (a linear layer whose weight is stored transposed)."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_experts_module(module: nn.Module) -> bool:
    """True for an experts module hf-curvedit edits (`hf_curvedit.expert_layouts.experts_layout`): a fused experts
    module that dispatches through transformers' generic experts interface (``use_experts_implementation``: Mixtral,
    Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, GLM-4-MoE, GraniteMoE and most MoE families of transformers 5), or
    one of the experts classes with a forward of their own that hf-curvedit knows (see `expert_layouts`)."""
    return experts_layout(module) is not None


def experts_have_gate(module: nn.Module) -> bool:
    """Whether a fused experts module's first projection is the fused ``gate_up_proj`` (else ``up_proj``, no gate).
    transformers before 5.3 records no ``has_gate``: its experts always have a gate."""
    p = module._parameters.get("gate_up_proj")
    return bool(getattr(module, "has_gate", p is not None and p.dim() == 3))


def expert_parameter_names(module: nn.Module) -> list[str]:
    """The projections of an experts module (`is_experts_module`), in forward order."""
    layout = experts_layout(module)
    return list(layout.params) if layout is not None else []


@dataclass(frozen=True)
class TargetWeight:
    """One weight the edit can act on: a linear layer's weight, or a 3D expert projection (one matrix per expert).

    Attributes:
        name: the qualified name users target: the linear module's name, or the expert parameter's name
            (``model.layers.0.mlp.experts.gate_up_proj``).
        module: the linear layer, or the experts module that owns the parameter.
        param_name: ``"weight"`` for a linear layer, the parameter's own name for experts.
        d_out, d_in: the logical shape of one matrix (``y = W a``), whatever the storage layout.
        num_experts: the number of experts (``None`` for a linear layer).
        transposed: the storage is ``(d_in, d_out)`` (GPT-2 `Conv1D`) or ``(experts, d_in, d_out)``.
        stacked: the experts' matrices are stacked in a 2D parameter, ``(experts·d_out, d_in)`` (or
            ``(experts·d_in, d_out)`` when transposed), as DBRX stores them.
    """

    name: str
    module: nn.Module
    param_name: str
    d_out: int
    d_in: int
    num_experts: int | None = None
    transposed: bool = False
    stacked: bool = False

    @property
    def is_experts(self) -> bool:
        return self.num_experts is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """``(d_out, d_in)``, or ``(experts, d_out, d_in)`` for an expert projection."""
        return (self.d_out, self.d_in) if self.num_experts is None else (self.num_experts, self.d_out, self.d_in)

    def parameter(self) -> torch.Tensor:
        """The stored parameter (in its storage layout)."""
        if self.is_experts:
            layout = experts_layout(self.module)
            assert layout is not None
            return layout.parameter(self.module, self.param_name)
        return getattr(self.module, self.param_name)

    def logical_weight(self) -> torch.Tensor:
        """The weight in its logical layout, ``(d_out, d_in)`` or ``(experts, d_out, d_in)`` (a view, no copy)."""
        return self.to_logical(self.parameter())

    def to_logical(self, stored: torch.Tensor) -> torch.Tensor:
        """A tensor in this weight's storage layout (the parameter, or a copy of it) in the logical layout (a view):
        the one place that knows how each kind of target stores its matrices."""
        if self.stacked:
            assert self.num_experts is not None
            stored = stored.view(self.num_experts, -1, stored.shape[-1])
        return stored.transpose(-1, -2) if self.transposed else stored

    def to_storage(self, logical: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_logical`: a logical ``(d_out, d_in)`` (or stacked) tensor in the storage layout
        (contiguous)."""
        stored = (logical.transpose(-1, -2) if self.transposed else logical).contiguous()
        return stored.view(-1, stored.shape[-1]) if self.stacked else stored


def experts_target(module: nn.Module, param: str, name: str = "") -> TargetWeight:
    """The `TargetWeight` of projection ``param`` of the experts module ``module`` (named ``name``)."""
    layout = experts_layout(module)
    if layout is None or param not in layout.params:
        raise InputError(f"{type(module).__name__} has no expert projection {param!r}")
    stored = layout.parameter(module, param)
    if layout.stacked:
        assert layout.num_experts is not None
        num, d_a, d_b = layout.num_experts, stored.shape[0] // layout.num_experts, stored.shape[1]
    else:
        num, d_a, d_b = stored.shape
    transposed = param in layout.transposed
    d_out, d_in = (d_b, d_a) if transposed else (d_a, d_b)
    qualified = f"{name}.{param}" if name else param
    return TargetWeight(qualified, module, param, int(d_out), int(d_in), int(num), transposed, layout.stacked)


def target_selected(name: str, spec: TargetSpec, expert: bool) -> bool:
    """Whether ``spec`` (`module_matches`'s grammar) selects the weight called ``name``: the one rule of what a
    ``target_modules`` or ``exclude_modules`` pattern selects, for the fit, the tuner, exposure and the planner. An
    expert projection (``expert=True``, ``...experts.gate_up_proj``) is also selected by naming its experts module; a
    linear layer only by its own name."""
    if spec is None:
        return False
    owner = name.rsplit(".", 1)[0] if expert and "." in name else None
    return module_matches(name, spec) or (owner is not None and module_matches(owner, spec))


def weight_targets(model: nn.Module) -> dict[str, TargetWeight]:
    """Every weight of ``model`` an edit can act on, by qualified name, in model order: linear layers (and GPT-2
    `Conv1D`) and the projections of experts modules. What an experts module holds inside it (JetMoE's router) is
    its own computation, never a target of its own: the tuner wraps the experts module as a whole."""
    out: dict[str, TargetWeight] = {}
    for name, module in _outside_experts(model):
        if is_linear_like(module):
            d_out, d_in = linear_shape(module)
            out[name] = TargetWeight(name, module, "weight", d_out, d_in, transposed=isinstance(module, Conv1D))
        elif is_experts_module(module):
            for p in expert_parameter_names(module):
                target = experts_target(module, p, name)
                out[target.name] = target
    return out


def _outside_experts(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    # named_modules, less the modules inside an experts module
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if name and is_experts_module(module):
            inside.append(name)
        yield name, module


def _unsupported_3d(model: nn.Module) -> dict[str, str]:
    # 3D parameters of modules that hf-curvedit does not know as experts: their own forward decides what the matrices
    # mean, so they are refused by name instead of being skipped silently.
    out = {}
    for name, module in _outside_experts(model):
        if is_experts_module(module):
            continue
        for p, t in module.named_parameters(recurse=False):
            if t.dim() == 3:
                out[f"{name}.{p}" if name else p] = type(module).__name__
    return out


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear-like module, whatever its weight layout."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_out), int(d_in)
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def module_matches(name: str, spec: str | Sequence[str]) -> bool:
    """Whether the qualified module ``name`` is selected by ``spec``: the one ``target_modules`` grammar.

    A string is a regex matched with ``re.fullmatch`` against the whole name. A list (tuple, set) holds exact names,
    name suffixes (``"mlp.up_proj"`` matches ``model.layers.0.mlp.up_proj``; a suffix starts after a ``.``) or globs
    (``fnmatch``, case-sensitive, against the whole name: ``"model.layers.1*.mlp.*"``).

    [`resolve_target_modules`], `FactorConfig.target_modules` and `CurvatureEditConfig.target_modules` all use it.
    """
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    for key in spec:
        if set(key) & _GLOB_CHARS:
            if fnmatch.fnmatchcase(name, key):
                return True
        elif name == key or name.endswith("." + key):
            return True
    return False


_matches = module_matches  # the former private name


def parse_target_modules(value: str | None) -> TargetSpec:
    """The command line's ``--target-modules`` (and a YAML string): a comma-separated value is a list of names,
    suffixes or globs; a single value is a regex (PEFT's convention). ``None`` stays ``None`` (the default)."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()] if "," in value else value


def layer_choices(module_names: Iterable[str], layers: Sequence[str] = (), modules: str | Sequence[str] | None = None,
                  regexes: Mapping[str, str] | None = None) -> dict[str, str]:
    """Label → ``target_modules`` regex, for `hf_curvedit.sweep.sweep_edits`.

    Each entry of ``layers`` (``"2,3"``: comma-separated block indices) picks the modules of ``module_names`` (the
    fitted ones) in those blocks, optionally only the leaves that start with one of ``modules`` (``"gate,up"`` or
    ``["gate", "up"]``); it is labelled ``"layers 2,3"`` (``"layers 2,3 (gate,up)"``). ``regexes`` (label → regex) are
    taken as they are.

    Raises:
        ValueError: a malformed layer entry, or one that selects no module of ``module_names``.
    """
    names_all = list(module_names)
    if isinstance(modules, str):
        leaves: list[str] | None = [m.strip() for m in modules.split(",") if m.strip()]
    else:
        leaves = [m.strip() for m in modules] if modules else None
    label_modules = ",".join(leaves) if leaves else None
    out: dict[str, str] = {}
    for spec in layers:
        spec = str(spec)
        try:
            blocks = {int(x) for x in spec.split(",")}
        except ValueError:
            raise InputError(f"--layers takes comma-separated block indices like 2,3; got {spec!r}") from None
        names = []
        for n in names_all:
            idx = re.search(r"\.(\d+)\.", n)
            leaf = n.rsplit(".", 1)[-1]
            if (idx and int(idx.group(1)) in blocks
                    and (leaves is None or any(leaf.startswith(prefix) for prefix in leaves))):
                names.append(n)
        if not names:
            raise InputError(f"layers {spec} (modules {label_modules}) select no module with factors; fitted: "
                             f"{names_all[:6]}")
        out[f"layers {spec}" + (f" ({label_modules})" if label_modules else "")] = "|".join(re.escape(n) for n in names)
    for label, regex in (regexes or {}).items():
        try:
            re.compile(regex)
        except re.error as e:
            raise InputError(f"layer choice {label!r}: {regex!r} is not a valid regular expression: {e}") from e
        out[label] = regex
    return out


def _describe_linears(names: Iterable[str], limit: int = 12) -> str:
    # Group by the name with layer indices collapsed, so a 32-layer model lists a handful of rows.
    groups: dict[str, int] = {}
    for n in names:
        key = re.sub(r"\.\d+\.", ".*.", n)
        groups[key] = groups.get(key, 0) + 1
    rows = [f"  {k}  (x{v})" if v > 1 else f"  {k}" for k, v in groups.items()]
    if len(rows) > limit:
        rows = rows[:limit] + [f"  ... and {len(rows) - limit} more"]
    return "\n".join(rows) if rows else "  (none)"


def resolve_target_modules(
    model: nn.Module,
    target_modules: TargetSpec = None,
    *,
    exclude_modules: TargetSpec = None,
    model_type: str | None = None,
) -> list[str]:
    """Qualified names of the weights to edit, in model order: linear layers, and expert projections of fused
    experts modules (named by their parameter, ``model.layers.0.mlp.experts.gate_up_proj``).

    ``target_modules`` follows PEFT's convention: a string is a regex matched against the full
    name (``re.fullmatch``); a list holds exact names, name suffixes (``"mlp.up_proj"``) or
    globs (``"model.layers.1*.mlp.*"``). Naming an experts module (``mlp.experts``) selects all its projections.
    ``None`` picks the architecture default (the MLP projections, experts included). Embeddings and a tied
    ``lm_head`` are never selected.
    """
    if model_type is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = weight_targets(model)
    spec = target_modules
    if spec is None:
        spec = default_target_modules(model_type)
        if spec is None:
            raise InputError(
                f"{no_default_message(model_type)}. Pass target_modules explicitly (names, globs or a regex). "
                f"Linear layers and expert projections in this model:\n{_describe_linears(targets)}"
            )
    if isinstance(spec, (list, tuple, set)) and len(spec) == 0:
        raise InputError("target_modules is empty; pass at least one name, glob or regex.")
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as e:
            raise InputError(f"target_modules={spec!r} is not a valid regular expression: {e}") from e

    def matches(name: str, target: TargetWeight, key: str | Sequence[str]) -> bool:
        return target_selected(name, key, target.is_experts)

    selected: list[str] = []
    matched_any_key: set[str] = set()
    for name, target in targets.items():
        if not matches(name, target, spec):
            continue
        if exclude_modules is not None and matches(name, target, exclude_modules):
            continue
        if name.endswith("lm_head") or "embed" in name.split(".")[-1]:
            continue
        selected.append(name)
        if not isinstance(spec, str):
            matched_any_key.update(k for k in spec if matches(name, target, [k]))

    if not selected:
        others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                  if n and module_matches(n, spec) and n not in targets]
        others += [f"{n} (a 3D parameter of {cls}, whose experts forward hf-curvedit does not know)"
                   for n, cls in _unsupported_3d(model).items() if module_matches(n, spec)]
        detail = (f" ({len(others)} matched name(s) are neither linear layers nor expert projections: "
                  f"{', '.join(others[:5])})" if others else "")
        where = (f"the built-in default for model_type={model_type!r}" if target_modules is None
                 else f"target_modules={spec!r}")
        raise InputError(
            f"No linear layer matches {where}, and no expert projection does{detail}. Use names, name suffixes, "
            f"globs or a regex that match some of the weights of this model:\n"
            f"{_describe_linears(targets)}"
        )
    if not isinstance(spec, str):
        unmatched = [k for k in spec if k not in matched_any_key]
        if unmatched:
            raise InputError(
                f"target_modules entries {unmatched} match no linear layer or expert projection (the others do). "
                f"Linear layers and expert projections in this model:\n{_describe_linears(targets)}"
            )
    return selected
