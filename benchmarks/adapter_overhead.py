"""Forward latency of a curvature edit on CPU: base vs merged vs unmerged adapter, as ratios to the base.

A small random-init Llama (hidden 256, 4 layers, MLP 1024); K-FAC factors of its MLP projections are collected from a
few batches (A from the layer inputs, G from the gradients of a summed next-token loss), eigendecomposed, and edited at
ρ = 0.6. The variants are timed interleaved (one forward of each per round, order rotated), and the median per variant
is reported, so a load spike on a shared machine hits all of them alike.

    python benchmarks/adapter_overhead.py [--rho 0.6] [--repeats 30] [--threads 1]

Targets (issue 3): merged ≤ 1.02× base, unmerged ≤ 1.3× base at ρ = 0.6.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_curvedit import CurvatureEditConfig, KFACEigen, ModuleEigen, build_curvature_edit
from hf_curvedit.curvature.eigen import symmetric_eigh
from hf_curvedit.targets import resolve_target_modules


def collect_eigen(model: torch.nn.Module, batches: list[torch.Tensor]) -> KFACEigen:
    """Empirical-Fisher K-FAC factors of the MLP projections from a few batches (benchmark-grade, not the factor
    stage): A = E[a aᵀ] over token positions, G = E[g gᵀ] with g the per-token output gradient of a summed loss."""
    names = resolve_target_modules(model)
    sums_A: dict[str, torch.Tensor] = {}
    sums_G: dict[str, torch.Tensor] = {}
    hooks = []

    def fwd_hook(name):
        def hook(module, inputs, output):
            a = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums_A[name] = sums_A.get(name, 0) + a.T @ a
            output.register_hook(lambda g: sums_G.__setitem__(
                name, sums_G.get(name, 0)
                + g.reshape(-1, g.shape[-1]).double().T @ g.reshape(-1, g.shape[-1]).double()))
        return hook

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(fwd_hook(n)))
    tokens = 0
    for ids in batches:
        logits = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        loss.backward()
        tokens += ids.numel()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    out = {}
    for n in names:
        la, va = symmetric_eigh(sums_A[n] / tokens)
        lg, vg = symmetric_eigh(sums_G[n] / tokens)
        out[n] = ModuleEigen(la, va, lg, vg)
    return KFACEigen(out, {"num_tokens": tokens, "model_name_or_path": "random-init benchmark Llama"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rho", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    # One thread by default: on a shared CPU box multi-threaded timings go bimodal (110 vs 650 ms here) and the ratios
    # mean nothing; pass --threads N on a dedicated machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512)
    base = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, config.vocab_size, (4, 128), generator=gen) for _ in range(4)]
    t0 = time.perf_counter()
    eigen = collect_eigen(base, calib)
    t_factors = time.perf_counter() - t0
    base.requires_grad_(False)  # like the PEFT variants, whose base weights PEFT freezes

    t0 = time.perf_counter()
    unmerged = build_curvature_edit(copy.deepcopy(base), eigen, CurvatureEditConfig(keep_mass=args.rho))
    t_build = time.perf_counter() - t0
    merged_wrapped = build_curvature_edit(copy.deepcopy(base), eigen, CurvatureEditConfig(keep_mass=args.rho))
    merged_wrapped.merge_adapter()
    merged_plain = build_curvature_edit(copy.deepcopy(base), eigen, CurvatureEditConfig(keep_mass=args.rho))
    merged_plain = merged_plain.merge_and_unload()

    variants = {
        "base": base,
        "merged (merge_and_unload)": merged_plain,
        "merged (merge_adapter)": merged_wrapped,
        "unmerged adapter": unmerged,
    }
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    with torch.inference_mode():
        for m in variants.values():  # warm-up
            m(x)
        for i in range(args.repeats):
            for name in names[i % len(names):] + names[: i % len(names)]:
                t = time.perf_counter()
                variants[name](x, use_cache=False)
                times[name].append(time.perf_counter() - t)
        # correctness guard: the merged and unmerged edits compute the same function
        diff = (unmerged(x).logits - merged_plain(x).logits).abs().max().item()

    base_ms = statistics.median(times["base"]) * 1e3
    print(f"# curvature-edit forward latency, CPU, {torch.get_num_threads()} thread(s), batch {args.batch} x seq "
          f"{args.seq}, rho = {args.rho}, median of {args.repeats} interleaved repeats")
    print(f"# factors from {eigen.metadata['num_tokens']} tokens in {t_factors:.1f}s; edit built in {t_build:.2f}s; "
          f"max |merged - unmerged| logit = {diff:.2e}")
    print(f"{'variant':<28} {'median ms':>10} {'ratio':>7} {'p25-p75 ms':>17}")
    for name in names:
        ms = statistics.median(times[name]) * 1e3
        q = statistics.quantiles([t * 1e3 for t in times[name]], n=4)
        print(f"{name:<28} {ms:>10.2f} {ms / base_ms:>6.3f}x {q[0]:>8.1f}-{q[2]:<8.1f}")
    print()
    print(f"{'module':<30} {'d_out x d_in':>12} {'r':>5} {'s':>5} {'k':>5} {'kept comp':>9} {'‖W-W`‖/‖W‖':>11} "
          f"{'bytes ratio':>11}")
    for rep in unmerged.base_model.edit_report():
        print(f"{rep.module:<30} {f'{rep.d_out}x{rep.d_in}':>12} {rep.r:>5} {rep.s:>5} {rep.k:>5} "
              f"{rep.kept_component_fraction:>9.3f} {rep.removed_norm_fraction:>11.3f} {rep.bytes_ratio:>11.3f}")


if __name__ == "__main__":
    main()
