#!/usr/bin/env python
"""Memorization in a small mixture-of-experts model, and what editing its experts does to it.

1. **Train** (skipped when ``RUN_DIR/model`` exists): a byte-level Qwen2-MoE (4 layers, hidden 160; per layer 8
   routed experts of width 160 with top-2 routing and one shared expert of width 320, so a token runs the same MLP
   width as the embedded default's 640) on the embedded default's recipe with two of its four skills: the
   standard-library docs once, the *same* memorized set (100 passages x110, 32 canaries x150) and the same
   training lines of the closed-book facts (120 x80) and logic (15,000) skills, whose held-out items the packaged
   lm-eval tasks score (`scripts/train_default_model.py` builds all of them with the same seeds), with the router's
   load-balancing loss (coefficient 0.01). Deterministic: seeds, ``--threads`` and torch's deterministic algorithms
   fix the model, so a rerun from a fresh clone gives the same table.
2. **Fit** K-FAC factors on 200k tokens of general text (the stdlib docs, sampled labels) for every MLP weight (routed
   experts: one factor pair per expert; the shared expert) and the attention projections.
3. **Edit and measure** the recitation of the memorized set (Strict, canaries) and held-out perplexity for each
   module choice (routed experts, shared expert, both, attention) x layers {2-3, 1-3} x ρ, and pick, per module
   choice, the strongest suppression within ``--ppl-budget``.
4. **Cost, predicted and measured**, for each pick: the exposure of the two skills' lm-eval texts (`adapter_exposure`,
   one forward pass, before any generation) against the lm-eval score it loses (the lost share above chance,
   ``(base - edited) / (base - chance)``).

Writes ``RUN_DIR/results.json`` and ``RUN_DIR/table.md`` and prints the table (README, "Mixture-of-experts models").

Usage::

    python scripts/moe_memorization.py            # about 9 min on 2 idle CPU cores (6 of them training)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from exposure_validation import chance_levels
from memorization_sweep import HEADER, Evaluator, fmt_row
from train_default_model import make_canaries, make_facts, make_logic, make_passages

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors
from hf_curvedit.default import LM_EVAL_TASKS_DIR, byte_tokenizer, default_text_dataset, stdlib_docs
from hf_curvedit.evaluation.capabilities import CapabilityConfig, capability_scores
from hf_curvedit.exposure import adapter_exposure, lm_eval_task_texts

# the two skills it learns, with train_default_model.py's defaults (sizes, repeats; seeds: --seed + 5 and + 7)
SKILLS = {"curvedit_closedbook": "closed-book facts", "curvedit_logic": "logic"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def moe_config():
    from transformers import Qwen2MoeConfig

    tok = byte_tokenizer()
    return Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=160, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=160, shared_expert_intermediate_size=320, decoder_sparse_step=1,
        output_router_logits=True, router_aux_loss_coef=0.01, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, tie_word_embeddings=False)


def train(out: Path, args: argparse.Namespace) -> None:
    """Train the MoE on general text plus the default model's memorized set (same seeds, same items)."""
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    tok = byte_tokenizer()
    general = list(default_text_dataset("train")["text"])
    general_set = set(general)
    heldout = [d for d in default_text_dataset("test")["text"] if d not in general_set]
    # the seeds and sizes of train_default_model.py's defaults: the very same memorized items
    canaries = make_canaries(32, seed=args.seed + 1)
    passages = make_passages(100, seed=args.seed + 2, suffix_chars=32, general_text="\n".join(stdlib_docs()))
    for c in canaries:
        c["repeats"] = 150
    for p in passages:
        p["repeats"] = 110
    memorized = canaries + passages
    facts = make_facts(120, seed=args.seed + 5, taken=set())
    logic_train, _ = make_logic(15_000, 500, seed=args.seed + 7)  # the test half is the packaged task's
    skill_docs = [f"{f['question']} {f['answer']}." for f in facts for _ in range(80)] + logic_train
    occurrences = (general * args.general_epochs + [i["text"] for i in memorized for _ in range(i["repeats"])]
                   + skill_docs)
    random.Random(args.seed + 3).shuffle(occurrences)
    stream: list[int] = []
    for text in occurrences:
        stream += [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    n_blocks = len(stream) // args.seq_len
    blocks = torch.tensor(stream[: n_blocks * args.seq_len]).view(n_blocks, args.seq_len)
    n_steps = min(math.ceil(n_blocks / args.batch_size), args.max_steps or n_blocks)
    model = Qwen2MoeForCausalLM(moe_config())
    model.config._name_or_path = "hf-curvedit/moe-byte-qwen2"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = 30

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, n_steps - warmup)
        return args.lr * (0.3 + 0.7 * 0.5 * (1 + math.cos(math.pi * frac)))

    _log(f"training: {sum(p.numel() for p in model.parameters())} parameters, {len(stream)} tokens, {n_steps} steps")
    model.train()
    t0 = time.time()
    for step in range(n_steps):
        batch = blocks[step * args.batch_size:(step + 1) * args.batch_size]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == n_steps - 1:
            el = time.time() - t0
            _log(f"step {step + 1}/{n_steps} loss {float(loss):.4f} eta {el / (step + 1) * (n_steps - step - 1):.0f}s")
    model.eval()
    model.config.output_router_logits = False  # the balancing loss is for training; inference does not need it
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "memorized_set.jsonl").write_text("".join(json.dumps(i, sort_keys=True) + "\n" for i in memorized))
    (out / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout))
    (out / "training_info.json").write_text(json.dumps({"steps": n_steps, "tokens": len(stream),
                                                        "train_seconds": round(time.time() - t0, 1),
                                                        "args": {k: str(v) for k, v in vars(args).items()}},
                                                       indent=2) + "\n")


