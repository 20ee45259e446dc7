"""The ``hf-curvedit`` command.

    hf-curvedit fit   [--model M] [--data D] --output-dir runs/default
    hf-curvedit edit  --factors runs/default --keep-mass 0.6 [0.8 ...] --output-dir runs/default/edits
    hf-curvedit evaluate --adapter runs/default/edits/rho0.6 --recitation quotes=quotes.txt --output report.json
    hf-curvedit publish  --adapter runs/default/edits/rho0.6 --repo-id user/name --out-dir publish/ [--dry-run]
    hf-curvedit run examples/default.yaml     # fit → sweep → edit → evaluate → publish, resuming finished steps

Without ``--model`` the embedded default (a small byte-level Llama) is used; without ``--data``
the factors come from the documentation of Python's standard library.
Exit codes: 0 success, 1 a run-time failure, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

logger = logging.getLogger("hf_curvedit")


class UsageError(Exception):
    """Bad arguments or input: exit code 2."""


def _targets(value: str | None) -> Any:
    if value is None:
        return None
    # A comma-separated list means names/globs; a single value is taken as a regex (PEFT convention).
    return [v.strip() for v in value.split(",") if v.strip()] if "," in value else value


def _load_model(name: str | None, dtype: str, device_map: str | None):

    from .default import load_default_model
    from .utils import parse_dtype

    if name is None:
        return load_default_model(parse_dtype(dtype))
    from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification,
                              AutoTokenizer)

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise UsageError(f"could not load model {name!r}: that folder does not exist")
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        archs = getattr(AutoConfig.from_pretrained(name), "architectures", None) or []
        if any(a.endswith("ForImageClassification") for a in archs):
            # Image classifiers come with their image processor in place of a tokenizer.
            model = AutoModelForImageClassification.from_pretrained(name, **kwargs)
            tok = AutoImageProcessor.from_pretrained(name)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load model {name!r}: {e}") from e
    return model.eval(), tok


def cmd_fit(args: argparse.Namespace) -> int:
    from .curvature import FactorConfig, fit_factors
    from .default import default_text_dataset

    from .curvature.factors import model_task

    model, tok = _load_model(args.model, args.dtype, args.device_map)
    images = model_task(model) == "image-classification"
    if images and not args.data:
        raise UsageError("an image classifier needs --data: an image dataset name, or a local folder of images "
                         "(one sub-folder per class) or a parquet/json file with an image column")
    if not images and (args.token_positions or args.max_examples):
        raise UsageError("--token-positions and --max-examples are for image classifiers; this model takes text")
    data: Any = args.data if args.data else default_text_dataset("train")
    cfg = FactorConfig(
        target_modules=_targets(args.target_modules), label_mode=args.label_mode, seq_len=args.seq_len,
        batch_size=args.batch_size, max_tokens=args.max_tokens, accumulate_dtype=args.accumulate_dtype,
        seed=args.seed, checkpoint_every=args.checkpoint_every, max_factor_memory_gb=args.max_factor_memory_gb,
        text_column=args.text_column, token_positions=args.token_positions, image_column=args.image_column,
        label_column=args.label_column, max_examples=args.max_examples,
        # recorded in the factor metadata and shown as the factor data on the model card
        extra={"dataset": args.data or "Python standard-library docs (hf_curvedit.default, train split)"},
    )
    out = Path(args.output_dir)
    if images:
        factors = fit_factors(model, data, cfg, out, image_processor=tok, resume=not args.restart)
    else:
        factors = fit_factors(model, data, cfg, out, tokenizer=tok, resume=not args.restart)
    eig = factors.eigendecompose(out)
    print(f"factors: {factors.path}")
    print(f"eigenbases: {out / 'eigen.safetensors'}")
    print(f"{'module':<40}{'tokens':>10}{'d_out':>7}{'d_in':>6}{'top λ_G':>12}{'top μ_A':>12}")
    for n in factors.module_names:
        e = eig[n]
        print(f"{n:<40}{factors.num_tokens[n]:>10}{e.shape[0]:>7}{e.shape[1]:>6}"
              f"{float(e.eigvals_G[0]):>12.3e}{float(e.eigvals_A[0]):>12.3e}")
    return EXIT_OK


def cmd_edit(args: argparse.Namespace) -> int:
    from .curvature import load_factors
    from .publish.hub import EDIT_FILENAME, edit_summary
    from .tuner import CurvatureEditConfig, build_curvature_edit

    model, _ = _load_model(args.model, "float32", None)
    factors = load_factors(args.factors, model)
    eig = factors.eigendecompose()
    out = Path(args.output_dir)
    rows = []
    for rho in args.keep_mass:
        cfg = CurvatureEditConfig(keep_mass=rho, target_modules=_targets(args.target_modules),
                                  selection=args.selection, rank_cap=args.rank_cap)
        peft_model = build_curvature_edit(model, eig, cfg)
        folder = out / f"rho{rho:g}"
        peft_model.save_pretrained(folder)
        for rep in peft_model.edit_report():
            rows.append((rho, rep))
        # The same description `publish` writes, so publishing this folder shows the per-module table.
        (folder / EDIT_FILENAME).write_text(json.dumps(edit_summary(peft_model, "default"), indent=2, default=str))
        model = peft_model.unload()
        print(f"adapter ρ={rho:g}: {folder}")
    print(f"{'ρ':>5}  {'module':<40}{'r':>6}{'s':>6}{'k':>6}{'kept comp.':>12}{'‖W′‖/‖W‖':>10}{'bytes':>8}")
    for rho, r in rows:
        print(f"{rho:>5g}  {r.module:<40}{r.r:>6}{r.s:>6}{r.k:>6}{r.kept_component_fraction:>12.3f}"
              f"{r.kept_norm_fraction:>10.3f}{r.bytes_ratio:>8.2f}")
    return EXIT_OK


def _recitation_set(spec: str, tok: Any, suffix_tokens: int):
    from datasets import load_from_disk

    from .evaluation import RecitationSet

    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--recitation takes NAME=PATH, got {spec!r}")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"recitation set {name!r}: {p} does not exist")
    if p.is_dir():  # a dataset saved with save_to_disk, e.g. from find_memorized_windows
        return name, RecitationSet.from_dataset(load_from_disk(str(p)))
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.suffix == ".jsonl":
        lines = [json.loads(ln)["text"] for ln in lines]
    return name, RecitationSet.from_texts(lines, tok, suffix_tokens=suffix_tokens, add_special_tokens=False)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from .evaluation import TextSet, evaluate_edit

    from .curvature.factors import model_task

    model, tok = _load_model(args.model, "float32", None)
    if model_task(model) == "image-classification":
        raise UsageError("`evaluate` measures language models; for an image classifier use the Python API: "
                         "evaluate_edit(peft_model, {name: ImageClassificationSet.from_dataset(...)})")
    peft_model = PeftModel.from_pretrained(model, args.adapter)
    sets: dict[str, Any] = dict(_recitation_set(s, tok, args.suffix_tokens) for s in args.recitation)
    if not sets and args.model is None:
        sets = _default_recitation_sets(tok)
    sets["heldout"] = TextSet.from_texts(_heldout_texts(args), tok)
    steps = tuple(args.stress_steps)
    report = evaluate_edit(peft_model, sets, tok, metadata={"adapter": str(args.adapter)},
                           batch_size=args.batch_size, stress=not args.no_stress,
                           stress_extend=steps, stress_shorten=steps)
    if args.output:
        report.save(args.output)
        print(f"report: {args.output}")
    print(f"{'metric':<22}{'set':<16}{'base':>10}{'edited':>10}")
    for row in report.to_table_rows():
        print(f"{row.metric:<22}{row.set:<16}{row.base:>10.4f}{row.edited:>10.4f}")
    return EXIT_OK


def _layer_choices(eig: Any, layer_specs: list[str], modules: str | None, regexes: list[str]) -> dict[str, str]:
    """Label → regex. ``--layers 2,3`` picks the fitted modules in those blocks (optionally only the
    ``--modules`` leaves, e.g. gate,up); ``--layer-choice LABEL=REGEX`` is taken as is."""
    import re

    out: dict[str, str] = {}
    leaves = [m.strip() for m in modules.split(",")] if modules else None
    for spec in layer_specs:
        try:
            layers = {int(x) for x in spec.split(",")}
        except ValueError:
            raise UsageError(f"--layers takes comma-separated block indices like 2,3; got {spec!r}") from None
        names = []
        for n in eig:
            idx = re.search(r"\.(\d+)\.", n)
            leaf = n.rsplit(".", 1)[-1]
            if idx and int(idx.group(1)) in layers and (leaves is None or any(leaf.startswith(l) for l in leaves)):
                names.append(n)
        if not names:
            raise UsageError(f"--layers {spec} --modules {modules} selects no module with factors; fitted: {list(eig)[:6]}")
        out[f"layers {spec}" + (f" ({modules})" if modules else "")] = "|".join(re.escape(n) for n in names)
    for spec in regexes:
        label, sep, regex = spec.partition("=")
        if not sep:
            raise UsageError(f"--layer-choice takes LABEL=REGEX, got {spec!r}")
        out[label] = regex
    return out


def _default_recitation_sets(tok: Any) -> dict[str, Any]:
    """The embedded default's memorized set: its repeated passages and its secret canaries."""
    from .default import DEFAULT_MODEL_DIR, MEMORIZED_SET_FILENAME, memorized_prefix_suffix_ids
    from .evaluation import RecitationSet

    if not (DEFAULT_MODEL_DIR / MEMORIZED_SET_FILENAME).exists():
        raise UsageError("no --recitation set given and the embedded default ships no memorized set; pass "
                         "--recitation NAME=PATH")
    return {name: RecitationSet(*memorized_prefix_suffix_ids(tok, kind=kind))
            for name, kind in (("passages", "passage"), ("canaries", "canary"))}


