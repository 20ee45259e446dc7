"""hf-curvedit: suppress memorization by editing weights in the eigenbasis of the loss curvature.

Importing this package registers the ``CURVEDIT`` PEFT method, so that ``PeftModel``,
``AutoPeftModelFor*`` and transformers' adapter loading understand saved curvature edits.

The flow: `fit_factors` (K-FAC factors over ordinary text) → `eigendecompose` → `build_curvature_edit`
(a PEFT adapter per `CurvatureEditConfig`) → `evaluate_edit` (an `EditReport`) → `hf_curvedit.publish.publish`
(model card and Hub upload). `predict_exposure` predicts which tasks an edit will hurt before it is built. See
docs/method.md for the method.
"""

__version__ = "0.1.0"

# `hf_curvedit.publish` stays the subpackage (call `hf_curvedit.publish.publish(...)`): re-exporting the function
# under the same name would shadow the package and break `import hf_curvedit.publish.card as card`.
from . import publish
from .curvature import (
    CausalLMTask,
    EigenCorrection,
    FactorConfig,
    FactorTask,
    ImageClassificationTask,
    KFACEigen,
    KFACFactors,
    ModuleEigen,
    default_task,
    eigendecompose,
    fit_eigen_correction,
    fit_factors,
    load_factors,
    plan_factors,
)
from .edit import CurvatureEdit, ExpertsEdit, compute_edit, compute_experts_edit
from .evaluation import (
    CapabilityConfig,
    CapabilityResult,
    EditReport,
    EvalConfig,
    ImageClassificationSet,
    RecitationSet,
    TextSet,
    coherence_ndcg,
    evaluate_capabilities,
    evaluate_classification,
    evaluate_edit,
    evaluate_recitation,
    evaluate_text_recitation,
    find_memorized_windows,
    metric_path,
    perplexity,
    recitation_scores,
    stress_test,
)
from .exposure import ExposureReport, adapter_exposure, lm_eval_task_texts, predict_exposure
from .integrity import DamagedFileError, FolderInUseError
from .publish import CardOptions, HubOptions, PublishError, PublishResult, push_folder, render_card
from .selection import (
    CorrectedSelection,
    Staircase,
    corrected_mass_selection,
    curvature_mass_cutoffs,
    factor_truncation_cutoffs,
    select_cutoffs,
)
from .sweep import SweepConfig, SweepResult, sweep_edits
from .target_defaults import DEFAULT_TARGET_MODULES
from .targets import TargetWeight, resolve_target_modules, weight_targets

# Importing .tuner registers PeftType.CURVEDIT with PEFT (see hf_curvedit/tuner/__init__.py).
from .tuner import (
    CurvatureEditConfig,
    CurvatureEditModel,
    DamagedAdapterError,
    ModuleEditReport,
    WrongBaseModelError,
    build_curvature_edit,
    check_base_model,
    curvature_edit_report,
)
from .tuner.summary import verify_adapter_folder

__all__ = [
    "CapabilityConfig", "CapabilityResult", "evaluate_capabilities",
    "DEFAULT_TARGET_MODULES", "CardOptions", "CausalLMTask", "CurvatureEdit", "CurvatureEditConfig",
    "CurvatureEditModel", "DamagedAdapterError", "DamagedFileError", "EditReport", "EvalConfig", "ExpertsEdit",
    "FactorConfig", "FactorTask", "FolderInUseError", "HubOptions", "TargetWeight", "compute_experts_edit",
    "plan_factors", "verify_adapter_folder", "weight_targets", "SweepConfig", "SweepResult", "sweep_edits",
    "ImageClassificationSet", "ImageClassificationTask", "KFACEigen", "KFACFactors", "ModuleEditReport", "ModuleEigen",
    "PublishError", "PublishResult", "RecitationSet", "Staircase", "TextSet", "WrongBaseModelError", "__version__",
    "build_curvature_edit", "check_base_model", "coherence_ndcg", "compute_edit", "curvature_edit_report",
    "curvature_mass_cutoffs", "default_task", "eigendecompose", "evaluate_classification", "evaluate_edit",
    "evaluate_recitation", "evaluate_text_recitation", "factor_truncation_cutoffs", "find_memorized_windows",
    "fit_factors", "load_factors", "metric_path", "perplexity", "publish", "push_folder", "recitation_scores",
    "render_card", "resolve_target_modules", "select_cutoffs", "stress_test",
    "CorrectedSelection", "EigenCorrection", "corrected_mass_selection", "fit_eigen_correction",
    "ExposureReport", "adapter_exposure", "lm_eval_task_texts", "predict_exposure",
]
