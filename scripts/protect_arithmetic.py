#!/usr/bin/env python
"""Protected domains on the embedded default model: how much arithmetic does protecting it keep, and at what cost?

Steps, each through the product's own pipeline functions (the same code as ``hf-curvedit fit / edit / evaluate``):

1. Write ``RUN_DIR/arithmetic.jsonl``: ``--n-lines`` two-digit sums and differences (``37+48=85``) in the format the
   default model learned them, drawn with a fixed seed and never one of the 500 held-out problems that the
   ``curvedit_arithmetic`` lm-eval task scores.
2. Fit the general factors (standard-library docs, 200k tokens, as the main job does) into ``RUN_DIR/factors`` and the
   arithmetic domain's factors (as many tokens, from step 1's file) into ``RUN_DIR/factors/domains/arithmetic``
   (what ``hf-curvedit fit --name arithmetic`` writes). Both are cached and reused.
3. Build the main job's edit (layers 2-3, gate + up + down, ρ = 0.8) without protection and with arithmetic protected
   at each ``--protect-rhos``, and measure each with ``evaluate_edit``: recitation of the memorized set (Strict,
   canaries), held-out perplexity and the capability tasks (arithmetic, closed-book facts, logic, open-book reading).
4. Print a Markdown table and write ``RUN_DIR/results.json`` and ``RUN_DIR/table.md``.

Usage::

    python scripts/protect_arithmetic.py          # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from hf_curvedit.default import LM_EVAL_TASKS_DIR
from hf_curvedit.pipeline import EditStep, EvaluateStep, FitStep
from hf_curvedit.pipeline.settings import CapabilitySettings
from hf_curvedit.pipeline.steps import run_edit, run_evaluate, run_fit
from hf_curvedit.utils import atomic_write_text

TARGETS = r"model\.layers\.[23]\.mlp\.(gate|up|down)_proj"
TASKS = ("curvedit_arithmetic", "curvedit_closedbook", "curvedit_logic", "curvedit_openbook")


def arithmetic_lines(n: int, seed: int) -> list[str]:
    """``n`` problems from the default model's arithmetic distribution, none of them a held-out test problem."""
    held_out = {json.loads(line)["question"]
                for line in (LM_EVAL_TASKS_DIR / "curvedit_arithmetic" / "test.jsonl").read_text().splitlines()}
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < n:
        a, b, op = rng.randrange(10, 100), rng.randrange(10, 100), rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        if f"{a}{op}{b}=" not in held_out:
            lines.append(f"{a}{op}{b}={a + b if op == '+' else a - b}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/protect_arithmetic"))
    ap.add_argument("--keep-mass", type=float, default=0.8)
    ap.add_argument("--protect-rhos", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    ap.add_argument("--n-lines", type=int, default=30_000)
    ap.add_argument("--tokens", type=int, default=200_000, help="factor tokens, general and arithmetic alike")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args(argv)
    run = args.run_dir
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    data = run / "arithmetic.jsonl"
    if not data.exists():
        atomic_write_text(data, "".join(json.dumps({"text": t}) + "\n" for t in arithmetic_lines(args.n_lines,
                                                                                                     args.seed)))
    factors = run / "factors"
    run_fit(None, FitStep(max_tokens=args.tokens, domains={"arithmetic": str(data)}), factors)
    print(f"[protect] factors ready ({time.time() - t0:.0f}s)", flush=True)

    evaluate = EvaluateStep(no_stress=True, capabilities=CapabilitySettings(tasks=TASKS))
    rows = []
    for rho_p in [None, *args.protect_rhos]:
        label = "none" if rho_p is None else f"arithmetic ρ={rho_p:g}"
        edit_dir = run / "edits" / ("plain" if rho_p is None else f"protect{rho_p:g}")
        step = EditStep(keep_mass=(args.keep_mass,), target_modules=TARGETS,
                        protect={} if rho_p is None else {"arithmetic": rho_p})
        adapter = run_edit(None, factors, step, edit_dir).adapters[args.keep_mass]
        report = run_evaluate(None, adapter, evaluate, edit_dir / "report.json")
        rec = {name: report.recitation[name] for name in ("passages", "canaries")}
        ppl = report.perplexity["heldout"]
        row = {"protect": label, "strict_passages": rec["passages"].edited.strict,
               "strict_canaries": rec["canaries"].edited.strict, "perplexity": ppl.edited.perplexity,
               "perplexity_change": ppl.edited.perplexity / ppl.base.perplexity - 1,
               "capabilities": {t: report.capabilities[t].edited for t in TASKS},
               "base": {"strict_passages": rec["passages"].base.strict, "strict_canaries": rec["canaries"].base.strict,
                        "perplexity": ppl.base.perplexity,
                        "capabilities": {t: report.capabilities[t].base for t in TASKS}}}
        rows.append(row)
        print(f"[protect] {label}: passages Strict {row['strict_passages']:.1%}, "
              f"canaries {row['strict_canaries']:.1%}, PPL {row['perplexity']:.3f} ({row['perplexity_change']:+.1%}), "
              + ", ".join(f"{t.removeprefix('curvedit_')} {v:.3f}" for t, v in row["capabilities"].items())
              + f" ({time.time() - t0:.0f}s)", flush=True)

    base = rows[0]["base"]
    head = "| protection | passages Strict | canaries | perplexity | " + " | ".join(
        t.removeprefix("curvedit_") for t in TASKS) + " |"
    lines = [head, "|" + "---|" * (4 + len(TASKS)),
             f"| base model (no edit) | {base['strict_passages']:.1%} | {base['strict_canaries']:.1%} | "
             f"{base['perplexity']:.3f} | " + " | ".join(f"{base['capabilities'][t]:.3f}" for t in TASKS) + " |"]
    for r in rows:
        lines.append(f"| edit, protect {r['protect']} | {r['strict_passages']:.1%} | {r['strict_canaries']:.1%} | "
                     f"{r['perplexity']:.3f} ({r['perplexity_change']:+.1%}) | "
                     + " | ".join(f"{r['capabilities'][t]:.3f}" for t in TASKS) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(run / "table.md", table + "\n")
    atomic_write_text(run / "results.json", json.dumps({"keep_mass": args.keep_mass, "targets": TARGETS, "rows": rows,
                                                        "seconds": round(time.time() - t0)}, indent=2))
    print(f"[protect] done in {time.time() - t0:.0f}s: {run / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
