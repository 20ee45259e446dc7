"""Registration, save/load through every PEFT and transformers path, merged checkpoints, wrong-base refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel  # noqa: E402
from peft.utils import PeftType  # noqa: E402
from safetensors import safe_open  # noqa: E402
from testing_utils import edit_gpt2, edit_layers, edit_llama, ids, random_eigen, slow  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_curvedit  # noqa: E402
from hf_curvedit import CurvatureEditConfig, WrongBaseModelError, build_curvature_edit  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama base saved to disk, and a ρ = 0.6 edit of it saved next to it."""
    root = tmp_path_factory.mktemp("curvedit")
    base_dir, adapter_dir = root / "base", root / "edit"
    edit_llama().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    eigen = random_eigen(base)
    model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6, task_type="CAUSAL_LM"))
    with torch.no_grad():
        expected = model(ids()).logits.clone()
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, expected, model


def test_registration_through_import():
    assert PeftType("CURVEDIT") is PeftType.CURVEDIT
    assert "CURVEDIT" in [t.value for t in PeftType]
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.CURVEDIT] == "curvedit_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["CURVEDIT"] is hf_curvedit.CurvatureEditConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CURVEDIT] is hf_curvedit.CurvatureEditModel
    # transformers derives the prefix from the enum value
    assert PeftType.CURVEDIT.value.lower() + "_" == hf_curvedit.CurvatureEditModel.prefix


def test_save_pretrained_writes_config_and_factorization(saved):
    _, adapter_dir, _, model = saved
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "CURVEDIT" and cfg["keep_mass"] == 0.6
    assert set(cfg["edited_modules"]) == set(edit_layers(model))
    assert cfg["factor_source"]["num_tokens"] == 1000
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {k.rsplit(".", 1)[-1]: f.get_tensor(k).dtype for k in keys}
    assert len(keys) == 5 * len(edit_layers(model))
    assert all(".curvedit_" in k and not k.endswith(".default") for k in keys)
    assert not any("original" in k or "base_layer" in k for k in keys)  # the base weights are not in the adapter
    assert dtypes == {"curvedit_Q": torch.float32, "curvedit_B": torch.float32, "curvedit_cutoffs": torch.int64,
                      "curvedit_meta": torch.float64, "curvedit_fingerprint": torch.float64}
    loaded = PeftConfig.from_pretrained(str(adapter_dir))
    assert isinstance(loaded, CurvatureEditConfig) and loaded.peft_type == PeftType.CURVEDIT


def test_every_loading_path_gives_identical_outputs(saved):
    base_dir, adapter_dir, expected, _ = saved
    x = ids()
    outputs = {}
    with torch.no_grad():
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)
        outputs["PeftModel.from_pretrained"] = m(x).logits
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir,
                                      low_cpu_mem_usage=True)
        outputs["PeftModel.from_pretrained(low_cpu_mem_usage)"] = m(x).logits
        outputs["AutoPeftModelForCausalLM"] = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()(x).logits
        b = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        b.load_adapter(str(adapter_dir))
        outputs["model.load_adapter"] = b(x).logits
        outputs["AutoModelForCausalLM(adapter_dir)"] = (
            AutoModelForCausalLM.from_pretrained(adapter_dir).eval()(x).logits)
    for path, out in outputs.items():
        assert torch.equal(out, expected), path
    # transformers' own adapter toggling works on the injected layers
    with torch.no_grad():
        b.disable_adapters()
        assert torch.equal(b(x).logits, AutoModelForCausalLM.from_pretrained(base_dir).eval()(x).logits)
        b.enable_adapters()
        assert torch.equal(b(x).logits, expected)


def test_loaded_edit_keeps_its_metadata_and_merges(saved):
    base_dir, adapter_dir, expected, model = saved
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)
    before = {r.module: r for r in model.base_model.edit_report()}
    for rep in loaded.base_model.edit_report():
        assert rep == before[rep.module]
    loaded.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, expected, rtol=1e-4, atol=1e-5)


