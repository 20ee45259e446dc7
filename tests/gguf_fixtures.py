"""A tiny GGUF file written by the gguf package's writer from a tiny Llama and the embedded default's byte tokenizer,
the way llama.cpp's converter writes one (its metadata keys, tensor names and the permuted q/k rows), for tests that
read and write GGUF without a download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from testing_utils import tiny_llama

from hf_curvedit.default import byte_tokenizer


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores the rotary halves of each q/k head interleaved; transformers' GGUF loader undoes this
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_gguf_model(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama the GGUF files hold (byte vocabulary, untied head)."""
    return tiny_llama(seed=seed, vocab_size=len(byte_tokenizer()), intermediate_size=64, num_hidden_layers=2)


def write_tiny_gguf(path: Path, model: torch.nn.Module | None = None, qtype: str = "F32") -> Path:
    """Write ``model`` (default `tiny_gguf_model`) and the byte tokenizer as a llama GGUF file; 2D weights in
    ``qtype`` (F32, F16, Q8_0, ...), norms in F32."""
    import gguf

    model = model or tiny_gguf_model()
    tok = byte_tokenizer()
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids)
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([])
    writer.add_bos_token_id(tok.eos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    target = gguf.GGMLQuantizationType[qtype]
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 2 and target != gguf.GGMLQuantizationType.F32:
            raw = gguf.quants.quantize(data, target)
            writer.add_tensor(mapped, raw, raw_shape=raw.shape, raw_dtype=target)
        else:
            writer.add_tensor(mapped, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
