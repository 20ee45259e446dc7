#!/usr/bin/env python
"""Does exposure predict what an edit costs? Predicted exposure against measured capability drops on the embedded
default.

Steps:

1. K-FAC factors on the standard-library docs as the main job fits them (200k tokens, sampled labels), cached in
   ``RUN_DIR/factors`` (or ``--factors`` of an earlier fit).
2. Texts: the four skills of ``curvedit_skills`` as lm-eval scores them (prompt + gold answer, `lm_eval_task_texts`)
   and the memorized set (passages and canaries, prefix + suffix).
3. For each layer choice (2,3 and 1,2,3; gate, up, down) × ρ: the product's exposure (`predict_exposure`: the share
   of each task's layer output the edit removes, combined over modules) and, for comparison, the other candidate
   measure: the share of the task's per-token gradient energy in the dropped components,
   ``Σ_dropped (u_G,iᵀ g)² (u_A,jᵀ a)² / Σ_all``, combined the same way.
4. The measured cost: lm-eval scores of the four skills on the base and on every edit, and Strict recitation of the
   memorized set.
5. Spearman rank correlations (with bootstrap 95% intervals) of each measure against the lost share of each skill's
   score above chance, ``(base − edited) / (base − chance)``, pooled over all edits; the ranking of the four skills
   within each edit; the same for recitation. Writes ``RUN_DIR/validation.json`` and draws
   ``docs/images/exposure_validation.png``.

Usage::

    python scripts/exposure_validation.py       # about 6 min on 2 idle CPU cores, the factor fit (40 s) included
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors, load_factors
from hf_curvedit.default import LM_EVAL_TASKS_DIR, default_text_dataset, load_default_model
from hf_curvedit.evaluation import evaluate_recitation
from hf_curvedit.evaluation.capabilities import CapabilityConfig, _quiet_lm_eval, capability_scores, task_manager
from hf_curvedit.exposure import combine_shares, lm_eval_task_texts, predict_exposure, recitation_texts
from hf_curvedit.pipeline.inputs import default_recitation_sets
from hf_curvedit.selection import select_cutoffs
from hf_curvedit.targets import layer_choices


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def chance_levels(config: CapabilityConfig) -> dict[str, float]:
    """Per task, the score of a uniform guess: the mean of 1/#choices for multiple choice, 0 for generation."""
    with _quiet_lm_eval():
        loaded = task_manager(config).load(list(config.tasks))["tasks"]
    return {name: (float(np.mean([1 / len(t.doc_to_choice(d)) for d in t.eval_docs]))
                   if t.OUTPUT_TYPE == "multiple_choice" else 0.0) for name, t in loaded.items()}


def gradient_energy(model, eigen, texts, modules) -> dict[str, dict[str, torch.Tensor]]:
    """Per task and module: ``E_ij = Σ_t (u_G,iᵀ g_t)² (u_A,jᵀ a_t)²`` over every token, where g_t is the gradient of
    the summed next-token loss of the text w.r.t. the module's output (the comparison measure)."""
    named = dict(model.named_modules())
    out = {}
    for task, ts in texts.items():
        E = {n: torch.zeros(eigen[n].shape, dtype=torch.float64) for n in modules}
        store, hooks = {}, []
        for n in modules:
            def hook(m, args, output, n=n):
                store[n] = args[0].detach()
                output.register_hook(lambda g, n=n: store.__setitem__(n + "/g", g.detach()))
            hooks.append(named[n].register_forward_hook(hook))
        try:
            for seq in ts.sequences:
                ids = torch.tensor([seq])
                logits = model(input_ids=ids).logits[0, :-1].double()
                loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                model.zero_grad()
                loss.backward()
                for n in modules:
                    p = store[n + "/g"][0].double() @ eigen[n].eigvecs_G.double()
                    q = store[n][0].double() @ eigen[n].eigvecs_A.double()
                    E[n] += p.square().T @ q.square()
        finally:
            for h in hooks:
                h.remove()
        out[task] = E
    return out


