"""The pipeline: fit → sweep → edit → evaluate → publish as typed steps over one output folder.

Each step is a plain function of its typed settings and its input/output folders, and writes what the next reads::

    OUTPUT_DIR/factors/        run_fit       factors.safetensors, eigen.safetensors (or shards of each
                                             and their .safetensors.index.json)
    OUTPUT_DIR/sweep/          run_sweep     sweep.json (read back with SweepResult.load), sweep.md, sweep.png
    OUTPUT_DIR/edit/rhoX/      run_edit      one adapter per ρ (save_pretrained) with curvedit_edit.json
                                             (rhoX-pattern with a keep_mass_pattern: a per-layer sweep's pick)
    OUTPUT_DIR/report.json     run_evaluate  the EditReport of the adapter
    OUTPUT_DIR/publish/        run_publish   the folder publish writes (weights, card, plots), pushed unless dry_run
    OUTPUT_DIR/steps/<step>.done.json        finished steps, skipped by the next run_pipeline (force=True redoes them)

`run_pipeline` runs the steps a `PipelineConfig` names (`PipelineConfig.from_yaml`: the format of
``examples/default.yaml``, one key per step with the options of the matching ``hf-curvedit`` subcommand); the
subcommands call the same functions. Without a model name the embedded default (`hf_curvedit.default`) is used.
Bad settings or input raise `UsageError` (a ``ValueError``); a step that ran and did not succeed raises `StepFailed`.

The package's modules: `settings` (the errors, the step settings and `PipelineConfig`), `inputs` (model and data
loading shared by the steps), `steps` (the five step functions and their outcomes),
`exposure` (`run_exposure`, for ``hf-curvedit exposure``) and `run` (`RunLayout`,
`run_pipeline`).
"""

from .exposure import run_exposure
from .inputs import (
    default_recitation_sets,
    heldout_texts,
    load_config,
    load_model,
    load_recitation_set,
    recitation_sets,
)
from .run import RunLayout, run_pipeline
from .settings import (
    DEFAULT_FACTOR_DATA,
    DEFAULT_KEEP_MASS,
    STEPS,
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
)
from .steps import EditOutcome, FitOutcome, report_table, run_edit, run_evaluate, run_fit, run_publish, run_sweep

__all__ = ["CapabilitySettings", "DEFAULT_FACTOR_DATA", "DEFAULT_KEEP_MASS",
           "EditOutcome", "EditStep", "EvaluateStep", "ExposureStep", "run_exposure", "FitOutcome",
           "FitStep", "PipelineConfig", "PublishStep", "RunLayout", "STEPS", "StepFailed", "SweepStep", "UsageError",
           "default_recitation_sets", "heldout_texts", "load_config", "load_model", "load_recitation_set",
           "recitation_sets", "report_table", "run_edit", "run_evaluate", "run_fit", "run_pipeline", "run_publish",
           "run_sweep"]
