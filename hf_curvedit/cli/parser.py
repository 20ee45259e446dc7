"""The ``hf-curvedit`` argument parser: one function per subcommand."""

from __future__ import annotations

import argparse
from typing import Any, get_args

from ..curvature.config import LabelMode, TokenPositions
from ..curvature.correction import EKFAC_STEM
from ..curvature.eigen import EIGEN_STEM
from ..curvature.storage import CHECKPOINT_DIR, FACTORS_STEM
from ..pipeline import (
    DEFAULT_KEEP_MASS,
    EditStep,
    EvaluateStep,
    ExposureStep,
    FitStep,
    SweepStep,
)
from ..selection import SELECTIONS
from ..shards import INDEX_SUFFIX, store_files
from ..sweep.allocation import ALLOCATIONS
from ..targets import parse_target_modules
from .commands import (
    cmd_demo,
    cmd_edit,
    cmd_evaluate,
    cmd_exposure,
    cmd_fit,
    cmd_plan,
    cmd_publish,
    cmd_run,
    cmd_sweep,
)

__all__ = ["build_parser"]


GGUF_HELP = ("read the model from this GGUF file (a name in the --model folder, or a path), dequantized by "
             "transformers; needs pip install 'hf-curvedit[gguf]'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-curvedit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_fit(sub)
    _add_edit(sub)
    _add_evaluate(sub)
    _add_exposure(sub)
    _add_sweep(sub)
    _add_publish(sub)
    _add_demo(sub)
    _add_run(sub)
    _add_plan(sub)
    return p


def _add_fit(sub: Any) -> None:
    """`hf-curvedit fit`."""
    f = sub.add_parser("fit", help="collect K-FAC curvature factors and eigendecompose them",
                       description="Collect K-FAC factors A and G for the target modules over ordinary text (or "
                                   "images, for an image classifier), then eigendecompose them (fp64). Resumes a "
                                   "killed run from its last checkpoint.")
    f.add_argument("--model", help="model id or local folder (default: the embedded default model)")
    f.add_argument("--gguf-file", metavar="NAME", help=GGUF_HELP)
    f.add_argument("--data", help="dataset name, or local text/json/csv/parquet file or folder "
                                  "(default: Python standard-library docs). Use general text, not the text you "
                                  "want the model to forget: memorized text in the factor data worsens the trade-off.")
    f.add_argument("--text-column", default=FitStep.text_column)
    f.add_argument("--token-positions", choices=get_args(TokenPositions), default=None,
                   help="image classifiers: class token only (default) or every token")
    f.add_argument("--image-column", default=FitStep.image_column,
                   help="image classifiers: the column holding the images")
    f.add_argument("--label-column", default=FitStep.label_column,
                   help="image classifiers: labels for --label-mode empirical")
    f.add_argument("--max-examples", type=int, default=None, help="image classifiers: stop after this many images")
    f.add_argument("--output-dir", required=True,
                   help=f"where the factors ({store_files(FACTORS_STEM)}) and their eigenbases "
                        f"({store_files(EIGEN_STEM)}) are written; a partial run's checkpoints go to "
                        f"OUTPUT_DIR/{CHECKPOINT_DIR}")
    f.add_argument("--target-modules", type=parse_target_modules,
                   help="regex, or comma-separated names/globs (default: the MLP projections)")
    f.add_argument("--label-mode", choices=get_args(LabelMode), default=FitStep.label_mode,
                   help="sampled = true Fisher (default), empirical = next token from the data")
    f.add_argument("--seq-len", type=int, default=FitStep.seq_len)
    f.add_argument("--batch-size", type=int, default=FitStep.batch_size)
    f.add_argument("--max-tokens", type=int, default=None)
    f.add_argument("--accumulate-dtype", choices=["float32", "float64"], default=FitStep.accumulate_dtype)
    f.add_argument("--storage-dtype", choices=["float32", "float64", "bfloat16"], default=None,
                   help="dtype of the finished factors in memory and on disk (default: --accumulate-dtype; "
                        "bfloat16 halves the file)")
    f.add_argument("--dtype", default=FitStep.dtype, help="model dtype: float32, bfloat16, float16")
    f.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. auto)")
    f.add_argument("--seed", type=int, default=FitStep.seed)
    f.add_argument("--checkpoint-every", type=int, default=FitStep.checkpoint_every,
                   help="batches between resumable checkpoints")
    f.add_argument("--max-factor-memory-gb", type=float, default=None)
    f.add_argument("--restart", action="store_true", help="discard a partial run in --output-dir and start over")
    f.add_argument("--ekfac", action="store_true",
                   help="then measure the EK-FAC corrected eigenvalues in a second pass over the same data "
                        f"({store_files(EKFAC_STEM)}; needed by --selection ekfac_mass)")
    f.add_argument("--name", dest="domain", metavar="NAME",
                   help="fit a protected domain's factors (e.g. arithmetic) from --data into OUTPUT_DIR/domains/NAME, "
                        "beside the general ones; edit and sweep use them with --protect NAME=RHO")
    f.set_defaults(func=cmd_fit)


