"""Sweeps: try several ρ and layer choices, pick an edit, and measure the baselines at matched perplexity.

Each candidate is built from the same eigenbases (factors of the unedited model), measured, and
removed again, so one model serves the whole sweep. The pick is the strongest suppression (lowest
Strict recitation on the primary set, then lowest perplexity) whose held-out perplexity rises by
no more than ``perplexity_budget``. Without a grid of ρ, each layer choice gets candidates on a ρ scale fitted
to the model (`hf_curvedit.sweep.scale`). With ``SweepConfig(allocation="per_layer")`` (the default) a search then
gives each layer its own ρ, from several starts (`search_allocation`), and the pick is made again over every
candidate. The baselines (`hf_curvedit.baselines`: SVD truncation, BalancedSubnet) are each
swept over their own knob; the point whose perplexity change is closest to the pick's stands for the
method in the side-by-side comparison.
"""

from ..baselines import svd_truncation  # re-exported: the SVD baseline lived here before hf_curvedit.baselines
from .allocation import ALLOCATIONS, SearchSpace, allocation_pattern, module_groups
from .edits import SweepConfig, pick_edit, sweep_edits
from .result import SweepPoint, SweepResult
from .scale import default_layer_choices
from .search import search_allocation

__all__ = ["ALLOCATIONS", "SearchSpace", "SweepConfig", "SweepPoint", "SweepResult", "allocation_pattern",
           "default_layer_choices", "module_groups", "pick_edit", "search_allocation", "svd_truncation",
           "sweep_edits"]
