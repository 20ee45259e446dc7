"""Models placed by accelerate (``device_map``, CPU and disk offload): the factor pass records inside accelerate's
hooks, so the factors of an offloaded model, experts included, equal those of the model in memory; and a non-finite
factor says where it came from."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from family_configs import tiny_causal_lm
from testing_utils import random_token_rows, slow_param
from transformers import AutoModelForCausalLM

from hf_curvedit import FactorConfig, fit_factors

CFG = FactorConfig(seq_len=16, batch_size=4, seed=0)


def _data() -> Dataset:
    return Dataset.from_dict({"input_ids": [[t % 128 for t in r] for r in random_token_rows(8, lo=10, hi=16, seed=2)]})


@pytest.fixture(scope="module", params=["mixtral", "llama"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    tiny_causal_lm(request.param, seed=1).save_pretrained(folder / "model")
    return folder


def _split(layer0: str, layer1: str) -> dict[str, str]:
    return {"model.embed_tokens": "cpu", "model.layers.0": layer0, "model.layers.1": layer1, "model.norm": "cpu",
            "lm_head": "cpu", "model.rotary_emb": "cpu"}


@pytest.mark.parametrize("placement", ["disk", "cpu offload", slow_param("split")])
def test_factors_of_an_offloaded_model_equal_the_in_memory_fit(saved, placement):
    reference = fit_factors(AutoModelForCausalLM.from_pretrained(saved / "model"), _data(), CFG, progress=False)
    if placement == "cpu offload":
        from accelerate import cpu_offload

        model = cpu_offload(AutoModelForCausalLM.from_pretrained(saved / "model"), execution_device=torch.device("cpu"))
    else:
        dm = _split("disk", "cpu") if placement == "disk" else _split("cpu", "disk")
        model = AutoModelForCausalLM.from_pretrained(saved / "model", device_map=dm,
                                                     offload_folder=saved / f"offload-{placement}")
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert all(hasattr(m, "_hf_hook") for m in experts), "accelerate's hooks are on the experts modules"
    got = fit_factors(model, _data(), CFG, progress=False)
    assert got.num_tokens == reference.num_tokens
    for n in reference.module_names:
        assert torch.equal(got.A[n], reference.A[n]) and torch.equal(got.G[n], reference.G[n]), n
    # the hooks are still in place afterwards, and the model still runs
    assert all(hasattr(m, "_hf_hook") and "forward" in m.__dict__ for m in experts)
    model(torch.randint(1, 100, (1, 5)))


def test_a_non_finite_factor_says_where_it_came_from():
    from hf_curvedit.curvature.fit import _finish_partition
    from hf_curvedit.curvature.tasks import CausalLMTask
    from hf_curvedit.targets import weight_targets

    model = tiny_causal_lm("llama")
    targets = weight_targets(model)
    name = "model.layers.0.mlp.down_proj"
    t = targets[name]

    def sums(fill: float) -> dict[str, torch.Tensor]:
        A, G = torch.eye(t.d_in), torch.eye(t.d_out)
        G[0, 0] = fill
        return {f"{name}.A": A, f"{name}.G": G}

    state = {"a_alias": {}, "count": {name: 4}, "nonfinite": [f"{name}.G"]}
    with pytest.raises(FloatingPointError, match="its output gradients held NaN or inf"):
        _finish_partition([name], sums(float("nan")), state, targets, CausalLMTask(), CFG, torch.float32, 1)
    state["nonfinite"] = []
    with pytest.raises(FloatingPointError, match="every sample of its output gradients was finite: the sum overflowed"):
        _finish_partition([name], sums(float("inf")), state, targets, CausalLMTask(), CFG, torch.float32, 1)
