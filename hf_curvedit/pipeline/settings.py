"""The pipeline's settings: its errors (`UsageError`, `StepFailed`), the typed settings of each step (`FitStep`,
`SweepStep`, `EditStep`, `EvaluateStep` with its `CapabilitySettings`, `PublishStep`), which check their field types
on construction and read themselves from a YAML mapping, and `PipelineConfig`, the whole run as
``PipelineConfig.from_yaml`` reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..curvature.config import LabelMode, TokenPositions
from ..selection import Selection
from ..sweep.allocation import Allocation
from ..targets import TargetSpec
from .fields import StepFailed, StepSettings, UsageError, check_domain_name, check_protect, pairs_field

# the errors stay importable from here, where they were before the settings' machinery had a module of its own
__all__ = ["DEFAULT_FACTOR_DATA", "DEFAULT_KEEP_MASS", "STEPS", "CapabilitySettings", "EditStep", "EvaluateStep",
           "FitStep", "PipelineConfig", "PublishStep", "StepFailed", "SweepStep", "UsageError"]

STEPS = ("fit", "sweep", "edit", "evaluate", "publish")
DEFAULT_FACTOR_DATA = "Python standard-library docs (hf_curvedit.default, train split)"
DEFAULT_KEEP_MASS = 0.6


@dataclass
class FitStep(StepSettings):
    """`hf-curvedit fit`: collect K-FAC factors and eigendecompose them (see `FactorConfig` for the fields)."""

    name: ClassVar[str] = "fit"
    data: str | None = None  # None: Python's standard-library docs
    text_column: str = "text"
    target_modules: TargetSpec = None
    label_mode: LabelMode = "sampled"
    seq_len: int = 256
    batch_size: int = 8
    max_tokens: int | None = None
    accumulate_dtype: Literal["float32", "float64"] = "float32"
    storage_dtype: Literal["float32", "float64", "bfloat16"] | None = None
    seed: int = 0
    checkpoint_every: int = 50
    max_factor_memory_gb: float | None = None
    token_positions: TokenPositions | None = None
    image_column: str = "image"
    label_column: str = "label"
    max_examples: int | None = None
    dtype: str = "float32"
    device_map: str | None = None
    restart: bool = False
    ekfac: bool = False  # also measure the EK-FAC corrected eigenvalues (for selection="ekfac_mass")
    # Protected domains' factor sets (OUTPUT_DIR/domains/NAME): `domain` fits only that one from `data` (the CLI's
    # `fit --name NAME --data ...`); `domains` (NAME=DATA) fits each after the general set (a run YAML's fit step).
    domain: str | None = None
    domains: dict[str, str] = pairs_field("NAME=DATA", "domains")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in [self.domain] * (self.domain is not None) + list(self.domains):
            check_domain_name(name)
        if self.domain is not None and not self.data:
            raise UsageError(f"--name {self.domain} fits a protected domain's factors: give its text with --data "
                             "(e.g. a .txt/.jsonl file of that domain)")
        if self.domain is not None and self.domains:
            raise UsageError("give either domain (one domain's factors) or domains (several, after the general ones)")


@dataclass
class SweepStep(StepSettings):
    """`hf-curvedit sweep`: ρ × layer choices and the baselines; the pick within ``ppl_budget``.

    ``baselines``: ``svd`` (over ``svd_ranks``; none when they are empty) and ``balanced_subnet`` (over
    ``subnet_ratios``, trained against ``clean``: default the standard-library docs). ``capabilities``: lm-eval tasks
    scored on the base, the pick and each baseline at matched perplexity. ``allocation``: ``per_layer`` (or
    ``per_projection``) searches a ρ per layer from the grid's pick, moving by ``allocation_steps`` and measuring at
    most ``allocation_max_candidates`` candidates (`SweepConfig`). An empty ``keep_mass`` fits the ρ scale to the
    model instead of a grid."""

    name: ClassVar[str] = "sweep"
    recitation: dict[str, str] = pairs_field("NAME=PATH", "--recitation")  # default: the embedded memorized set
    suffix_tokens: int = 8
    heldout: str | None = None
    text_column: str = "text"
    keep_mass: tuple[float, ...] = ()  # empty: the ρ scale fitted to the model (`SweepConfig.keep_masses`)
    layers: tuple[str, ...] = ()
    modules: str | list[str] | None = None
    layer_choice: dict[str, str] = pairs_field("LABEL=REGEX", "--layer-choice")
    ppl_budget: float = 0.15
    svd_ranks: tuple[int, ...] = (8, 16, 32, 64, 96, 128)
    batch_size: int = 16
    protect: dict[str, float] = pairs_field("NAME=RHO", "--protect", float)
    baselines: tuple[Literal["svd", "balanced_subnet"], ...] = ("svd",)
    subnet_ratios: tuple[float, ...] = (0.0015, 0.005, 0.01, 0.02, 0.05)
    subnet_epochs: int = 5
    subnet_lr: float = 0.3
    subnet_lam: float = 0.7
    clean: str | None = None  # text BalancedSubnet keeps; default: the standard-library docs
    capabilities: CapabilitySettings | None = None
    selection: Selection = "curvature_mass"
    exposure_tasks: tuple[str, ...] = ()  # lm-eval tasks whose exposure each candidate gets (default: capabilities')
    pick_by: Literal["recitation", "predicted_cost"] = "recitation"
    recitation_tolerance: float = 0.02
    allocation: Allocation = "per_layer"
    allocation_steps: tuple[float, ...] = (2.0, 1.41)
    allocation_max_candidates: int = 24
    allocation_max_seconds: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_protect(self.protect)
        if not self.allocation_steps or any(not s > 1.0 for s in self.allocation_steps):
            raise UsageError(f"--allocation-steps {list(self.allocation_steps)}: give one or more factors by which a "
                             "move multiplies or divides a layer's removed mass 1 - ρ, each > 1, coarse to fine, e.g. "
                             "--allocation-steps 2 1.41")
        if self.allocation_max_candidates < 1:
            raise UsageError(f"--allocation-max-candidates {self.allocation_max_candidates}: give the most candidates "
                             "the allocation search may measure, at least 1 (e.g. 24)")
        bad = [r for r in self.subnet_ratios if not 0.0 < r < 1.0]
        if bad:
            raise UsageError(f"--subnet-ratios {bad[0]:g} is not in (0, 1): each ratio is the fraction of MLP weights "
                             "BalancedSubnet zeroes, e.g. 0.0015 0.01")
        if self.subnet_epochs < 1 or self.subnet_lr <= 0 or not 0.0 <= self.subnet_lam <= 1.0:
            raise UsageError("BalancedSubnet needs --subnet-epochs ≥ 1, --subnet-lr > 0 and --subnet-lam in [0, 1]")


@dataclass
class EditStep(StepSettings):
    """`hf-curvedit edit`: one adapter per ρ. ``keep_mass=None``: the sweep's pick in a pipeline, else 0.6.
    ``keep_mass_pattern`` (module regex → ρ, `CurvatureEditConfig.keep_mass_pattern`) overrides ρ for the modules it
    matches; in a pipeline it is the pick's ρ per layer when the sweep searched one."""

    name: ClassVar[str] = "edit"
    keep_mass: tuple[float, ...] | None = None
    keep_mass_pattern: dict[str, float] = pairs_field("REGEX=RHO", "--keep-mass-pattern", float)
    target_modules: TargetSpec = None
    selection: Selection = "curvature_mass"
    rank_cap: int | None = None
    protect: dict[str, float] = pairs_field("NAME=RHO", "--protect", float)
    min_expert_tokens: int | None = None
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_protect(self.protect)
        bad = [rho for rho in self.keep_mass or () if not 0.0 < rho <= 1.0]
        if bad:  # all of them, before the first adapter is written
            raise UsageError(f"--keep-mass {bad[0]:g} is not in (0, 1]: each value is the fraction of curvature mass "
                             "to keep, e.g. --keep-mass 0.6 0.8")
        for pattern, rho in self.keep_mass_pattern.items():
            if not 0.0 < rho <= 1.0:
                raise UsageError(f"--keep-mass-pattern {pattern}={rho:g}: ρ must be in (0, 1] (the fraction of "
                                 "curvature mass the modules it matches keep)")
        if self.min_expert_tokens is not None and self.min_expert_tokens < 0:
            raise UsageError(f"--min-expert-tokens {self.min_expert_tokens} is negative: give the fewest tokens an "
                             "expert's factors must have seen for it to be edited (e.g. 4096)")
        if self.compute_dtype is not None:
            from ..utils import parse_dtype

            try:
                parse_dtype(self.compute_dtype)
            except ValueError as err:
                raise UsageError(f"--compute-dtype: {err}") from None


