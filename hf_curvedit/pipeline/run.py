"""The runner: `run_pipeline` runs the steps a `PipelineConfig` names over one output folder, each on what the one
before wrote, skipping the steps recorded as done; `RunLayout` says where in that folder each step writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..integrity import output_lock
from ..shards import TensorFiles
from ..utils import atomic_write_text
from .fields import StepFailed, UsageError
from .settings import STEPS, EditStep, PipelineConfig
from .steps import report_table, run_edit, run_evaluate, run_fit, run_publish, run_sweep


@dataclass(frozen=True)
class RunLayout:
    """Where each step of a run in ``root`` writes (and the next one reads)."""

    root: Path

    factors = property(lambda self: self.root / "factors")
    sweep = property(lambda self: self.root / "sweep")
    edit = property(lambda self: self.root / "edit")
    report = property(lambda self: self.root / "report.json")
    publish = property(lambda self: self.root / "publish")

    def marker(self, step: str) -> Path:
        return self.root / "steps" / f"{step}.done.json"

    def adapter(self) -> Path:
        """The one adapter the edit step made (as its marker records; else the one adapter folder in edit/)."""
        marker = self.marker("edit")
        recorded = json.loads(marker.read_text()).get("adapters") if marker.exists() else None
        adapters = [Path(p) for p in recorded] if recorded else sorted(
            p.parent for p in self.edit.glob("*/adapter_config.json"))
        if len(adapters) != 1:
            raise UsageError(f"expected exactly one adapter in {self.edit}, found {len(adapters)}: give the edit step "
                             "one keep_mass (or let the sweep choose it)")
        return adapters[0]


def _with_sweep_pick(step: EditStep, layout: RunLayout) -> EditStep:
    """The edit step with the sweep's pick (ρ, its ρ per layer when the sweep searched one, and modules) unless it
    sets keep_mass itself. Protection: the edit step's own ``protect`` when it gives one, else the one the sweep
    measured its pick with."""
    from ..sweep import SweepResult

    if step.keep_mass is not None:
        return step
    path = layout.sweep / "sweep.json"
    if not path.exists():
        raise UsageError(f"the sweep's results {path} are missing: run again with --force to redo the sweep")
    result = SweepResult.load(path)
    chosen = result.chosen
    if chosen is None:
        return step
    targets = step.target_modules if step.target_modules is not None else chosen.target_modules
    protect = step.protect or dict(result.extra.get("protect") or {})  # the pick was measured with this protection
    # the pick was measured with the sweep's selection; an edit step that names another one keeps its own
    selection = step.selection if step.selection != "curvature_mass" else result.extra.get("selection", step.selection)
    pattern = step.keep_mass_pattern or dict(chosen.keep_mass_pattern or {})
    return dataclasses.replace(step, keep_mass=(chosen.keep_mass,), keep_mass_pattern=pattern, target_modules=targets,
                               protect=protect, selection=selection)


def run_pipeline(config: PipelineConfig, *, force: bool = False, echo: Callable[[str], Any] = print) -> Path:
    """Run the steps of ``config`` in the order fit, sweep, edit, evaluate, publish, each on what the one before
    wrote. Steps recorded as done are skipped unless ``force``. ``echo`` gets the progress and each step's tables.

    Raises:
        UsageError: bad settings or input. StepFailed: the sweep found nothing within its budget.
    """
    with output_lock(config.output_dir, "hf-curvedit run"):
        return _run_pipeline(config, force=force, echo=echo)


def _run_pipeline(config: PipelineConfig, *, force: bool, echo: Callable[[str], Any]) -> Path:
    layout = RunLayout(Path(config.output_dir))
    model = config.model
    if config.evaluate and config.evaluate.capabilities and (force or not layout.marker("evaluate").exists()):
        config.evaluate.capabilities.check()  # an unknown task or a missing lm-eval fails now, not after the fit
    if config.sweep and config.sweep.capabilities and (force or not layout.marker("sweep").exists()):
        config.sweep.capabilities.check()
    for name in STEPS:
        step: Any = getattr(config, name)
        if step is None:
            continue
        marker = layout.marker(name)
        if marker.exists() and not force:
            echo(f"[run] {name}: already done ({marker}), skipping")
            continue
        echo(f"[run] {name}")
        record: dict[str, Any] = {"step": name}
        if name == "fit":
            echo(run_fit(model, step, layout.factors).summary())
        elif name == "sweep":
            result = run_sweep(model, layout.factors, step, layout.sweep)
            echo(result.to_markdown())
            if result.chosen is None:
                raise StepFailed(name, result.summary())
            echo(f"{result.summary()}  (results: {layout.sweep})")
            record["chosen"] = dataclasses.asdict(result.chosen)
        elif name == "edit":
            edits = run_edit(model, layout.factors, _with_sweep_pick(step, layout) if config.sweep else step,
                             layout.edit)
            echo(edits.summary())
            record["adapters"] = [str(p) for p in edits.adapters.values()]
        elif name == "evaluate":
            echo(report_table(run_evaluate(model, layout.adapter(), step, layout.report)))
        else:
            from ..sweep import SweepResult

            # only the sweep's own pick has its baselines measured next to it
            sweep_json, adapter = layout.sweep / "sweep.json", layout.adapter()
            comparison = None
            if sweep_json.exists():
                result = SweepResult.load(sweep_json)
                adapter_config = json.loads((adapter / "adapter_config.json").read_text())
                if result.matches and result.pick_mismatch(adapter_config) is None:
                    comparison = sweep_json
            echo(str(run_publish(layout.adapter(), step, layout.publish,
                                 report=layout.report if layout.report.exists() else None,
                                 eigen=layout.factors if TensorFiles.exists(layout.factors, "eigen") else None,
                                 comparison=comparison)))
        atomic_write_text(marker, json.dumps(record, indent=2))
    echo(f"[run] done: {layout.root}")
    return layout.root
