"""The curvature edit as a PEFT method (``PeftType.CURVEDIT``, state-dict prefix ``curvedit_``).

Importing this package adds ``CURVEDIT`` to `peft.utils.PeftType` and registers the config and tuner with PEFT, so
that `PeftModel.from_pretrained`, `AutoPeftModelFor*`, transformers' `load_adapter` and
`AutoModelForCausalLM.from_pretrained(adapter_dir)` understand saved edits. The edit math itself is in
`hf_curvedit.edit`, which does not depend on PEFT.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ..edit import CurvatureEdit, ModuleEditReport, compute_edit, weight_fingerprint
from .build import build_curvature_edit, compute_module_edits
from .config import CURVEDIT, CurvatureEditConfig
from .experts import CurvatureEditExperts
from .layer import CurvatureEditLayer, DamagedAdapterError, WrongBaseModelError
from .linear import CurvatureEditLinear
from .locate import check_base_model, curvature_edit_report
from .model import CurvatureEditModel

__all__ = [
    "CURVEDIT",
    "CurvatureEdit",
    "CurvatureEditConfig",
    "CurvatureEditExperts",
    "CurvatureEditLayer",
    "CurvatureEditLinear",
    "CurvatureEditModel",
    "DamagedAdapterError",
    "ModuleEditReport",
    "WrongBaseModelError",
    "build_curvature_edit",
    "check_base_model",
    "compute_edit",
    "compute_module_edits",
    "curvature_edit_report",
    "weight_fingerprint",
]

# transformers derives the state-dict prefix as peft_type.value.lower() + "_", hence "curvedit_".
if CURVEDIT not in PEFT_TYPE_TO_TUNER_MAPPING:  # idempotent under importlib.reload
    register_peft_method(name="curvedit", config_cls=CurvatureEditConfig, model_cls=CurvatureEditModel,
                         prefix="curvedit_")
