"""hf-curvedit against kronfluence (the reference K-FAC/EK-FAC library), side by side on the same run.

    # benchmark-only, and without its torchvision requirement (never imported), which would replace the CPU torch:
    pip install --no-deps kronfluence==1.0.1 einconv opt-einsum einops
    python benchmarks/kronfluence_parity.py [--pairs 3] [--batches 8] [--threads 2]

Three stages, each library in its own chain of fresh processes (so each process's peak RSS is that stage's, imports
and model included), the two libraries interleaved pair by pair in alternating order, on a Llama with hidden 512,
4 layers, vocabulary 32000 (or a real model read from a GGUF file, ``--gguf``), batches of 4 × 256 tokens from one
`datasets.Dataset` given to both, empirical labels, float32 accumulation:

- factors: the covariance pass (A and G of every MLP projection);
- eigen: eigendecomposition of those factors (float64);
- ekfac: the EK-FAC pass (the corrected eigenvalues Λ).

Prints per stage the medians of tokens/s (or seconds) and peak RSS, and the ratios hf-curvedit / kronfluence (tokens/s:
higher is better; memory: lower is better), and the relative difference of the factors and of Λ from the last pair.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("factors", "eigen", "ekfac")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args: argparse.Namespace):
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.gguf:  # a real model, and real text: the standard-library docs, in blocks of seq_len tokens
        from hf_curvedit.default import default_text_dataset
        from hf_curvedit.gguf import load_gguf_model

        model, tok = load_gguf_model(None, args.gguf)
        stream = [t for doc in default_text_dataset("train")["text"]
                  for t in tok(doc, add_special_tokens=False)["input_ids"]]
        ids = torch.tensor(stream[:args.batches * args.batch_size * args.seq_len]).view(-1, args.seq_len)
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        names = [n for n, _ in model.named_modules() if n.endswith((".gate_proj", ".up_proj", ".down_proj"))]
        return model, data, names
    torch.manual_seed(0)
    h = args.hidden
    config = LlamaConfig(hidden_size=h, intermediate_size=int(h * 2.6875), num_hidden_layers=args.layers,
                         num_attention_heads=h // 64, num_key_value_heads=h // 64, vocab_size=args.vocab,
                         max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batches * args.batch_size, args.seq_len), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    names = [f"model.layers.{i}.mlp.{p}" for i in range(args.layers) for p in ("gate_proj", "up_proj", "down_proj")]
    return model, data, names


def worker_ours(args: argparse.Namespace, stage: str, folder: Path) -> dict:
    from hf_curvedit import FactorConfig, fit_eigen_correction, fit_factors, load_factors

    model, data, names = build(args)
    cfg = FactorConfig(target_modules=names, label_mode="empirical", seq_len=args.seq_len, batch_size=args.batch_size,
                       packing=False)
    before = peak_rss_mib()
    start = time.perf_counter()
    if stage == "factors":
        fit_factors(model, data, cfg, folder, progress=False)
    elif stage == "eigen":
        load_factors(folder).eigendecompose()
    else:
        fit_eigen_correction(model, data, folder, progress=False)
    return {"seconds": time.perf_counter() - start, "rss_before": before}


def worker_kronfluence(args: argparse.Namespace, stage: str, folder: Path) -> dict:
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    model, data, names = build(args)
    data = data.with_format("torch")

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            return F.cross_entropy(logits, batch["input_ids"][:, 1:].reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            # hf-curvedit's sample positions: a real token with a real next token
            mask = batch["attention_mask"].clone()
            mask[:, -1] = 0
            return mask

    task = LMTask()
    analyzer = Analyzer("parity", prepare_model(model, task), task, cpu=True, disable_tqdm=True,
                        output_dir=str(folder))
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    before = peak_rss_mib()
    start = time.perf_counter()
    common = dict(per_device_batch_size=args.batch_size, factor_args=fargs, overwrite_output_dir=True)
    if stage == "factors":
        analyzer.fit_covariance_matrices("f", data, **common)
    elif stage == "eigen":
        analyzer.perform_eigendecomposition("f", factor_args=fargs, overwrite_output_dir=True)
    else:
        analyzer.fit_lambda_matrices("f", data, **common)
    return {"seconds": time.perf_counter() - start, "rss_before": before}


def compare(ours: Path, kf: Path) -> dict[str, float]:
    """Largest relative Frobenius difference over modules, of A, G and Λ (kronfluence's orders reversed)."""
    import torch
    from safetensors.torch import load_file

    from hf_curvedit import EigenCorrection, load_factors

    f = load_factors(ours)
    corr = EigenCorrection.load(ours)
    root = next((kf / "parity").glob("factors_f"))
    A = load_file(root / "activation_covariance.safetensors")
    nA = load_file(root / "num_activation_covariance_processed.safetensors")
    G = load_file(root / "gradient_covariance.safetensors")
    nG = load_file(root / "num_gradient_covariance_processed.safetensors")
    L = load_file(root / "lambda_matrix.safetensors")
    nL = load_file(root / "num_lambda_processed.safetensors")
    rel = lambda x, y: float(torch.linalg.norm(x.double() - y.double()) / torch.linalg.norm(y.double()))  # noqa: E731
    out = {"A": 0.0, "G": 0.0, "lambda": 0.0}
    for n in f.module_names:
        out["A"] = max(out["A"], rel(f.A[n], A[n] / nA[n]))
        # kronfluence divides G by the number of sequences, hf-curvedit by the number of tokens: compare shapes
        g_kf = G[n] / nG[n]
        out["G"] = max(out["G"], rel(f.G[n] / f.G[n].norm(), g_kf / g_kf.norm()))
        out["lambda"] = max(out["lambda"], rel(corr[n], (L[n] / nL[n]).flip(0).flip(1)))
    return out


def fixed_costs(args: argparse.Namespace) -> tuple[float, float, float, float]:
    """Seconds per fit of the steps whose cost scales with the factors, not the tokens, on this run's factor shapes:
    (mirroring the upper-triangle sums: before, now; the finiteness check: before, now). Medians of 3."""
    import torch

    from hf_curvedit.curvature.sums import mirror_upper
    from hf_curvedit.utils import all_finite

    torch.set_num_threads(args.threads)
    h, m = args.hidden, int(args.hidden * 2.6875)
    shapes = [h, m, m, m, h] * args.layers  # A gate (shared with up), G gate, G up, A down, G down
    mats = [torch.randn(d, d) for d in shapes]

    def timed(fn) -> float:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            for x in mats:
                fn(x)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    return (timed(lambda x: torch.triu(x) + torch.triu(x, 1).mT), timed(mirror_upper),
            timed(lambda x: bool(torch.isfinite(x).all())), timed(all_finite))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default="", help="a real model's GGUF file instead of a random Llama (e.g. SmolLM2-135M "
                   "from scripts/real_model.py); the text is then the standard-library docs")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", nargs=3, metavar=("LIB", "STAGE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        lib, stage, folder = args.worker
        result = (worker_ours if lib == "hf-curvedit" else worker_kronfluence)(args, stage, Path(folder))
        result["peak_rss"] = peak_rss_mib()
        print("RESULT " + json.dumps(result))
        return

    tokens = args.batches * args.batch_size * (args.seq_len - 1)
    results: dict[tuple[str, str], list[dict]] = {}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "pairs")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    last: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            order = ("hf-curvedit", "kronfluence") if pair % 2 == 0 else ("kronfluence", "hf-curvedit")
            for lib in order:
                folder = Path(tmp) / f"{lib}-{pair}"
                for stage in STAGES:
                    cmd = [sys.executable, __file__, *passthrough, "--worker", lib, stage, str(folder)]
                    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
                    if run.returncode or not line:
                        sys.exit(f"{lib} {stage} failed:\n{run.stderr[-3000:]}")
                    r = json.loads(line[0][7:])
                    results.setdefault((lib, stage), []).append(r)
                    print(f"pair {pair + 1} {lib:12s} {stage:8s} {r['seconds']:7.2f} s  peak {r['peak_rss']:7.0f} MiB"
                          f"  (before the stage {r['rss_before']:.0f})", flush=True)
                last[lib] = folder
        diff = compare(last["hf-curvedit"], last["kronfluence"])

    print(f"\n{tokens} tokens per pass, {args.threads} threads, medians of {args.pairs} interleaved pairs\n")
    print("| stage | hf-curvedit | kronfluence | ratio | hf-curvedit peak MiB | kronfluence peak MiB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for stage in STAGES:
        ours, kf = results[("hf-curvedit", stage)], results[("kronfluence", stage)]
        t_o = statistics.median(r["seconds"] for r in ours)
        t_k = statistics.median(r["seconds"] for r in kf)
        m_o = statistics.median(r["peak_rss"] for r in ours)
        m_k = statistics.median(r["peak_rss"] for r in kf)
        if stage == "eigen":
            speed = f"| {t_o:.2f} s | {t_k:.2f} s | {t_k / t_o:.2f}× faster |"
        else:
            speed = f"| {tokens / t_o:,.0f} tok/s | {tokens / t_k:,.0f} tok/s | {t_k / t_o:.2f} |"
        print(f"| {stage} {speed} {m_o:,.0f} | {m_k:,.0f} | {m_o / m_k:.2f} |")
    print(f"\nrelative difference (Frobenius): A {diff['A']:.1e}, G (shape) {diff['G']:.1e}, Λ {diff['lambda']:.1e}")
    if args.gguf:  # the fixed costs below are sized by --hidden and --layers
        return
    mo, mn, fo, fn = fixed_costs(args)
    print(f"fixed costs per fit on these factors: mirroring {mo:.3f} s before, {mn:.3f} s now ({mo / mn:.1f}× less); "
          f"finiteness check {fo:.3f} s before, {fn:.3f} s now ({fo / fn:.1f}× less)")


if __name__ == "__main__":
    main()
