"""The default target modules of each transformers family (a regex per ``config.model_type``), and why a family
without one has none."""

from __future__ import annotations

__all__ = ["DEFAULT_TARGET_MODULES", "NO_DEFAULT_REASON", "default_target_modules", "no_default_message"]

# The paper edits the MLP projections only (docs/method.md §2): the defaults below pick, per `config.model_type`, the
# MLP (feed-forward) projections of every decoder block and, in mixture-of-experts blocks, the routed experts' fused
# projections and the shared expert(s); never attention, routers, gates of shared experts, embeddings or a vision or
# audio tower of a multimodal wrapper. Regexes are matched with ``re.fullmatch`` against the qualified name, so they
# also work inside a PeftModel (where names gain a ``base_model.model.`` prefix) thanks to the leading ``(.*\.)?``.
# `scripts/family_defaults.py` prints the README's table of families from this mapping.
_LLAMA_MLP = r"(.*\.)?mlp\.(gate_proj|up_proj|down_proj)"
# Mixture-of-experts blocks: the routed experts (fused 3D projections), the shared expert(s) and, in the dense layers
# of the same model (DeepSeek's first layers), the plain MLP.
_EXPERTS = r"experts\.(gate_up_proj|up_proj|down_proj)"
_MOE_MLP = rf"(.*\.)?mlp\.({_EXPERTS}|((shared_experts?|shared_mlp)\.)?(gate_proj|up_proj|down_proj|gate_up_proj))"
_LANGUAGE_MODEL_MLP = (r"(.*\.)?language_model\.layers\.\d+\.mlp\."
                       r"(gate_proj|up_proj|down_proj|dense_h_to_4h|dense_4h_to_h)")
