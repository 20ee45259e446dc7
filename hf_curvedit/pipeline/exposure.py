"""`run_exposure`: the ``hf-curvedit exposure`` command's work, from its settings and a factor folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .inputs import default_recitation_sets, load_model, recitation_sets
from .settings import CapabilitySettings, ExposureStep, UsageError


def run_exposure(model: str | None, factors_dir: str | Path, step: ExposureStep,
                 output: str | Path | None = None) -> Any:
    """Predict each task's exposure to the edit of the factors in ``factors_dir`` at each ρ of ``step``; write the
    `ExposureReport` to ``output`` (JSON) when given and return it."""
    from ..curvature import load_factors
    from ..data import load_text_dataset
    from ..evaluation import TextSet
    from ..exposure import lm_eval_task_texts, predict_exposure
    from ..tuner import CurvatureEditConfig
    from .steps import load_protected_eigen

    capabilities = None
    if step.tasks:  # lm-eval and every task name are checked before the model is loaded
        capabilities = CapabilitySettings(tasks=step.tasks, include_path=step.include_path, limit=step.limit).check()
    net, tok = load_model(model)
    eigen = load_factors(factors_dir, net).eigendecompose()
    protected = load_protected_eigen(factors_dir, step.protect, net)
    texts: dict[str, Any] = {}
    if capabilities is not None:
        texts.update(lm_eval_task_texts(capabilities, tok))
    for name, path in step.texts.items():
        data = load_text_dataset(path)
        if step.text_column not in data.column_names:
            raise UsageError(f"--texts {name}={path}: no {step.text_column!r} column (it has {data.column_names}); "
                             "name the column with --text-column")
        texts[name] = TextSet.from_texts(list(data[step.text_column]), tok)
    sets = recitation_sets(step.recitation, tok, step.suffix_tokens)
    if step.memorized:
        sets.update(default_recitation_sets(tok))
    texts.update(sets)  # measured as memorized sets, outside the predicted cost
    config = CurvatureEditConfig(target_modules=step.target_modules, selection=step.selection, protect=step.protect)
    report = predict_exposure(net, {"general": eigen, **protected} if protected else eigen, texts, step.keep_mass,
                              config, tokenizer=tok, batch_size=step.batch_size)
    if output:
        report.save(output)
    return report