@dataclass
class CapabilitySettings(StepSettings):
    """The ``capabilities:`` block of the evaluate step (``hf-curvedit evaluate --tasks ...``): lm-evaluation-harness
    tasks run on the base and the edited model. The tasks shipped in ``hf_curvedit/lm_eval_tasks`` (the default
    model's ``curvedit_skills``) are always found; ``include_path`` adds folders of task YAMLs."""

    name: ClassVar[str] = "evaluate.capabilities"
    tasks: tuple[str, ...]
    include_path: tuple[str, ...] = ()
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 32

    def to_config(self) -> Any:
        """The `CapabilityConfig` these settings describe."""
        from ..default import LM_EVAL_TASKS_DIR
        from ..evaluation.capabilities import CapabilityConfig, CapabilityError

        limit = self.limit
        if limit is not None and limit >= 1 and limit.is_integer():  # a count, not a fraction
            limit = int(limit)
        try:
            return CapabilityConfig(tasks=list(self.tasks), include_path=[str(LM_EVAL_TASKS_DIR), *self.include_path],
                                    limit=limit, num_fewshot=self.num_fewshot, batch_size=self.batch_size)
        except CapabilityError as err:
            raise UsageError(str(err)) from None

    def exposure_config(self, extra: tuple[str, ...] = ()) -> Any:
        """The `CapabilityConfig` of these tasks plus ``extra`` (tasks whose exposure alone is measured)."""
        from dataclasses import replace

        return replace(self, tasks=tuple(dict.fromkeys([*self.tasks, *extra]))).check()

    def check(self) -> Any:
        """The `CapabilityConfig`, once lm-eval is installed and every task and its data are within reach: called
        before any model work, so a typo in a task name does not cost a fit."""
        from ..evaluation.capabilities import CapabilityError, check_tasks

        config = self.to_config()
        try:
            check_tasks(config)
        except ImportError as err:
            raise UsageError(f"{err} (or drop the capabilities settings)") from None
        except CapabilityError as err:
            raise UsageError(str(err)) from None
        return config


