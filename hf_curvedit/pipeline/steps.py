"""The pipeline's five steps, each a plain function of its typed settings and its input/output folders:
`run_fit` (with its `FitOutcome`), `run_sweep`, `run_edit` (with its `EditOutcome`), `run_evaluate` (with
`report_table` to print its report) and `run_publish`. The ``hf-curvedit`` subcommands and `run_pipeline` call them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..integrity import output_lock
from ..targets import layer_choices
from ..utils import atomic_folder, atomic_write_text
from .inputs import clean_texts, default_recitation_sets, heldout_texts, load_model, recitation_sets
from .settings import (
    DEFAULT_FACTOR_DATA,
    DEFAULT_KEEP_MASS,
    EditStep,
    EvaluateStep,
    FitStep,
    PublishStep,
    SweepStep,
    UsageError,
)


@dataclass
class FitOutcome:
    factors: Any  # KFACFactors
    eigen: Any  # KFACEigen
    eigen_path: Path

    def summary(self) -> str:
        lines = [f"factors: {self.factors.path}", f"eigenbases: {self.eigen_path}",
                 f"{'module':<40}{'tokens':>10}{'d_out':>7}{'d_in':>6}{'top λ_G':>12}{'top μ_A':>12}"]
        for n in self.factors.module_names:
            e, tokens = self.eigen[n], self.factors.num_tokens[n]
            # an experts projection has one count and one eigenbasis per expert: the range of counts, the top value
            if isinstance(tokens, (list, tuple)):
                tokens = f"{min(tokens)}–{max(tokens)}"
            lines.append(f"{n:<40}{tokens:>10}{e.shape[0]:>7}{e.shape[1]:>6}"
                         f"{float(e.eigvals_G.max()):>12.3e}{float(e.eigvals_A.max()):>12.3e}")
        return "\n".join(lines)


DOMAINS_DIR = "domains"  # protected domains' factor sets live in FACTORS_DIR/domains/NAME


def domain_factors_dir(factors_dir: str | Path, name: str) -> Path:
    """Where ``fit --name NAME`` writes (and ``--protect NAME=ρ`` reads) a protected domain's factors."""
    return Path(factors_dir) / DOMAINS_DIR / name


def load_protected_eigen(factors_dir: str | Path, protect: dict[str, float], net: Any) -> dict[str, Any]:
    """The eigenbases of each protected domain fitted beside the general factors in ``factors_dir``."""
    from ..curvature import load_factors
    from ..curvature.storage import FACTORS_STEM
    from ..shards import TensorFiles

    out = {}
    for name in protect:
        folder = domain_factors_dir(factors_dir, name)
        if not TensorFiles.exists(folder, FACTORS_STEM):
            have = sorted(p.name for p in (Path(factors_dir) / DOMAINS_DIR).glob("*") if p.is_dir())
            raise UsageError(f"no factors for protected domain {name!r} in {folder} (fitted domains: "
                             f"{have or 'none'}). Fit them first: hf-curvedit fit --name {name} --data FILE "
                             f"--output-dir {factors_dir} (in a run YAML: fit: {{domains: {{{name}: FILE}}}})")
        out[name] = load_factors(folder, net).eigendecompose()
    return out


def run_fit(model: str | None, step: FitStep, output_dir: str | Path) -> FitOutcome:
    """Fit factors on ``step.data`` (default: the stdlib docs) into ``output_dir`` (resuming a killed run unless
    ``step.restart``), then eigendecompose them into ``output_dir`` (``eigen.safetensors``, or shards and
    ``eigen.safetensors.index.json``; the factors likewise).

    With ``step.domain`` the factors are a protected domain's, in ``output_dir/domains/<domain>``; with
    ``step.domains`` each domain's factors are fitted after the general ones (the outcome is the general set's)."""
    net, processor = load_model(model, step.dtype, step.device_map)
    if step.domain is not None:
        return _fit_one(net, processor, step, step.data, domain_factors_dir(output_dir, step.domain))
    outcome = _fit_one(net, processor, step, step.data, Path(output_dir))
    for name, data in step.domains.items():
        _fit_one(net, processor, step, data, domain_factors_dir(output_dir, name))
    return outcome