def _add_edit(sub: Any) -> None:
    """`hf-curvedit edit`."""
    e = sub.add_parser("edit", help="build curvature-edit adapters from fitted factors",
                       description="Build one adapter per --keep-mass value and save each with save_pretrained.")
    e.add_argument("--model", help="the model the factors were fitted on (default: embedded default)")
    e.add_argument("--gguf-file", metavar="NAME", help=GGUF_HELP)
    e.add_argument("--factors", required=True, help="folder written by `hf-curvedit fit`")
    e.add_argument("--keep-mass", type=float, nargs="+", default=None,
                   help=f"ρ values in (0, 1] (default: {DEFAULT_KEEP_MASS:g})")
    e.add_argument("--target-modules", type=parse_target_modules,
                   help="regex, or comma-separated names (default: the MLP projections)")
    e.add_argument("--keep-mass-pattern", action="append", default=[], metavar="REGEX=RHO",
                   help="ρ for the modules whose name ends in a match of REGEX, instead of --keep-mass (repeatable; "
                        "a per-layer sweep's pick is its keep_mass_pattern in sweep.json)")
    e.add_argument("--selection", choices=SELECTIONS, default=EditStep.selection,
                   help="curvature_mass: the K-FAC staircase (default); factor_truncation: top eigenvectors of each "
                        "factor; ekfac_mass: the components of largest EK-FAC curvature (needs fit --ekfac)")
    e.add_argument("--rank-cap", type=int, default=None)
    e.add_argument("--min-expert-tokens", type=int, default=None, metavar="N",
                   help="mixture-of-experts models: leave an expert unedited when its factors saw fewer than N tokens "
                        "(default: max(d_out, d_in) of its matrix; an expert no token reached is never edited)")
    e.add_argument("--compute-dtype", default=None, metavar="DTYPE",
                   help="dtype of the unmerged adapter's matmuls (default: the base layer's; float32 is exact)")
    e.add_argument("--protect", action="append", default=[], metavar="NAME=RHO",
                   help="also keep what the factors of domain NAME (fit --name NAME) keep at ρ=RHO; repeatable")
    e.add_argument("--output-dir", required=True)
    e.set_defaults(func=cmd_edit)


