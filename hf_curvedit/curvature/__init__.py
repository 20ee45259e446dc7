"""K-FAC curvature factors: tasks (`tasks`), collection (`collector`, `fit`), planning (`plan`), storage
(`storage`), eigenbases (`eigen`), EK-FAC corrected eigenvalues (`ekfac`, `correction`)."""

from .collector import FactorCollector, collect_factor_sums
from .config import FactorConfig
from .correction import EigenCorrection
from .decompose import EigenFile, eigendecompose
from .eigen import KFACEigen, ModuleEigen, symmetric_eigh
from .ekfac import LambdaCollector, fit_eigen_correction
from .fit import fit_factors
from .partitions import plan_partitions
from .plan import FactorPlan, ModulePlan, plan_factors
from .storage import KFACFactors, load_factors
from .sums import InputSharing
from .tasks import (
    CausalLMTask,
    FactorTask,
    ImageClassificationTask,
    PreparedData,
    batch_generator,
    default_task,
    sample_labels,
    valid_position_mask,
)

__all__ = ["CausalLMTask", "EigenCorrection", "EigenFile", "LambdaCollector", "fit_eigen_correction",
           "FactorCollector", "FactorConfig", "FactorPlan", "FactorTask",
           "ImageClassificationTask", "InputSharing", "KFACEigen", "KFACFactors", "ModuleEigen", "ModulePlan",
           "PreparedData", "batch_generator", "collect_factor_sums", "default_task", "eigendecompose", "fit_factors",
           "load_factors", "plan_factors", "plan_partitions", "sample_labels", "symmetric_eigh", "valid_position_mask"]
