"""The pipeline's settings: its errors (`UsageError`, `StepFailed`), the typed settings of each step (`FitStep`,
`SweepStep`, `EditStep`, `EvaluateStep` with its `CapabilitySettings`, `PublishStep`), which check their field types
on construction and read themselves from a YAML mapping, and `PipelineConfig`, the whole run as
``PipelineConfig.from_yaml`` reads it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from ..curvature.config import LabelMode, TokenPositions
from ..selection import Selection
from ..targets import TargetSpec, parse_target_modules

STEPS = ("fit", "sweep", "edit", "evaluate", "publish")
DEFAULT_FACTOR_DATA = "Python standard-library docs (hf_curvedit.default, train split)"
DEFAULT_KEEP_MASS = 0.6


class UsageError(ValueError):
    """Bad settings or input (the command line's exit code 2)."""


class StepFailed(RuntimeError):
    """A step ran and did not succeed, e.g. no sweep point within the perplexity budget (exit code 1)."""

    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


# ------------------------------------------------------------------------------------------------ typed step settings
def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (the few shapes step fields use); TypeError/ValueError when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:  # Optional[X] and X | None
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _convert(value, a)
            except UsageError:  # nested settings explain themselves
                raise
            except (TypeError, ValueError):
                pass
        raise TypeError
    if origin is Literal:
        if value not in args:
            raise ValueError(f"use one of {list(args)}")
        return value
    if origin is tuple:  # tuple[X, ...]: a scalar is a one-element tuple
        return tuple(_convert(v, args[0]) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if origin in (list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple, set)):
            raise TypeError
        return [_convert(v, args[0]) for v in value]
    if isinstance(tp, type) and issubclass(tp, _Step):  # nested settings, e.g. evaluate.capabilities
        return value if isinstance(value, tp) else tp.from_dict(value)
    if isinstance(value, bool) and tp is not bool or tp is bool and not isinstance(value, bool):
        raise TypeError
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise TypeError
    if tp is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if tp in (int, float) or tp is str and isinstance(value, (str, int, float)) or tp is bool:
        return tp(value)
    raise TypeError


def _pairs(value: Any, metavar: str, flag: str) -> dict[str, str]:
    """NAME: VALUE mappings from a mapping (YAML) or from ``NAME=VALUE`` strings (the command line)."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for spec in [value] if isinstance(value, str) else list(value or []):
        name, sep, rest = str(spec).partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"{flag} takes {metavar}, got {spec!r}")
        out[name] = rest
    return out


class _Step:
    """Shared by the step settings: field types are checked (and lists become tuples) on construction."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if "pair" in f.metadata:
                pairs = _pairs(value, *f.metadata["pair"])
                if "pair_value" in f.metadata:
                    pairs = _pair_values(pairs, f.metadata["pair_value"], *f.metadata["pair"])
                setattr(self, f.name, pairs)
                continue
            try:
                setattr(self, f.name, _convert(value, hints[f.name]))
            except UsageError:
                raise
            except (TypeError, ValueError) as e:
                tp = hints[f.name]
                kind = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
                shown = f"<a {type(value).__name__}, not shown>" if "token" in f.name.lower() else repr(value)
                raise UsageError(f"step {self.name!r}: {f.name}={shown} is not a valid {kind}"
                                 + (f" ({e})" if str(e) and "token" not in f.name.lower() else "")) from None

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None):
        """The step from its YAML mapping (keys = the subcommand's flags with underscores); unknown keys raise."""
        if options is not None and not isinstance(options, Mapping):
            raise UsageError(f"step {cls.name!r} takes a mapping of options, got {options!r}")
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UsageError(f"unknown keys {unknown} in step {cls.name!r}; allowed: {', '.join(known)}")
        missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and options.get(f.name) in (None, "")]
        if missing:
            raise UsageError(f"step {cls.name!r} needs {', '.join(missing)}")
        if isinstance(options.get("target_modules"), str):  # the command line's convention: a,b = names; else regex
            options["target_modules"] = parse_target_modules(options["target_modules"])
        return cls(**options)


def _pairs_field(metavar: str, flag: str, value_type: type | None = None) -> Any:
    """A NAME → VALUE mapping field, given as a YAML mapping or as ``NAME=VALUE`` strings (``flag``, repeatable);
    values are converted to ``value_type`` when given."""
    meta: dict[str, Any] = {"pair": (metavar, flag)}
    if value_type is not None:
        meta["pair_value"] = value_type
    return field(default_factory=dict, metadata=meta)


def _pair_values(pairs: dict[str, str], value_type: type, metavar: str, flag: str) -> dict[str, Any]:
    out = {}
    for name, text in pairs.items():
        try:
            out[name] = value_type(text)
        except ValueError:
            raise UsageError(f"{flag} takes {metavar}, and {text!r} (for {name!r}) is not a "
                             f"{value_type.__name__}") from None
    return out


def check_domain_name(name: str, flag: str = "--name") -> str:
    """A factor-set name (``fit --name``, ``--protect NAME=ρ``): an identifier, since it names a folder too."""
    if not name.isidentifier():
        raise UsageError(f"{flag}: a factor-set name must be letters, digits and _ (a folder name), got {name!r}")
    return name


