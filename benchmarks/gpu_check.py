"""GPU check at 1B and 7B shapes: factor collection speed, peak memory, eigendecomposition, edit build, adapter cost.

On one CUDA device, Llama models built from configs in bf16 with random weights (nothing is downloaded):

- ``fit_factors`` over a fixed number of synthetic tokens for every MLP projection of every layer, in one pass;
  tokens/s next to a plain training step (forward + backward with weight gradients) on the same batches, and the peak
  GPU memory of each;
- `symmetric_eigh` on the GPU (float64) of the largest G and A factors of one layer;
- the edit build (eigendecomposition of the edited modules + `build_curvature_edit`) of the paper's recipe:
  gate and up projections of three late layers at ρ = 0.6;
- the whole model's forward with the edit unmerged and merged, against the base.

It prints one Markdown table. Budget: under 8 minutes on one H100/H200-class GPU.

    python benchmarks/gpu_check.py                      # 1B and 7B shapes, CUDA
    python benchmarks/gpu_check.py --shapes tiny --device cpu --tokens 4096   # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_curvedit import CurvatureEditConfig, FactorConfig, KFACEigen, ModuleEigen, build_curvature_edit, fit_factors
from hf_curvedit.curvature.eigen import symmetric_eigh

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
GIB = 1024**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured(device: torch.device, out: dict, key: str) -> Iterator[None]:
    """Time the block (synchronized) and record the peak GPU memory it reached."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    yield
    _sync(device)
    out[f"{key}_s"] = time.perf_counter() - start
    out[f"{key}_peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")


def check(shape: str, device: torch.device, tokens: int, seq_len: int, batch_size: int) -> dict:
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 128))
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    n_blocks = tokens // seq_len
    ids = torch.randint(0, cfg.vocab_size, (n_blocks, seq_len), generator=g)
    out: dict = {"shape": shape, "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
                 "tokens": n_blocks * seq_len}

    # a plain training step on the same batches: forward + backward with weight gradients
    with measured(device, out, "step"):
        for i in range(0, n_blocks, batch_size):
            batch = ids[i:i + batch_size].to(device)
            model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)

    data = Dataset.from_dict({"input_ids": ids.tolist()})
    fcfg = FactorConfig(seq_len=seq_len, batch_size=batch_size, max_tokens=n_blocks * seq_len, checkpoint_every=0)
    with measured(device, out, "fit"):
        factors = fit_factors(model, data, fcfg, progress=False)
    out["modules"] = len(factors.module_names)
    out["factor_gib"] = sum(t.numel() * t.element_size() for t in (*factors.G.values(),
                            *(factors.A[n] for n in factors.module_names if n not in factors.a_alias))) / GIB

    last = cfg.num_hidden_layers - 1
    big = factors.G[f"model.layers.{last}.mlp.up_proj"]
    small = factors.A[f"model.layers.{last}.mlp.up_proj"]
    for key, matrix in (("eigh_big", big), ("eigh_small", small)):
        with measured(device, out, key):
            symmetric_eigh(matrix, device=device)

    layers = [max(0, cfg.num_hidden_layers - k) for k in (4, 3, 2)]  # three late layers, as the paper's 23-25 of 32
    names = [f"model.layers.{i}.mlp.{p}" for i in layers for p in ("gate_proj", "up_proj")]
    with measured(device, out, "edit"):
        eigen = {}
        for n in names:
            va, ua = symmetric_eigh(factors.A[n], device=device)
            vg, ug = symmetric_eigh(factors.G[n], device=device)
            eigen[n] = ModuleEigen(va, ua, vg, ug)
        edited = build_curvature_edit(model, KFACEigen(eigen), CurvatureEditConfig(keep_mass=0.6, target_modules=names))
    del factors

    x = ids[:batch_size].to(device)

    def forward_time(repeats: int = 5) -> float:
        with torch.no_grad():
            edited(input_ids=x)
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                edited(input_ids=x)
            _sync(device)
        return (time.perf_counter() - start) / repeats

    with edited.disable_adapter():
        out["fwd_base_s"] = forward_time()
    out["fwd_unmerged_s"] = forward_time()
    edited.merge_adapter()
    out["fwd_merged_s"] = forward_time()
    edited.unmerge_adapter()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1B", "7B"], choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=65536, help="synthetic tokens per fit (and per training-step pass)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu --shapes tiny for a smoke run")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# GPU check on {where}, torch {torch.__version__}, bf16 models, {args.tokens} tokens per pass\n")
    print("| shape | params | modules | factors | fit tok/s | step tok/s | fit / step time | fit peak | step peak "
          "| eigh G (s) | eigh A (s) | edit build (s) | fwd unmerged / base | fwd merged / base |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        r = check(shape, device, args.tokens, args.seq_len, args.batch_size)
        print(f"| {shape} | {r['params_b']:.2f}B | {r['modules']} | {r['factor_gib']:.1f} GiB | "
              f"{r['tokens'] / r['fit_s']:,.0f} | {r['tokens'] / r['step_s']:,.0f} | {r['fit_s'] / r['step_s']:.2f}× | "
              f"{r['fit_peak'] / GIB:.1f} GiB | {r['step_peak'] / GIB:.1f} GiB | {r['eigh_big_s']:.1f} | "
              f"{r['eigh_small_s']:.1f} | {r['edit_s']:.1f} | {r['fwd_unmerged_s'] / r['fwd_base_s']:.2f}× | "
              f"{r['fwd_merged_s'] / r['fwd_base_s']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
