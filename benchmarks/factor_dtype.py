"""What storing finished factors in bfloat16 would do to the selection, on factors fitted by scripts/ekfac_frontier.py.

    python benchmarks/factor_dtype.py [--factors runs/ekfac_frontier/factors] [--rhos 0.6 0.8 0.9]

For every module and ρ: the factors rounded to bfloat16 (what a bf16 factor file would hold), eigendecomposed again,
and the edit's kept set and edited weight compared with those of the float32 factors:

- changed: the fraction of components whose kept/dropped status differs (in the float32 basis' order);
- ‖ΔW′‖/‖W − W′‖: how far the bf16 edit's weight lies from the float32 edit's, relative to what the edit removes.

Prints the median and worst module per ρ, and the memory saved.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hf_curvedit import load_factors
from hf_curvedit.curvature import ModuleEigen, symmetric_eigh
from hf_curvedit.default import load_default_model
from hf_curvedit.edit import compute_edit
from hf_curvedit.targets import weight_targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factors", default="runs/ekfac_frontier/factors")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.6, 0.8, 0.9])
    args = p.parse_args()
    model, _ = load_default_model()
    factors = load_factors(args.factors, model)
    eigen = factors.eigendecompose()
    targets = weight_targets(model)
    rows: dict[float, list[tuple[float, float]]] = {rho: [] for rho in args.rhos}
    fp32_bytes = bf16_bytes = 0
    for name in factors.module_names:
        A, G = factors.A[name], factors.G[name]
        fp32_bytes += (A.numel() + G.numel()) * 4
        bf16_bytes += (A.numel() + G.numel()) * 2
        va, ua = symmetric_eigh(A.bfloat16().float())
        vg, ug = symmetric_eigh(G.bfloat16().float())
        rounded = ModuleEigen(va, ua, vg, ug)
        W = targets[name].logical_weight().detach()
        for rho in args.rhos:
            ref = compute_edit(W, eigen[name], rho, dtype=torch.float64)
            low = compute_edit(W, rounded, rho, dtype=torch.float64)
            mask_ref = torch.arange(W.shape[1])[None, :] < ref.cutoffs[:, None]
            # the bf16 staircase in the float32 basis: which float32 components its kept span covers
            mask_low = torch.arange(W.shape[1])[None, :] < low.cutoffs[:, None]
            changed = float((mask_ref != mask_low).double().mean())
            removed = float(torch.linalg.vector_norm(W.double() - ref.dense())) or 1.0
            delta = float(torch.linalg.vector_norm(low.dense() - ref.dense())) / removed
            rows[rho].append((changed, delta))
    print(f"{len(factors.module_names)} modules; factors {fp32_bytes / 2**20:.1f} MiB in float32, "
          f"{bf16_bytes / 2**20:.1f} MiB in bfloat16\n")
    print("| ρ | components changed (median / worst) | ‖ΔW′‖ / ‖W − W′‖ (median / worst) |")
    print("|---|---|---|")
    for rho, vals in rows.items():
        ch = [c for c, _ in vals]
        de = [d for _, d in vals]
        print(f"| {rho:g} | {100 * statistics.median(ch):.2f}% / {100 * max(ch):.2f}% | "
              f"{statistics.median(de):.3f} / {max(de):.3f} |")


if __name__ == "__main__":
    main()
