"""Tiny randomly initialised causal language models, one per model family of transformers.

This is the model zoo of hf-curvedit's per-family lifecycle tests: every family that ``AutoModelForCausalLM`` maps
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) is either built tiny here or listed in :data:`SKIPPED` with the reason.

A tiny config is a shared base of keys (:data:`BASE`: vocabulary 128, hidden size 32, 2 layers, 4 heads and 2 KV
heads, MLP 64, 4 routed experts with top-2 routing and expert MLP 32, 128 positions, pad 0, bos 1, eos 2), filtered to
the keys each config class has, plus the family's overrides (:data:`TINY`). The overrides make sure that mixture-of-
experts families have at least one MoE layer and hybrid families at least one attention layer and one MLP/MoE layer;
comments say why the less obvious ones are there. Multimodal families whose causal LM is a text model get a tiny
``text_config``; wrappers that run on text alone also get a tiny vision/audio tower. Their image/audio token ids stay
outside the 128-token vocabulary, so random ids never ask for a missing image.

:func:`check_family` is the smoke test every entry of :data:`TINY` passes: a padded forward, a summed cross-entropy and
a backward, with finite logits and parameters. The tests also run on transformers 5.0, which lacks the newer families:
iterate over :func:`available_families`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

VOCAB = 128

# Keys shared by the families, under every name the config classes use for them. Only the keys a config class has are
# passed to it (an unknown key would be stored silently); spellings of one quantity carry the same value.
BASE: dict = dict(
    vocab_size=VOCAB,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # width
    hidden_size=32, n_embd=32, d_model=32,
    # depth
    num_hidden_layers=2, n_layer=2, n_layers=2, num_layers=2,
    # attention
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4,
    num_key_value_heads=2, num_kv_heads=2,
    head_dim=8, kv_channels=8,
    max_position_embeddings=128, n_positions=128, n_ctx=128, max_seq_len=128,
    # MLP
    intermediate_size=64, n_inner=64, ffn_dim=64, ffn_hidden_size=64,
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, moe_k=2,
    moe_intermediate_size=32, expert_ffn_hidden_size=32,
    shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32, shared_experts_intermediate_size=32,
    n_group=1, topk_group=1, num_expert_group=1,
    first_k_dense_replace=1, num_dense_layers=1,
    # multi-head latent attention
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, qk_head_dim=8, v_head_dim=8,
    # linear attention / state space layers
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    mamba_n_heads=4, mamba_d_head=16, mamba_num_heads=4, mamba_head_dim=16, mamba_d_state=8, ssm_state_size=8,
    state_size=8, mamba_chunk_size=16, chunk_size=16, mamba_n_groups=1, n_groups=1, time_step_rank=4, mamba_dt_rank=4,
    linear_head_dim=8, linear_num_heads=4,
    # sparse-attention indexers, compressed/low-rank projections, hyper-connections
    index_n_heads=2, index_head_dim=8, index_topk=8, o_groups=2, o_lora_rank=16, hc_lowrank=8,
    swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
    # other widths that default to a full-size model
    shared_intermediate_size=32, dense_intermediate_size=64, prefix_dense_intermediate_size=64,
    intermediate_size_mlp=64, router_hidden_size=16, lru_width=32, rotary_dim=4, word_embed_proj_dim=32,
)

# Multi-head latent attention: the rotary part of the query/key head is the config's head_dim, and keys and values are
# computed for every head.
_MLA = dict(num_key_value_heads=4, head_dim=4)

# model_type -> the overrides that make that family tiny, on top of the keys of BASE its config class has.
TINY: dict[str, dict] = {
    "afmoe": {},
    "apertus": {},
    "arcee": {},
    "aria_text": {},
    "axk1": {**_MLA, "mlp_layer_types": ["dense", "sparse"]},
    "axk2": {**_MLA, "mlp_layer_types": ["dense", "sparse"]},
    "bailing_hybrid": {**_MLA, "layer_types": ["linear_attention", "full_attention"],
                       "mlp_layer_types": ["dense", "sparse"]},
    "bamba": {"attn_layer_indices": [1]},  # layer 0 mamba, layer 1 attention
    "beam": {"mlp_layer_types": ["dense", "sparse"]},  # its first three layers are dense by default
    "biogpt": {},
    "bitnet": {},
    "bloom": {},
    "codegen": {},
    "cohere": {},
    "cohere2": {"layer_types": ["sliding_attention", "full_attention"]},
    "cohere2_moe": {"layer_types": ["sliding_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"],
                    "num_shared_experts": 1},
    "cohere_compass_text": {"layer_types": ["sliding_attention", "full_attention"],
                            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                "full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "cpmant": {"dim_ff": 64, "dim_head": 8},
    "ctrl": {"dff": 64},
    "cwm": {},
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not declare, and clamps with
    # clip_qkv, which must not be None (real DBRX checkpoints use 8)
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
    "deepseek_v2": {**_MLA},
    "deepseek_v3": {**_MLA},
    "deepseek_v32": {**_MLA, "mlp_layer_types": ["dense", "sparse"]},
    "deepseek_v4": {"layer_types": ["compressed_sparse_attention", "heavily_compressed_attention"],
                    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                    "mlp_layer_types": ["hash_moe", "moe"]},
    "diffllama": {},
    "doge": {},
    "dots1": {"n_shared_experts": 1},  # the default (None) does not build
    "dots3_note_text": {**_MLA, "mlp_layer_types": ["dense", "sparse"]},
    "ernie4_5": {},
    "ernie4_5_moe": {},
    "exaone4": {"layer_types": ["sliding_attention", "full_attention"]},
    "exaone_moe": {"layer_types": ["sliding_attention", "full_attention"]},
    "falcon": {},
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_d_head": 16},  # parallel attention + mamba in every layer
    "falcon_mamba": {},
    "flex_olmo": {},
    "flint": {"mlp_only_layers": [0]},  # layers 0 and 1 are dense by default
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"]},
    # gemma3n/gemma4 per-layer embeddings (PLE) are sized by hidden_size_per_layer_input and vocab_size_per_layer_input
    "gemma3n_text": {"layer_types": ["sliding_attention", "full_attention"], "num_kv_shared_layers": 0,
                     "activation_sparsity_pattern": [0.95, 0.0], "hidden_size_per_layer_input": 8,
                     "vocab_size_per_layer_input": VOCAB, "laurel_rank": 8},
    # the MoE variant: every layer has the dense MLP plus a router and experts beside it
    "gemma4_text": {"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB, "global_head_dim": 16,
                    "enable_moe_block": True, "top_k_experts": 2},
    "gemma4_unified_text": {"global_head_dim": 16},
    "glm": {},
    "glm4": {},
    "glm4_moe": {},
    "glm4_moe_lite": {**_MLA, "mlp_layer_types": ["dense", "sparse"]},
    "glm_moe_dsa": {**_MLA, "mlp_layer_types": ["dense", "sparse"]},
    "gpt-sw3": {},
    "gpt2": {},
    "gpt_bigcode": {},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 8},
    "gpt_neox": {},
    "gpt_neox_japanese": {"intermediate_multiple_size": 2},
    "gpt_oss": {},
    "gptj": {},
    "granite": {},
    "granite_swa": {},
    "granitemoe": {},
    "granitemoe_swa": {},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # all mamba by default
    "granitemoeshared": {},
    "helium": {},
    "hrm_text": {},
    "hunyuan_v1_dense": {},
    "hunyuan_v1_moe": {},
    "hy_v3": {},
    "hy_v4": {"mlp_layer_types": ["dense", "sparse"]},
    "hyperclovax": {},
    # the relative-position logits span rel_extent (full layers) or sliding_window_size (sliding layers)
    "inkling2_text": {"layer_types": ["hybrid_sliding", "hybrid"], "rel_extent": 16, "sliding_window_size": 8},
    "inkling_text": {"layer_types": ["hybrid_sliding", "hybrid"], "mlp_layer_types": ["dense", "sparse"],
                     "rel_extent": 16, "sliding_window_size": 8},
    "internlm3": {},
    "iquestcoder": {},
    "jais2": {},
    # layer 0: mamba + dense MLP, layer 1: attention + MoE
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2},
    "jetmoe": {},
    "kimi_linear": {**_MLA, "layer_types": ["linear_attention", "full_attention"],
                    "mlp_layer_types": ["dense", "sparse"]},
    "kolibri1": {},
    "laguna": {},
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False},  # keep the MLP at 64
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "lfm3": {"layer_types": ["conv", "full_attention"]},
    "llama": {},
    "llama4_text": {"interleave_moe_layer_step": 2},  # layer 0 dense, layer 1 MoE
    "longcat_flash": {**_MLA, "zero_expert_num": 2},  # identity ("zero") experts beside the 4 routed ones
    "mamba": {},
    "mamba2": {"head_dim": 16},  # num_heads * head_dim = expand * hidden_size
    "mellum": {},
    "mimo_v2_flash": {},
    "minicpm3": {**_MLA},
    "minimax": {},
    "minimax_m2": {},
    "minimax_m3_vl_text": {},
    "ministral": {},
    "ministral3": {},
    "mistral": {},
    "mixtral": {},
    "modernbert-decoder": {"cls_token_id": 1, "sep_token_id": 2},
    "moshi": {},
    "mpt": {},
    "nanochat": {},
    "nemotron": {},
    "nemotron_h": {},
    "olmo": {},
    "olmo2": {},
    "olmo3": {"layer_types": ["sliding_attention", "full_attention"]},
    "olmo_hybrid": {},
    "olmoe": {},
    "openai-gpt": {},
    "opt": {},
    "persimmon": {},
    "phi": {},
    "phi3": {},
    "phimoe": {},
    "qwen2": {},
    "qwen2_moe": {},
    "qwen3": {},
    # Qwen3.5/Qwen3-Next/Qwen4-Exp: a gated delta-net layer, then an attention layer
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_moe": {},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen4_exp_text": {"layer_types": ["linear_attention", "indexed_attention"], "indexer_n_heads": 2,
                       "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8, "indexer_compress_ratio": 4},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "rwkv": {},
    "seed_oss": {},
    "smollm3": {},
    "solar_open": {},
    "stablelm": {},
    "starcoder2": {},
    "vaultgemma": {},
    "xglm": {},
    "xlstm": {},
    "youtu": {**_MLA},
    # the shared transformer block is tied across the hybrid layers: two of them are needed
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"], "n_mamba_heads": 4, "adapter_rank": 8},
    "zaya": {"num_experts_per_tok": 1},  # ZAYA routes to one expert only
}

# Families whose causal LM is the text model of a multimodal config: AutoModelForCausalLM builds it from text_config.
TINY.update({
    "dots3_note": {"text_config": TINY["dots3_note_text"], "vision_config": {"adapter_out_dim": 32},
                   "audio_config": {"adapter_out_dim": 32}},
    "emu3": {"text_config": {}},
    "llama4": {"text_config": TINY["llama4_text"]},
    "mllama": {"text_config": {"cross_attention_layers": []}},
    "qwen3_5": {"text_config": TINY["qwen3_5_text"]},
    "qwen3_5_moe": {"text_config": TINY["qwen3_5_moe_text"]},
    "qwen4_exp": {"text_config": TINY["qwen4_exp_text"]},
})

# Byte Latent Transformer: an entropy patcher, a local encoder and decoder over bytes, a global model over patches.
_BLT_LOCAL = dict(vocab_size=VOCAB, hidden_size=32, hidden_size_global=64, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=64, head_dim=8, max_position_embeddings=128)
TINY["blt"] = {
    "max_position_embeddings": 128, "encoder_hash_byte_group_vocab": 64, "local_attention_window_len": 8,
    "patcher_config": {**_BLT_LOCAL, "num_hidden_layers": 2, "num_key_value_heads": 2},
    "encoder_config": {**_BLT_LOCAL, "num_hidden_layers": 1},
    "decoder_config": {**_BLT_LOCAL, "num_hidden_layers": 2},
    "global_config": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                          intermediate_size=64, head_dim=16, max_position_embeddings=128),
}

# A tiny ViT: 28x28 images in 2x2 patches of 14 pixels.
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=14)

# Multimodal wrappers whose causal-LM class also runs on text alone: a tiny text model and a tiny vision tower.
TINY.update({
    "gemma3": {"text_config": TINY["gemma3_text"], "vision_config": _VIT, "mm_tokens_per_image": 4},
    "gemma4": {"text_config": TINY["gemma4_text"]},
    "gemma4_unified": {"text_config": TINY["gemma4_unified_text"]},
    "git": {"vision_config": _VIT},
    "got_ocr2": {"text_config": {}, "vision_config": {**_VIT, "image_size": 64, "patch_size": 16, "output_channels": 32,
                                                      "mlp_dim": 64, "window_size": 2, "global_attn_indexes": [1]}},
    "fuyu": {"text_config": TINY["persimmon"], "image_size": 30, "patch_size": 15},
    "phi4_multimodal": {"vision_config": _VIT, "audio_config": {"hidden_size": 32, "intermediate_size": 64,
                                                                "num_blocks": 2, "num_attention_heads": 4,
                                                                "ext_pw_out_channel": 32,
                                                                "depthwise_separable_out_channel": 32,
                                                                "nemo_conv_channels": 32}},
    "moss_transcribe_diarize": {"text_config": {}, "audio_config": {"hidden_size": 32, "intermediate_size": 64,
                                                                    "num_hidden_layers": 2, "num_attention_heads": 4}},
})

# model_type -> why no tiny model of that family is built.
SKIPPED: dict[str, str] = {}
for _name in ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
              "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl",
              "xmod"):
    SKIPPED[_name] = "encoder-only family, causal only through is_decoder"
for _name in ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus",
              "plbart", "prophetnet", "trocr", "whisper"):
    SKIPPED[_name] = "decoder half of an encoder-decoder family"
SKIPPED.update({
    "xlm": "cross-lingual masked/causal language model of the encoder family (no plain causal decoder)",
    "xlnet": "permutation language model, not a causal decoder",
    "reformer": "LSH/chunked attention needs sequence lengths tied to its chunk lengths",
    "gemma3n": "multimodal wrapper whose vision tower needs the timm library (gemma3n_text is built)",
    "gemma4_assistant": "speculative-decoding drafter: ignores input_ids, runs on the target model's states",
    "gemma4_unified_assistant": "speculative-decoding drafter: ignores input_ids, runs on the target model's states",
    "musicgen": "decoder over parallel audio codebooks (batch x codebooks ids), not buildable from MusicgenConfig",
    "musicgen_melody": "decoder over parallel audio codebooks (batch x codebooks ids), not buildable from its config",
})


@functools.cache
def _known_keys(config_class: type) -> frozenset[str]:
    """The keys a config class has: its dataclass fields, its attributes once built, and its attribute_map aliases."""
    keys = set(vars(config_class()))
    if dataclasses.is_dataclass(config_class):
        keys |= {f.name for f in dataclasses.fields(config_class)}
    keys |= set(getattr(config_class, "attribute_map", None) or {})
    return frozenset(keys)


def _fit(config_class: type, overrides: dict) -> dict:
    """The keys of BASE that ``config_class`` has, then the overrides; a ``text_config`` dict is fitted the same way.

    The overrides are passed as given (some are init-only arguments, e.g. gemma4's ``global_head_dim``). Sub-configs
    other than ``text_config`` (vision, audio) are not fitted: a text-only causal LM does not build them, and the
    multimodal families spell out their tiny towers.
    """
    known = _known_keys(config_class)
    aliases = getattr(config_class, "attribute_map", None) or {}
    # An alias whose target is also in BASE is left out, so that the target's own value wins: deepseek_v4 aliases
    # intermediate_size to moe_intermediate_size, gpt2 hidden_size to n_embd.
    kwargs = {key: value for key, value in BASE.items() if key in known and aliases.get(key) not in BASE}
    kwargs.update(overrides)
    text = kwargs.get("text_config")
    if isinstance(text, dict):
        # a text_config declared as AutoConfig takes its class from its model_type: by default the composite's own
        text_type = text.get("model_type") or config_class().text_config.model_type
        kwargs["text_config"] = {**_fit(CONFIG_MAPPING[text_type], text), "model_type": text_type}
    return kwargs


def tiny_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    """The tiny config of a family of :data:`TINY`, with ``overrides`` (config keyword arguments) on top."""
    if model_type in SKIPPED:
        raise ValueError(f"{model_type} has no tiny config: {SKIPPED[model_type]}")
    config_class = CONFIG_MAPPING[model_type]
    return config_class(**_fit(config_class, {**TINY[model_type], **overrides}))


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny causal LM of a family of :data:`TINY`, randomly initialised from ``seed``, in eval mode and float32."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).float().eval()


def available_families() -> list[str]:
    """The families of :data:`TINY` that the installed transformers has (5.0 lacks the newer ones)."""
    return [name for name in TINY if name in CONFIG_MAPPING_NAMES]


def check_family(model_type: str) -> None:
    """Build a family's tiny model, run a padded forward and a backward, and raise if anything is wrong.

    The batch is (2, 12) random ids in [1, vocab) with the last two positions of the second row masked out. The logits
    must be (2, 12, vocab) and finite, the summed cross-entropy must backpropagate, and every floating-point parameter
    must be finite.
    """
    model = tiny_causal_lm(model_type)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if tuple(logits.shape) != (2, 12, vocab):
        raise AssertionError(f"{model_type}: logits of shape {tuple(logits.shape)}, expected (2, 12, {vocab})")
    if not torch.isfinite(logits).all():
        raise AssertionError(f"{model_type}: non-finite logits")
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids.reshape(-1), reduction="sum")
    loss.backward()
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise AssertionError(f"{model_type}: non-finite parameters {bad[:5]}")


# The zoo's configs are written for the newest transformers pyproject.toml allows; on older versions a tiny model may
# not run at all (JetMoE's config lacks pad_token_id on 5.0, DBRX's experts fail on their own shapes): skipped there
# with the reason, never on the newest version (as tests/test_families.py does).
OLDER_TRANSFORMERS = Version(transformers.__version__) < Version("5.23")


def _base_fails(family: str) -> str | None:
    if not OLDER_TRANSFORMERS:
        return None
    try:
        model = tiny_causal_lm(family)
        ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
    except Exception as err:
        return f"the tiny {family} does not run on transformers {transformers.__version__}: {type(err).__name__}"
    return None


def runnable_families(names: list[str], fast: Collection[str] | None = None) -> list:
    """``pytest.param`` per family, skipped (with the reason) where this transformers lacks it or cannot run it; with
    ``fast``, the other families are slow (`testing_utils.slow`: RUN_SLOW=1 runs them)."""
    from testing_utils import SLOW

    have = set(available_families())
    params = []
    for f in names:
        why = f"transformers lacks {f}" if f not in have else _base_fails(f)
        if why is None and old_dbrx(f):
            why = ("this transformers' DbrxExperts computes with the transposes of DBRX checkpoints inverted and "
                   "reshapes tokens by ffn_hidden_size (huggingface/transformers#47671): DBRX does not run there")
        marks = [pytest.mark.skipif(why is not None, reason=why or "")]
        params.append(pytest.param(f, marks=[*marks, *(SLOW if fast is not None and f not in fast else ())]))
    return params


def old_dbrx(family: str) -> bool:
    """transformers before huggingface/transformers#47671: DbrxExperts with the checkpoints' transposes inverted."""
    from hf_curvedit.expert_layouts import experts_layout

    if family != "dbrx" or family not in available_families():
        return False
    model = tiny_causal_lm(family)
    return experts_layout(model.transformer.blocks[0].ffn.experts).transposed == {"w1", "v1"}