def cmd_sweep(args: argparse.Namespace) -> int:
    from .curvature import load_factors
    from .evaluation import TextSet
    from .sweep import sweep_edits

    model, tok = _load_model(args.model, "float32", None)
    eig = load_factors(args.factors, model).eigendecompose()
    sets = (dict(_recitation_set(s, tok, args.suffix_tokens) for s in args.recitation) if args.recitation
            else _default_recitation_sets(tok))
    texts = _heldout_texts(args)
    choices = _layer_choices(eig, args.layers, args.modules, args.layer_choice) or None
    result = sweep_edits(model, eig, sets, TextSet.from_texts(texts, tok), keep_masses=args.keep_mass,
                         layer_choices=choices, perplexity_budget=args.ppl_budget, svd_ranks=args.svd_ranks,
                         batch_size=args.batch_size)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "sweep.json")
    (out / "sweep.md").write_text(result.to_markdown() + "\n", encoding="utf-8")
    _plot_sweep(result, out / "sweep.png")
    print(result.to_markdown())
    if result.chosen is None:
        print(f"no edit keeps the perplexity increase within {100 * args.ppl_budget:.0f}%", file=sys.stderr)
        return EXIT_FAILURE
    c = result.chosen
    print(f"chosen: {c.layers} ρ={c.keep_mass:g}: {result.primary_set} Strict "
          f"{100 * result.base.recitation[result.primary_set]['strict']:.1f}% → {100 * c.recitation[result.primary_set]['strict']:.1f}%, "
          f"perplexity {c.perplexity_change * 100:+.1f}%  (results: {out})")
    return EXIT_OK