_FEED_FORWARD = r"(.*\.)?feed_forward\.(gate_proj|up_proj|down_proj|gate_up_proj|w1|w2|w3)"
_VIT_MLP = r"(.*\.)?(layers\.\d+\.mlp\.(fc1|fc2)|layer\.\d+\.(intermediate\.dense|output\.dense))"
_FAMILIES: dict[str, tuple[str, ...]] = {
    _LLAMA_MLP: (
        "apertus", "arcee", "bitnet", "cohere", "cohere2", "cohere_compass_text", "cwm", "diffllama", "doge",
        "emu3", "emu3_text_model", "ernie4_5", "exaone4", "gemma", "gemma2", "gemma3_text", "gemma3n_text",
        "gemma4_unified_text", "granite", "granite_swa", "helium", "hrm_text", "hunyuan_v1_dense", "hyperclovax",
        "internlm3", "iquestcoder", "jais2", "llama", "minicpm3", "ministral", "ministral3", "mistral", "mllama",
        "mllama_text_model", "nemotron", "olmo", "olmo2", "olmo3", "olmo_hybrid", "qwen2", "qwen3", "qwen3_5",
        "qwen3_5_text", "seed_oss", "smollm3", "stablelm", "vaultgemma", "youtu",
    ),
    _MOE_MLP: (
        "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
        "deepseek_v32", "deepseek_v4", "dots1", "dots3_note", "dots3_note_text", "ernie4_5_moe", "exaone_moe",
        "flex_olmo", "flint", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "hunyuan_v1_moe", "hy_v3",
        "hy_v4", "inkling2_text", "inkling_text", "kimi_linear", "kolibri1", "laguna", "mellum", "mimo_v2_flash",
        "minimax", "minimax_m2", "minimax_m3_vl_text", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe",
        "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen4_exp", "qwen4_exp_text", "solar_open", "zaya",
    ),
    # multimodal wrappers: the language model's MLP only (a vision or audio tower sees no text gradient)
    _LANGUAGE_MODEL_MLP: ("fuyu", "gemma3", "gemma4_unified", "got_ocr2", "moss_transcribe_diarize"),
    rf"(.*\.)?language_model\.layers\.\d+\.(mlp\.(gate_proj|up_proj|down_proj)|{_EXPERTS})": ("gemma4",),
    rf"(.*\.)?layers\.\d+\.(mlp\.(gate_proj|up_proj|down_proj)|{_EXPERTS})": ("gemma4_text",),
    _FEED_FORWARD: ("bamba", "falcon_h1", "lfm2", "lfm3", "zamba", "zamba2"),
    # Llama 4: the dense layers' MLP, and the MoE layers' routed experts (Llama4TextExperts, recorded through the
    # router's choice: `hf_curvedit.expert_layouts`) and shared expert
    rf"(.*\.)?feed_forward\.({_EXPERTS}|(shared_expert\.)?(gate_proj|up_proj|down_proj))": ("llama4", "llama4_text"),
    rf"(.*\.)?feed_forward\.({_EXPERTS}|gate_proj|up_proj|down_proj|w1|w2|w3)": ("jamba", "lfm2_moe"),
    rf"(.*\.)?(block_sparse_moe\.{_EXPERTS}|shared_mlp\.(input_linear|output_linear))": (
        "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"),
    rf"(.*\.)?mixer\.((shared_experts\.)?(up_proj|down_proj)|{_EXPERTS})": ("nemotron_h",),
    # LongCat-Flash: the two dense MLPs of each block (`mlps`) and the routed experts of its MoE (`mlp.experts`, whose
    # "zero" experts are the identity and have nothing to edit)
    rf"(.*\.)?(mlps\.\d+\.(gate_proj|up_proj|down_proj)|mlp\.{_EXPERTS})": ("longcat_flash",),
    # DBRX: the routed experts are its only MLP (`ffn.experts`, whose `mlp` holds w1, v1, w2 as 2D stacks)
    r"(.*\.)?ffn\.experts\.(w1|v1|w2)": ("dbrx",),
    # JetMoE: the MoE's two expert projections; the mixture-of-attention experts (`self_attention.experts`) are not MLP
    r"(.*\.)?mlp\.(input_linear|output_linear)": ("jetmoe",),
    r"(.*\.)?(global_transformer|local_encoder|local_decoder)\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)": (
        "blt",),
    r"(.*\.)?mlp\.(gate_up_proj|down_proj)": ("glm", "glm4", "phi3", "phi4_multimodal"),
    r"(.*\.)?mlp\.(fc1|fc2)": ("moshi", "nanochat", "phi"),
    r"(.*\.)?layers\.\d+\.(fc1|fc2)": ("biogpt", "opt", "xglm"),
    r"(.*\.)?mlp\.(dense_h_to_4h|dense_4h_to_h)": ("bloom", "falcon", "gpt_neox", "gpt_neox_japanese", "persimmon"),
    r"(.*\.)?mlp\.(fc_in|fc_out)": ("codegen", "gptj"),
    r"(.*\.)?mlp\.(c_fc|c_proj)": ("gpt2", "gpt-sw3", "openai-gpt", "gpt_bigcode", "gpt_neo", "starcoder2"),
    r"(.*\.)?mlp\.(Wi|Wo)": ("modernbert-decoder",),
    r"(.*\.)?ffn\.(up_proj|down_proj)": ("mpt",),
    r"(.*\.)?ffn\.(proj_up_gate|proj_up|proj_down)": ("xlstm",),
    r"(.*\.)?ffn\.ffn\.(w_in\.w_0|w_in\.w_1|w_out)": ("cpmant",),
    r"(.*\.)?ffn\.(0|2)": ("ctrl",),
    r"(.*\.)?mlp_block\.(gate_proj|up_proj|down_proj)": ("recurrent_gemma",),
    r"(.*\.)?feed_forward\.(key|receptance|value)": ("rwkv",),
    r"(.*\.)?encoder\.layer\.\d+\.(intermediate\.dense|output\.dense)": ("git",),
    # Vision transformers. transformers 5 names the MLP `layers.N.mlp.fc1/fc2`; checkpoints and releases that still
    # use the BERT-style names have `layer.N.intermediate.dense` + the block's `output.dense` (not
    # `attention.output.dense`). Both spellings are accepted.
    _VIT_MLP: ("vit", "deit", "beit"),
    r"(.*\.)?layers?\.\d+\.mlp\.(fc1|fc2|weights_in|weights_out)": ("dinov2",),
    r"(.*\.)?blocks\.\d+\.(intermediate\.dense|output\.dense|mlp\.fc1|mlp\.fc2)": ("swin",),
}
DEFAULT_TARGET_MODULES: dict[str, str] = {family: pattern for pattern, families in _FAMILIES.items()
                                          for family in families}
# Families of transformers whose MLP the method cannot reach, and why (the error names it instead of a bare "no
# default").
NO_DEFAULT_REASON: dict[str, str] = {
    "mamba": "it has no MLP (state-space layers only)",
    "mamba2": "it has no MLP (state-space layers only)",
    "falcon_mamba": "it has no MLP (state-space layers only)",
}


def no_default_message(model_type: str | None) -> str:
    """The first sentence of the error for a family without a default: the family, and why when it is known."""
    why = f" ({NO_DEFAULT_REASON[model_type]})" if model_type in NO_DEFAULT_REASON else ""
    return f"hf-curvedit has no default target modules for model_type={model_type!r}{why}"


def default_target_modules(model_type: str | None) -> str | None:
    """The architecture default for ``config.model_type`` (a regex), or None if unknown."""
    if model_type is None:
        return None
    return DEFAULT_TARGET_MODULES.get(model_type)
