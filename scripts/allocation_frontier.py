#!/usr/bin/env python
"""One ρ for all layers against a ρ per layer (issue 35), on the embedded default with the main job's factors.

Stages (each saves its sweep.json under ``--out`` and reuses it on the next run unless ``--force``):

1. For each perplexity budget of ``--budgets`` (the first is the main job's, +15%): the main job's sweep (its ρ grid ×
   layers 2–3 and 1–3, gate+up+down, ``examples/default.yaml``) with ``allocation="per_layer"``: the grid's pick,
   the search's pick, its candidates and the time each part took.
2. A denser uniform grid (``--uniform-rhos``) on the same layer choices: the best single ρ at each budget is taken over
   it and the main job's grid together, so that the searched allocation is compared with more than the grid it
   started from.
3. The frontier table: per budget, the best uniform candidate and the best candidate of that budget's search (Strict
   on passages and canaries, perplexity change). A plot of every candidate (``frontier.png``).
4. Held-out halves: each memorized set split in two (even and odd items); the sweep and its search run on one half
   and both picks are scored on the other, then the halves swap.
5. The four skills (lm-eval ``curvedit_skills``) on the base, the uniform pick, the searched pick and the uniform
   candidate whose perplexity change is nearest the searched pick's (``--no-skills`` skips them; cached in
   ``skills.json``).

The main job's factors: ``--factors`` (default ``runs/default/factors``, what ``hf-curvedit run
examples/default.yaml`` writes); when that folder has none, they are fitted there with the main job's fit settings.

Usage::

    python scripts/allocation_frontier.py                       # about 6 min on 2 idle CPU cores (with the fit)
    python scripts/allocation_frontier.py --budgets 0.15 --no-skills --folds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from hf_curvedit import CurvatureEditConfig, build_curvature_edit, load_factors
from hf_curvedit.evaluation import RecitationSet, TextSet, evaluate_recitation
from hf_curvedit.pipeline import PipelineConfig
from hf_curvedit.pipeline.inputs import default_recitation_sets, heldout_texts, load_model
from hf_curvedit.shards import TensorFiles
from hf_curvedit.sweep import SweepConfig, SweepPoint, SweepResult, pick_edit, sweep_edits
from hf_curvedit.targets import layer_choices

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ROOT / "examples" / "default.yaml"
PRIMARY = "passages"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
            f"{torch.get_num_threads()}, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)")


def main_job_factors(folder: Path, net: Any) -> Any:
    """The main job's eigenbases: from ``folder``, fitted there first with the main job's fit settings if absent."""
    if not TensorFiles.exists(folder, "factors"):
        from hf_curvedit.pipeline.steps import run_fit

        fit = PipelineConfig.from_yaml(MAIN_JOB).fit
        log(f"no factors in {folder}: fitting them with the main job's settings ({fit})")
        run_fit(None, fit, folder)
    return load_factors(folder, net).eigendecompose()


class Stages:
    """The model, its eigenbases, the data and the main job's sweep settings; each sweep cached in ``out``."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.net, self.tok = load_model(None)
        self.eigen = main_job_factors(Path(args.factors), self.net)
        self.sets = default_recitation_sets(self.tok)
        self.heldout = TextSet.from_texts(heldout_texts(None, default_model=True), self.tok)
        self.job = PipelineConfig.from_yaml(MAIN_JOB).sweep
        self.choices = layer_choices(self.eigen, self.job.layers, self.job.modules)
        self.seconds: dict[str, float] = {}

    def config(self, budget: float, allocation: str = "per_layer", rhos: tuple[float, ...] | None = None
               ) -> SweepConfig:
        return SweepConfig(keep_masses=rhos or self.job.keep_mass, layer_choices=self.choices,
                           perplexity_budget=budget, batch_size=self.job.batch_size, pad_token_id=self.tok.pad_token_id,
                           allocation=allocation, allocation_max_candidates=self.args.max_candidates,
                           allocation_steps=tuple(self.args.steps))

    def sweep(self, name: str, config: SweepConfig, sets: dict[str, RecitationSet] | None = None) -> SweepResult:
        path = self.out / f"{name}.json"
        if path.exists() and not self.args.force:
            log(f"{name}: reusing {path}")
            result = SweepResult.load(path)
            self.seconds[name] = float(result.extra.get("script_seconds", 0.0))
            return result
        log(f"{name}: sweeping")
        started = time.perf_counter()
        result = sweep_edits(self.net, self.eigen, sets or self.sets, self.heldout, config)
        result.extra["script_seconds"] = self.seconds[name] = round(time.perf_counter() - started, 1)
        result.save(path)
        return result

    def strict_on(self, point: SweepPoint, sets: dict[str, RecitationSet]) -> dict[str, float]:
        """Strict recitation of each of ``sets`` under the edit of ``point``."""
        edited = build_curvature_edit(self.net, self.eigen, CurvatureEditConfig(**point.edit_settings()))
        try:
            return {name: evaluate_recitation(edited, s.prefixes, s.suffixes, batch_size=self.job.batch_size,
                                              pad_token_id=self.tok.pad_token_id, show_progress=False).strict
                    for name, s in sets.items()}
        finally:
            self.net = edited.unload()

    def skills(self, point: SweepPoint | None) -> dict[str, float]:
        from hf_curvedit.evaluation.capabilities import capability_scores

        config = self.job.capabilities.to_config()
        if point is None:
            return capability_scores(self.net, self.tok, config)
        edited = build_curvature_edit(self.net, self.eigen, CurvatureEditConfig(**point.edit_settings()))
        try:
            return capability_scores(edited, self.tok, config)
        finally:
            self.net = edited.unload()


