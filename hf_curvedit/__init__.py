"""hf-curvedit: suppress memorization by editing weights in the eigenbasis of the loss curvature.

Importing this package registers the ``CURVEDIT`` PEFT method, so that ``PeftModel``,
``AutoPeftModelFor*`` and transformers' adapter loading understand saved curvature edits.
"""

__version__ = "0.1.0"

from .targets import DEFAULT_TARGET_MODULES, resolve_target_modules
from .curvature import FactorConfig, KFACEigen, KFACFactors, ModuleEigen, eigendecompose, fit_factors, load_factors

# --- tuner (adapter) exports: owned by the adapter work ---
# --- end tuner ---

# --- evaluation exports: owned by the evaluation work ---
# --- end evaluation ---