def test_several_adapters_save_and_load(tmp_path, saved):
    base_dir, _, _, _ = saved
    eigen = random_eigen(edit_llama())
    model = build_curvature_edit(AutoModelForCausalLM.from_pretrained(base_dir).eval(), eigen,
                                 CurvatureEditConfig(keep_mass=0.5), adapter_name="rho5")
    build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=0.8, target_modules=["up_proj"]),
                         adapter_name="rho8")
    x = ids()
    with torch.no_grad():
        out5 = model(x).logits.clone()
        model.set_adapter("rho8")
        out8 = model(x).logits.clone()
    model.save_pretrained(tmp_path)
    # PEFT puts adapters other than "default" into sub-folders named after them
    assert all((tmp_path / name / "adapter_model.safetensors").exists() for name in ("rho5", "rho8"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tmp_path / "rho5",
                                       adapter_name="rho5")
    loaded.load_adapter(tmp_path / "rho8", adapter_name="rho8")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out5)
        loaded.set_adapter("rho8")
        assert torch.equal(loaded(x).logits, out8)
    assert {r.module for r in loaded.base_model.edit_report("rho8")} == {"model.layers.0.mlp.up_proj",
                                                                         "model.layers.1.mlp.up_proj"}


@slow
def test_merged_checkpoint_loads_with_plain_transformers(tmp_path, saved):
    base_dir, adapter_dir, expected, _ = saved
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)
    merged = merged.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    x = ids()
    with torch.no_grad():
        in_process = merged(x).logits
    torch.testing.assert_close(in_process, expected, rtol=1e-4, atol=1e-5)
    torch.save(x, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        "assert 'hf_curvedit' not in sys.modules and 'peft' not in sys.modules\n"
        f"x = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"with torch.no_grad(): torch.save(m(x).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), in_process)


def test_wrong_base_is_refused_with_a_clear_error(tmp_path, saved):
    base_dir, adapter_dir, _, _ = saved
    # same architecture, other weights
    other_dir = tmp_path / "other"
    edit_llama(seed=123).save_pretrained(other_dir)
    with pytest.raises(WrongBaseModelError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj.*different values"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other_dir), adapter_dir)
    with pytest.raises(WrongBaseModelError, match="different base model"):
        AutoModelForCausalLM.from_pretrained(other_dir).load_adapter(str(adapter_dir))
    # other shapes
    wide_dir = tmp_path / "wide"
    edit_llama(intermediate_size=96).save_pretrained(wide_dir)
    with pytest.raises(WrongBaseModelError, match=r"shape \(d_out, d_in\) is \(96, 64\).*\(128, 64\)"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(wide_dir), adapter_dir)
    # other depth: fewer layers (edited modules missing) and more layers (modules the edit does not know)
    for n_layers in (1, 3):
        d = tmp_path / f"depth{n_layers}"
        edit_llama(num_hidden_layers=n_layers).save_pretrained(d)
        with pytest.raises(WrongBaseModelError, match="model.layers"):
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d), adapter_dir)
    # a weight changed after building is caught by the explicit check
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    model.base_model.check_base_model()
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight.mul_(1.1)
    with pytest.raises(WrongBaseModelError, match=r"model\.layers\.1\.mlp\.down_proj.*RMS"):
        model.base_model.check_base_model()


def test_bf16_copy_of_the_right_base_is_accepted(saved):
    base_dir, adapter_dir, expected, _ = saved
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16),
                                      adapter_dir)
    for layer in edit_layers(model).values():
        assert layer.curvedit_Q["default"].dtype == torch.float32
    with torch.no_grad():
        out = model(ids()).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_gpt2_conv1d_save_load_round_trip(tmp_path):
    base = edit_gpt2()
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = build_curvature_edit(base, random_eigen(base), CurvatureEditConfig(keep_mass=0.7))
    x = ids()
    with torch.no_grad():
        expected = model(x).logits.clone()
    model.save_pretrained(tmp_path / "edit")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(),
                                       tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
        merged = loaded.merge_and_unload()
        assert type(merged.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-4, atol=1e-5)


def test_unloaded_buffers_are_not_used_silently(saved):
    # a config with edited_modules but no weights loaded must not run as an all-zero edit
    _, adapter_dir, _, _ = saved
    from peft import get_peft_model

    config = PeftConfig.from_pretrained(str(adapter_dir))
    model = get_peft_model(edit_llama(), config)
    with pytest.raises(RuntimeError, match="no weights yet"):
        model(ids())