def _fit_one(net: Any, processor: Any, step: FitStep, data_spec: str | None, out: Path) -> FitOutcome:
    from ..curvature import FactorConfig, default_task, fit_factors
    from ..default import default_text_dataset

    images = default_task(net).name == "image-classification"
    if images and not data_spec:
        raise UsageError("an image classifier needs --data: an image dataset name, or a local folder of images "
                         "(one sub-folder per class) or a parquet/json file with an image column")
    if not images and (step.token_positions or step.max_examples):
        raise UsageError("--token-positions and --max-examples are for image classifiers; this model takes text")
    cfg = FactorConfig(
        target_modules=step.target_modules, label_mode=step.label_mode, seq_len=step.seq_len,
        batch_size=step.batch_size, max_tokens=step.max_tokens, accumulate_dtype=step.accumulate_dtype,
        storage_dtype=step.storage_dtype,
        seed=step.seed, checkpoint_every=step.checkpoint_every, max_factor_memory_gb=step.max_factor_memory_gb,
        text_column=step.text_column, token_positions=step.token_positions, image_column=step.image_column,
        label_column=step.label_column, max_examples=step.max_examples, dataset=data_spec or DEFAULT_FACTOR_DATA)
    data: Any = data_spec or default_text_dataset("train")
    factors = fit_factors(net, data, cfg, out, processor=processor, resume=not step.restart)
    if step.ekfac:
        from ..curvature import fit_eigen_correction

        fit_eigen_correction(net, data, factors, cfg, out, processor=processor, resume=not step.restart)
    eigen = factors.eigendecompose(out)
    return FitOutcome(factors, eigen, getattr(eigen, "store_path", out))


def run_sweep(model: str | None, factors_dir: str | Path, step: SweepStep,
              output_dir: str | Path) -> Any:
    """Sweep the edits of the factors in ``factors_dir``; write sweep.json, sweep.md and sweep.png to
    ``output_dir``. Returns the `SweepResult` (its ``chosen`` is None when nothing fits the budget)."""
    capabilities = step.capabilities.check() if step.capabilities else None
    exposure_tasks = exposure_config(step.capabilities, step.exposure_tasks)
    if step.pick_by == "predicted_cost" and exposure_tasks is None:
        raise UsageError("--pick-by predicted_cost ranks the candidates by their exposure to lm-eval tasks: name them "
                         "with --exposure-tasks (or --tasks)")
    with output_lock(output_dir, "hf-curvedit sweep"):
        return _run_sweep(model, factors_dir, step, Path(output_dir), capabilities, exposure_tasks)


def _run_sweep(model: str | None, factors_dir: str | Path, step: SweepStep, out: Path, capabilities: Any,
               exposure_tasks: Any) -> Any:
    from ..baselines import BalancedSubnetConfig
    from ..curvature import load_factors
    from ..evaluation import TextSet
    from ..publish.plots import plot_sweep
    from ..sweep import SweepConfig, sweep_edits

    net, tok = load_model(model)
    eig = load_factors(factors_dir, net).eigendecompose()
    protected = load_protected_eigen(factors_dir, step.protect, net)
    sets = (recitation_sets(step.recitation, tok, step.suffix_tokens) if step.recitation
            else default_recitation_sets(tok))
    heldout = TextSet.from_texts(heldout_texts(step.heldout, step.text_column, default_model=model is None), tok)
    choices = layer_choices(eig, step.layers, step.modules, step.layer_choice) or None
    baselines = [b for b in step.baselines if b != "svd" or step.svd_ranks]  # no ranks: no SVD baseline
    clean = subnet = None
    if "balanced_subnet" in baselines:
        clean = TextSet.from_texts(clean_texts(step.clean, step.text_column), tok)
        subnet = BalancedSubnetConfig(epochs=step.subnet_epochs, lr=step.subnet_lr, lam=step.subnet_lam)
    config = SweepConfig(keep_masses=step.keep_mass or None, layer_choices=choices, perplexity_budget=step.ppl_budget,
                         svd_ranks=step.svd_ranks, batch_size=step.batch_size, protect=step.protect,
                         baselines=baselines, balanced_subnet=subnet, balanced_subnet_ratios=step.subnet_ratios,
                         capabilities=capabilities, selection=step.selection, pick_by=step.pick_by,
                         recitation_tolerance=step.recitation_tolerance, allocation=step.allocation,
                         allocation_steps=step.allocation_steps,
                         allocation_max_candidates=step.allocation_max_candidates,
                         allocation_max_seconds=step.allocation_max_seconds)
    result = sweep_edits(net, {"general": eig, **protected} if protected else eig, sets, heldout, config,
                         clean=clean, tokenizer=tok, exposure_texts=exposure_texts(exposure_tasks, tok))
    result.save(out / "sweep.json")
    atomic_write_text(out / "sweep.md", result.report_markdown() + "\n")
    plot_sweep(result, out / "sweep.png")
    return result


