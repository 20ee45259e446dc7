#!/usr/bin/env python
"""The sweep against itself: a grid alone, a grid and the search, the ρ scale and the search, and everything at its
defaults, on one model and its factors; optionally the previous release's search from a checkout of it.

Each variant is one ``hf-curvedit sweep`` (no baselines) into ``OUT/<variant>``; the script prints one row per variant:
its candidates, its seconds, its pick, the pick's Strict recitation of the primary set and its perplexity change.

    python scripts/sweep_comparison.py --factors runs/default/factors --out runs/sweep_comparison \\
        --keep-mass 0.7 0.75 0.8 0.85 --layers 2,3 1,2,3 --modules gate,up,down --ppl-budget 0.15
    # the previous release's grid search, from a checkout of it (git worktree add ../previous <commit>):
    python scripts/sweep_comparison.py ... --previous ../previous

Arguments after ``--`` go to every ``hf-curvedit sweep`` (``--model``, ``--recitation``, ``--heldout``, ...).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def sweep(cwd: Path | None, args: list[str], out: Path) -> float:
    """Run ``hf-curvedit sweep`` (from the checkout ``cwd``, else this one) into ``out``; its seconds."""
    if (out / "sweep.json").exists():
        return json.loads((out / "seconds.json").read_text())["seconds"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hf_curvedit.cli", "sweep", *args, "--output-dir", str(out.resolve())],
                   cwd=cwd, check=False)
    seconds = time.perf_counter() - started
    (out / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def row(label: str, out: Path, seconds: float) -> str:
    data = json.loads((out / "sweep.json").read_text())
    points = [p for p in data["points"] if p["method"] == "curvedit"]
    chosen, primary = data.get("chosen"), data["primary_set"]
    if chosen is None:
        return f"| {label} | {len(points)} | {seconds:.0f} s | nothing within the budget | – | – |"
    knob = (", ".join(f"{g}: {r:g}" for g, r in chosen["allocation"].items()) if chosen.get("allocation")
            else f"ρ={chosen['keep_mass']:g}")
    return (f"| {label} | {len(points)} | {seconds:.0f} s | {chosen['layers']} {knob} | "
            f"{100 * chosen['recitation'][primary]['strict']:.1f}% | {100 * chosen['perplexity_change']:+.1f}% |")


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep-mass", nargs="+", default=[])
    ap.add_argument("--layers", nargs="+", default=[])
    ap.add_argument("--modules", default=None)
    ap.add_argument("--layer-choice", nargs="+", default=[], metavar="LABEL=REGEX",
                    help="layer choices by regex (a mixture-of-experts model's experts), with or instead of --layers")
    ap.add_argument("--ppl-budget", default="0.15")
    ap.add_argument("--previous", help="a checkout of the previous release: its grid and per-layer search too")
    args = ap.parse_args(argv)
    out = Path(args.out)
    common = ["--factors", str(Path(args.factors).resolve()), "--ppl-budget", args.ppl_budget, "--baselines", *extra]
    layers = [*(["--layers", *args.layers] if args.layers else []),
              *(["--modules", args.modules] if args.modules else []),
              *[a for choice in args.layer_choice for a in ("--layer-choice", choice)]]
    grid = [*(["--keep-mass", *args.keep_mass] if args.keep_mass else []), *layers]
    variants = []
    if args.previous:
        variants += [("previous release: grid", Path(args.previous), [*common, *grid, "--allocation", "uniform"]),
                     ("previous release: grid + per-layer search", Path(args.previous),
                      [*common, *grid, "--allocation", "per_layer"])]
    if args.keep_mass:
        variants += [("grid", None, [*common, *grid, "--allocation", "uniform"]),
                     ("grid + search", None, [*common, *grid])]
    if args.layers or args.layer_choice:
        variants.append(("ρ scale + search (these layer choices)", None, [*common, *layers]))
    variants.append(("defaults: windows, ρ scale, search", None, common))
    rows = ["| sweep | candidates | time | pick | Strict | ΔPPL |", "|---|---|---|---|---|---|"]
    for i, (label, cwd, sweep_args) in enumerate(variants):
        target = out / f"{i}"
        target.mkdir(parents=True, exist_ok=True)
        seconds = sweep(cwd, sweep_args, target)
        rows.append(row(label, target, seconds))
        print(rows[-1], flush=True)
    print("\n".join(rows))
    (out / "table.md").write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
