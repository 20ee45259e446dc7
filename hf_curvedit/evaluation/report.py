"""`EditReport`: what an edit did, base vs edited, as typed dataclasses that round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import InputError
from ..utils import atomic_write_text
from .capabilities import CapabilityResult
from .classification import ClassificationComparison, ClassificationMetrics
from .coherence import CoherenceResult
from .perplexity import PerplexityResult
from .recitation import RecitationResult
from .stress import StressResult

REPORT_FORMAT_VERSION = 1


@dataclass
class RecitationMetrics:
    """Recitation metrics of one model on one set, with per-example distances (``d``) and lengths (``L``)."""

    strict: float
    loose: float
    avg_lev: float
    loose_threshold: float
    distances: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.distances)

    @classmethod
    def from_result(cls, result: RecitationResult) -> RecitationMetrics:
        return cls(result.strict, result.loose, result.avg_lev, result.loose_threshold,
                   [e.distance for e in result.examples], [e.length for e in result.examples])


@dataclass
class RecitationComparison:
    base: RecitationMetrics
    edited: RecitationMetrics


@dataclass
class PerplexityComparison:
    base: PerplexityResult
    edited: PerplexityResult


@dataclass
class StressComparison:
    base: StressResult
    edited: StressResult


@dataclass
class ReportMetadata:
    """Where the numbers came from.

    Args:
        base_model: ``config._name_or_path`` of the base model, if known.
        adapter_name: the active PEFT adapter, for a `peft.PeftModel`.
        peft_type: its PEFT type (e.g. ``"CURVEDIT"``, ``"LORA"``).
        library_version: ``hf_curvedit.__version__``.
        created_at: ISO-8601 UTC time of the evaluation.
        settings: the [`EvalConfig`] used, as a dict.
        extra: anything else the caller wants in the card (JSON-serializable).
    """

    base_model: str | None = None
    adapter_name: str | None = None
    peft_type: str | None = None
    library_version: str | None = None
    created_at: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalize to JSON types now (tuples -> lists, ...) so that a report equals its own JSON round trip,
        # and so that a non-serializable entry fails here rather than when the card is written.
        for name in ("settings", "extra"):
            try:
                setattr(self, name, json.loads(json.dumps(getattr(self, name))))
            except TypeError as err:
                raise TypeError(f"ReportMetadata.{name} must be JSON-serializable: {err}") from err


class TableRow(NamedTuple):
    """One row of the card's table. ``base`` is ``None`` where a metric has no base value."""

    metric: str
    set: str
    base: float | None
    edited: float


@dataclass
class EditReport:
    """Everything [`evaluate_edit`] measured, keyed by set name.

    Recitation rates and classification rates are fractions in ``[0, 1]`` (multiply by 100 for the
    paper's percentages). ``classification`` holds image-classifier sets: a noisy-label set gives the
    memorized-label rate and the true-label accuracy, a clean set its accuracy. ``capabilities`` holds the
    lm-evaluation-harness tasks, keyed by task name (see [`evaluate_capabilities`]); they are not table rows, the card
    shows them in a table of their own, beside ``exposure``: per task (evaluated or not), the share of its signal the
    edit removes (see `hf_curvedit.exposure`).
    """

    recitation: dict[str, RecitationComparison] = field(default_factory=dict)
    perplexity: dict[str, PerplexityComparison] = field(default_factory=dict)
    coherence: dict[str, CoherenceResult] = field(default_factory=dict)
    stress: dict[str, StressComparison] = field(default_factory=dict)
    classification: dict[str, ClassificationComparison] = field(default_factory=dict)
    capabilities: dict[str, CapabilityResult] = field(default_factory=dict)
    exposure: dict[str, float] = field(default_factory=dict)
    metadata: ReportMetadata = field(default_factory=ReportMetadata)

    def to_table_rows(self) -> list[TableRow]:
        """Rows ``(metric, set, base, edited)`` for the model card, in a stable order."""
        rows: list[TableRow] = []
        for name, rec in self.recitation.items():
            rows.append(TableRow("Strict", name, rec.base.strict, rec.edited.strict))
            rows.append(TableRow(f"Loose@{rec.edited.loose_threshold:g}", name, rec.base.loose, rec.edited.loose))
            rows.append(TableRow("AvgLev", name, rec.base.avg_lev, rec.edited.avg_lev))
        for name, st in self.stress.items():
            rows.append(TableRow("Stress longest match", name, st.base.mean_longest_match,
                                 st.edited.mean_longest_match))
            rows.append(TableRow("Stress full match", name, st.base.full_match_rate, st.edited.full_match_rate))
        for name, ppl in self.perplexity.items():
            rows.append(TableRow("Perplexity", name, ppl.base.perplexity, ppl.edited.perplexity))
        for name, coh in self.coherence.items():
            # The base against itself scores 1 by definition.
            rows.append(TableRow(f"nDCG@{coh.k}", name, 1.0, coh.ndcg))
        for name, cls in self.classification.items():
            if cls.base.true_label_accuracy is not None and cls.edited.true_label_accuracy is not None:
                rows.append(TableRow("Memorized-label rate", name, cls.base.accuracy, cls.edited.accuracy))
                rows.append(TableRow("True-label accuracy", name, cls.base.true_label_accuracy,
                                     cls.edited.true_label_accuracy))
            else:
                rows.append(TableRow("Accuracy", name, cls.base.accuracy, cls.edited.accuracy))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``format_version``)."""
        return {"format_version": REPORT_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditReport:
        """Inverse of [`to_dict`]."""
        version = data.get("format_version", REPORT_FORMAT_VERSION)
        if version != REPORT_FORMAT_VERSION:
            raise InputError(f"EditReport format_version {version} is not supported (this library reads "
                             f"{REPORT_FORMAT_VERSION}); upgrade hf-curvedit")
        try:
            return cls(
                recitation={k: RecitationComparison(RecitationMetrics(**v["base"]), RecitationMetrics(**v["edited"]))
                            for k, v in data.get("recitation", {}).items()},
                perplexity={k: PerplexityComparison(PerplexityResult(**v["base"]), PerplexityResult(**v["edited"]))
                            for k, v in data.get("perplexity", {}).items()},
                coherence={k: CoherenceResult(**v) for k, v in data.get("coherence", {}).items()},
                stress={k: StressComparison(StressResult(**v["base"]), StressResult(**v["edited"]))
                        for k, v in data.get("stress", {}).items()},
                classification={k: ClassificationComparison(ClassificationMetrics(**v["base"]),
                                                            ClassificationMetrics(**v["edited"]))
                                for k, v in data.get("classification", {}).items()},
                capabilities={k: CapabilityResult(**v) for k, v in data.get("capabilities", {}).items()},
                exposure={k: float(v) for k, v in data.get("exposure", {}).items()},
                metadata=ReportMetadata(**data.get("metadata", {})),
            )
        except (KeyError, TypeError) as err:
            raise InputError(f"not a valid EditReport dict: {err}") from err

    def to_json(self, indent: int | None = 2) -> str:
        """Serialize to a JSON string (floats are written with full precision, so the round trip is exact)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> EditReport:
        """Inverse of [`to_json`]."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON to ``path`` (atomically)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> EditReport:
        """Read a report written by [`save`]; a damaged file raises `DamagedFileError` naming it."""
        from ..integrity import DamagedFileError, read_json_file

        fix = "Evaluate the edit again (hf-curvedit evaluate)"
        data = read_json_file(path, "an evaluation report", fix)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise DamagedFileError(path, str(err), fix) from None
