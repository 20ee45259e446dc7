"""One MLP layer at Llama/OLMo-2 7B shapes (hidden 4096, MLP 11008) on CPU: eigendecomposition, edit build, forward.

Random weights and factors with realistic, decaying spectra (no download); every figure is measured in this run.

1. ``eigh``: `symmetric_eigh` of a 4096² and an 11008² factor in float64, each in a fresh process: time and peak
   memory above the factor itself, next to the planner's estimate (`hf_curvedit.curvature.plan.eigh_peak_bytes`).
2. ``edit``: selection + `compute_edit` of gate, up (11008×4096) and down (4096×11008) at ρ ∈ {0.6, 0.75, 0.9}:
   time, rank, and the adapter's bytes against the bf16 weight it replaces.
3. ``forward``: the edited up projection at batch×seq = 1×1 (decode) and 4×512 (prefill), base vs unmerged adapter
   vs merged, in float32 and bfloat16, timed interleaved (medians); ratios to the base of the same dtype.

    python benchmarks/scale_7b.py                         # all parts (about 10-15 minutes on 2 cores)
    python benchmarks/scale_7b.py --parts forward --forward-rhos 0.6 --threads 2

Target (unmerged inference): unmerged ≤ 1.0× the base layer at both shapes, in bf16 and fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from hf_curvedit import CurvatureEditConfig, ModuleEigen, build_curvature_edit, compute_edit
from hf_curvedit.curvature.eigen import symmetric_eigh
from hf_curvedit.curvature.plan import eigh_peak_bytes
from hf_curvedit.selection import select_cutoffs

GIB = 1024**3


def decaying_factor(n: int, seed: int) -> torch.Tensor:
    """An n×n PSD factor X Xᵀ / m whose spectrum decays like those of real activations and gradients."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, n + 1, dtype=torch.float32) ** -0.75
    X = torch.randn(n, n, generator=g) * scale[None, :]
    return (X @ X.T / n).double()


