"""K-FAC curvature factors: collection, storage, eigendecomposition."""

from .config import FactorConfig
from .eigen import KFACEigen, ModuleEigen, symmetric_eigh
from .factors import KFACFactors, eigendecompose, fit_factors, load_factors

__all__ = ["FactorConfig", "KFACEigen", "KFACFactors", "ModuleEigen", "eigendecompose", "fit_factors",
           "load_factors", "symmetric_eigh"]
