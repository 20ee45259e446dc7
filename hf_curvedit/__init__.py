"""hf-curvedit: suppress memorization by editing weights in the eigenbasis of the loss curvature.

Importing this package registers the ``CURVEDIT`` PEFT method, so that ``PeftModel``,
``AutoPeftModelFor*`` and transformers' adapter loading understand saved curvature edits.
"""

__version__ = "0.1.0"

from .targets import DEFAULT_TARGET_MODULES, resolve_target_modules
from .curvature import FactorConfig, KFACEigen, KFACFactors, ModuleEigen, eigendecompose, fit_factors, load_factors

# --- tuner (adapter) exports: owned by the adapter work ---
# Importing .tuner registers PeftType.CURVEDIT with PEFT (see hf_curvedit/tuner/__init__.py).
from .selection import Staircase, curvature_mass_cutoffs, factor_truncation_cutoffs, select_cutoffs
from .tuner import (
    CurvatureEditConfig,
    CurvatureEditModel,
    ModuleEditReport,
    WrongBaseModelError,
    build_curvature_edit,
    check_base_model,
    curvature_edit_report,
)
# --- end tuner ---

# --- evaluation exports: owned by the evaluation work ---
from .evaluation import (EditReport, EvalConfig, ImageClassificationSet, RecitationSet, TextSet, coherence_ndcg,
                         evaluate_classification, evaluate_edit,
                         evaluate_recitation, evaluate_text_recitation, find_memorized_windows, metric_path,
                         perplexity, recitation_scores, stress_test)
# --- end evaluation ---

# --- publish exports ---
# `hf_curvedit.publish` stays the subpackage (call `hf_curvedit.publish.publish(...)`): re-exporting the function
# under the same name would shadow the package and break `import hf_curvedit.publish.card as card`.
from . import publish
from .publish import PublishError, PublishResult, push_folder, render_card
# --- end publish ---
