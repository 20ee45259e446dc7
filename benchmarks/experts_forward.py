"""The unmerged expert adapter's forward: time and memory against the base experts, and against the dense copy of the
edited experts that a substituted parameter would need.

Two settings, each timed interleaved (one forward of each variant per round, order rotated; medians), so that a load
spike hits all variants alike:

1. **A Mixtral-8x7B-shaped experts layer** (8 experts, hidden 4096, MLP 14336, top-2, bf16, `MixtralExperts` with
   ``--implementation``, default grouped_mm), every expert edited with factors of rank ``--ranks`` (random factors:
   time and memory depend on the shapes, not on the values). Variants: the base module; a second module holding a
   dense copy of the ``W'`` stacks (what merging writes, and what an adapter holding a dense copy runs); the factored
   forward the adapter runs (`hf_curvedit.tuner.experts_forward`).
2. **The trained MoE** of ``scripts/moe_memorization.py`` (``--moe-run-dir``, when it exists): its routed + shared
   experts edit at the script's pick, on a batch of held-out text; base, unmerged adapter and merged.

Memory is what each variant holds beyond the base weights (bytes of its tensors, exact), plus the process's resident
memory growth when it is built (measured).

    python benchmarks/experts_forward.py [--ranks 512 2048] [--tokens 256] [--repeats 5] [--threads 2]
        [--moe-run-dir runs/moe_memorization] [--small]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

GiB = 1024**3


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per variant, one call of each per round in rotated order (after one warm-up round)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            with torch.no_grad():
                variants[n]()
            if r:
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def mixtral_layer(args) -> list[tuple[str, float, float, int, int]]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from hf_curvedit.targets import experts_target
    from hf_curvedit.tuner.experts_forward import FACTORED, ExpertsProjection, edited_experts_forward

    dtype = torch.bfloat16
    shape = (64, 96) if args.small else (4096, 14336)
    config = MixtralConfig(hidden_size=shape[0], intermediate_size=shape[1], num_local_experts=8,
                           num_experts_per_tok=2)
    config._experts_implementation = args.implementation  # what a loaded model's config carries
    torch.manual_seed(0)
    module = MixtralExperts(config).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    E, T = config.num_local_experts, args.tokens
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(T, config.hidden_size, generator=g).to(dtype)
    index = torch.rand(T, E, generator=g).topk(2, dim=-1).indices
    weights = torch.rand(T, 2, generator=g).softmax(-1).to(dtype)
    params = ("gate_up_proj", "down_proj")
    base_bytes = _bytes(*(getattr(module, p) for p in params))

    before = _rss()
    dense = MixtralExperts(config).to(dtype)  # a second module: the W' stacks a dense copy holds (as merged runs)
    dense.load_state_dict(module.state_dict())
    dense_rss = _rss() - before
    variants: dict[str, Callable[[], object]] = {"base": lambda: module(hidden, index, weights),
                                                 "dense W' copy": lambda: dense(hidden, index, weights)}
    extra = {"dense W' copy": (_bytes(*(getattr(dense, p) for p in params)), dense_rss)}
    for k in args.ranks:
        before = _rss()
        projections = {}
        for p in params:
            _, d_out, d_in = experts_target(module, p).to_logical(getattr(module, p)).shape
            kind = torch.full((E,), FACTORED)
            projections[p] = ExpertsProjection(kind, (FACTORED,), torch.arange(E),
                                               torch.randn(E, d_in, k, generator=g).to(dtype) / d_in**0.5,
                                               torch.randn(E, k, d_out, generator=g).to(dtype) / k**0.5)
        name = f"factored, rank {k}"
        forward = edited_experts_forward(module, projections)
        variants[name] = lambda forward=forward: forward(hidden, index, weights)
        extra[name] = (sum(_bytes(j.first, j.second) for j in projections.values()), _rss() - before)
    times = interleaved(variants, args.repeats)
    rows = []
    for n, t in times.items():
        held, grown = extra.get(n, (0, 0))
        rows.append((n, t, t / times["base"], held, grown))
    print(f"{'a small' if args.small else 'Mixtral-8x7B-shaped'} experts layer (bf16, {T} tokens, top-2, "
          f"{args.implementation}); base weights {base_bytes / GiB:.2f} GiB")
    return rows


def trained_moe(args) -> list[tuple[str, float, float, int, int]] | None:
    run = Path(args.moe_run_dir)
    if not (run / "model" / "config.json").exists() or not (run / "results.json").exists():
        print(f"no trained MoE in {run} (run scripts/moe_memorization.py first): skipped")
        return None
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from hf_curvedit import CurvatureEditConfig, build_curvature_edit, load_factors
    from hf_curvedit.tuner.experts import CurvatureEditExperts

    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(run / "model")
    results = json.loads((run / "results.json").read_text())
    label = "routed + shared experts"
    ok = [p for p in results["points"] if p["modules"] == label and p["ppl"] <= results["base"]["ppl"] * 1.15]
    pick = min(ok, key=lambda p: (p["all"]["strict"], p["ppl"]))
    leaves = r"mlp\.(experts\.(gate_up_proj|down_proj)|shared_expert\.(gate|up|down)_proj)"
    regex = rf".*layers\.({'|'.join(pick['layers'].split(','))})\.{leaves}"
    eigen = load_factors(run / "factors").eigendecompose()
    text = "\n".join(json.loads(line)["text"] for line in (run / "model" / "heldout.jsonl").read_text().splitlines())
    ids = torch.tensor(tok(text)["input_ids"][: 16 * 256]).view(16, 256)
    before = _rss()
    edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=pick["rho"], target_modules=regex))
    built = _rss() - before
    stacks = [(layer, p) for layer in edited.modules() if isinstance(layer, CurvatureEditExperts)
              for p in layer.units_of("default")]
    dense_bytes = sum(_bytes(getattr(layer.base_layer, p)) for layer, p in stacks)
    with torch.no_grad():
        edited(input_ids=ids[:1])  # the projections are made once per device and dtype, then cached
    projections = [layer._projection("default", p, torch.device("cpu")) for layer, p in stacks]
    held = sum(_bytes(j.first, j.second, j.dense) for j in projections)
    merged = build_curvature_edit(AutoModelForCausalLM.from_pretrained(run / "model").eval(), eigen,
                                  CurvatureEditConfig(keep_mass=pick["rho"], target_modules=regex))
    merged.merge_adapter()

    def base() -> object:
        with edited.disable_adapter():
            return edited(input_ids=ids).logits

    times = interleaved({"base": base, "unmerged adapter": lambda: edited(input_ids=ids).logits,
                         "merged": lambda: merged(input_ids=ids).logits}, args.repeats)
    print(f"\ntrained MoE ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32, 16 x 256 "
          f"tokens): routed + shared experts, layers {pick['layers']}, ρ = {pick['rho']:g}; edited expert stacks "
          f"{dense_bytes / 2**20:.1f} MiB; building the adapter grew the process by {built / 2**20:.1f} MiB")
    # merged: W' written over the parameters, the originals kept for unmerge (merge_and_unload would drop them)
    extra = {"unmerged adapter": (held, 0), "merged": (dense_bytes, 0)}
    return [(n, t, t / times["base"], *extra.get(n, (0, 0))) for n, t in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--implementation", default="grouped_mm", choices=["eager", "grouped_mm", "batched_mm"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--moe-run-dir", default="runs/moe_memorization")
    ap.add_argument("--skip-mixtral", action="store_true")
    ap.add_argument("--small", action="store_true", help="hidden 64, MLP 96: checks that the script runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header = ("| variant | forward (median) | / base | held beyond the base weights | resident growth when built |\n"
              "|---|---|---|---|---|")
    for rows in (None if args.skip_mixtral else mixtral_layer(args), trained_moe(args)):
        if rows is None:
            continue
        print(header)
        for n, t, ratio, held, grown in rows:
            print(f"| {n} | {t * 1e3:,.1f} ms | {ratio:.2f}× | {held / 2**20:,.1f} MiB | "
                  f"{grown / 2**20:,.1f} MiB |")


if __name__ == "__main__":
    main()