def gradient_exposure(E: dict[str, torch.Tensor], eigen, rho: float) -> float:
    shares = {}
    for n, e in E.items():
        st = select_cutoffs(eigen[n].eigvals_G, eigen[n].eigvals_A, rho, "curvature_mass")
        kept = torch.arange(e.shape[1])[None, :] < st.cutoffs[:, None]
        shares[n] = float(e[~kept].sum() / e.sum())
    return combine_shares(shares)


def spearman(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    r, p = stats.spearmanr(x, y)
    ci = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b)[0], paired=True, vectorized=False,
                         n_resamples=2000, method="percentile", random_state=0).confidence_interval
    return {"rho": float(r), "p": float(p), "ci": [float(ci.low), float(ci.high)], "n": len(x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/exposure_validation"))
    ap.add_argument("--factors", type=Path, help="a folder of fitted factors (default: fit into RUN_DIR/factors)")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.99, 0.97, 0.95, 0.9, 0.8])
    ap.add_argument("--layers", nargs="+", default=["2,3", "1,2,3"])
    ap.add_argument("--plot", type=Path, default=Path("docs/images/exposure_validation.png"))
    args = ap.parse_args()
    t0 = time.time()
    model, tok = load_default_model()
    factors_dir = args.factors or args.run_dir / "factors"
    if args.factors is None:
        _log("factors")
        fit_factors(model, default_text_dataset("train"),
                    FactorConfig(seq_len=256, batch_size=8, max_tokens=args.tokens, label_mode="sampled"), factors_dir,
                    tokenizer=tok)
    eigen = load_factors(factors_dir, model).eigendecompose()
    ccfg = CapabilityConfig(tasks=["curvedit_skills"], include_path=[str(LM_EVAL_TASKS_DIR)])
    skills = lm_eval_task_texts(ccfg, tok)
    sets = default_recitation_sets(tok)
    texts = {**skills, **recitation_texts(sets)}
    chance = chance_levels(ccfg)
    choices = layer_choices(list(eigen), args.layers, "gate,up,down")

    _log("gradient energies (comparison measure)")
    E = gradient_energy(model, eigen, texts, [n for n in eigen])
    _log("base: capabilities and recitation")
    base = {"capabilities": capability_scores(model, tok, ccfg),
            "recitation": {s: evaluate_recitation(model, rs.prefixes, rs.suffixes, show_progress=False).strict
                           for s, rs in sets.items()}}
    edits = []
    held = {"model": model}
    for label, regex in choices.items():
        _log(f"exposure: {label}")
        cfg = CurvatureEditConfig(target_modules=regex)
        report = predict_exposure(held["model"], eigen, texts, args.rhos, cfg, tokenizer=tok, show_progress=False)
        for rho in args.rhos:
            cand = f"ρ={rho:g}"
            mods = list(report.shares[cand][next(iter(texts))])
            _log(f"measure: {label} ρ={rho}")
            edited = build_curvature_edit(held["model"], eigen,
                                          CurvatureEditConfig(keep_mass=rho, target_modules=regex))
            try:
                caps = capability_scores(edited, tok, ccfg)
                rec = {s: evaluate_recitation(edited, rs.prefixes, rs.suffixes, show_progress=False).strict
                       for s, rs in sets.items()}
            finally:
                held["model"] = edited.unload()
            edits.append({"layers": label, "keep_mass": rho, "capabilities": caps, "recitation": rec,
                          "exposure": report.exposures(cand),
                          "gradient_exposure": {t: gradient_exposure({n: E[t][n] for n in mods}, eigen, rho)
                                                for t in texts}})
    out = {"base": base, "chance": chance, "edits": edits, "rhos": args.rhos, "seconds": None}
    out["stats"] = statistics(out)
    out["seconds"] = time.time() - t0
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / "validation.json").write_text(json.dumps(out, indent=1))
    print_tables(out)
    plot(out, args.plot)
    _log(f"done in {(time.time() - t0) / 60:.1f} min")


def lost_share(out: dict, e: dict, task: str) -> float:
    b, c = out["base"]["capabilities"][task], out["chance"][task]
    return (b - e["capabilities"][task]) / (b - c)