def _add_evaluate(sub: Any) -> None:
    """`hf-curvedit evaluate`."""
    v = sub.add_parser("evaluate", help="measure an edit: recitation, perplexity, nDCG, stress test (base vs edited)",
                       description="Load the base model with the adapter and measure it with the adapter on and off.")
    v.add_argument("--model", help="base model (default: embedded default)")
    v.add_argument("--gguf-file", metavar="NAME", help=GGUF_HELP)
    v.add_argument("--adapter", required=True, help="adapter folder written by `hf-curvedit edit`")
    v.add_argument("--recitation", action="append", default=[], metavar="NAME=PATH",
                   help="a set to recite: a save_to_disk folder with prefix_ids/suffix_ids, or a .txt/.jsonl file "
                        "of texts whose last --suffix-tokens tokens are the suffix (repeatable)")
    v.add_argument("--suffix-tokens", type=int, default=EvaluateStep.suffix_tokens)
    v.add_argument("--heldout", help="held-out text for perplexity/nDCG (default: held-out stdlib docs)")
    v.add_argument("--text-column", default=EvaluateStep.text_column)
    v.add_argument("--output", help="write the EditReport JSON here")
    v.add_argument("--batch-size", type=int, default=EvaluateStep.batch_size)
    v.add_argument("--tasks", help="lm-evaluation-harness tasks to run on base and edited model, comma-separated "
                                   "(e.g. triviaqa,gsm8k,boolq; the default model's: curvedit_skills); needs "
                                   "pip install 'hf-curvedit[lm-eval]'")
    v.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of extra lm-eval task YAMLs, e.g. local tasks for offline use (repeatable)")
    v.add_argument("--limit", type=float, default=None, help="lm-eval: items per task (a fraction if < 1)")
    v.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default: the task's)")
    v.add_argument("--exposure-tasks", type=_names, default=(), metavar="TASKS",
                   help="lm-eval tasks (comma-separated) whose exposure to the edit is measured without running them; "
                        "the --tasks get theirs too. The card shows both next to the capability table")
    v.add_argument("--stress-steps", type=int, nargs="+", default=EvaluateStep.stress_steps,
                   help="stress test: left-extend / right-shorten the prompt by these many tokens")
    v.add_argument("--no-stress", action="store_true", help="skip the stress test (the slowest part)")
    v.set_defaults(func=cmd_evaluate)


