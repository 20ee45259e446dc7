"""A fit whose factors are many times the memory budget, on CPU: peak memory per process against the budget and the
planner's figures, and wall time on 1 and 2 processes.

    python benchmarks/scale_fit.py [--budget-gb 0.05] [--tokens 16384]

A Llama of hidden 256, MLP 2048 and 8 layers (random weights, byte vocabulary) holds ~408 MiB of fp32 factor
accumulators for its 24 MLP projections. Each stage runs in a fresh process (several processes under torchrun,
gloo), and each process reports the peak of its resident memory during the stage above its resident memory before
it (the model and the data already loaded), and the stage's wall time:

1. the fit without a budget, in one process (every accumulator at once: what the budget avoids);
2. the fit under ``--budget-gb``, in one process (2 threads);
3. the same, with glibc's mmap threshold fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_=1048576``: large tensors are
   mapped and unmapped, so the resident memory follows the live tensors instead of glibc's heap);
4. the same fit in 2 processes (1 thread each): each collects its own partitions over all the data;
5. the eigendecomposition of the factors into their cache, in one process and in 2.

Prints a table and the ratios; the planner's figures come from `plan_factors` of the same model and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256)
# --small: the same stages at a tiny shape (a smoke test of the script, not a measurement)
SMALL = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=256)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model(small: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_curvedit.default import byte_tokenizer

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(byte_tokenizer()), **(SMALL if small else SHAPE))).eval()


def _config(args, budget: bool):
    from hf_curvedit import FactorConfig

    return FactorConfig(seq_len=256, batch_size=8, max_tokens=args.tokens, seed=0,
                        max_factor_memory_gb=args.budget_gb if budget else None)


def stage(args) -> None:
    """One stage in this process (under torchrun: one of its processes); writes its figures to a JSON file."""
    import torch

    from hf_curvedit import fit_factors, load_factors
    from hf_curvedit.curvature.distributed import dist_state
    from hf_curvedit.default import byte_tokenizer, default_text_dataset

    torch.set_num_threads(args.threads)
    state = dist_state()
    model, tok = _model(args.small), byte_tokenizer()
    data = default_text_dataset("train")
    before = _rss()
    start = time.perf_counter()
    if args.stage == "fit":
        fit_factors(model, data, _config(args, args.budget), args.out, tokenizer=tok, progress=False)
    else:
        load_factors(args.out).eigendecompose()
    seconds = time.perf_counter() - start
    # one file per process: processes printing to one pipe at once can interleave their lines
    Path(f"{args.out}.{args.stage}.rank{state.process_index}.json").write_text(json.dumps(
        {"rank": state.process_index, "seconds": seconds, "above": _peak() - before, "before": before}))


def _run(args, stage_name: str, out: Path, procs: int, threads: int, budget: bool, **env_extra: str) -> list[dict]:
    me = [str(Path(__file__).resolve()), "--stage", stage_name, "--out", str(out), "--threads", str(threads),
          "--tokens", str(args.tokens), "--budget-gb", str(args.budget_gb)] + (["--budget"] if budget else []) \
        + (["--small"] if args.small else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo", **env_extra)
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
               "127.0.0.1", "--master_port", str(port), *me]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return [json.loads(Path(f"{out}.{stage_name}.rank{rank}.json").read_text()) for rank in range(procs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-gb", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--stage", choices=["fit", "eigen"])
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", action="store_true")
    ap.add_argument("--small", action="store_true", help="a tiny model: checks that the script runs")
    args = ap.parse_args()
    if args.stage:
        return stage(args)

    from hf_curvedit import plan_factors

    plan = plan_factors(_model(args.small), _config(args, True), num_processes=2)
    total = sum(plan.partition_bytes())
    mib = lambda n: f"{n / 1024**2:,.0f} MiB"  # noqa: E731
    print(f"factors: {mib(total)} in {plan.data_passes} partitions under a {mib(args.budget_gb * 1024**3)} budget "
          f"({total / (args.budget_gb * 1024**3):.1f}x); planner: {mib(plan.accumulator_bytes)} of accumulators and "
          f"{mib(plan.transient_bytes)} of one batch's forward and backward per process, eigendecomposition "
          f"{mib(plan.eigen_process_bytes)} per process; {plan.data_passes} passes, {plan.wall_passes} one after the "
          f"other on 2 processes\n")
    rows = []
    fits = (("fit, no budget, 1 process", 1, 2, False, {}),
            ("fit, budget, 1 process", 1, 2, True, {}),
            ("fit, budget, 1 process, mmap threshold 1 MiB", 1, 2, True, {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
            ("fit, budget, 2 processes", 2, 1, True, {}))
    with tempfile.TemporaryDirectory() as tmp:
        for label, procs, threads, budget, env in fits:
            out = Path(tmp) / label.replace(" ", "_").replace(",", "")
            rows.append((label, _run(args, "fit", out, procs, threads, budget, **env),
                         plan.process_bytes if budget else total + plan.transient_bytes))
        one, two = Path(tmp) / "fit_budget_1_process", Path(tmp) / "fit_budget_2_processes"
        rows.append(("eigendecomposition, 1 process", _run(args, "eigen", one, 1, 2, True), plan.eigen_process_bytes))
        rows.append(("eigendecomposition, 2 processes", _run(args, "eigen", two, 2, 1, True),
                     plan.eigen_process_bytes))
    print("| stage | wall time | peak memory above the loaded model, per process | planner | peak / planner |")
    print("|---|---|---|---|---|")
    for label, results, planned in rows:
        peak = max(r["above"] for r in results)
        seconds = max(r["seconds"] for r in results)
        print(f"| {label} | {seconds:.1f} s | {mib(peak)} | {mib(planned)} | {peak / planned:.2f} |")
    t = {label: max(r["seconds"] for r in results) for label, results, _ in rows}
    print(f"\n2 processes / 1 process, fit: {t['fit, budget, 2 processes'] / t['fit, budget, 1 process']:.2f}x the "
          f"time ({plan.wall_passes} passes instead of {plan.data_passes}); eigendecomposition: "
          f"{t['eigendecomposition, 2 processes'] / t['eigendecomposition, 1 process']:.2f}x")


if __name__ == "__main__":
    main()
