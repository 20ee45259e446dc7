"""Exposure: how much of a task's signal an edit removes, predicted from the eigenbases before the edit is built
(docs/method.md, "Exposure").

`predict_exposure` compares candidate ρ values; `adapter_exposure` measures an edit that exists; `lm_eval_task_texts`
reads lm-evaluation-harness tasks as texts (prompt + gold answer). The result is an `ExposureReport`.
"""

from .measure import TaskTexts, adapter_exposure, measure_exposure, predict_exposure
from .report import ExposureReport, combine_shares
from .texts import lm_eval_task_texts, recitation_texts

__all__ = ["ExposureReport", "TaskTexts", "adapter_exposure", "combine_shares", "lm_eval_task_texts",
           "measure_exposure", "predict_exposure", "recitation_texts"]
