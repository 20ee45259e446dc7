"""The curvature edit as plain tensor math (no PEFT): the edit of one weight (`weight.py`), of each expert of an
expert projection (`experts.py`), fingerprints of the weights an edit was built for (`fingerprint.py`), and the
per-module report decoded from an edit's statistics (`report.py`).

The sweep, the baselines and the plots use this package directly; the PEFT tuner (`hf_curvedit.tuner`) only stores
and applies its results. See docs/method.md.
"""

from .experts import ExpertsEdit, ExpertsFactors, compute_experts_edit, expert_is_edited, expert_token_threshold
from .fingerprint import FINGERPRINT_SIZE, fingerprint_mismatch, weight_fingerprint
from .report import ModuleEditReport
from .weight import META_FIELDS, META_INDEX, CurvatureEdit, compute_edit, q_side_of

__all__ = ["FINGERPRINT_SIZE", "META_FIELDS", "META_INDEX", "CurvatureEdit", "ExpertsEdit", "ExpertsFactors",
           "ModuleEditReport",
           "compute_edit", "compute_experts_edit", "expert_is_edited", "expert_token_threshold", "fingerprint_mismatch",
           "q_side_of", "weight_fingerprint"]
