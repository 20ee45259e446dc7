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


def test_module_matches_is_the_target_modules_grammar():
    from hf_curvedit.targets import module_matches

    name = "model.layers.1.mlp.up_proj"
    assert module_matches(name, r".*layers\.1\.mlp\.(gate|up)_proj")  # a string is a regex, fullmatch
    assert not module_matches(name, r"layers\.1\.mlp\.up_proj")  # ... on the whole name
    assert module_matches(name, ["mlp.up_proj"]) and module_matches(name, [name])  # suffixes and exact names
    assert not module_matches(name, ["p_proj"]), "a suffix starts after a dot"
    assert module_matches(name, ["model.layers.1*.mlp.*"]) and not module_matches(name, ["*.layers.2.*"])  # globs
    assert module_matches(name, {"down_proj", "up_proj"})  # any iterable of keys, e.g. PEFT's sets


def test_parse_target_modules_and_layer_choices():
    from hf_curvedit.targets import layer_choices, parse_target_modules

    assert parse_target_modules(None) is None
    assert parse_target_modules("gate_proj, up_proj") == ["gate_proj", "up_proj"]
    assert parse_target_modules(r".*mlp\..*") == r".*mlp\..*"
    fitted = [f"model.layers.{i}.mlp.{m}_proj" for i in range(3) for m in ("gate", "up", "down")]
    choices = layer_choices(fitted, ["1,2", "0"], "gate,up", {"mine": r".*down_proj"})
    assert list(choices) == ["layers 1,2 (gate,up)", "layers 0 (gate,up)", "mine"]
    assert _matching(fitted, choices["layers 1,2 (gate,up)"]) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.2.mlp.gate_proj",
        "model.layers.2.mlp.up_proj"]
    assert layer_choices(fitted, ["2"], ["down"]) == {"layers 2 (down)": r"model\.layers\.2\.mlp\.down_proj"}
    with pytest.raises(ValueError, match="--layers takes"):
        layer_choices(fitted, ["x"])
    with pytest.raises(ValueError, match="select no module"):
        layer_choices(fitted, ["7"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        layer_choices(fitted, [], None, {"bad": "("})


def _matching(names, regex):
    from hf_curvedit.targets import module_matches

    return [n for n in names if module_matches(n, regex)]


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("spec", [["mlp"], ["mlp.experts"], ["experts"], ["up_proj"], ["mlp.up_proj"],
                                  r".*layers\.0\.mlp\..*", ["model.layers.1*"], r".*experts"])
def test_one_matcher_decides_for_the_fit_and_the_tuner(family, spec):
    """What a pattern selects is the same for resolve_target_modules (fit, planner) and the tuner (build, load): a
    linear layer only by its own name, an expert projection also by its experts module's."""
    from family_configs import tiny_causal_lm

    from hf_curvedit import CurvatureEditConfig
    from hf_curvedit.tuner.locate import edit_candidates, is_target

    model = tiny_causal_lm(family)
    try:
        fit = set(resolve_target_modules(model, spec))
    except ValueError:
        fit = set()
    config = CurvatureEditConfig(target_modules=spec)
    tuner = {name for name, _, param in edit_candidates(model) if is_target(config, name, param is not None) is True}
    tuner = {n for n in tuner if not n.endswith("lm_head") and "embed" not in n.split(".")[-1]}
    assert fit == tuner
    if spec == ["mlp"]:
        assert not fit, "a dense mlp.up_proj is not selected by naming its parent"