def curvedit(points: list[SweepPoint]) -> list[SweepPoint]:
    return [p for p in points if p.method == "curvedit"]


def grid_points(points: list[SweepPoint]) -> list[SweepPoint]:
    """The curvature edits measured before the search: one ρ for a layer choice."""
    return [p for p in curvedit(points) if p.search_round is None]


def best_within(points: list[SweepPoint], budget: float) -> SweepPoint | None:
    return pick_edit(points, PRIMARY, SweepConfig(perplexity_budget=budget))


def grid_pick(result: SweepResult, budget: float) -> SweepPoint:
    """The grid's own pick: the best within-budget candidate before the search (one of the search's starts)."""
    pick = best_within(grid_points(result.points), budget)
    assert pick is not None, "the caller checks that the grid has a pick"
    return pick


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def row(label: str, p: SweepPoint) -> str:
    return (f"| {label} | {p.layers} {p.knob} | {pct(p.recitation[PRIMARY]['strict'])} | "
            f"{pct(p.recitation['canaries']['strict'])} | {p.perplexity:.3f} ({100 * p.perplexity_change:+.1f}%) |")


def frontier(searches: dict[float, SweepResult], uniform: list[SweepPoint]) -> str:
    lines = ["| budget | edit | ρ | passages Strict | canaries Strict | held-out PPL (change) |",
             "|---|---|---|---|---|---|"]
    for budget, result in searches.items():
        start = grid_pick(result, budget)
        best_uniform = best_within(uniform + grid_points(result.points), budget)
        lines.append(row(f"+{100 * budget:g}% | grid's pick (one of the starts)", start))
        if best_uniform is not None and best_uniform != start:
            lines.append(row(f"+{100 * budget:g}% | best single ρ (denser grid)", best_uniform))
        assert result.chosen is not None
        lines.append(row(f"+{100 * budget:g}% | **searched allocation**", result.chosen))
    return "\n".join(lines)


