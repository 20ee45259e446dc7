"""Model cards for curvature edits: Hub metadata (`ModelCardData`, `EvalResult`) and the Jinja templates.

[`CardOptions`] is what a caller says about the card; [`card_inputs`] joins it with an edit summary (the
``curvedit_edit.json`` content, see `hf_curvedit.tuner.summary.edit_summary`) into the [`CardInputs`] that
[`render_card`] renders.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData

from ..evaluation.report import EditReport
from ..tuner.summary import jsonable, module_rows, module_rows_from_config  # noqa: F401

# re-exported: they lived here before the tuner owned them
from ..utils import fill_unset_fields
from .card_metadata import eval_results, pipeline_tag_for
from .card_rows import capability_rows, eval_meta, expert_rows, fmt, format_row, layer_rho_rows, module_row

logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2510.24256"
CITATION = """@article{merullo2025curvature,
  title   = {From Memorization to Reasoning in the Spectrum of Loss Curvature},
  author  = {Merullo and Vatsavaya and Bushnaq and Lewis},
  journal = {arXiv preprint arXiv:2510.24256},
  year    = {2025},
  url     = {https://arxiv.org/abs/2510.24256}
}"""
TEMPLATE_PACKAGE_DIR = "model_cards"
CardKind = Literal["adapter", "merged"]




@dataclass
class CardInputs:
    """Everything a card is rendered from, independent of where it came from (a live model or a folder).

    Args:
        kind: ``"adapter"`` (PEFT adapter repo) or ``"merged"`` (plain transformers checkpoint).
        repo_id: the Hub repo the card is for, e.g. ``"user/llama-curvedit-rho0.6"``.
        edit_config: the `CurvatureEditConfig` as a dict (``adapter_config.json`` content).
        modules: per edited module a dict with at least ``module`` and ``keep_mass`` (a `ModuleEditReport`
            as dict when the live model was available: ``r``, ``s``, ``k``, ``kept_mass_fraction``, ...).
        report: the evaluation, base against edited.
        base_model: Hub id of the base model (local paths are not valid `base_model` metadata).
        license: license of the base model, when known.
        pipeline_tag: Hub pipeline tag; derived from the task type when ``None``.
        factor_data: provenance of the curvature factors (dataset, token count, label mode).
        adapter_name: PEFT adapter name, shown in the loading snippet.
        spectrum_plots: ``(module, relative path)`` of the spectrum PNGs.
        tradeoff_plot: relative path of the recitation-vs-perplexity PNG.
        comparison: a `SweepResult` with baselines: the edit next to each baseline at matched perplexity.
        comparison_plot: relative path of that sweep's plot.
        tags: extra Hub tags.
        gguf: the edit as a GGUF file in the repo (`hf_curvedit.publish.gguf.gguf_card_info`).
    """

    kind: CardKind
    repo_id: str
    edit_config: dict[str, Any]
    modules: list[dict[str, Any]]
    report: EditReport | None = None
    base_model: str | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    factor_data: dict[str, Any] = field(default_factory=dict)
    adapter_name: str = "default"
    spectrum_plots: list[tuple[str, str]] = field(default_factory=list)
    tradeoff_plot: str | None = None
    tags: list[str] = field(default_factory=list)
    comparison: Any = None  # a SweepResult whose matches are the baselines at the edit's perplexity
    comparison_plot: str | None = None
    gguf: dict[str, Any] | None = None


@dataclass
class CardOptions:
    """What the card says beyond what the edit and its report carry (all optional).

    Args:
        base_model: Hub id of the base model, for the card metadata (and ``adapter_config.json`` of a published
            adapter). By default the edit's ``base_model_name_or_path``; local paths are left out of the metadata.
        license: license of the base model; by default read from the base model's card when it can be found.
        factor_data: overrides for the card's factor-data line (``dataset``, ``tokens``, ``label mode``,
            ``sequence length``); by default it is read from the adapter config's ``factor_source``.
        tags: extra Hub tags.
        pipeline_tag: the Hub pipeline tag; derived from the task type or the architectures by default.
    """

    base_model: str | None = None
    license: str | None = None
    factor_data: Mapping[str, Any] | None = None
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None

    def __post_init__(self) -> None:
        fill_unset_fields(self)


def load_template(kind: CardKind) -> str:
    """Return the text of the packaged card template for `kind` (``"adapter"`` or ``"merged"``)."""
    return _template_file(f"{kind}.md.jinja")


def _template_file(name: str) -> str:
    # importlib.resources reads from an installed wheel (even a zipped one) as well as from a source checkout
    path = resources.files("hf_curvedit").joinpath(TEMPLATE_PACKAGE_DIR, name)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model card template {name!r} is missing from the installed hf_curvedit package "
            f"(expected at hf_curvedit/{TEMPLATE_PACKAGE_DIR}/{name}); reinstall hf-curvedit"
        ) from None


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id (``"org/name"`` or ``"name"``) rather than a local path."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~")):
        return False
    return re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) is not None and ".." not in name


def framework_versions() -> dict[str, str]:
    """Installed versions of the libraries a curvature edit depends on."""
    out = {}
    for dist in ("hf-curvedit", "torch", "transformers", "peft", "huggingface_hub", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def config_yaml(edit_config: Mapping[str, Any]) -> str:
    """The edit config as block YAML, keys in their original order."""
    return yaml.safe_dump(jsonable(dict(edit_config)), sort_keys=False, allow_unicode=True, default_flow_style=False)


def card_data(inputs: CardInputs) -> ModelCardData:
    """The card's YAML metadata: base model and relation, library, tags, pipeline tag, license and model-index."""
    pipeline_tag = pipeline_tag_for(inputs.edit_config, inputs.pipeline_tag)
    tags = ["hf-curvedit", "curvature-edit", "memorization", "k-fac"]
    if inputs.kind == "adapter":
        tags.append("peft")
    tags += [t for t in inputs.tags if t not in tags]
    model_name = inputs.repo_id.split("/")[-1]
    results = eval_results(inputs.report, pipeline_tag or "text-generation") if inputs.report else None
    return ModelCardData(
        base_model=inputs.base_model if is_hub_id(inputs.base_model) else None,
        base_model_relation=(("adapter" if inputs.kind == "adapter" else "finetune")
                             if is_hub_id(inputs.base_model) else None),
        library_name="peft" if inputs.kind == "adapter" else "transformers",
        license=inputs.license,
        pipeline_tag=pipeline_tag,
        tags=tags,
        # model_name only names the model-index entry; without results it would be a stray YAML key
        model_name=model_name if results else None,
        eval_results=results,
    )