def _heldout_texts(args: argparse.Namespace) -> list[str]:
    if args.heldout:
        from .data import load_text_dataset

        return list(load_text_dataset(args.heldout)[args.text_column])
    from .default import DEFAULT_MODEL_DIR, HELDOUT_FILENAME, default_text_dataset, load_heldout_text

    if args.model is None and (DEFAULT_MODEL_DIR / HELDOUT_FILENAME).exists():
        return load_heldout_text()
    return list(default_text_dataset("test")["text"])


def _plot_sweep(result: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    s = result.primary_set
    for method, marker in (("curvedit", "o"), ("svd", "x")):
        pts = [p for p in result.points if p.method == method]
        if pts:
            ax.scatter([100 * p.perplexity_change for p in pts], [100 * p.recitation[s]["strict"] for p in pts],
                       marker=marker, label={"curvedit": "curvature edit", "svd": "SVD truncation"}[method])
    if result.chosen is not None:
        ax.scatter([100 * result.chosen.perplexity_change], [100 * result.chosen.recitation[s]["strict"]],
                   s=160, facecolors="none", edgecolors="red", label="chosen")
    ax.axvline(100 * result.perplexity_budget, color="grey", ls="--", lw=1, label="perplexity budget")
    ax.set_xlabel("held-out perplexity change (%)")
    ax.set_ylabel(f"Strict recitation on {s} (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_publish(args: argparse.Namespace) -> int:
    from .evaluation import EditReport
    from .publish import publish

    report = EditReport.load(args.report) if args.report else None
    result = publish(args.adapter, args.repo_id, report, out_dir=args.out_dir, merged=args.merged,
                     private=args.private or None, revision=args.revision, create_pr=args.create_pr,
                     token=args.token, dry_run=args.dry_run, eigen=args.eigen, overwrite=args.overwrite)
    print(result)
    return EXIT_OK


RUN_STEPS = ("fit", "sweep", "edit", "evaluate", "publish")


def _namespace(parser: argparse.ArgumentParser, command: str, options: dict[str, Any]) -> argparse.Namespace:
    """Turn a YAML step into the argparse namespace of the matching subcommand (same flags, same checks)."""
    argv = [command]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):  # NAME: PATH mappings (recitation sets, layer choices)
            for k, v in value.items():
                argv += [flag, f"{k}={v}"]
        elif isinstance(value, (list, tuple)):
            argv += [flag] + [str(v) for v in value]
        else:
            argv += [flag, str(value)]
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        raise UsageError(f"invalid options for step {command!r}: {options}") from e


def cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from .utils import atomic_write_text

    path = Path(args.config)
    if not path.exists():
        raise UsageError(f"config file {path} does not exist")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(cfg) - {"model", "output_dir", *RUN_STEPS})
    if unknown:
        raise UsageError(f"unknown keys {unknown} in {path}; allowed: model, output_dir, {', '.join(RUN_STEPS)}")
    if "output_dir" not in cfg:
        raise UsageError(f"{path} needs an output_dir")
    out = Path(cfg["output_dir"])
    done_dir = out / "steps"
    parser = build_parser()
    model = cfg.get("model")
    common = {"model": model} if model else {}
    edit_dir = out / "edit"
    chosen: dict[str, Any] | None = None

    for step in RUN_STEPS:
        if step not in cfg:
            continue
        marker = done_dir / f"{step}.done.json"
        if marker.exists() and not args.force:
            print(f"[run] {step}: already done ({marker}), skipping")
            if step == "sweep":
                chosen = json.loads(marker.read_text())["chosen"]
            continue
        opts = dict(cfg[step] or {})
        if step == "fit":
            ns = _namespace(parser, "fit", {**common, "output_dir": out / "factors", **opts})
        elif step == "sweep":
            ns = _namespace(parser, "sweep", {**common, "factors": out / "factors", "output_dir": out / "sweep", **opts})
        elif step == "edit":
            if chosen is not None and "keep_mass" not in opts:
                opts = {"keep_mass": [chosen["keep_mass"]], "target_modules": chosen["target_modules"], **opts}
            ns = _namespace(parser, "edit", {**common, "factors": out / "factors", "output_dir": edit_dir, **opts})
        elif step == "evaluate":
            adapter = _only_adapter(edit_dir)
            ns = _namespace(parser, "evaluate", {**common, "adapter": adapter, "output": out / "report.json", **opts})
        else:
            adapter = _only_adapter(edit_dir)
            report = out / "report.json" if (out / "report.json").exists() else None
            ns = _namespace(parser, "publish", {"adapter": adapter, "report": report, "out_dir": out / "publish",
                                                "eigen": out / "factors" / "eigen.safetensors", "overwrite": True, **opts})
        print(f"[run] {step}")
        rc = ns.func(ns)
        if rc != EXIT_OK:
            print(f"[run] {step} failed with exit code {rc}; fix it and run again to resume from this step", file=sys.stderr)
            return rc
        record: dict[str, Any] = {"step": step}
        if step == "sweep":
            sweep = json.loads((out / "sweep" / "sweep.json").read_text())
            chosen = sweep["chosen"]
            record["chosen"] = chosen
        atomic_write_text(marker, json.dumps(record, indent=2))
    print(f"[run] done: {out}")
    return EXIT_OK