@dataclass
class EvaluateStep(StepSettings):
    """`hf-curvedit evaluate`: recitation, perplexity, nDCG and the stress test, base against edited; with
    ``capabilities``, lm-evaluation-harness tasks as well."""

    name: ClassVar[str] = "evaluate"
    recitation: dict[str, str] = pairs_field("NAME=PATH", "--recitation")
    suffix_tokens: int = 8
    heldout: str | None = None
    text_column: str = "text"
    batch_size: int = 16
    stress_steps: tuple[int, ...] = (0, 5, 10, 15, 20)
    no_stress: bool = False
    capabilities: CapabilitySettings | None = None
    exposure_tasks: tuple[str, ...] = ()  # lm-eval tasks whose exposure alone is measured (not evaluated)


@dataclass
class ExposureStep(StepSettings):
    """`hf-curvedit exposure`: each task's predicted exposure to the edit at each ρ, from the eigenbases alone.

    ``tasks``: lm-eval task names (prompt + gold answer of each item); ``texts``: NAME=PATH text files;
    ``recitation``: memorized sets (NAME=PATH, as for ``evaluate``); ``memorized``: the embedded default's."""

    name: ClassVar[str] = "exposure"
    keep_mass: tuple[float, ...] = (DEFAULT_KEEP_MASS,)
    target_modules: TargetSpec = None
    selection: Selection = "curvature_mass"
    protect: dict[str, float] = pairs_field("NAME=RHO", "--protect", float)
    tasks: tuple[str, ...] = ()
    include_path: tuple[str, ...] = ()
    limit: float | None = None
    texts: dict[str, str] = pairs_field("NAME=PATH", "--texts")
    text_column: str = "text"
    recitation: dict[str, str] = pairs_field("NAME=PATH", "--recitation")
    suffix_tokens: int = 8
    memorized: bool = False
    batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_protect(self.protect)
        bad = [rho for rho in self.keep_mass if not 0.0 < rho <= 1.0]
        if bad:
            raise UsageError(f"--keep-mass {bad[0]:g} is not in (0, 1]: each value is a fraction of curvature mass "
                             "to keep, e.g. --keep-mass 0.95 0.9 0.8")
        if not (self.tasks or self.texts or self.recitation or self.memorized):
            raise UsageError("name what to measure: --tasks (lm-eval tasks, e.g. curvedit_skills), --texts NAME=PATH "
                             "(a text or JSONL file), --recitation NAME=PATH or --memorized")
        if (self.include_path or self.limit is not None) and not self.tasks:
            raise UsageError("--include-path and --limit set up lm-eval tasks: add --tasks")


