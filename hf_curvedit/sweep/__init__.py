"""Sweeps: try several ρ and layer choices, pick an edit, and measure the baselines at matched perplexity.

Each candidate is built from the same eigenbases (factors of the unedited model), measured, and
removed again, so one model serves the whole sweep. The pick is the strongest suppression (lowest
Strict recitation on the primary set, then lowest perplexity) whose held-out perplexity rises by
no more than ``perplexity_budget``. The baselines (`hf_curvedit.baselines`: SVD truncation, BalancedSubnet) are
each swept over their own knob; the point whose perplexity change is closest to the pick's stands for the method
in the side-by-side comparison.
"""

from ..baselines import svd_truncation  # re-exported: the SVD baseline lived here before hf_curvedit.baselines
from .edits import SweepConfig, sweep_edits
from .result import SweepPoint, SweepResult

__all__ = ["SweepConfig", "SweepPoint", "SweepResult", "svd_truncation", "sweep_edits"]
