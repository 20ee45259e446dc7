#!/usr/bin/env python
"""Memorization-suppression sweep on the embedded default model (issue 6's measured result).

Steps (each is timed and printed):

1. Load the default model (``hf_curvedit/assets/default_model``), its memorized set
   (``memorized_set.jsonl``: canaries + repeated passages) and its held-out text (``heldout.jsonl``).
2. Fit K-FAC factors (sampled labels, the true Fisher) on **general text only** -- the ``"train"``
   split of the standard-library docs, never the memorized set -- and eigendecompose them. Both are
   cached in ``RUN_DIR/factors`` and reused on the next run. (When memorized text dominates the factor
   data, the trade-off gets worse: docs/method.md §6.)
3. Measure the base model: recitation of the memorized set and held-out perplexity.
4. For every layer choice x module choice x ρ: build the curvature edit, measure it, drop it.
5. SVD-truncation baseline: replace the same modules' ``W`` by its best rank-``k`` approximation
   (``torch.linalg.svd``) for a grid of ``k``; report the ``k`` whose perplexity increase is closest
   to the chosen edit's.
6. Pick the strongest suppression (lowest Strict on the memorized set, then lowest perplexity) whose
   held-out perplexity increase is within ``--ppl-budget`` (default 15%), print the table, and write
   ``RUN_DIR/results.json`` and ``RUN_DIR/table.md``.

Recitation: every memorized item is ``prefix + suffix``; the model greedily continues
``<eos> + prefix`` (every training document started after ``<eos>``) for ``len(suffix)`` tokens.
For a passage the suffix is its last 32 bytes, for a canary the secret plus the final period.
Strict = exact match, Loose = normalized Levenshtein similarity ≥ 0.75, AvgLev = mean normalized
token-level edit distance (higher = less memorization). "Canaries" is the fraction of canaries whose
secret is recited exactly.

Usage::

    python scripts/memorization_sweep.py                      # ~4 min on 2 CPU cores
    python scripts/memorization_sweep.py --rhos 0.6 --targets 2,3:gate,up   # one edit
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors
from hf_curvedit.default import (
    DEFAULT_MODEL_DIR,
    default_text_dataset,
    load_default_model,
    load_heldout_text,
    load_memorized_set,
)
from hf_curvedit.evaluation import evaluate_recitation, perplexity
from hf_curvedit.sweep import svd_truncation
from hf_curvedit.targets import resolve_target_modules


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_items(model_dir: Path) -> tuple[list[dict], list[str]]:
    return load_memorized_set(model_dir), load_heldout_text(model_dir)


class Evaluator:
    """Recitation of the memorized set (per kind) and held-out perplexity of one model."""

    def __init__(self, items: list[dict], heldout: list[str], tok, block_size: int, batch_size: int):
        self.items, self.heldout, self.tok = items, heldout, tok
        self.block_size, self.batch_size = block_size, batch_size
        ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.prefixes = [[tok.eos_token_id] + ids(it["prefix"]) for it in items]
        self.suffixes = [ids(it["suffix"]) for it in items]
        self.kinds = [it["kind"] for it in items]

    def __call__(self, model) -> dict:
        t = time.time()
        res = evaluate_recitation(model, self.prefixes, self.suffixes, batch_size=self.batch_size,
                                  pad_token_id=self.tok.pad_token_id, show_progress=False)
        ex = res.examples
        out: dict = {}
        for kind in ("all", "passage", "canary"):
            sel = [e for e, k in zip(ex, self.kinds) if kind == "all" or k == kind]
            out[kind] = {"strict": sum(e.strict() for e in sel) / len(sel),
                         "loose": sum(e.loose() for e in sel) / len(sel),
                         "avg_lev": sum(e.normalized for e in sel) / len(sel), "n": len(sel)}
        ppl = perplexity(model, self.heldout, tokenizer=self.tok, block_size=self.block_size,
                         batch_size=self.batch_size, show_progress=False)
        out["ppl"] = ppl.perplexity
        out["ppl_tokens"] = ppl.n_tokens
        out["eval_s"] = round(time.time() - t, 1)
        return out


def module_regex(layers: list[int], modules: list[str]) -> str:
    return rf".*layers\.({'|'.join(map(str, layers))})\.mlp\.({'|'.join(modules)})_proj"


def fmt_row(name: str, r: dict, base_ppl: float) -> str:
    a, p, c = r["all"], r["passage"], r["canary"]
    d = (r["ppl"] / base_ppl - 1) * 100
    return (f"| {name} | {a['strict']:.1%} | {a['loose']:.1%} | {a['avg_lev']:.3f} | {p['strict']:.1%} | "
            f"{c['strict']:.1%} | {r['ppl']:.3f} | {d:+.2f}% |")


HEADER = ("| model / edit | Strict (all) | Loose (all) | AvgLev (all) | Strict passages | Canaries recited | "
          "held-out PPL | ΔPPL |\n|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/memorization_sweep"))
    ap.add_argument("--factor-tokens", type=int, default=200_000, help="general-text tokens for the factors")
    ap.add_argument("--factor-label-mode", default="sampled", choices=("sampled", "empirical"))
    ap.add_argument("--rhos", default="0.5,0.6,0.65,0.7,0.75,0.8,0.85,0.9")
    ap.add_argument("--targets", default="2,3:gate,up;1,2:gate,up;1,2,3:gate,up;0,1,2,3:gate,up;"
                                          "2,3:gate,up,down;1,2,3:gate,up,down",
                    help="edit targets separated by ';', each LAYERS:MODULES (e.g. '2,3:gate,up')")
    ap.add_argument("--ppl-budget", type=float, default=0.15)
    ap.add_argument("--svd-ranks", default="8,16,24,28,32,36,40,44,48,64,96,128")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}
    t_all = time.time()
    args.run_dir.mkdir(parents=True, exist_ok=True)

    t = time.time()
    if args.model_dir.resolve() == DEFAULT_MODEL_DIR.resolve():
        base, tok = load_default_model()
    else:
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
        base = LlamaForCausalLM.from_pretrained(args.model_dir).eval()
        tok = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    items, heldout = load_items(args.model_dir)
    ev = Evaluator(items, heldout, tok, args.block_size, args.batch_size)
    timings["load"] = time.time() - t
    _log(f"model {sum(p.numel() for p in base.parameters())} params; memorized set: "
         f"{sum(k == 'passage' for k in ev.kinds)} passages + {sum(k == 'canary' for k in ev.kinds)} canaries; "
         f"held-out {len(heldout)} docs")

    t = time.time()
    fcfg = FactorConfig(seq_len=256, batch_size=8, max_tokens=args.factor_tokens, label_mode=args.factor_label_mode,
                        seed=args.seed)
    factors = fit_factors(base, default_text_dataset("train"), fcfg, args.run_dir / "factors", tokenizer=tok,
                          progress=False)
    timings["fit_factors"] = time.time() - t
    t = time.time()
    eigen = factors.eigendecompose()
    timings["eigendecompose"] = time.time() - t
    _log(f"factors on general text only ({args.factor_tokens} tokens, {args.factor_label_mode} labels): "
         f"fit {timings['fit_factors']:.0f}s (0 if cached), eigen {timings['eigendecompose']:.1f}s")

    t = time.time()
    base_res = ev(base)
    timings["base_eval"] = time.time() - t
    base_ppl = base_res["ppl"]
    _log("base: " + fmt_row("base", base_res, base_ppl))

    rhos = [float(x) for x in args.rhos.split(",")]
    targets = [([int(x) for x in spec.split(":")[0].split(",")], spec.split(":")[1].split(","))
               for spec in args.targets.split(";")]
    edits = []
    t = time.time()
    for layers, mods in targets:
        regex = module_regex(layers, mods)
        for rho in rhos:
            name = f"L{''.join(map(str, layers))} {'+'.join(mods)} ρ={rho}"
            te = time.time()
            peft_model = build_curvature_edit(copy.deepcopy(base), eigen,
                                              CurvatureEditConfig(keep_mass=rho, target_modules=regex))
            res = ev(peft_model)
            res.update(name=name, layers=layers, modules=mods, rho=rho, regex=regex, seconds=round(time.time() - te, 1))
            edits.append(res)
            del peft_model
            _log(fmt_row(name, res, base_ppl) + f" ({res['seconds']}s)")
    timings["edit_sweep"] = time.time() - t

    def dppl(r: dict) -> float:
        return r["ppl"] / base_ppl - 1

    def pick(budget: float) -> dict | None:
        ok = [r for r in edits if dppl(r) <= budget]
        return min(ok, key=lambda r: (r["all"]["strict"], r["ppl"])) if ok else None

    chosen = pick(args.ppl_budget)
    stretch = pick(0.10)

    # The SVD baseline is matched to the chosen edit; without one, to the mildest edit (lowest ΔPPL).
    ref = chosen if chosen is not None else (min(edits, key=dppl) if edits else None)
    svd_rows = []
    svd_match = None
    if ref is not None:
        t = time.time()
        for k in [int(x) for x in args.svd_ranks.split(",")]:
            names = resolve_target_modules(base, ref["regex"])
            with svd_truncation(base, names, k):
                res = ev(base)
            n_mod = len(names)
            res.update(name=f"SVD rank {k} ({n_mod} modules: {ref['name'].split(' ρ')[0]})", k=k)
            svd_rows.append(res)
            _log(fmt_row(res["name"], res, base_ppl))
        timings["svd_baseline"] = time.time() - t
        svd_match = min(svd_rows, key=lambda r: abs(dppl(r) - dppl(ref)))
    timings["total"] = time.time() - t_all

    lines = ["## Memorization sweep on the embedded default model", "",
             f"Factors: general text only (stdlib docs train split, {args.factor_tokens} tokens, "
             f"{args.factor_label_mode} labels). Budget: ΔPPL ≤ {args.ppl_budget:.0%}.", "", HEADER,
             fmt_row("base", base_res, base_ppl)]
    lines += [fmt_row(r["name"], r, base_ppl) for r in edits]
    lines += ["", f"SVD-truncation baseline (same modules as {ref['name'] if ref else '-'}):", "", HEADER]
    lines += [fmt_row(r["name"], r, base_ppl) for r in svd_rows]
    lines += ["", "Summary:", "", HEADER, fmt_row("base", base_res, base_ppl)]
    if chosen is not None:
        lines.append(fmt_row(f"**chosen (≤{args.ppl_budget:.0%})**: {chosen['name']}", chosen, base_ppl))
    else:
        lines.append(f"| no edit within ΔPPL ≤ {args.ppl_budget:.0%} | | | | | | | |")
    if stretch is not None:
        lines.append(fmt_row(f"best within ≤10%: {stretch['name']}", stretch, base_ppl))
    if svd_match is not None:
        lines.append(fmt_row(f"SVD at matched PPL (vs {ref['name']}): {svd_match['name']}", svd_match, base_ppl))
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    (args.run_dir / "table.md").write_text(table + "\n")
    (args.run_dir / "results.json").write_text(json.dumps(
        {"base": base_res, "edits": edits, "svd": svd_rows, "chosen": chosen, "stretch": stretch,
         "svd_matched": svd_match, "svd_reference": ref and ref["name"], "timings": timings,
         "args": {k: str(v) for k, v in vars(args).items()}},
        indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
