"""Baselines that the sweep measures next to the curvature edit, at matched perplexity.

- ``"svd"``: `svd_truncation`, the best rank-k approximation of the same modules' weights;
- ``"balanced_subnet"``: `train_balanced_subnet`, BalancedSubnet (Sakarvadia et al., ICLR 2025), which learns a sparse
  mask of MLP weights from the memorized set itself.
"""

from .balanced_subnet import BalancedSubnetConfig, BalancedSubnetMasks, train_balanced_subnet
from .svd import svd_truncation

BASELINES: tuple[str, ...] = ("svd", "balanced_subnet")

__all__ = ["BASELINES", "BalancedSubnetConfig", "BalancedSubnetMasks", "svd_truncation", "train_balanced_subnet"]