@dataclass
class EditOutcome:
    adapters: dict[float, Path]  # ρ → adapter folder
    reports: list[tuple[float, Any]]  # (ρ, ModuleEditReport)

    def summary(self) -> str:
        """The adapters and, per module, its own ρ (a keep_mass_pattern's where one matches) and its selection."""
        lines = [f"adapter ρ={rho:g}: {folder}" for rho, folder in self.adapters.items()]
        lines.append(f"{'ρ':>6}  {'module':<40}{'r':>6}{'s':>6}{'k':>6}{'kept comp.':>12}{'‖W′‖/‖W‖':>10}"
                     f"{'bytes':>8}")
        lines += [f"{r.keep_mass:>6g}  {r.module:<40}{r.r:>6}{r.s:>6}{r.k:>6}{r.kept_component_fraction:>12.3f}"
                  f"{r.kept_norm_fraction:>10.3f}{r.bytes_ratio:>8.2f}" for _, r in self.reports]
        return "\n".join(lines)


def run_edit(model: str | None, factors_dir: str | Path, step: EditStep,
             output_dir: str | Path) -> EditOutcome:
    """Build one adapter per ρ of ``step.keep_mass`` (default 0.6; ``step.keep_mass_pattern`` overrides it where it
    matches) from the factors in ``factors_dir``; save each to ``output_dir/rho<ρ>`` (``rho<ρ>-pattern`` with a
    pattern) with the ``curvedit_edit.json`` that publish reads."""
    from ..curvature import load_factors
    from ..publish import EDIT_FILENAME
    from ..tuner import CurvatureEditConfig, build_curvature_edit
    from ..tuner.summary import edit_summary

    with output_lock(output_dir, "hf-curvedit edit"):
        net, _ = load_model(model)
        eig = load_factors(factors_dir, net).eigendecompose()
        protected = load_protected_eigen(factors_dir, step.protect, net)
        outcome = EditOutcome({}, [])
        for rho in step.keep_mass or (DEFAULT_KEEP_MASS,):
            cfg = CurvatureEditConfig(keep_mass=rho, keep_mass_pattern=dict(step.keep_mass_pattern),
                                      target_modules=step.target_modules, selection=step.selection,
                                      rank_cap=step.rank_cap, protect=dict(step.protect),
                                      min_expert_tokens=step.min_expert_tokens, compute_dtype=step.compute_dtype)
            peft_model = build_curvature_edit(net, {"general": eig, **protected} if protected else eig, cfg)
            folder = Path(output_dir) / (f"rho{rho:g}" + ("-pattern" if step.keep_mass_pattern else ""))
            with atomic_folder(folder) as staging:  # an adapter folder is complete or absent, never half written
                peft_model.save_pretrained(staging)
                summary = edit_summary(peft_model, "default")  # what publish shows as the per-module table
                atomic_write_text(staging / EDIT_FILENAME, json.dumps(summary, indent=2, default=str))
            outcome.reports += [(rho, rep) for rep in peft_model.edit_report()]
            outcome.adapters[rho] = folder
            net = peft_model.unload()
        return outcome