@dataclass
class PublishStep(StepSettings):
    """`hf-curvedit publish`: write the publish folder (card, weights, plots) and push it unless ``dry_run``."""

    name: ClassVar[str] = "publish"
    repo_id: str
    merged: bool = False
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    token: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    gguf_source: str | None = None  # the GGUF file the base was read from: the folder then carries the edit as GGUF
    gguf_type: str | None = None  # its edited tensors' type (default: their type in gguf_source)

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..publish.hub import check_repo_id

        try:
            check_repo_id(self.repo_id)
        except ValueError as err:
            raise UsageError(f"--repo-id: {err}") from None

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None):
        if isinstance(options, Mapping):  # a run owns its publish folder: replace what an earlier run wrote
            options = {"overwrite": True, **options}
        return super().from_dict(options)


_STEP_TYPES: dict[str, type] = {"fit": FitStep, "sweep": SweepStep, "edit": EditStep, "evaluate": EvaluateStep,
                                "publish": PublishStep}


def with_gguf_file(model: str | None, gguf_file: str | None) -> str | None:
    """The model the steps load: ``model``, or the GGUF file ``gguf_file`` in it (a ``.gguf`` path, which `load_model`
    reads through transformers' GGUF loader)."""
    if not gguf_file:
        return str(model) if model else None
    from ..gguf import split_gguf_path

    folder, name = split_gguf_path(model, gguf_file)
    return str(folder / name)


@dataclass
class PipelineConfig:
    """What `run_pipeline` does: the model (None: the embedded default), the output folder, the steps to run."""

    output_dir: Path
    model: str | None = None
    fit: FitStep | None = None
    sweep: SweepStep | None = None
    edit: EditStep | None = None
    evaluate: EvaluateStep | None = None
    publish: PublishStep | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the config") -> PipelineConfig:
        if not isinstance(data, Mapping):
            raise UsageError(f"{source} must be a mapping of model, output_dir and steps")
        unknown = sorted(set(data) - {"model", "gguf_file", "output_dir", *STEPS})
        if unknown:
            raise UsageError(f"unknown keys {unknown} in {source}; allowed: model, gguf_file, output_dir, "
                             f"{', '.join(STEPS)}")
        if not data.get("output_dir"):
            raise UsageError(f"{source} needs an output_dir")
        model = data.get("model")
        steps = {s: _STEP_TYPES[s].from_dict(data[s]) for s in STEPS if s in data}  # type: ignore[attr-defined]
        return cls(Path(data["output_dir"]), with_gguf_file(model, data.get("gguf_file")), **steps)

    def with_gguf_file(self, gguf_file: str | None) -> PipelineConfig:
        """This config with its model read from ``gguf_file`` (a name in the model folder, or a path)."""
        return dataclasses.replace(self, model=with_gguf_file(self.model, gguf_file))

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        import yaml

        path = Path(path)
        if not path.exists():
            raise UsageError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            # where and what, never the line itself (it may hold a token)
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or type(e).__name__
            raise UsageError(f"{path} is not valid YAML{where}: {what}") from None
        return cls.from_dict(data or {}, str(path))