def statistics(out: dict) -> dict:
    skills = list(out["base"]["capabilities"])
    res: dict = {}
    for measure in ("exposure", "gradient_exposure"):
        pooled = [(e[measure][t], lost_share(out, e, t)) for e in out["edits"] for t in skills]
        within = [stats.spearmanr([e[measure][t] for t in skills], [lost_share(out, e, t) for t in skills])[0]
                  for e in out["edits"]]
        rec = [(e[measure][s], out["base"]["recitation"][s] - e["recitation"][s])
               for e in out["edits"] for s in out["base"]["recitation"]]
        res[measure] = {"pooled": spearman(*zip(*pooled)), "within_edit_mean": float(np.nanmean(within)),
                        "within_edit": [float(w) for w in within], "recitation": spearman(*zip(*rec))}
        for t in skills:  # across edits, one skill at a time
            res[measure].setdefault("per_skill", {})[t] = float(stats.spearmanr(
                [e[measure][t] for e in out["edits"]], [lost_share(out, e, t) for e in out["edits"]])[0])
    return res


def print_tables(out: dict) -> None:
    skills = list(out["base"]["capabilities"])
    b = out["base"]
    print("\n| layers | ρ | " + " | ".join(f"{s.removeprefix('curvedit_')} (exposure → score)" for s in skills)
          + " | passages Strict | canaries Strict |")
    print("|---|---|" + "---|" * (len(skills) + 2))
    print("| base | – | " + " | ".join(f"{b['capabilities'][s]:.3f}" for s in skills)
          + f" | {100 * b['recitation']['passages']:.1f}% | {100 * b['recitation']['canaries']:.1f}% |")
    for e in out["edits"]:
        cells = [f"{e['exposure'][s]:.2f} → {e['capabilities'][s]:.3f}" for s in skills]
        rec = [f"{e['exposure'][s]:.2f} → {100 * e['recitation'][s]:.1f}%" for s in ("passages", "canaries")]
        print(f"| {e['layers'].removeprefix('layers ')} | {e['keep_mass']:g} | " + " | ".join(cells + rec) + " |")
    print("\nchance:", {s: round(c, 3) for s, c in out["chance"].items()})
    for m, r in out["stats"].items():
        p, rec = r["pooled"], r["recitation"]
        print(f"\n{m}: pooled Spearman {p['rho']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}] (p={p['p']:.1e}, "
              f"n={p['n']}); within an edit (4 skills) mean {r['within_edit_mean']:.2f}; per skill across edits "
              + ", ".join(f"{k.removeprefix('curvedit_')} {v:.2f}" for k, v in r["per_skill"].items())
              + f"; recitation {rec['rho']:.2f} [{rec['ci'][0]:.2f}, {rec['ci'][1]:.2f}] (n={rec['n']})")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills = list(out["base"]["capabilities"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    markers = {label: m for label, m in zip(sorted({e["layers"] for e in out["edits"]}), "os^D")}
    for ax, measure, title in ((axes[0], "exposure", "exposure (removed output share)"),
                               (axes[1], "gradient_exposure", "gradient-energy share (not shipped)")):
        for color, t in zip(plt.cm.tab10.colors, skills):
            for label, mk in markers.items():
                pts = [(e[measure][t], lost_share(out, e, t)) for e in out["edits"] if e["layers"] == label]
                ax.scatter(*zip(*pts), color=color, marker=mk, label=f"{t.removeprefix('curvedit_')}, {label}")
        s = out["stats"][measure]["pooled"]
        ax.set_title(f"{title}\nSpearman {s['rho']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]", fontsize=10)
        ax.set_xlabel("predicted exposure")
        ax.set_ylabel("lost share of the score above chance")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    ax = axes[2]
    for color, s in zip(("tab:purple", "tab:brown"), ("passages", "canaries")):
        for label, mk in markers.items():
            pts = [(e["exposure"][s], 100 * (out["base"]["recitation"][s] - e["recitation"][s]))
                   for e in out["edits"] if e["layers"] == label]
            ax.scatter(*zip(*pts), color=color, marker=mk, label=f"{s}, {label}")
    r = out["stats"]["exposure"]["recitation"]
    ax.set_title(f"memorized set\nSpearman {r['rho']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]", fontsize=10)
    ax.set_xlabel("predicted exposure")
    ax.set_ylabel("Strict recitation lost (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Predicted exposure against measured cost (embedded default, 2 layer choices × "
                 f"{len(out['rhos'])} ρ)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
