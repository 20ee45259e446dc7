"""What an edit costs: lm-evaluation-harness tasks on the base and the edited model, from one model object.

[`evaluate_capabilities`] wraps the model *instance* in lm-eval's ``HFLM`` once and runs every task twice: with the
adapter disabled (the base) and with it on (the edit). Nothing is reloaded between the two runs. Tasks come from
lm-eval's registry (Hub datasets, so they need the network or a warm ``datasets`` cache) or from local task YAMLs
given through ``include_path``; the embedded default model's skill tasks ship in ``hf_curvedit/lm_eval_tasks``
(tag ``curvedit_skills``). Needs the ``lm-eval`` extra: ``pip install 'hf-curvedit[lm-eval]'``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..utils import fill_unset_fields

INSTALL_HINT = "pip install 'hf-curvedit[lm-eval]'"
# Keys of an lm-eval result entry that are not metrics.
_NOT_METRICS = {"name", "alias", "sample_len", "samples"}
# `datasets` builders that read local files: a task whose dataset_path is one of these has no Hub dataset.
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}


class CapabilityError(InputError):
    """A capability evaluation that cannot run as asked (unknown task, data out of reach, bad settings)."""


@dataclass
class CapabilityConfig:
    """Which lm-evaluation-harness tasks to run, and how.

    Args:
        tasks: task, group or tag names (e.g. ``["triviaqa", "gsm8k", "boolq"]`` or ``["curvedit_skills"]``); a
            comma-separated string is split.
        include_path: folder(s) of extra task YAMLs (lm-eval's own ``include_path``), e.g. local tasks whose data is
            a JSONL file, for machines without network.
        limit: evaluate only the first ``limit`` items of each task (a float in ``(0, 1)`` is a fraction).
        num_fewshot: few-shot examples per prompt; ``None`` keeps each task's own setting.
        batch_size: requests per forward pass.
        bootstrap_iters: bootstrap resamples for the standard errors of non-mean metrics (0 skips them).
        metrics: task -> metric to report (``"acc_norm"`` or with lm-eval's filter, ``"exact_match,strict-match"``);
            by default the first metric the task defines.
        seed: lm-eval's random, numpy, torch and few-shot seeds.
    """

    tasks: Sequence[str]
    include_path: str | Path | Sequence[str | Path] | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 32
    bootstrap_iters: int = 1000
    metrics: dict[str, str] = field(default_factory=dict)
    seed: int = 1234

    def __post_init__(self) -> None:
        fill_unset_fields(self)
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = [t.strip() for item in self.tasks for t in str(item).split(",") if t.strip()]
        if not self.tasks:
            raise CapabilityError("CapabilityConfig.tasks is empty: name at least one lm-eval task, e.g. "
                                  "tasks=['curvedit_skills'] or ['triviaqa', 'gsm8k']")
        if self.limit is not None and not (self.limit > 0):
            raise CapabilityError(f"limit must be positive (an item count, or a fraction in (0, 1)), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise CapabilityError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.batch_size <= 0:
            raise CapabilityError(f"batch_size must be positive, got {self.batch_size}")
        paths = [self.include_path] if isinstance(self.include_path, (str, Path)) else list(self.include_path or [])
        for p in paths:
            if not Path(p).is_dir():
                raise CapabilityError(f"include_path {str(p)!r} is not a folder: give the folder that holds the task "
                                      "YAML files")
        self.include_path = [str(p) for p in paths] or None


@dataclass
class CapabilityResult:
    """One task's score on the base and on the edited model.

    ``metric`` is lm-eval's metric name and ``filter`` its filter (``"none"`` when the task has none); ``n`` is the
    number of items scored, ``dataset`` the task's Hub dataset (``None`` for local data).
    """

    task: str
    metric: str
    filter: str
    base: float
    edited: float
    base_stderr: float | None
    edited_stderr: float | None
    n: int
    num_fewshot: int | None = None
    higher_is_better: bool = True
    dataset: str | None = None
    dataset_config: str | None = None
    output_type: str | None = None

    @property
    def change(self) -> float:
        """Edited minus base."""
        return self.edited - self.base


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as err:
        raise ImportError(f"capability evaluation runs lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
                          ) from err
    return lm_eval


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    # lm-eval warns on every model *instance* ("pretrained is not of type str") and on every custom_dataset task;
    # both are how this module uses it on purpose.
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(config: CapabilityConfig) -> Any:
    """lm-eval's ``TaskManager`` over ``config.include_path`` alone when every task of ``config`` is there, else over
    lm-eval's own tasks too.

    Built once per process for the same folders (and the same task YAMLs in them): indexing lm-eval's thousands
    of task files takes seconds to tens of seconds, and one ``run`` checks its tasks at several points; local tasks
    (the default model's skills) need none of it.
    """
    _import_lm_eval()
    folders = tuple(str(Path(p).resolve()) for p in config.include_path or ())
    stamp = tuple((str(f), f.stat().st_mtime_ns) for d in folders for f in sorted(Path(d).rglob("*"))
                  if f.suffix in (".yaml", ".yml", ".py"))  # task files and the `!function` modules they name
    if folders:
        local = _cached_task_manager(folders, stamp, include_defaults=False)
        if set(config.tasks) <= set(local.all_tasks):
            return local
    return _cached_task_manager(folders, stamp, include_defaults=True)


@functools.lru_cache(maxsize=8)
def _cached_task_manager(folders: tuple[str, ...], stamp: tuple[tuple[str, int], ...], include_defaults: bool) -> Any:
    # `stamp` (each task file and its mtime) is only part of the key: an edited or added one builds a new manager.
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager(include_path=list(folders) or None, include_defaults=include_defaults)


def check_tasks(config: CapabilityConfig, manager: Any = None) -> Any:
    """Fail early, before any model runs: every task name must exist, and its data must be within reach.

    Returns the ``TaskManager``. An unknown name lists the closest known ones; a task whose data is on the Hub while
    ``HF_HUB_OFFLINE=1`` is set names the offline alternative.
    """
    from huggingface_hub import constants
    from rapidfuzz import process

    manager = manager or task_manager(config)
    known = set(manager.all_tasks)
    unknown = [t for t in config.tasks if t not in known]
    if unknown:
        hints = "; ".join(f"{t!r}: did you mean {', '.join(repr(m) for m, _, _ in process.extract(t, known, limit=3))}?"
                          for t in unknown)
        raise CapabilityError(f"unknown lm-eval task(s) {unknown} ({hints}). `lm-eval ls tasks` lists lm-eval's "
                              "tasks; local task YAMLs are found through include_path.")
    for name in config.tasks:
        try:
            with _quiet_lm_eval():
                manager.load([name])
        except Exception as err:
            if constants.HF_HUB_OFFLINE:
                dataset = _dataset_of(manager, name)
                source = f" ({dataset!r} from the Hugging Face Hub)" if dataset else ""
                raise CapabilityError(
                    f"task {name!r} could not load its data{source}"
                    " while HF_HUB_OFFLINE=1 is set. Run it where the Hub is reachable (or with the dataset already in "
                    "the datasets cache), or evaluate offline with local tasks: include_path (--include-path) = a "
                    "folder of task YAMLs whose data is local JSONL, e.g. hf_curvedit's own `curvedit_skills` for the "
                    "default model."
                ) from err
            raise CapabilityError(f"task {name!r} could not be loaded: {type(err).__name__}: {err}") from err
    return manager


def _dataset_of(manager: Any, name: str) -> str | None:
    entry = getattr(manager, "task_index", {}).get(name)  # a group or a tag has no single dataset
    cfg = getattr(entry, "cfg", None)
    return cfg.get("dataset_path") if isinstance(cfg, dict) else None


def _run(lm: Any, config: CapabilityConfig, manager: Any) -> dict[str, Any]:
    lm_eval = _import_lm_eval()
    with _quiet_lm_eval():
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(config.tasks), task_manager=manager, num_fewshot=config.num_fewshot,
            limit=config.limit, bootstrap_iters=config.bootstrap_iters, log_samples=False,
            random_seed=config.seed, numpy_random_seed=config.seed, torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )
    if results is None:  # lm-eval returns None on non-zero ranks of a distributed run
        raise CapabilityError("lm-eval returned no results (a non-main process of a distributed run?)")
    return results


def _metric_key(task: str, entry: Mapping[str, Any], wanted: str | None) -> str | None:
    keys = [k for k, v in entry.items()
            if k not in _NOT_METRICS and "_stderr," not in k and isinstance(v, (int, float))]
    if wanted is None:
        return keys[0] if keys else None
    matches = [k for k in keys if k == wanted or k.split(",")[0] == wanted]
    if not matches:
        raise CapabilityError(f"task {task!r} has no metric {wanted!r}; it reports {keys}")
    return matches[0]


def _stderr(entry: Mapping[str, Any], key: str) -> float | None:
    metric, _, flt = key.partition(",")
    value = entry.get(f"{metric}_stderr,{flt}")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _rows(results: Mapping[str, Any]) -> list[str]:
    """Result entries to report: every entry with a metric, except subtasks of a group that has its own score."""
    entries = results["results"]
    scored = {k for k, v in entries.items() if _metric_key(k, v, None) is not None}
    hidden: set[str] = set()

    def hide(group: str) -> None:
        for sub in results.get("group_subtasks", {}).get(group, []):
            hidden.add(sub)
            hide(sub)

    for group in results.get("group_subtasks", {}):
        if group in scored:
            hide(group)
    return [k for k in entries if k in scored and k not in hidden]


def _n(results: Mapping[str, Any], task: str) -> int:
    if task in results.get("n-samples", {}):
        return int(results["n-samples"][task]["effective"])
    return sum(_n(results, sub) for sub in results.get("group_subtasks", {}).get(task, []))


def capability_scores(model: torch.nn.Module, tokenizer: Any, config: CapabilityConfig) -> dict[str, float]:
    """One model's score per task: the metric [`compare_results`] reports (e.g. to compare several edits of one
    model, as the sweep does)."""
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = check_tasks(config)
    was_training = model.training
    model.eval()
    try:
        with _quiet_lm_eval():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        results = _run(lm, config, manager)
    finally:
        model.train(was_training)
    metrics = config.metrics or {}
    out = {}
    for task in _rows(results):
        entry = results["results"][task]
        key = _metric_key(task, entry, metrics.get(task))
        assert key is not None
        out[task] = float(entry[key])
    return out


def compare_results(base: Mapping[str, Any], edited: Mapping[str, Any],
                    metrics: Mapping[str, str] | None = None) -> dict[str, CapabilityResult]:
    """Pair two ``lm_eval.simple_evaluate`` results (base, edited) into [`CapabilityResult`]s, one per task."""
    out: dict[str, CapabilityResult] = {}
    metrics = metrics or {}
    for task in _rows(base):
        b, e = base["results"][task], edited["results"].get(task)
        if e is None:
            raise CapabilityError(f"task {task!r} is in the base results but not in the edited ones")
        key = _metric_key(task, b, metrics.get(task))
        assert key is not None
        metric, _, flt = key.partition(",")
        cfg = base.get("configs", {}).get(task, {})
        out[task] = CapabilityResult(
            task=task, metric=metric, filter=flt or "none", base=float(b[key]), edited=float(e[key]),
            base_stderr=_stderr(b, key), edited_stderr=_stderr(e, key), n=_n(base, task),
            num_fewshot=base.get("n-shot", {}).get(task),
            higher_is_better=bool(base.get("higher_is_better", {}).get(task, {}).get(metric, True)),
            dataset=None if cfg.get("dataset_path") in _LOCAL_BUILDERS else cfg.get("dataset_path"),
            dataset_config=cfg.get("dataset_name"),
            output_type=cfg.get("output_type"),
        )
    return out


def evaluate_capabilities(model: torch.nn.Module, tokenizer: Any, config: CapabilityConfig, *,
                          base_model: torch.nn.Module | None = None) -> dict[str, CapabilityResult]:
    """Run lm-eval tasks on the base and on the edited model; one [`CapabilityResult`] per task.

    Args:
        model: the edited model. For a `peft.PeftModel` the base is the same object inside
            ``model.disable_adapter()``, so one model instance serves both runs.
        tokenizer: the model's tokenizer.
        config: the tasks and settings.
        base_model: the unedited model, when ``model`` is not a `peft.PeftModel`.
    """
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel

    manager = check_tasks(config)
    if isinstance(model, PeftModel):
        if base_model is not None:
            raise InputError("`model` is a PeftModel, whose base is the model with the adapter disabled; "
                             "do not pass `base_model` as well")
        base_ctx: Any = model.disable_adapter
        base_model = model
    elif base_model is None:
        raise InputError("`model` is not a PeftModel, so pass the unedited model as `base_model=`")
    else:
        base_ctx = contextlib.nullcontext

    def wrap(m: torch.nn.Module) -> Any:
        with _quiet_lm_eval():
            return HFLM(pretrained=m, tokenizer=tokenizer, batch_size=config.batch_size)

    was_training = model.training
    model.eval()
    try:
        base_lm = wrap(base_model)
        with base_ctx():
            base = _run(base_lm, config, manager)
        edited = _run(base_lm if base_model is model else wrap(model), config, manager)
    finally:
        model.train(was_training)
    return compare_results(base, edited, config.metrics)