def _add_sweep(sub: Any) -> None:
    """`hf-curvedit sweep`."""
    w = sub.add_parser("sweep", help="try several ρ and layer choices, print the trade-off, pick an edit",
                       description="Build, measure and drop one edit per ρ x layer choice (plus an SVD-truncation "
                                   "baseline); pick the lowest Strict recitation within the perplexity budget. "
                                   "Writes sweep.json, sweep.md and sweep.png. Exit code 1 if nothing fits, with "
                                   "the closest candidate and the settings to try next.")
    w.add_argument("--model", help="the model the factors were fitted on (default: embedded default)")
    w.add_argument("--gguf-file", metavar="NAME", help=GGUF_HELP)
    w.add_argument("--factors", required=True, help="folder written by `hf-curvedit fit`")
    w.add_argument("--recitation", action="append", default=[], metavar="NAME=PATH",
                   help="memorized set(s) to recite (default: the embedded default's memorized set)")
    w.add_argument("--suffix-tokens", type=int, default=SweepStep.suffix_tokens)
    w.add_argument("--heldout", help="held-out text for perplexity (default: held-out stdlib docs)")
    w.add_argument("--text-column", default=SweepStep.text_column)
    w.add_argument("--keep-mass", type=float, nargs="+", default=SweepStep.keep_mass,
                   help="a grid of ρ for every layer choice (default: a ρ scale fitted to the model: each layer "
                        "choice walks removed masses 1-ρ of 0.1, 0.05, 0.02, ... until it brackets --ppl-budget)")
    w.add_argument("--layers", nargs="*", default=[], metavar="I,J",
                   help="layer choices, e.g. --layers 2,3 1,2 (default: windows of 2-3 blocks across the depth, "
                        "gate/up and gate/up+down)")
    w.add_argument("--modules", help="only these module leaves with --layers, e.g. gate,up")
    w.add_argument("--layer-choice", action="append", default=[], metavar="LABEL=REGEX")
    w.add_argument("--ppl-budget", type=float, default=SweepStep.ppl_budget,
                   help="largest perplexity increase (0.15 = +15%%)")
    w.add_argument("--svd-ranks", type=int, nargs="*", default=SweepStep.svd_ranks)
    w.add_argument("--protect", action="append", default=[], metavar="NAME=RHO",
                   help="protect domain NAME (fit --name NAME) at ρ=RHO in every candidate; repeatable")
    w.add_argument("--baselines", nargs="*", choices=["svd", "balanced_subnet"], default=SweepStep.baselines,
                   help="methods measured next to the edit at matched perplexity (default: svd)")
    w.add_argument("--subnet-ratios", type=float, nargs="+", default=SweepStep.subnet_ratios,
                   help="BalancedSubnet: fractions of MLP weights zeroed, one mask each")
    w.add_argument("--subnet-epochs", type=int, default=SweepStep.subnet_epochs)
    w.add_argument("--subnet-lr", type=float, default=SweepStep.subnet_lr)
    w.add_argument("--subnet-lam", type=float, default=SweepStep.subnet_lam, help="BalancedSubnet: weight λ of the "
                   "clean loss")
    w.add_argument("--clean", help="text BalancedSubnet keeps (default: the standard-library docs)")
    w.add_argument("--tasks", help="lm-eval tasks scored on the base, the pick and each matched baseline")
    w.add_argument("--include-path", action="append", default=[], metavar="DIR")
    w.add_argument("--limit", type=float, default=None, help="lm-eval: items per task (a fraction if < 1)")
    w.add_argument("--batch-size", type=int, default=SweepStep.batch_size)
    w.add_argument("--selection", choices=SELECTIONS, default=SweepStep.selection,
                   help="which components every candidate keeps (ekfac_mass: needs fit --ekfac)")
    w.add_argument("--exposure-tasks", type=_names, default=(), metavar="TASKS",
                   help="lm-eval tasks (comma-separated; default: --tasks) whose exposure every candidate gets: its "
                        "predicted capability cost, from forward passes only")
    w.add_argument("--pick-by", choices=["recitation", "predicted_cost"], default=SweepStep.pick_by,
                   help="recitation: lowest Strict within the budget (default); predicted_cost: the lowest predicted "
                        "cost among those within --recitation-tolerance of the lowest Strict (lm-eval then scores the "
                        "pick alone, with --tasks)")
    w.add_argument("--recitation-tolerance", type=float, default=SweepStep.recitation_tolerance,
                   help="--pick-by predicted_cost: Strict recitation (a fraction) it may give up for a lower cost")
    w.add_argument("--allocation", choices=ALLOCATIONS, default=SweepStep.allocation,
                   help="uniform: one ρ per candidate; per_layer (default): then search a ρ for each layer of any "
                        "layer choice (a layer may stay unedited), from several starts (experts, routed and shared, "
                        "go with their layer); per_projection: for each layer's gate/up and down separately. Every "
                        "candidate lands in sweep.json")
    w.add_argument("--allocation-steps", type=float, nargs="+", default=SweepStep.allocation_steps, metavar="FACTOR",
                   help="the search's moves: factors on a layer's removed mass 1-ρ, coarse to fine (default: 2 1.41)")
    w.add_argument("--allocation-max-candidates", type=int, default=SweepStep.allocation_max_candidates, metavar="N",
                   help="the most candidates the allocation search measures (default: %(default)s)")
    w.add_argument("--allocation-max-seconds", type=float, default=None, metavar="S",
                   help="the most seconds the allocation search may take (default: no limit)")
    w.add_argument("--output-dir", required=True)
    w.set_defaults(func=cmd_sweep)


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _add_exposure(sub: Any) -> None:
    """`hf-curvedit exposure`."""
    x = sub.add_parser("exposure", help="predict which tasks an edit will hurt, before building it",
                       description="For each task and ρ, the share of the task's signal (prompt + gold answer) that "
                                   "the edit would remove from the edited layers' outputs: forward passes of the base "
                                   "model over the task's texts, with the eigenbases of `hf-curvedit fit`; nothing is "
                                   "generated and no lm-eval run is needed. Prints one row per ρ, cheapest first.")
    x.add_argument("--model", help="the model the factors were fitted on (default: embedded default)")
    x.add_argument("--gguf-file", metavar="NAME", help=GGUF_HELP)
    x.add_argument("--factors", required=True, help="folder written by `hf-curvedit fit`")
    x.add_argument("--keep-mass", type=float, nargs="+", default=ExposureStep.keep_mass,
                   help=f"ρ values in (0, 1] (default: {DEFAULT_KEEP_MASS:g})")
    x.add_argument("--target-modules", type=parse_target_modules,
                   help="regex, or comma-separated names (default: the MLP projections)")
    x.add_argument("--selection", choices=SELECTIONS, default=ExposureStep.selection)
    x.add_argument("--protect", action="append", default=[], metavar="NAME=RHO",
                   help="protect domain NAME (fit --name NAME) at ρ=RHO, as for `edit`; repeatable")
    x.add_argument("--tasks", type=_names, default=(), metavar="TASKS",
                   help="lm-eval tasks, comma-separated (the default model's: curvedit_skills); their items' prompt + "
                        "gold answer are the texts. Needs pip install 'hf-curvedit[lm-eval]'")
    x.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of extra lm-eval task YAMLs (repeatable)")
    x.add_argument("--limit", type=float, default=None, help="lm-eval: items per task (a fraction if < 1)")
    x.add_argument("--texts", action="append", default=[], metavar="NAME=PATH",
                   help="a task given as a text, JSONL, CSV or parquet file (one text per row; repeatable)")
    x.add_argument("--text-column", default=ExposureStep.text_column)
    x.add_argument("--recitation", action="append", default=[], metavar="NAME=PATH",
                   help="a memorized set (prefix + suffix), as for `evaluate`; repeatable")
    x.add_argument("--suffix-tokens", type=int, default=ExposureStep.suffix_tokens)
    x.add_argument("--memorized", action="store_true", help="also the embedded default's memorized set")
    x.add_argument("--batch-size", type=int, default=ExposureStep.batch_size)
    x.add_argument("--output", help="write the ExposureReport JSON here")
    x.set_defaults(func=cmd_exposure)


