"""`ExposureReport`: per candidate edit and task, the share of the task's layer output that the edit removes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, InputKeyError
from ..utils import atomic_write_text

__all__ = ["ExposureReport", "combine_shares"]


def combine_shares(shares: Mapping[str, float]) -> float:
    """A task's exposure to an edit from its per-module removed shares ``s_m``: ``1 − Π_m (1 − s_m)``.

    The share of the task's signal that passes no edited module untouched: it grows with every module edited (an edit
    of three layers costs more than one of two at the same ρ, which a mean would hide) and stays in ``[0, 1]``.
    """
    survive = 1.0
    for s in shares.values():
        survive *= 1.0 - min(max(float(s), 0.0), 1.0)
    return 1.0 - survive


@dataclass
class ExposureReport:
    """What `predict_exposure` or `adapter_exposure` measured.

    Attributes:
        shares: candidate → task → module → the removed share of that module's output on the task's tokens,
            ``Σ_t ‖(W − W′) a_t‖² / Σ_t ‖W a_t‖²`` (over every token of the task's texts, on the base model's
            activations).
        tokens: task → number of tokens measured.
        settings: candidate → what the edit was (``keep_mass``, ``target_modules``, ``protect``, ``selection``).
        memorized: the tasks that are memorized sets (given as `RecitationSet`): measured, but not a capability, so
            not part of the predicted cost.
    """

    shares: dict[str, dict[str, dict[str, float]]]
    tokens: dict[str, int]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    memorized: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> list[str]:
        return list(self.shares)

    @property
    def tasks(self) -> list[str]:
        return list(self.tokens)

    def exposure(self, candidate: str, task: str) -> float:
        """The task's exposure to the candidate edit (`combine_shares` of its per-module shares)."""
        try:
            return combine_shares(self.shares[candidate][task])
        except KeyError:
            raise InputKeyError(f"no exposure of task {task!r} to candidate {candidate!r}; candidates: "
                                f"{self.candidates}, tasks: {self.tasks}") from None

    def exposures(self, candidate: str) -> dict[str, float]:
        """Task → exposure to one candidate edit."""
        return {t: self.exposure(candidate, t) for t in self.tasks}

    def cost(self, candidate: str) -> float:
        """The predicted capability cost of a candidate: its mean exposure over the tasks (memorized sets aside)."""
        values = [v for t, v in self.exposures(candidate).items() if t not in self.memorized]
        return sum(values) / len(values) if values else math.nan

    def ranked(self) -> list[str]:
        """The candidates, cheapest predicted cost first."""
        return sorted(self.candidates, key=self.cost)

    def to_markdown(self) -> str:
        """One row per candidate (cheapest first): the exposure of each task and the mean (the predicted cost)."""
        head = ["edit", *(f"{t} (memorized)" if t in self.memorized else t for t in self.tasks),
                "predicted cost (mean over tasks)"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in self.ranked():
            cells = [c, *(f"{self.exposure(c, t):.3f}" for t in self.tasks), f"{self.cost(c):.3f}"]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON types, with the combined exposures and costs alongside the shares they come from."""
        return {**asdict(self), "exposure": {c: self.exposures(c) for c in self.candidates},
                "cost": {c: self.cost(c) for c in self.candidates}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExposureReport:
        """Inverse of `to_dict` (the derived ``exposure`` and ``cost`` are recomputed)."""
        try:
            return cls(shares=dict(data["shares"]), tokens=dict(data["tokens"]),
                       settings=dict(data.get("settings") or {}),
                       memorized=list(data.get("memorized") or []))
        except (KeyError, TypeError) as err:
            raise InputError(f"not an exposure report: {err}") from err

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ExposureReport:
        """Read a report written by `save`; a damaged file raises `DamagedFileError` naming it."""
        from ..integrity import DamagedFileError, read_json_file

        fix = "Measure it again (hf-curvedit exposure --output ...)"
        try:
            return cls.from_dict(read_json_file(path, "an exposure report", fix))
        except ValueError as err:
            raise DamagedFileError(path, str(err), fix) from None
