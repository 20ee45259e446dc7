"""Speed on a real model: SmolLM2-135M (30 layers, hidden 576, MLP 1536, vocabulary 49k), from the files
``scripts/real_model.py`` leaves in its run folder, side by side in one run.

    python scripts/real_model.py                      # first: the model, the fine-tune, its factors and sweep
    python benchmarks/real_model_speed.py [--repeats 3] [--threads 2]
    # kronfluence on the same model and data (its own script, fresh processes):
    pip install --no-deps kronfluence==1.0.1 einconv opt-einsum einops
    python benchmarks/kronfluence_parity.py --gguf runs/real_model/gguf/SmolLM2-135M-Instruct.Q4_1.gguf --pairs 1

Interleaved, medians of ``--repeats``, on the same batches of the standard-library docs (``--batches`` ×
``--batch-size`` × ``--seq-len`` tokens), all 90 MLP projections:

- one training step (forward and backward with weight gradients) against the factor pass (`fit_factors`) and the
  EK-FAC pass (`fit_eigen_correction`): tokens/s and their ratios;
- the planner's memory for the factor pass (`plan_factors`: accumulators plus one batch) against the peak resident
  memory a fresh process adds above the loaded model while it fits;
- the unmerged adapter of the sweep's pick against the base model, in float32 and bfloat16 (prefill of
  ``--batch-size`` × ``--seq-len`` tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TUNED = "finetuned/finetuned.F16.gguf"


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    # loading the GGUF (dequantizing every tensor) peaks above what the fit adds: the peak starts again from here
    Path("/proc/self/clear_refs").write_text("5")


def load(run: Path):
    from hf_curvedit.gguf import load_gguf_model

    return load_gguf_model(run / "finetuned", "finetuned.F16.gguf")


def batches(tok, args) -> list[torch.Tensor]:
    from hf_curvedit.default import default_text_dataset

    ids = [t for doc in default_text_dataset("train")["text"] for t in tok(doc, add_special_tokens=False)["input_ids"]]
    n = args.batches * args.batch_size * args.seq_len
    block = torch.tensor(ids[:n]).view(args.batches, args.batch_size, args.seq_len)
    return list(block)


def peak_worker(args) -> None:
    """In a fresh process: the peak resident memory that fitting the factors adds above the loaded model."""
    from datasets import Dataset

    from hf_curvedit import FactorConfig, fit_factors

    torch.set_num_threads(args.threads)
    model, tok = load(Path(args.run_dir))
    data = Dataset.from_dict({"input_ids": torch.cat(batches(tok, args)).tolist()})
    before = _status_mib("VmRSS")
    _reset_peak()
    fit_factors(model, data, FactorConfig(seq_len=args.seq_len, batch_size=args.batch_size, packing=False),
                progress=False)
    print("RESULT " + json.dumps({"before": before, "peak": _status_mib("VmHWM")}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/real_model")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak_worker:
        return peak_worker(args)
    from datasets import Dataset

    from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_eigen_correction, fit_factors
    from hf_curvedit.curvature import load_factors, plan_factors
    from hf_curvedit.sweep import SweepResult

    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    model, tok = load(run)
    data_batches = batches(tok, args)
    data = Dataset.from_dict({"input_ids": torch.cat(data_batches).tolist()})
    cfg = FactorConfig(seq_len=args.seq_len, batch_size=args.batch_size, packing=False)
    tokens = args.batches * args.batch_size * (args.seq_len - 1)
    factors = load_factors(run / "factors")

    def train_step() -> None:
        model.train()
        for b in data_batches:
            model(input_ids=b, labels=b).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    def factor_pass() -> None:
        fit_factors(model, data, cfg, progress=False)

    def ekfac_pass() -> None:
        fit_eigen_correction(model, data, factors, cfg, progress=False)

    timings: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, fn in (("training step (forward + backward)", train_step), ("factor pass", factor_pass),
                         ("EK-FAC pass", ekfac_pass)):
            start = time.perf_counter()
            fn()
            timings.setdefault(name, []).append(time.perf_counter() - start)
    print(f"\n{tokens:,} tokens per pass ({args.batches} batches of {args.batch_size} × {args.seq_len}), "
          f"{args.threads} threads, medians of {args.repeats} interleaved runs\n")
    step = statistics.median(timings["training step (forward + backward)"])
    print("| pass | tokens/s | time / training step |\n|---|---|---|")
    for name, runs in timings.items():
        t = statistics.median(runs)
        print(f"| {name} | {tokens / t:,.0f} | {t / step:.2f}× |")

    plan = plan_factors(model, cfg)
    proc = subprocess.run([sys.executable, __file__, "--peak-worker", *sys.argv[1:]], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"the peak worker failed:\n{proc.stderr[-3000:]}")
    peak = json.loads(line[0][7:])
    added = (peak["peak"] - peak["before"]) * 2**20
    print("\n| factor pass memory | MiB |\n|---|---|"
          f"\n| planner: accumulators | {plan.accumulator_bytes / 2**20:,.0f} |"
          f"\n| planner: one batch's forward and backward | {plan.transient_bytes / 2**20:,.0f} |"
          f"\n| planner: per process | {plan.process_bytes / 2**20:,.0f} |"
          f"\n| measured: peak above the loaded model | {added / 2**20:,.0f} ({added / plan.process_bytes:.2f}× the "
          "planner's) |")

    sweep = SweepResult.load(run / "sweep" / "sweep.json")
    settings = sweep.chosen.edit_settings()
    x = data_batches[0]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        base = model.to(dtype)
        edited = build_curvature_edit(base, factors.eigendecompose(run / "factors"), CurvatureEditConfig(**settings))
        runs: dict[str, list[float]] = {"base": [], "unmerged": []}
        with torch.no_grad():
            for _ in range(args.repeats):
                for name in ("base", "unmerged"):
                    start = time.perf_counter()
                    if name == "base":
                        with edited.disable_adapter():
                            edited(input_ids=x)
                    else:
                        edited(input_ids=x)
                    runs[name].append(time.perf_counter() - start)
        model = edited.unload()
        b, u = statistics.median(runs["base"]), statistics.median(runs["unmerged"])
        rows.append(f"| {str(dtype).removeprefix('torch.')} | {b:.2f} s | {u:.2f} s | {u / b:.2f}× |")
    print(f"\nthe pick ({sweep.chosen.layers}, {sweep.chosen.knob}), prefill of {args.batch_size} × {args.seq_len} "
          "tokens\n\n| dtype | base | unmerged adapter | ratio |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
