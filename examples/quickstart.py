"""Quick start: fit curvature factors, build a ρ = 0.6 edit, toggle it, save it, load it back.

Runs offline on the embedded default model in about a minute on 2 CPU cores:
    python examples/quickstart.py
"""
import torch
from peft import PeftModel

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors
from hf_curvedit.default import default_text_dataset, load_default_model

model, tok = load_default_model()                        # small byte-level Llama
text = default_text_dataset("train")                     # general text: Python's stdlib docs
factors = fit_factors(model, text, FactorConfig(seq_len=256, max_tokens=65_536), "runs/quickstart", tokenizer=tok)
edited = build_curvature_edit(model, factors, CurvatureEditConfig(
    keep_mass=0.6, target_modules=r".*layers\.[23]\.mlp\.(gate|up)_proj"))
print(edited.edit_report()[0])

x = tok("def fibonacci(n):", return_tensors="pt").input_ids
with torch.no_grad():
    on = edited(x).logits
    with edited.disable_adapter():                       # the base model, bit for bit
        off = edited(x).logits
print("adapter changes the logits:", not torch.equal(on, off))

edited.save_pretrained("runs/quickstart/edit")           # adapter_config.json + adapter_model.safetensors
base, _ = load_default_model()
reloaded = PeftModel.from_pretrained(base, "runs/quickstart/edit")
with torch.no_grad():
    print("reloaded edit gives the same logits:", torch.equal(reloaded(x).logits, on))