def render_card(inputs: CardInputs, hub_url: str = "https://huggingface.co") -> ModelCard:
    """Render the model card of a curvature edit.

    Args:
        inputs ([`CardInputs`]): what to describe.
        hub_url (`str`): base URL used for links to the base model.

    Returns:
        `huggingface_hub.ModelCard`: its ``str()`` is the README.md to upload; it re-parses with
        ``ModelCard(str(card))``.
    """
    env = jinja2.Environment(loader=jinja2.FunctionLoader(_template_file), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["fmt"] = fmt
    data = card_data(inputs)
    cfg = inputs.edit_config
    target = cfg.get("target_modules")
    if isinstance(target, str):
        target = [target]
    text = env.get_template(f"{inputs.kind}.md.jinja").render(
        card_data=data.to_yaml(),
        kind=inputs.kind,
        model_name=inputs.repo_id.split("/")[-1],
        repo_id=inputs.repo_id,
        base_model=inputs.base_model if is_hub_id(inputs.base_model) else None,
        hub_url=hub_url.rstrip("/"),
        paper_url=PAPER_URL,
        adapter_name=inputs.adapter_name,
        selection=cfg.get("selection", "curvature_mass"),
        rank_cap=cfg.get("rank_cap"),
        target_modules=sorted(target) if target else [],
        modules=[module_row(m) for m in inputs.modules],
        layer_rhos=layer_rho_rows(inputs.modules),
        experts=expert_rows(inputs.modules),
        min_expert_tokens=cfg.get("min_expert_tokens"),
        factor_data={k: v for k, v in inputs.factor_data.items() if v not in (None, "", {}, [])},
        protected=[{"name": name, "keep_mass": rho,
                    "data": factor_data_from_source((cfg.get("protect_factor_sources") or {}).get(name) or {})}
                   for name, rho in (cfg.get("protect") or {}).items()],
        spectrum_plots=[{"module": m, "path": p} for m, p in inputs.spectrum_plots],
        tradeoff_plot=inputs.tradeoff_plot,
        comparison_table=inputs.comparison.comparison() if inputs.comparison is not None else None,
        comparison_methods=sorted(inputs.comparison.matches) if inputs.comparison is not None else [],
        comparison_plot=inputs.comparison_plot,
        gguf=inputs.gguf,
        base_gguf=cfg.get("base_gguf"),
        eval_rows=[format_row(r) for r in inputs.report.to_table_rows()] if inputs.report else [],
        eval_meta=eval_meta(inputs.report),
        capability_rows=capability_rows(inputs.report),
        config_yaml=config_yaml(cfg),
        versions=framework_versions(),
        citation=CITATION,
    )
    card = ModelCard(text)
    return card


def factor_dataset(factor_source: Mapping[str, Any]) -> str | None:
    """The description of the factor data in ``factor_source`` (the adapter config's provenance of its factors).

    An explicit ``factor_source["dataset"]`` wins; otherwise it is `FactorConfig.dataset`, which `fit_factors`
    records as ``factor_source["factor_config"]["dataset"]``. Adapters saved before that field existed kept it in
    ``factor_config["extra"]["dataset"]``; that is read too.
    """
    factor_config = factor_source.get("factor_config") or {}
    legacy = factor_config.get("extra") or {}
    return factor_source.get("dataset") or factor_config.get("dataset") or legacy.get("dataset")


def factor_data_from_source(factor_source: Mapping[str, Any],
                            overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Summarize ``factor_source`` (filled by `build_curvature_edit`) as the card's factor-data line.

    Picks the dataset ([`factor_dataset`]), the token count, the label mode (``sampled`` = true Fisher,
    ``empirical`` = gold labels) and the sequence length; `overrides` wins over what is found.
    """
    factor_config = factor_source.get("factor_config") or {}
    out: dict[str, Any] = {
        "dataset": factor_dataset(factor_source),
        "tokens": _token_count(factor_source.get("num_tokens")),
        "label mode": factor_config.get("label_mode") or factor_source.get("label_mode"),
        "sequence length": factor_config.get("seq_len"),
    }
    out.update(overrides or {})
    return {k: v for k, v in out.items() if v is not None}


def _token_count(num_tokens: Any) -> Any:
    # Factors keep a count per module; they are equal when all modules saw the same data (the usual case).
    if isinstance(num_tokens, Mapping) and num_tokens:
        values = sorted({int(v) for v in num_tokens.values() if not isinstance(v, list)})
        if not values:  # expert projections only: their counts are per expert (the card's experts table)
            per_expert = sorted(int(c) for v in num_tokens.values() for c in v)
            return f"{per_expert[0]:,}–{per_expert[-1]:,} per expert"
        return f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,}–{values[-1]:,} (per module)"
    return num_tokens


def card_inputs(edit: Mapping[str, Any], repo_id: str, options: CardOptions, *, report: EditReport | None = None,
                license: str | None = None, spectrum_plots: list[tuple[str, str]] | None = None,
                tradeoff_plot: str | None = None, comparison: Any = None,
                comparison_plot: str | None = None, gguf: dict[str, Any] | None = None) -> CardInputs:
    """The [`CardInputs`] of an edit summary (``curvedit_edit.json`` content, with its ``kind``) and the options.

    `license` is the license found for the base model; ``options.license`` wins over it.
    """
    config = edit["config"]
    config_for_tag = dict(config)
    if edit.get("architectures"):
        config_for_tag.setdefault("architectures", edit["architectures"])
    return CardInputs(
        kind=edit.get("kind", "adapter"), repo_id=repo_id, edit_config=config, modules=edit["modules"], report=report,
        base_model=edit.get("base_model"), license=options.license if options.license is not None else license,
        pipeline_tag=pipeline_tag_for(config_for_tag, options.pipeline_tag),
        factor_data=factor_data_from_source(config.get("factor_source") or {}, options.factor_data),
        adapter_name=edit.get("adapter_name") or "default", spectrum_plots=list(spectrum_plots or []),
        tradeoff_plot=tradeoff_plot, tags=list(options.tags or []), comparison=comparison,
        comparison_plot=comparison_plot, gguf=gguf,
    )


def base_license(base_model: str | None, local_base: str | None = None, *, token: str | bool | None = None,
                 endpoint: str | None = None, lookup: bool = True) -> str | None:
    """The license of the base model: from a local copy's README, else (when `lookup`) from its card on the Hub.

    Not finding it is not an error: the card then has no license field.

    Args:
        base_model: Hub id (or local path) of the base model.
        local_base: where the base weights were loaded from, when that differs (a local folder).
        token, endpoint: for the Hub lookup, as in `HfApi`.
        lookup: whether the Hub may be asked (not in a dry run).
    """
    for candidate in (local_base, base_model):
        if candidate and (Path(candidate) / "README.md").is_file():
            try:
                return ModelCard.load(Path(candidate) / "README.md").data.license
            except Exception as err:  # a malformed README must not block publishing
                logger.warning("could not read the license from %s/README.md: %s", candidate, err)
    if lookup and is_hub_id(base_model):
        try:
            data = HfApi(endpoint=endpoint, token=token).model_info(base_model).card_data
            return getattr(data, "license", None) if data is not None else None
        except Exception as err:
            logger.info("could not look up the license of %s on the Hub (%s); the card will have none", base_model, err)
    return None
