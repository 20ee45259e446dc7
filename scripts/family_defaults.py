"""Print the README's table of model families and the weights `CurvatureEditConfig()` edits by default in each.

Builds the tiny model of every family of the test zoo (`tests/family_configs.py`, the models of the per-family
lifecycle test), resolves the default targets and prints them with layer indices collapsed, one row per group of
families that share them::

    python scripts/family_defaults.py > /tmp/families.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from family_configs import available_families, tiny_causal_lm  # noqa: E402

from hf_curvedit.target_defaults import NO_DEFAULT_REASON  # noqa: E402
from hf_curvedit.targets import resolve_target_modules, weight_targets  # noqa: E402


def _leaf_pattern(names: list[str]) -> str:
    """``model.layers.0.mlp.gate_proj``, ... → ``mlp.{gate,up,down}_proj`` style: the part after the block index."""
    groups: dict[str, list[str]] = {}
    for n in names:
        tail = re.sub(r"\.\d+\.", ".*.", re.split(r"\.\d+\.", n, maxsplit=1)[-1])
        head, _, leaf = tail.rpartition(".")
        groups.setdefault(head, [])
        if leaf not in groups[head]:
            groups[head].append(leaf)
    parts = []
    for head, leaves in groups.items():
        inner = leaves[0] if len(leaves) == 1 else "{" + ", ".join(leaves) + "}"
        parts.append(f"{head}.{inner}" if head else inner)
    return "; ".join(f"`{p}`" for p in parts)


def main() -> None:
    torch.set_num_threads(1)
    rows: dict[tuple[str, str], list[str]] = {}
    without: dict[str, str] = {}
    for family in available_families():
        model = tiny_causal_lm(family)
        model_type = model.config.model_type
        if model_type in NO_DEFAULT_REASON:
            without[family] = NO_DEFAULT_REASON[model_type]
            continue
        targets = weight_targets(model)
        names = resolve_target_modules(model)
        untouched = any(p.dim() == 3 and ".experts." in n for n, p in model.named_parameters())
        kind = ("MoE" if any(targets[n].is_experts for n in names)
                else "MoE (routed experts not editable: a forward of their own)" if untouched else "dense")
        rows.setdefault((kind, _leaf_pattern(names)), []).append(family)
    print("| kind | families | default targets (per block) |")
    print("|---|---|---|")
    for (kind, pattern), families in sorted(rows.items(), key=lambda kv: (not kv[0][0].startswith("MoE"), -len(kv[1]))):
        print(f"| {kind} | {', '.join(sorted(families))} | {pattern} |")
    print()
    for family, why in sorted(without.items()):
        print(f"- {family}: no default, {why}")


if __name__ == "__main__":
    main()
