"""Tokens/s of K-FAC factor collection against a plain training step, on a small Llama on CPU.

    python benchmarks/factor_throughput.py [--threads 1] [--repeats 7]

(a) forward + backward of a plain training step (weight gradients, no optimizer);
(b) factor collection for all MLP projections (gate, up, down) of every layer, default settings
    (sampled labels, fp32 accumulation).
Both are timed interleaved in one run, so a noisy shared machine affects them alike; the ratio b/a
is the figure to read (target ≤ 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_curvedit import FactorConfig
from hf_curvedit.curvature import collect_factor_sums
from hf_curvedit.targets import resolve_target_modules


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable ratios on a shared machine)")
    p.add_argument("--label-mode", default="sampled", choices=["sampled", "empirical"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                      vocab_size=args.vocab, max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = resolve_target_modules(model)
    fcfg = FactorConfig(seq_len=args.seq_len, batch_size=args.batch_size, label_mode=args.label_mode)
    tokens = args.batch_size * (args.seq_len - 1)

    def train_step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), ids[:, 1:].reshape(-1)).backward()

    def collect() -> None:
        model.zero_grad(set_to_none=True)
        collect_factor_sums(model, [(0, batch)], names, fcfg)

    for fn in (train_step, collect):  # warm-up
        fn()
    times: dict[str, list[float]] = {"train": [], "collect": []}
    for _ in range(args.repeats):
        for key, fn in (("train", train_step), ("collect", collect)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Llama hidden={args.hidden} mlp={4 * args.hidden} layers={args.layers} seq={args.seq_len} "
          f"batch={args.batch_size} vocab={args.vocab} threads={args.threads}; {len(names)} target modules")
    print(f"{'step':<34}{'median s':>10}{'tokens/s':>12}")
    print(f"{'(a) forward+backward training':<34}{med['train']:>10.4f}{tokens / med['train']:>12.0f}")
    print(f"{'(b) factor collection (MLP, all)':<34}{med['collect']:>10.4f}{tokens / med['collect']:>12.0f}")
    print(f"ratio b/a (time): {med['collect'] / med['train']:.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