def check_protect(protect: Mapping[str, float]) -> None:
    for name, rho in protect.items():
        check_domain_name(name, "--protect")
        if not 0.0 < rho <= 1.0:
            raise UsageError(f"--protect {name}={rho:g}: ρ must be in (0, 1] (the fraction of that domain's "
                             "curvature mass to keep)")


@dataclass
class FitStep(_Step):
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
    # Protected domains' factor sets (OUTPUT_DIR/domains/NAME): `domain` fits only that one from `data` (the CLI's
    # `fit --name NAME --data ...`); `domains` (NAME=DATA) fits each after the general set (a run YAML's fit step).
    domain: str | None = None
    domains: dict[str, str] = _pairs_field("NAME=DATA", "domains")

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
class SweepStep(_Step):
    """`hf-curvedit sweep`: ρ × layer choices and the baselines; the pick within ``ppl_budget``.

    ``baselines``: ``svd`` (over ``svd_ranks``; none when they are empty) and ``balanced_subnet`` (over
    ``subnet_ratios``, trained against ``clean``: default the standard-library docs). ``capabilities``: lm-eval tasks
    scored on the base, the pick and each baseline at matched perplexity."""

    name: ClassVar[str] = "sweep"
    recitation: dict[str, str] = _pairs_field("NAME=PATH", "--recitation")  # default: the embedded memorized set
    suffix_tokens: int = 8
    heldout: str | None = None
    text_column: str = "text"
    keep_mass: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    layers: tuple[str, ...] = ()
    modules: str | list[str] | None = None
    layer_choice: dict[str, str] = _pairs_field("LABEL=REGEX", "--layer-choice")
    ppl_budget: float = 0.15
    svd_ranks: tuple[int, ...] = (8, 16, 32, 64, 96, 128)
    batch_size: int = 16
    protect: dict[str, float] = _pairs_field("NAME=RHO", "--protect", float)
    baselines: tuple[Literal["svd", "balanced_subnet"], ...] = ("svd",)
    subnet_ratios: tuple[float, ...] = (0.0015, 0.005, 0.01, 0.02, 0.05)
    subnet_epochs: int = 5
    subnet_lr: float = 0.3
    subnet_lam: float = 0.7
    clean: str | None = None  # text BalancedSubnet keeps; default: the standard-library docs
    capabilities: CapabilitySettings | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_protect(self.protect)
        bad = [r for r in self.subnet_ratios if not 0.0 < r < 1.0]
        if bad:
            raise UsageError(f"--subnet-ratios {bad[0]:g} is not in (0, 1): each ratio is the fraction of MLP weights "
                             "BalancedSubnet zeroes, e.g. 0.0015 0.01")
        if self.subnet_epochs < 1 or self.subnet_lr <= 0 or not 0.0 <= self.subnet_lam <= 1.0:
            raise UsageError("BalancedSubnet needs --subnet-epochs ≥ 1, --subnet-lr > 0 and --subnet-lam in [0, 1]")


@dataclass
class EditStep(_Step):
    """`hf-curvedit edit`: one adapter per ρ. ``keep_mass=None``: the sweep's pick in a pipeline, else 0.6."""

    name: ClassVar[str] = "edit"
    keep_mass: tuple[float, ...] | None = None
    target_modules: TargetSpec = None
    selection: Selection = "curvature_mass"
    rank_cap: int | None = None
    protect: dict[str, float] = _pairs_field("NAME=RHO", "--protect", float)
    min_expert_tokens: int | None = None
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_protect(self.protect)
        bad = [rho for rho in self.keep_mass or () if not 0.0 < rho <= 1.0]
        if bad:  # all of them, before the first adapter is written
            raise UsageError(f"--keep-mass {bad[0]:g} is not in (0, 1]: each value is the fraction of curvature mass "
                             "to keep, e.g. --keep-mass 0.6 0.8")
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
class CapabilitySettings(_Step):
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
class EvaluateStep(_Step):
    """`hf-curvedit evaluate`: recitation, perplexity, nDCG and the stress test, base against edited; with
    ``capabilities``, lm-evaluation-harness tasks as well."""

    name: ClassVar[str] = "evaluate"
    recitation: dict[str, str] = _pairs_field("NAME=PATH", "--recitation")
    suffix_tokens: int = 8
    heldout: str | None = None
    text_column: str = "text"
    batch_size: int = 16
    stress_steps: tuple[int, ...] = (0, 5, 10, 15, 20)
    no_stress: bool = False
    capabilities: CapabilitySettings | None = None


@dataclass
class PublishStep(_Step):
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
        unknown = sorted(set(data) - {"model", "output_dir", *STEPS})
        if unknown:
            raise UsageError(f"unknown keys {unknown} in {source}; allowed: model, output_dir, {', '.join(STEPS)}")
        if not data.get("output_dir"):
            raise UsageError(f"{source} needs an output_dir")
        model = data.get("model")
        steps = {s: _STEP_TYPES[s].from_dict(data[s]) for s in STEPS if s in data}  # type: ignore[attr-defined]
        return cls(Path(data["output_dir"]), str(model) if model else None, **steps)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        import yaml

        path = Path(path)
        if not path.exists():
            raise UsageError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise UsageError(f"{path} is not valid YAML: {e}") from e
        return cls.from_dict(data or {}, str(path))