def _add_publish(sub: Any) -> None:
    """`hf-curvedit publish`."""
    u = sub.add_parser("publish", help="write the model card and push an edit to the Hub",
                       description="Write a folder with the weights, model card, plots and evaluation, then create "
                                   "the repo and upload it (huggingface_hub). --dry-run only writes the folder.")
    u.add_argument("--adapter", required=True, help="adapter folder")
    u.add_argument("--repo-id", required=True)
    u.add_argument("--out-dir", required=True, help="local folder to write (must be new or empty)")
    u.add_argument("--report", help="EditReport JSON from `hf-curvedit evaluate`")
    u.add_argument("--eigen", help=f"the eigenbases, for the spectrum plots: their folder or its "
                                   f"{EIGEN_STEM}.safetensors (or {EIGEN_STEM}{INDEX_SUFFIX})")
    u.add_argument("--comparison", help="sweep.json of a sweep with --baselines whose pick is this adapter: the card "
                   "shows it next to each baseline at matched perplexity")
    u.add_argument("--merged", action="store_true", help="publish merged weights instead of the adapter")
    u.add_argument("--gguf-source", metavar="FILE",
                   help="the GGUF file the base was read from: the folder also carries the edit as a GGUF file (the "
                        "source's metadata and tokenizer, the edited tensors replaced) for llama.cpp, Ollama and LM "
                        "Studio")
    u.add_argument("--gguf-type", choices=["Q4_0", "Q4_1", "Q8_0", "F16", "F32"],
                   help="type of the edited tensors in that file (default: their type in --gguf-source)")
    u.add_argument("--private", action="store_true")
    u.add_argument("--revision")
    u.add_argument("--create-pr", action="store_true")
    u.add_argument("--token", help="Hub token (default: the stored login / HF_TOKEN)")
    u.add_argument("--overwrite", action="store_true", help="replace a folder an earlier publish wrote")
    u.add_argument("--dry-run", action="store_true")
    u.add_argument("--space", action="store_true",
                   help="also write a gradio Space showing base vs edited (in OUT_DIR-space) and push it")
    u.add_argument("--space-id", help="the Space repo (default: REPO_ID-demo)")
    u.set_defaults(func=cmd_publish)


