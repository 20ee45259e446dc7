#!/usr/bin/env python
"""K-FAC against EK-FAC selection on the embedded default: the memorization / perplexity frontier and the capabilities
at matched perplexity.

Steps:

1. Fit K-FAC factors on the standard-library docs as the main job does (200k tokens, sampled labels), then the EK-FAC
   pass over the same blocks (`fit_eigen_correction`); both cached in ``RUN_DIR/factors``.
2. For each selection (``curvature_mass``, ``ekfac_mass``) × layer choice (2,3 and 1,2,3; gate, up, down) × ρ: build
   the edit and measure Strict recitation of the passages and the canaries, and held-out perplexity
   (`sweep_edits`, one point each).
3. Matched perplexity: per layer choice, each selection's Strict and canaries interpolated (linearly in perplexity
   change, between neighbouring ρ) at the perplexity levels both frontiers reach.
4. Capabilities: for each K-FAC point within +20% perplexity, the EK-FAC point of the same layer choice closest in
   perplexity; the four skills of ``curvedit_skills`` (lm-eval) on both, and on the base.

Writes ``RUN_DIR/frontier.json``, prints the tables, and draws ``docs/images/ekfac_frontier.png``.

Usage::

    python scripts/ekfac_frontier.py            # about 9 min on 2 idle CPU cores (the two passes are cached)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hf_curvedit import FactorConfig, fit_eigen_correction, fit_factors, load_factors
from hf_curvedit.default import default_text_dataset, load_default_model
from hf_curvedit.evaluation import TextSet
from hf_curvedit.evaluation.capabilities import CapabilityConfig, capability_scores
from hf_curvedit.pipeline.inputs import default_recitation_sets, heldout_texts
from hf_curvedit.sweep import SweepConfig, sweep_edits
from hf_curvedit.targets import layer_choices

SELECTIONS = ("curvature_mass", "ekfac_mass")
LEVELS = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def interpolate(points: list[dict], level: float, key: str) -> float | None:
    """``key`` at perplexity change ``level``, linear between the two grid points around it (None outside)."""
    pts = sorted(points, key=lambda p: p["ppl_change"])
    for a, b in zip(pts, pts[1:]):
        if a["ppl_change"] <= level <= b["ppl_change"]:
            if b["ppl_change"] == a["ppl_change"]:
                return a[key]
            t = (level - a["ppl_change"]) / (b["ppl_change"] - a["ppl_change"])
            return a[key] + t * (b[key] - a[key])
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/ekfac_frontier")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    p.add_argument("--layers", nargs="+", default=["2,3", "1,2,3"])
    p.add_argument("--no-capabilities", action="store_true")
    p.add_argument("--plot", default="docs/images/ekfac_frontier.png")
    args = p.parse_args()
    run = Path(args.run_dir)
    t0 = time.time()

    model, tok = load_default_model()
    data = default_text_dataset("train")
    cfg = FactorConfig(seq_len=256, batch_size=8, max_tokens=args.tokens, label_mode="sampled")
    _log("K-FAC factors")
    factors = fit_factors(model, data, cfg, run / "factors", tokenizer=tok)
    del factors
    _log("EK-FAC pass")
    fit_eigen_correction(model, data, run / "factors", tokenizer=tok)
    eigen = load_factors(run / "factors", model).eigendecompose()
    sets = default_recitation_sets(tok)
    heldout = TextSet.from_texts(heldout_texts(default_model=True), tok)
    choices = layer_choices(list(eigen), args.layers, "gate,up,down")

    points: list[dict] = []
    base = None
    for sel in SELECTIONS:
        _log(f"sweep, selection={sel}")
        result = sweep_edits(model, eigen, sets, heldout,
                             config=SweepConfig(keep_masses=args.rhos, layer_choices=choices, perplexity_budget=10.0,
                                                selection=sel))
        base = result.base
        for pt in result.points:
            points.append({"selection": sel, "layers": pt.layers, "target_modules": pt.target_modules,
                           "keep_mass": pt.keep_mass, "passages": pt.recitation["passages"]["strict"],
                           "canaries": pt.recitation["canaries"]["strict"], "ppl_change": pt.perplexity_change})
    assert base is not None
    base_row = {"passages": base.recitation["passages"]["strict"], "canaries": base.recitation["canaries"]["strict"],
                "perplexity": base.perplexity}

    matched = []
    for label in choices:
        for level in LEVELS:
            row: dict = {"layers": label, "ppl_change": level}
            for sel in SELECTIONS:
                pts = [q for q in points if q["selection"] == sel and q["layers"] == label]
                row[sel] = {k: interpolate(pts, level, k) for k in ("passages", "canaries")}
            if all(row[s]["passages"] is not None for s in SELECTIONS):
                matched.append(row)

    caps: list[dict] = []
    if not args.no_capabilities:
        from hf_curvedit import CurvatureEditConfig, build_curvature_edit
        from hf_curvedit.default import LM_EVAL_TASKS_DIR

        ccfg = CapabilityConfig(tasks=["curvedit_skills"], include_path=[str(LM_EVAL_TASKS_DIR)])
        _log("capabilities: base")
        base_row["capabilities"] = capability_scores(model, tok, ccfg)

        held = {"model": model}

        def scores(q: dict) -> dict:
            edited = build_curvature_edit(held["model"], eigen, CurvatureEditConfig(
                keep_mass=q["keep_mass"], target_modules=q["target_modules"], selection=q["selection"]))
            try:
                return capability_scores(edited, tok, ccfg)
            finally:
                held["model"] = edited.unload()

        for label in choices:
            kfac = [q for q in points if q["selection"] == "curvature_mass" and q["layers"] == label
                    and q["ppl_change"] <= 0.20]
            ek = [q for q in points if q["selection"] == "ekfac_mass" and q["layers"] == label]
            for q in sorted(kfac, key=lambda q: q["ppl_change"]):
                twin = min(ek, key=lambda r: abs(r["ppl_change"] - q["ppl_change"]))
                _log(f"capabilities: {label} ρ={q['keep_mass']} vs EK-FAC ρ={twin['keep_mass']}")
                caps.append({"layers": label, "kfac": {**q, "capabilities": scores(q)},
                             "ekfac": {**twin, "capabilities": scores(twin)}})

    out = {"base": base_row, "points": points, "matched": matched, "capabilities": caps, "rhos": args.rhos,
           "tokens": args.tokens, "seconds": time.time() - t0}
    run.mkdir(parents=True, exist_ok=True)
    (run / "frontier.json").write_text(json.dumps(out, indent=1))
    print_tables(out)
    plot(out, Path(args.plot))
    _log(f"done in {(time.time() - t0) / 60:.1f} min")


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def print_tables(out: dict) -> None:
    b = out["base"]
    print(f"\nbase: passages {pct(b['passages'])}, canaries {pct(b['canaries'])}, perplexity {b['perplexity']:.3f}\n")
    print("| layers | perplexity | Strict K-FAC | Strict EK-FAC | canaries K-FAC | canaries EK-FAC |")
    print("|---|---|---|---|---|---|")
    for r in out["matched"]:
        k, e = r["curvature_mass"], r["ekfac_mass"]
        print(f"| {r['layers']} | +{100 * r['ppl_change']:.0f}% | {pct(k['passages'])} | {pct(e['passages'])} | "
              f"{pct(k['canaries'])} | {pct(e['canaries'])} |")
    if out["capabilities"]:
        skills = list(out["base"]["capabilities"])
        print("\n| layers | selection | ρ | perplexity | Strict | canaries | " + " | ".join(skills) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(skills))
        print("| – | base | – | – | " + f"{pct(b['passages'])} | {pct(b['canaries'])} | "
              + " | ".join(f"{b['capabilities'][s]:.3f}" for s in skills) + " |")
        for c in out["capabilities"]:
            for name, q in (("K-FAC", c["kfac"]), ("EK-FAC", c["ekfac"])):
                print(f"| {c['layers']} | {name} | {q['keep_mass']:g} | +{100 * q['ppl_change']:.1f}% | "
                      f"{pct(q['passages'])} | {pct(q['canaries'])} | "
                      + " | ".join(f"{q['capabilities'][s]:.3f}" for s in skills) + " |")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({q["layers"] for q in out["points"]})
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for sel, color, name in (("curvature_mass", "tab:blue", "K-FAC λ·μ"), ("ekfac_mass", "tab:red", "EK-FAC Λ")):
            pts = sorted((q for q in out["points"] if q["selection"] == sel and q["layers"] == label),
                         key=lambda q: q["ppl_change"])
            x = np.array([100 * q["ppl_change"] for q in pts])
            ax.plot(x, [100 * q["passages"] for q in pts], "o-", color=color, label=f"{name}: passages")
            ax.plot(x, [100 * q["canaries"] for q in pts], "s--", color=color, alpha=0.6, label=f"{name}: canaries")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("held-out perplexity change (%)")
        ax.set_ylabel("Strict recitation (%)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Selection by K-FAC products vs EK-FAC measured curvature (embedded default, same ρ grid)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
