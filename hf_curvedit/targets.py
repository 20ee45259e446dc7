"""Choosing which linear layers to edit: names, globs, regexes and architecture defaults."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

TargetSpec = str | Sequence[str] | None

# The paper edits the MLP projections only (docs/method.md §2). Regexes are matched with
# ``re.fullmatch`` against the module's qualified name, so they also work inside a PeftModel
# (where names gain a ``base_model.model.`` prefix) thanks to the leading ``(.*\.)?``.
_LLAMA_MLP = r"(.*\.)?mlp\.(gate_proj|up_proj|down_proj)"
_VIT_MLP = r"(.*\.)?(layers\.\d+\.mlp\.(fc1|fc2)|layer\.\d+\.(intermediate\.dense|output\.dense))"
DEFAULT_TARGET_MODULES: dict[str, str] = {
    "llama": _LLAMA_MLP,
    "mistral": _LLAMA_MLP,
    "mixtral": r"(.*\.)?block_sparse_moe\.experts\.\d+\.(w1|w2|w3)",
    "qwen2": _LLAMA_MLP,
    "qwen3": _LLAMA_MLP,
    "olmo": _LLAMA_MLP,
    "olmo2": _LLAMA_MLP,
    "olmo3": _LLAMA_MLP,
    "gemma": _LLAMA_MLP,
    "gemma2": _LLAMA_MLP,
    "gemma3_text": _LLAMA_MLP,
    "phi3": r"(.*\.)?mlp\.(gate_up_proj|down_proj)",
    "phi": r"(.*\.)?mlp\.(fc1|fc2)",
    "gpt_neox": r"(.*\.)?mlp\.(dense_h_to_4h|dense_4h_to_h)",
    "gpt2": r"(.*\.)?mlp\.(c_fc|c_proj)",
    "gptj": r"(.*\.)?mlp\.(fc_in|fc_out)",
    "opt": r"(.*\.)?layers\.\d+\.(fc1|fc2)",
    # Vision transformers. transformers 5 names the MLP `layers.N.mlp.fc1/fc2`; checkpoints and releases that still
    # use the BERT-style names have `layer.N.intermediate.dense` + the block's `output.dense` (not
    # `attention.output.dense`). Both spellings are accepted.
    "vit": _VIT_MLP,
    "deit": _VIT_MLP,
    "beit": _VIT_MLP,
    "dinov2": r"(.*\.)?layers?\.\d+\.mlp\.(fc1|fc2|weights_in|weights_out)",
    "swin": r"(.*\.)?blocks\.\d+\.(intermediate\.dense|output\.dense|mlp\.fc1|mlp\.fc2)",
}

_GLOB_CHARS = set("*?[")


def is_linear_like(module: nn.Module) -> bool:
    """True for `nn.Linear` and GPT-2's `Conv1D` (a linear layer whose weight is stored transposed)."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear-like module, whatever its weight layout."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_out), int(d_in)
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def default_target_modules(model_type: str | None) -> str | None:
    """The architecture default for ``config.model_type`` (a regex), or None if unknown."""
    if model_type is None:
        return None
    return DEFAULT_TARGET_MODULES.get(model_type)


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
            raise ValueError(f"--layers takes comma-separated block indices like 2,3; got {spec!r}") from None
        names = []
        for n in names_all:
            idx = re.search(r"\.(\d+)\.", n)
            leaf = n.rsplit(".", 1)[-1]
            if (idx and int(idx.group(1)) in blocks
                    and (leaves is None or any(leaf.startswith(prefix) for prefix in leaves))):
                names.append(n)
        if not names:
            raise ValueError(f"layers {spec} (modules {label_modules}) select no module with factors; fitted: "
                             f"{names_all[:6]}")
        out[f"layers {spec}" + (f" ({label_modules})" if label_modules else "")] = "|".join(re.escape(n) for n in names)
    for label, regex in (regexes or {}).items():
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"layer choice {label!r}: {regex!r} is not a valid regular expression: {e}") from e
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
    """Qualified names of the linear layers to edit, in model order.

    ``target_modules`` follows PEFT's convention: a string is a regex matched against the full
    module name (``re.fullmatch``); a list holds exact names, name suffixes (``"mlp.up_proj"``) or
    globs (``"model.layers.1*.mlp.*"``). ``None`` picks the architecture default (the MLP
    projections). Embeddings and a tied ``lm_head`` are never selected.
    """
    if model_type is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
    linears = [(n, m) for n, m in model.named_modules() if is_linear_like(m)]
    linear_names = [n for n, _ in linears]
    spec = target_modules
    if spec is None:
        spec = default_target_modules(model_type)
        if spec is None:
            raise ValueError(
                f"hf-curvedit has no default target modules for model_type={model_type!r}. "
                "Pass target_modules explicitly (names, globs or a regex). Linear layers in this "
                f"model:\n{_describe_linears(linear_names)}"
            )
    if isinstance(spec, (list, tuple, set)) and len(spec) == 0:
        raise ValueError("target_modules is empty; pass at least one name, glob or regex.")
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as e:
            raise ValueError(f"target_modules={spec!r} is not a valid regular expression: {e}") from e

    selected: list[str] = []
    non_linear: list[str] = []
    matched_any_key: set[str] = set()
    all_names = {n: m for n, m in model.named_modules()}
    for name, module in all_names.items():
        if not name or not module_matches(name, spec):
            continue
        if exclude_modules is not None and module_matches(name, exclude_modules):
            continue
        if not is_linear_like(module):
            non_linear.append(f"{name} ({type(module).__name__})")
            continue
        if name.endswith("lm_head") or "embed" in name.split(".")[-1]:
            continue
        selected.append(name)
        if not isinstance(spec, str):
            matched_any_key.update(k for k in spec if module_matches(name, [k]))

    if not selected:
        detail = (f" ({len(non_linear)} matched module(s) are not linear: {', '.join(non_linear[:5])})" if non_linear
                  else "")
        raise ValueError(
            f"No linear layer matches target_modules={spec!r}{detail}. Use names, name suffixes, "
            f"globs or a regex that match some of the linear layers of this model:\n"
            f"{_describe_linears(linear_names)}"
        )
    if not isinstance(spec, str):
        unmatched = [k for k in spec if k not in matched_any_key]
        if unmatched:
            raise ValueError(
                f"target_modules entries {unmatched} match no linear layer (the others do). "
                f"Linear layers in this model:\n{_describe_linears(linear_names)}"
            )
    return selected
