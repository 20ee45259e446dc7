"""The pipeline's errors (`UsageError`, `StepFailed`) and the machinery of its typed settings: `StepSettings`, whose
fields check their types on construction and read themselves from a YAML mapping, with NAME=VALUE pair fields."""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, ClassVar, Literal, Union

from ..errors import InputError, register_secret
from ..targets import parse_target_modules

__all__ = ["StepFailed", "StepSettings", "UsageError", "check_domain_name", "check_protect", "convert_value",
           "pair_values", "pairs_field", "parse_pairs"]


class UsageError(InputError):
    """Bad settings or input (the command line's exit code 2)."""


class StepFailed(RuntimeError):
    """A step ran and did not succeed, e.g. no sweep point within the perplexity budget (exit code 1)."""

    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


# ------------------------------------------------------------------------------------------------ typed step settings
def convert_value(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (the few shapes step fields use); TypeError/ValueError when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:  # Optional[X] and X | None
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return convert_value(value, a)
            except UsageError:  # nested settings explain themselves
                raise
            except (TypeError, ValueError):
                pass
        raise TypeError
    if origin is Literal:
        if value not in args:
            raise InputError(f"use one of {list(args)}")
        return value
    if origin is tuple:  # tuple[X, ...]: a scalar is a one-element tuple
        return tuple(convert_value(v, args[0]) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if origin in (list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple, set)):
            raise TypeError
        return [convert_value(v, args[0]) for v in value]
    if isinstance(tp, type) and issubclass(tp, StepSettings):  # nested settings, e.g. evaluate.capabilities
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


def parse_pairs(value: Any, metavar: str, flag: str) -> dict[str, str]:
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


class StepSettings:
    """Shared by the step settings: field types are checked (and lists become tuples) on construction."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if "token" in f.name.lower():
                register_secret(value)  # the command line never shows it
            if "pair" in f.metadata:
                pairs = parse_pairs(value, *f.metadata["pair"])
                if "pair_value" in f.metadata:
                    pairs = pair_values(pairs, f.metadata["pair_value"], *f.metadata["pair"])
                setattr(self, f.name, pairs)
                continue
            try:
                setattr(self, f.name, convert_value(value, hints[f.name]))
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
            # the value itself is not shown: it may hold a token
            raise UsageError(f"step {cls.name!r} takes a mapping of options (key: value lines), got a "
                             f"{type(options).__name__}")
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


def pairs_field(metavar: str, flag: str, value_type: type | None = None) -> Any:
    """A NAME → VALUE mapping field, given as a YAML mapping or as ``NAME=VALUE`` strings (``flag``, repeatable);
    values are converted to ``value_type`` when given."""
    meta: dict[str, Any] = {"pair": (metavar, flag)}
    if value_type is not None:
        meta["pair_value"] = value_type
    return field(default_factory=dict, metadata=meta)


def pair_values(pairs: dict[str, str], value_type: type, metavar: str, flag: str) -> dict[str, Any]:
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
