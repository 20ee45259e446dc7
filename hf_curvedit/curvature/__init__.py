"""K-FAC curvature factors: collection, storage, eigendecomposition."""

from .config import FactorConfig
from .eigen import KFACEigen, ModuleEigen, symmetric_eigh
from .factors import KFACFactors, collect_factor_sums, eigendecompose, fit_factors, load_factors, valid_position_mask

__all__ = ["FactorConfig", "KFACEigen", "KFACFactors", "ModuleEigen", "collect_factor_sums", "eigendecompose",
           "fit_factors", "load_factors", "symmetric_eigh", "valid_position_mask"]
