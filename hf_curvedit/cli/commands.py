"""The subcommands of ``hf-curvedit``: each builds its step settings from the parsed flags and calls the step
function that `hf-curvedit run` calls too."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from ..pipeline import (
    CapabilitySettings,
    EditStep,
    EvaluateStep,
    ExposureStep,
    FitStep,
    PipelineConfig,
    PublishStep,
    StepFailed,
    SweepStep,
    UsageError,
    load_config,
    report_table,
    run_edit,
    run_evaluate,
    run_exposure,
    run_fit,
    run_pipeline,
    run_publish,
    run_sweep,
)
from ..targets import parse_target_modules

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "cmd_demo", "cmd_edit", "cmd_evaluate", "cmd_exposure", "cmd_fit",
           "cmd_plan", "cmd_publish", "cmd_run", "cmd_sweep"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _step(cls: type, args: argparse.Namespace) -> Any:
    """The step settings from the parsed flags of its subcommand (same names, dashes → underscores)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def cmd_fit(args: argparse.Namespace) -> int:
    print(run_fit(args.model, _step(FitStep, args), args.output_dir).summary())
    return EXIT_OK


def cmd_edit(args: argparse.Namespace) -> int:
    print(run_edit(args.model, args.factors, _step(EditStep, args), args.output_dir).summary())
    return EXIT_OK


def _capabilities(args: argparse.Namespace) -> CapabilitySettings | None:
    """The lm-eval settings of ``--tasks`` and its companion flags (which need it)."""
    fewshot = getattr(args, "num_fewshot", None)
    if args.tasks:
        return CapabilitySettings(tasks=(args.tasks,), include_path=tuple(args.include_path), limit=args.limit,
                                  num_fewshot=fewshot)
    if args.include_path or args.limit is not None or fewshot is not None:
        raise UsageError("--include-path, --limit and --num-fewshot set up lm-eval capability tasks: add --tasks")
    return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    step = _step(EvaluateStep, args)
    step.capabilities = _capabilities(args)
    report = run_evaluate(args.model, args.adapter, step, args.output)
    if args.output:
        print(f"report: {args.output}")
    print(report_table(report))
    return EXIT_OK


def cmd_exposure(args: argparse.Namespace) -> int:
    report = run_exposure(args.model, args.factors, _step(ExposureStep, args), args.output)
    print(report.to_markdown())
    print(f"{len(report.tasks)} tasks ({sum(report.tokens.values())} tokens); exposure = share of each task's signal "
          "the edit removes (docs/method.md, Exposure); cheapest edit first"
          + (f"; results: {args.output}" if args.output else ""))
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    step = _step(SweepStep, args)
    step.capabilities = _capabilities(args)
    result = run_sweep(args.model, args.factors, step, args.output_dir)
    print(result.report_markdown())
    if result.chosen is None:
        print(result.summary(), file=sys.stderr)
        return EXIT_FAILURE
    print(f"{result.summary()}  (results: {args.output_dir})")
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    if args.space_id and not args.space:
        raise UsageError("--space-id needs --space")
    if args.space:
        from ..publish.space import check_space

        space_dir = check_space(args.out_dir, merged=args.merged, overwrite=args.overwrite)  # before any write
    step = _step(PublishStep, args)
    result = run_publish(args.adapter, step, args.out_dir, report=args.report, eigen=args.eigen,
                         comparison=args.comparison)
    print(result)
    if args.space:
        from ..publish import HubOptions
        from ..publish.space import model_revision, publish_space

        hub = HubOptions(private=step.private or None, revision=step.revision, token=step.token)
        print(publish_space(result.folder, step.repo_id, space_id=args.space_id, out_dir=space_dir, hub=hub,
                            revision=model_revision(result, hub), dry_run=step.dry_run, overwrite=step.overwrite))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import DEMO_INSTALL_HINT, launch_demo, require_gradio

    try:
        require_gradio()
    except ImportError:
        print(f"hf-curvedit demo: gradio is not installed; install it with: {DEMO_INSTALL_HINT}", file=sys.stderr)
        return EXIT_FAILURE
    launch_demo(args.adapter, args.model, host=args.host, port=args.port, work_dir=args.work_dir,
                fit_tokens=args.fit_tokens, recitation=_step(EvaluateStep, args).recitation,
                suffix_tokens=args.suffix_tokens)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    try:
        run_pipeline(PipelineConfig.from_yaml(args.config).with_gguf_file(args.gguf_file), force=args.force)
    except StepFailed as e:
        print(f"[run] {e.step} failed: {e}; fix it and run again to resume from this step", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from ..curvature import FactorConfig, plan_factors

    config = FactorConfig(target_modules=parse_target_modules(args.target_modules),
                          accumulate_dtype=args.accumulate_dtype, max_factor_memory_gb=args.max_factor_memory_gb,
                          seq_len=args.seq_len, batch_size=args.batch_size)
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be at least 1, got {args.num_processes}")
    plan = plan_factors(load_config(args.model), config, num_processes=args.num_processes, dtype=args.dtype)
    print(plan.to_table())
    if args.json:
        from ..utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(plan.to_dict(), indent=2))
        print(f"plan: {args.json}")
    return EXIT_OK
