"""Pythia-160m: fit factors on general text, sweep ρ on two middle layers, save the adapters.

    python examples/pythia160m.py --output-dir runs/pythia160m              # CPU: ~1 h for 2M tokens
    accelerate launch --num_processes 2 examples/pythia160m.py --output-dir runs/pythia160m   # GPUs

GPT-NeoX MLPs are `mlp.dense_h_to_4h` / `mlp.dense_4h_to_h` (the architecture default). Pythia was
trained on the Pile; fit the factors on general text (here wikitext), not on text it memorized.
Estimates, not measurements: 2M tokens is ~2e15 FLOPs forward+backward, about a minute on one GPU;
factors for 2 layers x (A 768² + G 3072²) are ~80 MB.
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="EleutherAI/pythia-160m")
    p.add_argument("--layers", default="6,7")
    p.add_argument("--keep-mass", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    p.add_argument("--max-tokens", type=int, default=2_000_000)
    p.add_argument("--output-dir", required=True)
    args = p.parse_args()

    from accelerate import PartialState

    state = PartialState()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(state.device)
    layers = "|".join(args.layers.split(","))
    targets = rf".*layers\.({layers})\.mlp\.dense_h_to_4h"
    text = load_dataset("wikitext", "wikitext-103-raw-v1", split="train", streaming=True)
    factors = fit_factors(model, text, FactorConfig(target_modules=targets, seq_len=512, batch_size=8,
                                                    max_tokens=args.max_tokens, dataset="wikitext-103"),
                          args.output_dir, tokenizer=tok)
    if not state.is_main_process:
        return
    eigen = factors.eigendecompose()
    for rho in args.keep_mass:
        edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=rho, target_modules=targets))
        edited.save_pretrained(f"{args.output_dir}/edit-rho{rho:g}")
        model = edited.unload()


if __name__ == "__main__":
    main()
