"""The paper's recipe for OLMo-2 (Merullo et al. 2025, docs/method.md §8), on GPUs with accelerate.

    # 1 GPU
    python examples/olmo2_paper_recipe.py --model allenai/OLMo-2-1124-7B --output-dir runs/olmo2-7b
    # 8 GPUs: each process takes every 8th batch; sums are reduced once at the end
    accelerate launch --num_processes 8 examples/olmo2_paper_recipe.py --model allenai/OLMo-2-1124-7B \
        --output-dir runs/olmo2-7b

Settings from the paper: factors from ~20M tokens of the pretraining mix in 512-token blocks, true
Fisher (sampled labels); edit gate and up of layers 23, 24, 25 (7B; the 1B model has 16 layers: use
e.g. 11-13) at ρ = 0.6, down_proj untouched; ρ search range 0.6-0.9.

Measured here (no GPU; see README "At scale"): `hf-curvedit plan` gives 2.9 GiB of fp32 factor accumulators for
these 6 modules (3 x (A 4096², shared by gate and up, + 2 x G 11008²)), next to the 14 GB bf16 model, in one data
pass; the fp64 eigendecomposition of one 11008² factor took 260 s on 2 CPU cores (peak 3.7 GiB above the factor) and
is cached; building the edit of one 7B-shaped gate or up weight took 19 s at ρ = 0.6 on the same machine (benchmarks/
scale_7b.py). Still an estimate: the 7B forward+backward over 20M tokens is ~8e17 FLOPs, roughly 30-60 min on one
H100 in bf16 and a few minutes on 8 (benchmarks/gpu_check.py measures this on the day a GPU is available).
The run resumes from its last checkpoint if killed (same --output-dir, same number of processes).
"""

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="allenai/OLMo-2-1124-7B")
    p.add_argument("--dataset", default="allenai/dolmino-mix-1124", help="general pretraining-style text")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--layers", default="23,24,25")
    p.add_argument("--keep-mass", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    p.add_argument("--max-tokens", type=int, default=20_000_000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args()

    from accelerate import PartialState

    state = PartialState()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(state.device)
    layers = "|".join(args.layers.split(","))
    targets = rf".*layers\.({layers})\.mlp\.(gate_proj|up_proj)"
    text = load_dataset(args.dataset, args.dataset_config, split="train", streaming=True)
    factors = fit_factors(model, text, FactorConfig(target_modules=targets, seq_len=args.seq_len,
                                                    batch_size=args.batch_size, max_tokens=args.max_tokens,
                                                    dataset=args.dataset),
                          args.output_dir, tokenizer=tok)
    if not state.is_main_process:
        return
    eigen = factors.eigendecompose()
    for rho in args.keep_mass:
        edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=rho, target_modules=targets))
        edited.save_pretrained(f"{args.output_dir}/edit-rho{rho:g}")
        model = edited.unload()
    print(f"adapters in {args.output_dir}/edit-rho*; measure them with `hf-curvedit evaluate`")


if __name__ == "__main__":
    main()
