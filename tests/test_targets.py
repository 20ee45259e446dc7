"""Architecture defaults pick the MLP projections of each supported family."""

from __future__ import annotations

import pytest
import transformers

from hf_curvedit.targets import resolve_target_modules

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL, {"gate_proj", "up_proj", "down_proj"}),
    "mistral": ("MistralConfig", "MistralForCausalLM", SMALL, {"gate_proj", "up_proj", "down_proj"}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL, {"gate_proj", "up_proj", "down_proj"}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", SMALL, {"gate_proj", "up_proj", "down_proj"}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(SMALL, head_dim=8), {"gate_proj", "up_proj", "down_proj"}),
    # transformers 5.0's Phi reads config.pad_token_id without a default
    "phi": ("PhiConfig", "PhiForCausalLM", dict(SMALL, num_key_value_heads=4, pad_token_id=0), {"fc1", "fc2"}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4), {"dense_h_to_4h", "dense_4h_to_h"}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4), {"c_fc", "c_proj"}),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_default_targets_are_the_mlp_projections(arch):
    cfg_cls, model_cls, kwargs, leaves = CASES[arch]
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs))
    names = resolve_target_modules(model)
    assert len(names) == 2 * len(leaves), names
    assert {n.rsplit(".", 1)[-1] for n in names} == leaves
    assert all(".mlp." in n for n in names), "attention projections (e.g. GPT-2 attn.c_proj) are not MLP"