def report_table(report: Any) -> str:
    """An `EditReport` as plain-text tables: metric, set, base, edited; then the capabilities, if measured."""
    rows = [f"{'metric':<22}{'set':<16}{'base':>10}{'edited':>10}"]
    rows += [f"{r.metric:<22}{r.set:<16}{r.base:>10.4f}{r.edited:>10.4f}" for r in report.to_table_rows()]
    if report.capabilities:
        rows += ["", f"{'capability (lm-eval)':<24}{'metric':<14}{'n':>5}{'base':>9}{'edited':>9}{'change':>9}"]
        rows += [f"{c.task:<24}{c.metric:<14}{c.n:>5}{c.base:>9.3f}{c.edited:>9.3f}{c.change:>+9.3f}"
                 for c in report.capabilities.values()]
    return "\n".join(rows)


def run_evaluate(model: str | None, adapter_dir: str | Path, step: EvaluateStep,
                 output: str | Path | None = None) -> Any:
    """Measure the adapter in ``adapter_dir`` on and off (language models); save the `EditReport` to ``output``."""
    from peft import PeftModel

    from ..curvature import default_task
    from ..evaluation import TextSet, evaluate_edit
    from ..tuner.summary import verify_adapter_folder

    capabilities = step.capabilities.check() if step.capabilities else None
    exposure_tasks = exposure_config(step.capabilities, step.exposure_tasks)
    verify_adapter_folder(adapter_dir)  # a damaged or foreign adapter is refused, by name, before any model work
    net, tok = load_model(model)
    if default_task(net).name == "image-classification":
        raise UsageError("`evaluate` measures language models; for an image classifier use the Python API: "
                         "evaluate_edit(peft_model, {name: ImageClassificationSet.from_dataset(...)})")
    peft_model = PeftModel.from_pretrained(net, str(adapter_dir))
    sets: dict[str, Any] = recitation_sets(step.recitation, tok, step.suffix_tokens)
    if not sets and model is None:
        sets = default_recitation_sets(tok)
    texts = heldout_texts(step.heldout, step.text_column, default_model=model is None)
    sets["heldout"] = TextSet.from_texts(texts, tok)
    report = evaluate_edit(peft_model, sets, tok, metadata={"adapter": str(adapter_dir)}, batch_size=step.batch_size,
                           stress=not step.no_stress, stress_extend=step.stress_steps, stress_shorten=step.stress_steps,
                           capabilities=capabilities, exposure=exposure_texts(exposure_tasks, tok))
    if output:
        report.save(output)
    return report


def exposure_config(capabilities: Any, extra: tuple[str, ...]) -> Any:
    """The `CapabilityConfig` of the tasks whose exposure is measured: the capability tasks plus ``extra``; None when
    there are none. Checked (lm-eval installed, every task known) before any model work."""
    from .settings import CapabilitySettings

    if capabilities is None and not extra:
        return None
    return (capabilities or CapabilitySettings(tasks=())).exposure_config(extra)


def exposure_texts(config: Any, tokenizer: Any) -> dict[str, Any] | None:
    """The texts of the tasks of `exposure_config` (None when there are none)."""
    if config is None:
        return None
    from ..exposure import lm_eval_task_texts

    return lm_eval_task_texts(config, tokenizer)


def run_publish(adapter_dir: str | Path, step: PublishStep, out_dir: str | Path, *,
                report: str | Path | None = None, eigen: str | Path | None = None,
                comparison: str | Path | None = None) -> Any:
    """Publish the adapter in ``adapter_dir`` with the `EditReport` file ``report``, the spectra of ``eigen`` (an
    eigen store: its folder, eigen.safetensors or its index) and the method comparison of a ``sweep.json`` that
    measured baselines, to
    ``step.repo_id``, through the folder ``out_dir``. Returns the `PublishResult`."""
    from ..evaluation import EditReport
    from ..publish import HubOptions, publish

    hub = HubOptions(private=step.private or None, revision=step.revision, create_pr=step.create_pr, token=step.token)
    return publish(adapter_dir, step.repo_id, EditReport.load(report) if report else None, out_dir=out_dir,
                   merged=step.merged, eigen=eigen, hub=hub, dry_run=step.dry_run, overwrite=step.overwrite,
                   comparison=comparison, gguf_source=step.gguf_source, gguf_type=step.gguf_type)