def test_end_to_end_from_fitted_factors(tmp_path):
    # the factor stage's real output (fit_factors -> eigendecompose -> eigen.safetensors) feeds the builder directly
    from datasets import Dataset

    from hf_curvedit import FactorConfig, eigendecompose, fit_factors

    base = edit_llama()
    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": [torch.randint(0, 128, (16,), generator=gen).tolist() for _ in range(32)]})
    factors = fit_factors(base, data, FactorConfig(seq_len=16, batch_size=8, max_tokens=512),
                          output_dir=tmp_path / "factors", progress=False)
    eigen = eigendecompose(factors, cache_dir=tmp_path / "factors")
    config = CurvatureEditConfig(keep_mass=0.6, target_modules=["gate_proj", "up_proj"])
    model = build_curvature_edit(base, tmp_path / "factors" / "eigen.safetensors", config)
    assert set(edit_layers(model)) == {n for n in eigen if "down_proj" not in n}
    source = model.peft_config["default"].factor_source
    assert source["num_tokens"] == eigen.metadata["num_tokens"] and source["path"].endswith("eigen.safetensors")
    x = ids()
    with torch.no_grad():
        expected = model(x).logits.clone()
    model.save_pretrained(tmp_path / "edit")
    loaded = PeftModel.from_pretrained(edit_llama(), tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)


def test_builder_accepts_fitted_factors_directly(tmp_path):
    from datasets import Dataset

    from hf_curvedit import FactorConfig, fit_factors

    base = edit_llama()
    gen = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": [torch.randint(0, 128, (16,), generator=gen).tolist() for _ in range(16)]})
    factors = fit_factors(base, data, FactorConfig(seq_len=16, batch_size=8), output_dir=tmp_path, progress=False)
    config = CurvatureEditConfig(keep_mass=0.6, target_modules=["up_proj"])
    from_factors = build_curvature_edit(base, factors, config)
    x = ids()
    with torch.no_grad():
        got = from_factors(x).logits.clone()
    base = from_factors.unload()
    from_file = build_curvature_edit(base, tmp_path / "eigen.safetensors",
                                     CurvatureEditConfig(keep_mass=0.6, target_modules=["up_proj"]))
    with torch.no_grad():
        assert torch.equal(from_file(x).logits, got)


def test_transformers_integration_load_add_and_set_adapter(tmp_path, saved):
    """transformers' own adapter API on a plain model: load_adapter (twice), add_adapter, set_adapter, disable."""
    base_dir, _, _, _ = saved
    eigen = random_eigen(edit_llama())
    path = eigen.save(tmp_path / "eigen.safetensors")
    x = ids()
    expected = {}
    for name, rho in (("rho5", 0.5), ("rho8", 0.8)):
        m = build_curvature_edit(AutoModelForCausalLM.from_pretrained(base_dir).eval(), eigen,
                                 CurvatureEditConfig(keep_mass=rho, task_type="CAUSAL_LM"))
        with torch.no_grad():
            expected[name] = m(x).logits.clone()
        m.save_pretrained(tmp_path / name)
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_out = plain(x).logits.clone()
    plain.load_adapter(str(tmp_path / "rho5"), adapter_name="rho5")
    plain.load_adapter(str(tmp_path / "rho8"), adapter_name="rho8")
    # a new edit from a factors file, through transformers' add_adapter
    plain.add_adapter(CurvatureEditConfig(keep_mass=0.5, factors_path=str(path)), adapter_name="fresh")
    with torch.no_grad():
        for name in ("rho8", "rho5"):
            plain.set_adapter(name)
            assert torch.equal(plain(x).logits, expected[name]), name
        plain.set_adapter("fresh")
        assert torch.equal(plain(x).logits, expected["rho5"])  # the same factors and ρ as rho5
        plain.disable_adapters()
        assert torch.equal(plain(x).logits, base_out)
        plain.enable_adapters()
        assert torch.equal(plain(x).logits, expected["rho5"])
    assert set(plain.peft_config) == {"rho5", "rho8", "fresh"}