def random_basis(n: int, seed: int) -> torch.Tensor:
    """A random orthonormal basis (float64), without an eigendecomposition."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q.double()


def power_law(n: int, exponent: float) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=torch.float64) ** -exponent


# Spectrum decay exponents (λ_i ∝ i^-e), calibrated so that ρ = 0.6 keeps the share of rows and columns measured on
# this project's small trained Llama (docs/method.md §5: up_proj r ≈ 530-634 of 640, s ≈ 78-104 of 160; down_proj
# r ≈ 56 of 160, s ≈ 202 of 640): the output-side factor of gate/up is flat, that of down steep.
EXPONENTS = {"gate_proj": (1.0, 0.3), "up_proj": (1.0, 0.3), "down_proj": (1.0, 1.3)}  # (A, G)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def eigh_child(n: int) -> None:
    factor = decaying_factor(n, seed=n)
    before = _rss_bytes()
    start = time.perf_counter()
    vals, vecs = symmetric_eigh(factor)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"n": n, "seconds": seconds, "peak_bytes": peak, "top": float(vals[0])}))


def part_eigh(sizes: list[int], threads: int) -> None:
    print("\n## eigendecomposition (float64, symmetrized, one fresh process each)\n")
    print("| factor | time (s) | peak above the factor | planner estimate | measured / estimate |")
    print("|---|---|---|---|---|")
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--eigh-child", str(n), "--threads", str(threads)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        est = eigh_peak_bytes(n)
        print(f"| {n}² | {r['seconds']:.1f} | {r['peak_bytes'] / GIB:.2f} GiB | {est / GIB:.2f} GiB | "
              f"{r['peak_bytes'] / est:.2f} |")


def shapes(hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    return {"gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}


def bases(hidden: int, mlp: int) -> dict[str, ModuleEigen]:
    small, big = random_basis(hidden, 1), random_basis(mlp, 2)
    out = {}
    for name, (d_out, d_in) in shapes(hidden, mlp).items():
        e_a, e_g = EXPONENTS[name]
        ua, ug = (small, big) if d_in == hidden else (big, small)
        out[name] = ModuleEigen(power_law(d_in, e_a), ua, power_law(d_out, e_g), ug)
    return out


def part_edit(hidden: int, mlp: int, rhos: list[float]) -> None:
    print(f"\n## selection + compute_edit (weights {mlp}×{hidden} and {hidden}×{mlp}, fp64 math, fp32 factors)\n")
    start = time.perf_counter()
    eig = bases(hidden, mlp)
    print(f"(random orthonormal bases built in {time.perf_counter() - start:.1f} s)\n")
    print("| module | ρ | selection (s) | compute_edit (s) | r | s | k | adapter | bf16 weight | adapter / weight |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, (d_out, d_in) in shapes(hidden, mlp).items():
        weight = torch.randn(d_out, d_in, generator=g) * 0.02
        for rho in rhos:
            t0 = time.perf_counter()
            st = select_cutoffs(eig[name].eigvals_G, eig[name].eigvals_A, rho)
            t1 = time.perf_counter()
            edit = compute_edit(weight, eig[name], rho)
            t2 = time.perf_counter()
            adapter = sum(t.numel() * t.element_size() for t in (edit.Q, edit.B))
            dense = d_out * d_in * 2
            print(f"| {name} | {rho:g} | {t1 - t0:.2f} | {t2 - t1:.1f} | {st.r} | {st.s} | {st.k} | "
                  f"{adapter / 2**20:.0f} MiB | {dense / 2**20:.0f} MiB | {adapter / dense:.2f} |")


class _OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.up_proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(x)


def _median_times(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def part_forward(hidden: int, mlp: int, rhos: list[float], repeats: int, prefill_repeats: int) -> None:
    print(f"\n## forward of the edited up projection ({mlp}×{hidden}), medians (decode: {repeats}, prefill: "
          f"{prefill_repeats}), interleaved; the base is the plain nn.Linear\n")
    torch.manual_seed(0)
    eig = bases(hidden, mlp)["up_proj"]
    print("| ρ | adapter path | dtype | batch×seq | base (ms) | unmerged (ms) | merged (ms) | unmerged / base "
          "| merged / base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rho in rhos:
        base = _OneLayer(hidden, mlp).eval()
        with torch.no_grad():
            base.up_proj.weight.mul_(0.02 / base.up_proj.weight.std())
        config = CurvatureEditConfig(keep_mass=rho, target_modules=["up_proj"])
        edited = build_curvature_edit(base, {"up_proj": eig}, config)
        layer = edited.base_model.model.up_proj
        k = layer.curvedit_Q["default"].shape[1]
        path = f"dense W' (k = {k})" if layer.runs_dense("default") else f"factorized, k = {k}"
        for dtype in (torch.float32, torch.bfloat16):
            edited.to(dtype)
            for (batch, seq), n in (((1, 1), repeats), ((4, 512), prefill_repeats)):
                x = torch.randn(batch, seq, hidden).to(dtype)
                with torch.no_grad():
                    layer(x)  # the cast copies of the factors are made once, not timed
                    unmerged = _median_times({"base": lambda: layer.base_layer(x), "unmerged": lambda: layer(x)}, n)
                    edited.merge_adapter()
                    merged = _median_times({"base": lambda: layer.base_layer(x), "merged": lambda: layer(x)}, n)
                    edited.unmerge_adapter()
                b, u, m = unmerged["base"], unmerged["unmerged"], merged["merged"]
                print(f"| {rho:g} | {path} | {str(dtype).removeprefix('torch.')} | {batch}×{seq} | {1e3 * b:.2f} | "
                      f"{1e3 * u:.2f} | {1e3 * m:.2f} | {u / b:.2f}× | {m / merged['base']:.2f}× |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="eigh,edit,forward", help="comma-separated: eigh, edit, forward")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--rhos", type=float, nargs="+", default=[0.6, 0.75, 0.9])
    p.add_argument("--forward-rhos", type=float, nargs="+", default=[0.6, 0.75], help="ρ of the forward benchmark")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds at decode shape (1×1)")
    p.add_argument("--prefill-repeats", type=int, default=5, help="timed rounds at prefill shape (4×512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eigh-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.eigh_child:
        eigh_child(args.eigh_child)
        return
    parts = {s.strip() for s in args.parts.split(",")}
    print(f"# 7B-shaped layer on CPU: hidden {args.hidden}, MLP {args.mlp}, torch {torch.__version__}, "
          f"{args.threads} threads")
    if "eigh" in parts:
        part_eigh([args.hidden, args.mlp], args.threads)
    if "edit" in parts:
        part_edit(args.hidden, args.mlp, args.rhos)
    if "forward" in parts:
        part_forward(args.hidden, args.mlp, args.forward_rhos, args.repeats, args.prefill_repeats)


if __name__ == "__main__":
    main()