def plot(path: Path, searches: dict[float, SweepResult], uniform: list[SweepPoint]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    every = {id(p): p for r in searches.values() for p in curvedit(r.points)}
    grid = sorted(grid_points(list(every.values()) + uniform), key=lambda p: p.keep_mass)
    for layers in dict.fromkeys(p.layers for p in grid):
        pts = [p for p in grid if p.layers == layers]
        ax.plot([100 * p.perplexity_change for p in pts], [100 * p.recitation[PRIMARY]["strict"] for p in pts],
                "o-", label=f"one ρ, {layers}")
    searched = [p for p in every.values() if p.search_round is not None]
    ax.scatter([100 * p.perplexity_change for p in searched], [100 * p.recitation[PRIMARY]["strict"] for p in searched],
               marker="D", color="tab:red", alpha=0.6, label="ρ per layer (search candidates)")
    for budget, r in searches.items():
        assert r.chosen is not None
        ax.scatter([100 * r.chosen.perplexity_change], [100 * r.chosen.recitation[PRIMARY]["strict"]], s=180,
                   facecolors="none", edgecolors="black")
        ax.axvline(100 * budget, color="grey", ls="--", lw=1)
    ax.set_xlim(right=100 * max(searches) + 5)  # the frontier, not the strong edits far past every budget
    ax.set_xlabel("held-out perplexity change (%)")
    ax.set_ylabel("Strict recitation of the passages (%)")
    ax.set_title("Embedded default: one ρ against a ρ per layer (circled: the picks)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def halves(stages: Stages, folds: int) -> str:
    """Search on one half of each memorized set, score both picks on the other half."""
    split = {i: {name: RecitationSet(s.prefixes[i::2], s.suffixes[i::2]) for name, s in stages.sets.items()}
             for i in (0, 1)}
    lines = ["| searched on | scored on | edit | ρ | passages Strict (searched half) | passages Strict (other half) | "
             "canaries Strict (other half) | held-out PPL change |", "|---|---|---|---|---|---|---|---|"]
    budget = stages.args.budgets[0]
    for fold in range(folds):
        on, other = split[fold], split[1 - fold]
        result = stages.sweep(f"half{fold}_{budget:g}", stages.config(budget), on)
        start = grid_pick(result, budget)
        assert result.chosen is not None
        for label, point in (("grid's pick (one ρ)", start), ("searched allocation", result.chosen)):
            scored = stages.strict_on(point, other)
            names = ("even items", "odd items") if fold == 0 else ("odd items", "even items")
            lines.append(f"| {names[0]} | {names[1]} | {label} | {point.layers} {point.knob} | "
                         f"{pct(point.recitation[PRIMARY]['strict'])} | {pct(scored[PRIMARY])} | "
                         f"{pct(scored['canaries'])} | {100 * point.perplexity_change:+.1f}% |")
    return "\n".join(lines)


def costs(stages: Stages, searches: dict[float, SweepResult]) -> str:
    lines = ["| budget | grid candidates | search candidates | starts | stopped | sweep total | of which the search | "
             "per candidate |", "|---|---|---|---|---|---|---|---|"]
    for budget, r in searches.items():
        s = r.extra["allocation_search"]
        grid = len(grid_points(r.points))
        total = float(r.extra.get("script_seconds") or 0.0)
        per = s["seconds"] / max(1, s["candidates"])
        stopped = ", ".join(sorted({run["stopped"] for run in s["starts"]}))
        lines.append(f"| +{100 * budget:g}% | {grid} | {s['candidates']} | {len(s['starts'])} | {stopped} | "
                     f"{total:.0f} s | {s['seconds']:.0f} s | {per:.1f} s |")
    return "\n".join(lines)


def skills_table(stages: Stages, main: SweepResult, uniform: list[SweepPoint]) -> str:
    assert main.chosen is not None
    start = grid_pick(main, main.perplexity_budget)
    candidates = grid_points(uniform + main.points)
    matched = min(candidates, key=lambda p: abs(p.perplexity_change - main.chosen.perplexity_change))
    rows: list[tuple[str, SweepPoint | None]] = [("base", None), ("grid's pick (one ρ)", start),
                                                 ("searched allocation", main.chosen),
                                                 ("one ρ at the searched pick's perplexity", matched)]
    cache_path = stages.out / "skills.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() and not stages.args.force else {}
    scores = []
    for label, point in rows:
        key = "base" if point is None else f"{point.layers} {point.knob}"
        if key not in cache:
            log(f"skills: {label}")
            cache[key] = stages.skills(point)
            cache_path.write_text(json.dumps(cache, indent=2))
        scores.append(cache[key])
    tasks = sorted(scores[0])
    lines = ["| edit | ρ | passages Strict | held-out PPL change | " + " | ".join(tasks) + " |",
             "|---" * (4 + len(tasks)) + "|"]
    for (label, point), s in zip(rows, scores):
        what = "–" if point is None else f"{point.layers} {point.knob}"
        strict = pct((point or main.base).recitation[PRIMARY]["strict"])
        change = "–" if point is None else f"{100 * point.perplexity_change:+.1f}%"
        lines.append(f"| {label} | {what} | {strict} | {change} | " + " | ".join(f"{s[t]:.3f}" for t in tasks) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", default="runs/default/factors", help="the main job's factors (fitted if absent)")
    ap.add_argument("--out", default="runs/allocation_frontier")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.08],
                    help="perplexity budgets; the first (the main job's) is used by the halves and the skills")
    ap.add_argument("--uniform-rhos", type=float, nargs="+", default=[0.725, 0.775, 0.825, 0.875, 0.9])
    ap.add_argument("--max-candidates", type=int, default=24)
    ap.add_argument("--steps", type=float, nargs="+", default=[2.0, 1.41],
                    help="the search's factors on a layer's removed mass 1 - ρ, coarse to fine")
    ap.add_argument("--folds", type=int, default=2, choices=(0, 1, 2), help="held-out halves to search on")
    ap.add_argument("--no-skills", action="store_true")
    ap.add_argument("--force", action="store_true", help="measure again instead of reusing --out's sweeps")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    report = [f"Machine: {machine()} at the start."]
    stages = Stages(args)
    searches = {b: stages.sweep(f"search_{b:g}", stages.config(b)) for b in args.budgets}
    for b, r in searches.items():
        if r.chosen is None:
            raise SystemExit(f"nothing within +{100 * b:g}%: {r.summary()} (the grid's pick is one of the search's "
                             "starts: give a budget that some grid candidate meets)")
    uniform = curvedit(stages.sweep("uniform", stages.config(max(args.budgets), "uniform", tuple(args.uniform_rhos)))
                       .points)
    base = next(iter(searches.values())).base
    report += [f"Base: passages Strict {pct(base.recitation[PRIMARY]['strict'])}, canaries Strict "
               f"{pct(base.recitation['canaries']['strict'])}, held-out PPL {base.perplexity:.3f}.", "",
               "### Frontier", "", frontier(searches, uniform), "", "### Cost", "", costs(stages, searches)]
    plot(stages.out / "frontier.png", searches, uniform)
    if args.folds:
        report += ["", "### Held-out halves", "", halves(stages, args.folds)]
    if not args.no_skills:
        report += ["", "### Skills", "", skills_table(stages, searches[args.budgets[0]], uniform)]
    report += ["", f"Machine: {machine()} at the end; the script took {time.perf_counter() - started:.0f} s."]
    text = "\n".join(report)
    (stages.out / "frontier.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
