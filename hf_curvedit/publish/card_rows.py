"""The rows of a model card's tables, as the templates show them: evaluation rows (percent or plain, with their
change), capability rows, per-module and per-expert rows, and the `fmt` filter."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..evaluation.capabilities import CapabilityResult
from ..evaluation.report import EditReport, TableRow

__all__ = ["capability_row", "capability_rows", "eval_meta", "expert_rows", "fmt", "format_row", "is_percent",
           "layer_rho_rows", "module_row"]

PERCENT_METRICS = ("Strict", "Loose", "Stress full match", "Memorized-label rate", "True-label accuracy", "Accuracy")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def is_percent(metric: str) -> bool:
    return metric.startswith(PERCENT_METRICS)


def format_row(row: TableRow) -> dict[str, str]:
    if is_percent(row.metric):
        def show(v: float | None) -> str:
            return "–" if v is None else f"{100 * v:.1f}%"
        change = "–" if row.base is None else f"{100 * (row.edited - row.base):+.1f} pt"
        metric = f"{row.metric} (%)"
    else:
        digits = 2 if row.metric == "Perplexity" else 3
        show = lambda v: fmt(v, digits)  # noqa: E731
        if row.base is None:
            change = "–"
        elif row.metric == "Perplexity" and row.base:
            change = f"{100 * (row.edited / row.base - 1):+.1f}%"
        else:
            change = f"{row.edited - row.base:+.{digits}f}"
        metric = row.metric
    return {"metric": metric, "set": row.set, "base": show(row.base), "edited": show(row.edited), "change": change}


def capability_row(res: CapabilityResult, exposure: float | None = None) -> dict[str, str]:
    """One row of the card's capability table; ``exposure`` is the task's predicted exposure to the edit."""
    def show(value: float, stderr: float | None) -> str:
        return f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")

    metric = res.metric if res.filter == "none" else f"{res.metric} ({res.filter})"
    shots = "" if res.num_fewshot in (None, 0) else f", {res.num_fewshot}-shot"
    return {"task": res.task, "metric": metric + shots, "n": str(res.n), "base": show(res.base, res.base_stderr),
            "edited": show(res.edited, res.edited_stderr), "change": f"{res.change:+.3f}",
            "exposure": "–" if exposure is None else f"{exposure:.3f}"}


def capability_rows(report: EditReport | None) -> list[dict[str, str]]:
    """The card's capability table: each lm-eval task with its exposure, then each task whose exposure alone was
    measured (not evaluated)."""
    if report is None:
        return []
    rows = [capability_row(r, report.exposure.get(task)) for task, r in report.capabilities.items()]
    rows += [{"task": task, "metric": "not evaluated", "n": "–", "base": "–", "edited": "–", "change": "–",
              "exposure": f"{value:.3f}"} for task, value in report.exposure.items() if task not in report.capabilities]
    return rows


def eval_meta(report: EditReport | None) -> str:
    if report is None:
        return ""
    parts = []
    md = report.metadata
    if md.created_at:
        parts.append(f"evaluated {md.created_at}")
    if md.library_version:
        parts.append(f"hf-curvedit {md.library_version}")
    return ", ".join(parts)


def expert_rows(modules: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The card's experts table: per expert projection, how many experts were edited and how many tokens each one's
    factors saw."""
    rows = []
    for m in modules:
        tokens = m.get("expert_tokens")
        if not m.get("num_experts") or tokens is None:
            continue
        ordered = sorted(tokens)
        rows.append({"module": m["module"], "num_experts": m["num_experts"], "edited_experts": m.get("edited_experts"),
                     "tokens": f"{ordered[0]:,} / {ordered[len(ordered) // 2]:,} / {ordered[-1]:,}",
                     "unedited": ", ".join(str(e) for e in m.get("unedited_experts") or []) or "none",
                     "per_expert": ", ".join(f"{e}: {t:,}" for e, t in enumerate(tokens))})
    return rows


def module_row(m: Mapping[str, Any]) -> dict[str, Any]:
    row = {"r": None, "s": None, "k": None, "kept_mass_fraction": None, "removed_norm_fraction": None}
    row.update(m)
    return row


def layer_rho_rows(modules: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The card's "ρ per layer" line: each layer's ρ (per projection kind where its modules differ), or nothing when
    every module has the same ρ (a uniform edit: the ρ of the module table says it all)."""
    from ..sweep.allocation import group_label, module_groups

    rho = {m["module"]: m.get("keep_mass") for m in modules}
    if len({r for r in rho.values() if r is not None}) < 2:
        return []
    rows = []
    for layer, names in module_groups(rho, "per_layer").items():
        values = {rho[n] for n in names}
        if len(values) == 1:
            shown = f"{float(values.pop()):g}"
        else:  # per projection kind within the layer, in the order the modules come
            kinds = {group_label(n, "per_projection").removeprefix(f"{layer} "): rho[n] for n in names}
            shown = ", ".join(f"{kind} {float(r):g}" for kind, r in kinds.items())
        rows.append({"layer": layer, "rho": shown})
    return rows