def _add_demo(sub: Any) -> None:
    """`hf-curvedit demo`."""
    d = sub.add_parser("demo", help="compare base and edited continuations side by side in the browser",
                       description="Serve a gradio app on 127.0.0.1: a prompt's continuation by the base model "
                                   "(adapter disabled) and by the edit, side by side, from one loaded model, with "
                                   "the longest run shared with a reference highlighted, and a recitation table. "
                                   "Without --adapter, an edit of the embedded default is built first (layers 1-3 "
                                   "gate/up/down, rho 0.8, factors from --fit-tokens tokens of stdlib docs; a few "
                                   "minutes on 2 cores) and kept in --work-dir for the next start. Needs gradio: "
                                   "pip install 'hf-curvedit[demo]'.")
    d.add_argument("--adapter", help="adapter folder or Hub repo id (default: build an edit of the embedded default)")
    d.add_argument("--base", dest="model", help="base model id or folder (default: the embedded default)")
    d.add_argument("--gguf-file", metavar="NAME", help=GGUF_HELP)
    d.add_argument("--recitation", action="append", default=[], metavar="NAME=PATH",
                   help="examples to pick and recite, as for `evaluate` (default: the embedded memorized set)")
    d.add_argument("--suffix-tokens", type=int, default=EvaluateStep.suffix_tokens)
    d.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    d.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    d.add_argument("--work-dir", default="runs/demo", help="where the default edit is built and kept")
    d.add_argument("--fit-tokens", type=int, default=50_000, help="factor tokens for the default edit")
    d.set_defaults(func=cmd_demo)


def _add_run(sub: Any) -> None:
    """`hf-curvedit run`."""
    r = sub.add_parser("run", help="do every step from one YAML file, resuming finished steps",
                       description="Run the steps named in CONFIG.yaml in the order fit, sweep, edit, evaluate, "
                                   "publish. Each step takes the same options as its subcommand (YAML keys with "
                                   "underscores). Finished steps are recorded in OUTPUT_DIR/steps and skipped on "
                                   "the next run; the edit step uses the sweep's pick unless it sets keep_mass.")
    r.add_argument("config", help="YAML file, e.g. examples/default.yaml")
    r.add_argument("--gguf-file", metavar="NAME", help=GGUF_HELP + " (the YAML's gguf_file)")
    r.add_argument("--force", action="store_true", help="redo finished steps")
    r.set_defaults(func=cmd_run)


def _add_plan(sub: Any) -> None:
    """`hf-curvedit plan`."""
    n = sub.add_parser("plan", help="plan a factor fit: memory, data passes, eigendecomposition, adapter sizes",
                       description="Build the model from its config with fake tensors (no weights are read or "
                                   "allocated) and print what fit_factors would allocate: per-module factor sizes, "
                                   "accumulator memory, the partitions under --max-factor-memory-gb (one data pass "
                                   "each), the fp64 eigendecomposition memory and the adapter size bounds.")
    n.add_argument("--model", help="model id or local folder (only its config is read; default: the embedded model)")
    n.add_argument("--gguf-file", metavar="NAME", help=GGUF_HELP)
    n.add_argument("--target-modules", help="regex, or comma-separated names/globs (default: the MLP projections)")
    n.add_argument("--accumulate-dtype", choices=["float32", "float64"], default="float32")
    n.add_argument("--max-factor-memory-gb", type=float, default=None)
    n.add_argument("--num-processes", type=int, default=1,
                   help="processes of a torchrun / accelerate launch that share the data passes (default: 1)")
    n.add_argument("--seq-len", type=int, default=512, help="tokens per block of the fit (the batch's activations)")
    n.add_argument("--batch-size", type=int, default=8, help="blocks per batch of the fit")
    n.add_argument("--dtype", default=None, help="the dtype the model runs in (float32, bfloat16, ...)")
    n.add_argument("--json", help="also write the plan as JSON to this file")
    n.set_defaults(func=cmd_plan)