def _only_adapter(edit_dir: Path) -> Path:
    adapters = sorted(p.parent for p in edit_dir.glob("*/adapter_config.json"))
    if len(adapters) != 1:
        raise UsageError(f"expected exactly one adapter in {edit_dir}, found {len(adapters)}: give the edit step one "
                         "keep_mass (or let the sweep choose it)")
    return adapters[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-curvedit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("fit", help="collect K-FAC curvature factors and eigendecompose them",
                       description="Collect K-FAC factors A and G for the target modules over ordinary text (or "
                                   "images, for an image classifier), then eigendecompose them (fp64). Resumes a "
                                   "killed run from its last checkpoint.")
    f.add_argument("--model", help="model id or local folder (default: the embedded default model)")
    f.add_argument("--data", help="dataset name, or local text/json/csv/parquet file or folder "
                                  "(default: Python standard-library docs). Use general text, not the text you "
                                  "want the model to forget: memorized text in the factor data worsens the trade-off.")
    f.add_argument("--text-column", default="text")
    f.add_argument("--token-positions", choices=["cls", "all"], default=None,
                   help="image classifiers: class token only (default) or every token")
    f.add_argument("--image-column", default="image", help="image classifiers: the column holding the images")
    f.add_argument("--label-column", default="label", help="image classifiers: labels for --label-mode empirical")
    f.add_argument("--max-examples", type=int, default=None, help="image classifiers: stop after this many images")
    f.add_argument("--output-dir", required=True, help="where factors.safetensors and eigen.safetensors go")
    f.add_argument("--target-modules", help="regex, or comma-separated names/globs (default: the MLP projections)")
    f.add_argument("--label-mode", choices=["sampled", "empirical"], default="sampled",
                   help="sampled = true Fisher (default), empirical = next token from the data")
    f.add_argument("--seq-len", type=int, default=256)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--max-tokens", type=int, default=None)
    f.add_argument("--accumulate-dtype", choices=["float32", "float64"], default="float32")
    f.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    f.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. auto)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--checkpoint-every", type=int, default=50, help="batches between resumable checkpoints")
    f.add_argument("--max-factor-memory-gb", type=float, default=None)
    f.add_argument("--restart", action="store_true", help="discard a partial run in --output-dir and start over")
    f.set_defaults(func=cmd_fit)

    e = sub.add_parser("edit", help="build curvature-edit adapters from fitted factors",
                       description="Build one adapter per --keep-mass value and save each with save_pretrained.")
    e.add_argument("--model", help="the model the factors were fitted on (default: embedded default)")
    e.add_argument("--factors", required=True, help="folder written by `hf-curvedit fit`")
    e.add_argument("--keep-mass", type=float, nargs="+", default=[0.6], help="ρ values in (0, 1]")
    e.add_argument("--target-modules", help="regex, or comma-separated names (default: the MLP projections)")
    e.add_argument("--selection", choices=["curvature_mass", "factor_truncation"], default="curvature_mass")
    e.add_argument("--rank-cap", type=int, default=None)
    e.add_argument("--output-dir", required=True)
    e.set_defaults(func=cmd_edit)

    v = sub.add_parser("evaluate", help="measure an edit: recitation, perplexity, nDCG, stress test (base vs edited)",
                       description="Load the base model with the adapter and measure it with the adapter on and off.")
    v.add_argument("--model", help="base model (default: embedded default)")
    v.add_argument("--adapter", required=True, help="adapter folder written by `hf-curvedit edit`")
    v.add_argument("--recitation", action="append", default=[], metavar="NAME=PATH",
                   help="a set to recite: a save_to_disk folder with prefix_ids/suffix_ids, or a .txt/.jsonl file "
                        "of texts whose last --suffix-tokens tokens are the suffix (repeatable)")
    v.add_argument("--suffix-tokens", type=int, default=8)
    v.add_argument("--heldout", help="held-out text for perplexity/nDCG (default: held-out stdlib docs)")
    v.add_argument("--text-column", default="text")
    v.add_argument("--output", help="write the EditReport JSON here")
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--stress-steps", type=int, nargs="+", default=[0, 5, 10, 15, 20],
                   help="stress test: left-extend / right-shorten the prompt by these many tokens")
    v.add_argument("--no-stress", action="store_true", help="skip the stress test (the slowest part)")
    v.set_defaults(func=cmd_evaluate)

    w = sub.add_parser("sweep", help="try several ρ and layer choices, print the trade-off, pick an edit",
                       description="Build, measure and drop one edit per ρ x layer choice (plus an SVD-truncation "
                                   "baseline); pick the lowest Strict recitation within the perplexity budget. "
                                   "Writes sweep.json, sweep.md and sweep.png. Exit code 1 if nothing fits.")
    w.add_argument("--model", help="the model the factors were fitted on (default: embedded default)")
    w.add_argument("--factors", required=True, help="folder written by `hf-curvedit fit`")
    w.add_argument("--recitation", action="append", default=[], metavar="NAME=PATH",
                   help="memorized set(s) to recite (default: the embedded default's memorized set)")
    w.add_argument("--suffix-tokens", type=int, default=8)
    w.add_argument("--heldout", help="held-out text for perplexity (default: held-out stdlib docs)")
    w.add_argument("--text-column", default="text")
    w.add_argument("--keep-mass", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    w.add_argument("--layers", nargs="*", default=[], metavar="I,J", help="layer choices, e.g. --layers 2,3 1,2")
    w.add_argument("--modules", help="only these module leaves with --layers, e.g. gate,up")
    w.add_argument("--layer-choice", action="append", default=[], metavar="LABEL=REGEX")
    w.add_argument("--ppl-budget", type=float, default=0.15, help="largest perplexity increase (0.15 = +15%%)")
    w.add_argument("--svd-ranks", type=int, nargs="*", default=[8, 16, 32, 64, 96, 128])
    w.add_argument("--batch-size", type=int, default=16)
    w.add_argument("--output-dir", required=True)
    w.set_defaults(func=cmd_sweep)

    u = sub.add_parser("publish", help="write the model card and push an edit to the Hub",
                       description="Write a folder with the weights, model card, plots and evaluation, then create "
                                   "the repo and upload it (huggingface_hub). --dry-run only writes the folder.")
    u.add_argument("--adapter", required=True, help="adapter folder")
    u.add_argument("--repo-id", required=True)
    u.add_argument("--out-dir", required=True, help="local folder to write (must be new or empty)")
    u.add_argument("--report", help="EditReport JSON from `hf-curvedit evaluate`")
    u.add_argument("--eigen", help="eigen.safetensors, for the spectrum plots")
    u.add_argument("--merged", action="store_true", help="publish merged weights instead of the adapter")
    u.add_argument("--private", action="store_true")
    u.add_argument("--revision")
    u.add_argument("--create-pr", action="store_true")
    u.add_argument("--token", help="Hub token (default: the stored login / HF_TOKEN)")
    u.add_argument("--overwrite", action="store_true", help="replace a folder an earlier publish wrote")
    u.add_argument("--dry-run", action="store_true")
    u.set_defaults(func=cmd_publish)

    r = sub.add_parser("run", help="do every step from one YAML file, resuming finished steps",
                       description="Run the steps named in CONFIG.yaml in the order fit, sweep, edit, evaluate, "
                                   "publish. Each step takes the same options as its subcommand (YAML keys with "
                                   "underscores). Finished steps are recorded in OUTPUT_DIR/steps and skipped on "
                                   "the next run; the edit step uses the sweep's pick unless it sets keep_mass.")
    r.add_argument("config", help="YAML file, e.g. examples/default.yaml")
    r.add_argument("--force", action="store_true", help="redo finished steps")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"hf-curvedit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command reports every failure with its exit code
        logger.debug("failure", exc_info=True)
        print(f"hf-curvedit {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