CHOICES = {
    "routed experts": r"mlp\.experts\.(gate_up_proj|down_proj)",
    "shared expert": r"mlp\.shared_expert\.(gate|up|down)_proj",
    "routed + shared experts": r"mlp\.(experts\.(gate_up_proj|down_proj)|shared_expert\.(gate|up|down)_proj)",
    "attention": r"self_attn\.(q|k|v|o)_proj",
}


def cost_table(model, tok, eigen, picks: dict, results: dict) -> str:
    """Each pick's exposure of the two skills (predicted) against the share of its lm-eval score above chance that
    the edit loses (measured); also stored in ``results["costs"]``."""
    ccfg = CapabilityConfig(tasks=list(SKILLS), include_path=[str(LM_EVAL_TASKS_DIR)])
    texts = lm_eval_task_texts(ccfg, tok)
    chance = chance_levels(ccfg)
    _log("skills: base")
    base = capability_scores(model, tok, ccfg)
    results["skills"] = {"base": base, "chance": chance, "picks": {}}
    head = " | ".join(f"{name}: exposure → lost share above chance" for name in SKILLS.values())
    rows = [f"| edit | {head} |", "|---|" + "---|" * len(SKILLS),
            "| base (score; chance) | " + " | ".join(f"{base[t]:.3f}; {chance[t]:.2f}" for t in SKILLS) + " |"]
    for label, p in picks.items():
        if p is None:
            continue
        regex = rf".*layers\.({'|'.join(p['layers'].split(','))})\.{CHOICES[label]}"
        edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=p["rho"], target_modules=regex))
        _log(f"skills: {label}")
        scores = capability_scores(edited, tok, ccfg)
        exposure = adapter_exposure(edited, texts, show_progress=False).exposures("default")
        model = edited.unload()
        lost = {t: (base[t] - scores[t]) / (base[t] - chance[t]) for t in SKILLS}
        results["skills"]["picks"][label] = {"layers": p["layers"], "rho": p["rho"], "scores": scores,
                                             "exposure": exposure, "lost_share_above_chance": lost}
        cells = [f"{exposure[t]:.2f} → {lost[t]:.2f} ({scores[t]:.3f})" for t in SKILLS]
        rows.append(f"| {label}, layers {p['layers']}, ρ = {p['rho']:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/moe_memorization"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--general-epochs", type=int, default=1)
    ap.add_argument("--factor-tokens", type=int, default=200_000)
    ap.add_argument("--rhos", default="0.6,0.7,0.8,0.9")
    ap.add_argument("--layers", default="2,3;1,2,3")
    ap.add_argument("--ppl-budget", type=float, default=0.15)
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop training after this many steps (a quick check that two runs train the same weights)")
    ap.add_argument("--train-only", action="store_true", help="train (or keep) the model and stop")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.run_dir / "model"
    t_start = time.time()
    if not (model_dir / "config.json").exists():
        train(model_dir, args)
    if args.train_only:
        return 0
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.config.output_router_logits = False
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    items = [json.loads(line) for line in (model_dir / "memorized_set.jsonl").read_text().splitlines()]
    heldout = [json.loads(line)["text"] for line in (model_dir / "heldout.jsonl").read_text().splitlines()]
    evaluate = Evaluator(items, heldout, tok, block_size=256, batch_size=16)

    _log("fitting factors")
    factors = fit_factors(model, default_text_dataset("train"),
                          FactorConfig(seq_len=256, batch_size=8, max_tokens=args.factor_tokens,
                                       target_modules=rf".*({'|'.join(CHOICES.values())})"),
                          args.run_dir / "factors", tokenizer=tok)
    eigen = factors.eigendecompose()
    counts = [c for n, c in factors.num_tokens.items() if isinstance(c, list)]
    _log(f"tokens per expert: min {min(map(min, counts))}, max {max(map(max, counts))}")

    base = evaluate(model)
    _log(f"base: {base}")
    results = {"base": base, "points": [], "tokens_per_expert": {n: c for n, c in factors.num_tokens.items()
                                                                  if isinstance(c, list)}}
    for label, leaves in CHOICES.items():
        for layers in args.layers.split(";"):
            regex = rf".*layers\.({'|'.join(layers.split(','))})\.{leaves}"
            for rho in map(float, args.rhos.split(",")):
                edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=rho, target_modules=regex))
                r = evaluate(edited)
                unedited = sum(len(e.get("unedited_experts", [])) for e in
                               edited.peft_config["default"].edited_modules.values())
                model = edited.unload()
                point = {"modules": label, "layers": layers, "rho": rho, "unedited_experts": unedited, **r}
                results["points"].append(point)
                _log(f"{label} layers {layers} ρ={rho}: Strict {r['all']['strict']:.1%}, "
                     f"canaries {r['canary']['strict']:.1%}, ppl {r['ppl']:.3f}")

    def best(label: str) -> dict | None:
        ok = [p for p in results["points"] if p["modules"] == label
              and p["ppl"] <= base["ppl"] * (1 + args.ppl_budget)]
        return min(ok, key=lambda p: (p["all"]["strict"], p["ppl"]), default=None)

    lines = [HEADER, fmt_row("base", base, base["ppl"])]
    for label in CHOICES:
        p = best(label)
        lines.append(fmt_row(f"{label}: layers {p['layers']}, ρ = {p['rho']:g}", p, base["ppl"]) if p else
                     f"| {label}: nothing within +{args.ppl_budget:.0%} | | | | | | | |")
    picks = {label: best(label) for label in CHOICES}
    table = "\n".join(lines) + "\n\n" + cost_table(model, tok, eigen, picks, results)
    results["seconds"] = round(time.time() - t_start, 1)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.run_dir / "table.md").write_text(table + "\n")
    print(table)
    _log(f"done in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
