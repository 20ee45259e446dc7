"""What checking an adapter's digests costs when it is loaded: the 7B-shaped edit, loaded with and without the check.

The adapter is the paper's edit of OLMo-2 7B in shape: gate and up projections (11008×4096) of three layers, at the
rank k = 1243 that `benchmarks/scale_7b.py` measured for ρ = 0.6 (6 modules, (4096 + 11008)·1243 float32 numbers
each: 450 MB). Its base is a 3-layer bf16 Llama with 7B widths (hidden 4096, MLP 11008; random weights). The edit's
factors are random (the cost of hashing depends on the bytes, not their values), stored the way
`build_curvature_edit` stores them, with the digests it records.

Timed, interleaved (median of ``--repeats`` rounds, order rotated):

- ``PeftModel.from_pretrained`` + one forward, with the digests checked (as shipped) and with the check switched off;
- transformers' ``load_adapter`` + one forward, the same two ways;
- ``verify_adapter_folder`` alone (what ``hf-curvedit evaluate`` and ``publish`` run before any model work).

    python benchmarks/integrity_overhead.py [--repeats 5] [--threads 2] [--layers 3] [--rank 1243]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_curvedit import CurvatureEditConfig
from hf_curvedit.edit import FINGERPRINT_SIZE, META_FIELDS, CurvatureEdit, weight_fingerprint
from hf_curvedit.tuner import layer as layer_module
from hf_curvedit.tuner.build import fill_edits, record_digests
from hf_curvedit.tuner.summary import verify_adapter_folder


def build(folder: Path, layers: int, rank: int, hidden: int, mlp: int) -> None:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    base.save_pretrained(folder / "base")
    names = [f"model.layers.{i}.mlp.{p}" for i in range(layers) for p in ("gate_proj", "up_proj")]
    g = torch.Generator().manual_seed(1)
    edits = {}
    for n in names:
        w = base.get_submodule(n).weight
        meta = torch.zeros(len(META_FIELDS), dtype=torch.float64)
        meta[0] = 0.6
        edits[n] = CurvatureEdit(Q=torch.randn(hidden, rank, generator=g), B=torch.randn(mlp, rank, generator=g),
                                 q_side="input", cutoffs=torch.zeros(mlp, dtype=torch.int64), meta=meta,
                                 fingerprint=weight_fingerprint(w))
        assert edits[n].fingerprint.numel() == FINGERPRINT_SIZE
    from peft import get_peft_model

    config = CurvatureEditConfig(keep_mass=0.6, target_modules=names,
                                 edited_modules={n: {"k": rank, "q_side": "input"} for n in names})
    config.base_model_name_or_path = str(folder / "base")
    peft_model = get_peft_model(base, config)
    fill_edits(peft_model, "default", edits)
    record_digests(peft_model, "default", peft_model.peft_config["default"])
    peft_model.save_pretrained(folder / "adapter")


@contextlib.contextmanager
def digests(checked: bool):
    """Switch the digest check off (``checked=False``) for a comparison run."""
    original = layer_module.digest_problem
    if not checked:
        layer_module.digest_problem = lambda *a, **k: None
    try:
        yield
    finally:
        layer_module.digest_problem = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--rank", type=int, default=1243)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        build(folder, args.layers, args.rank, args.hidden, args.mlp)
        size = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
        print(f"built the base and a {size / 1e6:.0f} MB adapter in {time.perf_counter() - t:.0f} s")
        x = torch.randint(0, 256, (1, 8))
        base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.bfloat16).eval()

        def peft_load() -> None:
            model = PeftModel.from_pretrained(base, folder / "adapter")
            with torch.no_grad():
                model(input_ids=x)
            model.unload()

        def transformers_load() -> None:
            base.load_adapter(str(folder / "adapter"), adapter_name="bench")
            with torch.no_grad():
                base(input_ids=x)
            base.delete_adapter("bench")

        variants = {
            "PeftModel.from_pretrained + forward, digests checked": (peft_load, True),
            "PeftModel.from_pretrained + forward, no check": (peft_load, False),
            "load_adapter + forward, digests checked": (transformers_load, True),
            "load_adapter + forward, no check": (transformers_load, False),
            "verify_adapter_folder": (lambda: verify_adapter_folder(folder / "adapter"), True),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.repeats):
            order = list(variants)[r % len(variants):] + list(variants)[: r % len(variants)]
            for name in order:
                fn, checked = variants[name]
                with digests(checked):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{args.layers} layers × gate/up ({args.mlp}×{args.hidden}, k = {args.rank}), {size / 1e6:.0f} MB, "
              f"{args.threads} threads, median of {args.repeats}\n")
        print("| load path | time | checked / unchecked |")
        print("|---|---|---|")
        for path in ("PeftModel.from_pretrained + forward", "load_adapter + forward"):
            on, off = med[f"{path}, digests checked"], med[f"{path}, no check"]
            print(f"| {path} | {on:.2f} s (no check: {off:.2f} s) | {on / off:.2f}× |")
        v = med["verify_adapter_folder"]
        print(f"| verify_adapter_folder (no model) | {v:.2f} s ({size / 1e9 / v:.2f} GB/s) | – |")


if __name__ == "__main__":
    main()
