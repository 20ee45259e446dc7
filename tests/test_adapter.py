"""The curvature edit as a PEFT adapter: math, toggling, switching, merging, reports, rank cap."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import weakref

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import get_peft_model  # noqa: E402
from testing_utils import dense_edit, edit_gpt2, edit_layers, edit_llama, ids, logical_weight, random_eigen  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import hf_curvedit  # noqa: E402,F401  (registers the PEFT method)
from hf_curvedit import CurvatureEditConfig, KFACEigen, build_curvature_edit  # noqa: E402
from hf_curvedit.tuner import CurvatureEditLayer, curvature_edit_report  # noqa: E402

# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_enabled_forward_equals_dense_formula_in_fp64(arch):
    base = (edit_llama() if arch == "llama" else edit_gpt2()).double()
    reference = copy.deepcopy(base)
    eigen = random_eigen(base)
    rho = 0.6
    model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=rho))
    layers = edit_layers(model)
    assert set(layers) == set(eigen)
    x = ids()
    for name, layer in layers.items():
        W_dense = dense_edit(logical_weight(reference.get_submodule(name)), eigen[name], rho)
        h = torch.randn(3, 5, W_dense.shape[1], dtype=torch.float64)
        bias = layer.get_base_layer().bias
        expected = h @ W_dense.T + (bias if bias is not None else 0)
        torch.testing.assert_close(layer(h), expected, rtol=1e-10, atol=1e-10)
        # the edit is a projection: applying it to W' again changes nothing
        torch.testing.assert_close(dense_edit(W_dense, eigen[name], rho), W_dense, rtol=1e-9, atol=1e-12)
        # write W' into the reference model for the end-to-end check below
        target = reference.get_submodule(name)
        target.weight.data = (W_dense.T if arch == "gpt2" else W_dense).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=1e-9, atol=1e-9)


def test_adapter_state_is_an_exact_orthonormal_factorization_in_fp32_buffers():
    base = edit_llama()
    eigen = random_eigen(base)
    model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    sides = set()
    for name, layer in edit_layers(model).items():
        Q, B = layer.curvedit_Q["default"], layer.curvedit_B["default"]
        assert Q.dtype == B.dtype == torch.float32
        assert not any(Q is p or B is p for p in model.parameters())
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-5, rtol=0)
        rep = layer.report("default", name)
        assert Q.shape[1] == rep.k == min(rep.r, rep.s)
        side = layer._curvedit_q_side["default"]
        sides.add(side)
        assert side == ("input" if rep.s <= rep.r else "output")
        assert Q.shape[0] == (layer.in_features if side == "input" else layer.out_features)
        cut = layer.curvedit_cutoffs["default"]
        assert cut.dtype == torch.int64 and (cut[1:] <= cut[:-1]).all() and int(cut[0]) == rep.s
        W_dense = dense_edit(logical_weight(base.get_submodule(name).base_layer), eigen[name], 0.6)
        torch.testing.assert_close(layer.edited_weight("default").double(), W_dense, atol=1e-5, rtol=1e-4)
        assert torch.linalg.matrix_rank(W_dense).item() <= rep.k
    assert sides == {"input", "output"}  # up/gate keep s < r, down keeps r < s with these shapes


def test_disabled_adapter_is_bit_exact_base():
    base = edit_llama()
    x = ids()
    with torch.no_grad():
        ref = base(x).logits.clone()
    model = build_curvature_edit(base, random_eigen(base), CurvatureEditConfig(keep_mass=0.6))
    with torch.no_grad():
        edited = model(x).logits
        assert not torch.allclose(edited, ref, atol=1e-4)
        with model.disable_adapter():
            assert torch.equal(model(x).logits, ref)
        assert torch.equal(model(x).logits, edited)  # re-enabled on exit
        model.merge_adapter()
        with model.disable_adapter():  # disabling a merged edit restores the base weights
            assert torch.equal(model(x).logits, ref)


def test_set_adapter_switches_between_edits_with_different_rho():
    eigen = random_eigen(edit_llama())
    x = ids()
    singles = {}
    for rho in (0.5, 0.9):
        m = build_curvature_edit(edit_llama(), eigen, CurvatureEditConfig(keep_mass=rho),
                                 adapter_name=f"r{int(rho * 10)}")
        with torch.no_grad():
            singles[rho] = m(x).logits
    model = build_curvature_edit(edit_llama(), eigen, CurvatureEditConfig(keep_mass=0.5), adapter_name="r5")
    model = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=0.9), adapter_name="r9")
    assert model.active_adapter == "r5"  # adding does not activate
    with torch.no_grad():
        assert torch.equal(model(x).logits, singles[0.5])
        model.set_adapter("r9")
        assert torch.equal(model(x).logits, singles[0.9])
        model.set_adapter("r5")
        assert torch.equal(model(x).logits, singles[0.5])
    assert not torch.allclose(singles[0.5], singles[0.9], atol=1e-4)
    with pytest.raises(ValueError, match="cannot be active together"):
        model.base_model.set_adapter(["r5", "r9"])
    reports = {r.module: r for r in curvature_edit_report(model, "r9")}
    assert all(r.keep_mass == 0.9 for r in reports.values())
    # switching while an edit is merged never runs the stale merged weight
    with torch.no_grad():
        model.merge_adapter()
        model.set_adapter("r9")
        assert torch.equal(model(x).logits, singles[0.9])
        assert not any(layer.merged for layer in edit_layers(model).values())
    model.delete_adapter("r9")
    assert model.active_adapter == "r5"
    assert all(set(layer.curvedit_Q) == {"r5"} for layer in edit_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(x).logits, singles[0.5])


def test_merge_unmerge_round_trip_is_bit_exact_in_fp32():
    base = edit_llama()
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    x = ids()
    with torch.no_grad():
        ref = base(x).logits.clone()
    model = build_curvature_edit(base, random_eigen(base), CurvatureEditConfig(keep_mass=0.6))
    with torch.no_grad():
        unmerged = model(x).logits
        model.merge_adapter()
        layers = edit_layers(model)
        for name, layer in layers.items():
            assert layer.merged
            torch.testing.assert_close(layer.get_base_layer().weight, layer.edited_weight("default"), rtol=0, atol=0)
        torch.testing.assert_close(model(x).logits, unmerged, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                assert torch.equal(m.weight,
                                   originals[n.removeprefix("base_model.model.").replace(".base_layer", "")]), n
        with model.disable_adapter():
            assert torch.equal(model(x).logits, ref)
        assert torch.equal(model(x).logits, unmerged)


def test_bf16_base_keeps_fp32_adapter_and_merge_round_trip_is_bit_exact():
    base = edit_llama()
    model = build_curvature_edit(base, random_eigen(base), CurvatureEditConfig(keep_mass=0.6))
    model = model.to(torch.bfloat16)
    layers = edit_layers(model)
    for layer in layers.values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert layer.curvedit_Q["default"].dtype == torch.float32  # never cast to the base dtype
        assert layer.curvedit_meta["default"].dtype == torch.float64
        assert layer.curvedit_cutoffs["default"].dtype == torch.int64
    originals = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    x = ids()
    with torch.no_grad():
        unmerged = model(x).logits
        assert unmerged.dtype == torch.bfloat16
        model.merge_adapter()
        merged = model(x).logits
        # merged weights are W' rounded to bf16: equal to the unmerged output only up to bf16 rounding
        torch.testing.assert_close(merged.float(), unmerged.float(), rtol=0.05, atol=0.05)
        model.unmerge_adapter()
        for n, layer in layers.items():
            assert torch.equal(layer.get_base_layer().weight, originals[n])  # the original tensor itself comes back
        assert torch.equal(model(x).logits, unmerged)


def test_merge_and_unload_and_unload():
    x = ids()
    eigen = random_eigen(edit_llama())
    model = build_curvature_edit(edit_llama(), eigen, CurvatureEditConfig(keep_mass=0.6))
    with torch.no_grad():
        edited = model(x).logits
    plain = model.merge_and_unload()
    assert type(plain) is LlamaForCausalLM
    assert not any(isinstance(m, CurvatureEditLayer) for m in plain.modules())
    assert not any("curvedit" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, edited, rtol=1e-4, atol=1e-5)

    fresh = edit_llama()
    with torch.no_grad():
        ref = fresh(x).logits.clone()
    model = build_curvature_edit(fresh, eigen, CurvatureEditConfig(keep_mass=0.6))
    model.merge_adapter()
    base = model.unload()  # unload drops the edit; a merged edit is undone first
    assert type(base) is LlamaForCausalLM
    with torch.no_grad():
        assert torch.equal(base(x).logits, ref)


def test_report_numbers_are_consistent():
    base = edit_llama()
    weights = {n: logical_weight(m).double().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    eigen = random_eigen(base)
    model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6))
    reports = model.base_model.edit_report()
    assert [r.module for r in reports] == list(eigen)
    for rep in reports:
        W = weights[rep.module]
        Wp = dense_edit(W, eigen[rep.module], 0.6)
        assert rep.kept_norm_fraction == pytest.approx(float(Wp.norm() / W.norm()), rel=1e-9)
        assert rep.removed_norm_fraction == pytest.approx(float((W - Wp).norm() / W.norm()), rel=1e-6)
        assert rep.kept_norm_fraction**2 + rep.removed_norm_fraction**2 == pytest.approx(1.0, rel=1e-9)
        assert rep.kept_mass_fraction >= 0.6
        assert rep.kept_component_fraction == rep.kept_components / (rep.d_out * rep.d_in)
        assert rep.adapter_bytes == (rep.d_in + rep.d_out) * rep.k * 4
        assert rep.weight_bytes == rep.d_in * rep.d_out * 4
        assert rep.bytes_ratio == pytest.approx(rep.adapter_bytes / rep.weight_bytes)
        assert rep.to_dict()["module"] == rep.module


def test_rank_cap_truncates_by_svd_and_records_its_error():
    base = edit_llama()
    eigen = random_eigen(base)
    uncapped = build_curvature_edit(edit_llama(), eigen, CurvatureEditConfig(keep_mass=0.6))
    full = {n: layer.edited_weight("default").double() for n, layer in edit_layers(uncapped).items()}
    model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6, rank_cap=10))
    for name, layer in edit_layers(model).items():
        rep = layer.report("default", name)
        Wc = layer.edited_weight("default").double()
        Q = layer.curvedit_Q["default"]
        assert Q.shape[1] == rep.rank == 10 < rep.k and rep.rank_cap == 10
        torch.testing.assert_close(Q.T @ Q, torch.eye(10), atol=1e-5, rtol=0)
        err = float((Wc - full[name]).norm() / full[name].norm())
        assert rep.rank_cap_error == pytest.approx(err, rel=1e-3)
        # the SVD truncation is the best rank-10 approximation of W'
        s = torch.linalg.svdvals(full[name])
        assert err == pytest.approx(float(s[10:].norm() / s.norm()), rel=1e-3)
        B = layer.curvedit_B["default"].double()
        assert torch.linalg.matrix_rank(B @ Q.double().T).item() == 10
    # a cap at or above k changes nothing
    same = build_curvature_edit(edit_llama(), eigen, CurvatureEditConfig(keep_mass=0.6, rank_cap=10_000))
    for name, layer in edit_layers(same).items():
        assert layer.report("default").rank_cap_error == 0.0
        torch.testing.assert_close(layer.edited_weight("default").double(), full[name], rtol=0, atol=0)


def test_keep_mass_pattern_and_factor_truncation_variant():
    eigen = random_eigen(edit_llama())
    cfg = CurvatureEditConfig(keep_mass=0.6, keep_mass_pattern={r"layers\.1\.mlp\.up_proj": 0.9, "down_proj": 0.3})
    model = build_curvature_edit(edit_llama(), eigen, cfg)
    rhos = {r.module: r.keep_mass for r in model.base_model.edit_report()}
    assert rhos["model.layers.1.mlp.up_proj"] == 0.9
    assert rhos["model.layers.0.mlp.up_proj"] == 0.6
    assert rhos["model.layers.0.mlp.down_proj"] == rhos["model.layers.1.mlp.down_proj"] == 0.3
    # the model resolves ρ per module from the config (as LoRA resolves rank_pattern); the layer records it
    assert model.peft_config["default"].keep_mass_for("model.layers.1.mlp.up_proj") == 0.9

    ft = build_curvature_edit(edit_llama(), eigen, CurvatureEditConfig(keep_mass=0.8, selection="factor_truncation"))
    for rep in ft.base_model.edit_report():
        assert rep.selection == "factor_truncation"
        assert rep.kept_components == rep.r * rep.s
        e = eigen[rep.module]
        assert (float(e.eigvals_G[: rep.r].sum()) >= 0.8 * float(e.eigvals_G.sum())
                > float(e.eigvals_G[: rep.r - 1].sum()))


def test_config_validation_and_missing_factor_errors(tmp_path):
    with pytest.raises(ValueError, match="keep_mass"):
        CurvatureEditConfig(keep_mass=1.5)
    with pytest.raises(ValueError, match="keep_mass_pattern"):
        CurvatureEditConfig(keep_mass_pattern={"up_proj": 0})
    with pytest.raises(ValueError, match="selection"):
        CurvatureEditConfig(selection="heap")
    with pytest.raises(ValueError, match="rank_cap"):
        CurvatureEditConfig(rank_cap=0)
    # factors for only some targeted modules: the missing one is named
    base = edit_llama()
    partial = KFACEigen({k: v for k, v in random_eigen(base).items() if "layers.0" in k})
    with pytest.raises(ValueError, match=r"no K-FAC factors for module 'model\.layers\.1\.mlp\.gate_proj'"):
        build_curvature_edit(base, partial, CurvatureEditConfig())
    # get_peft_model without any factors explains how to provide them
    with pytest.raises(ValueError, match="build_curvature_edit"):
        get_peft_model(edit_llama(), CurvatureEditConfig())
    # a tied lm_head is refused (editing it would edit the embeddings)
    gpt2 = edit_gpt2()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    with pytest.raises(ValueError, match="tied"):
        build_curvature_edit(gpt2, random_eigen(gpt2, names=["lm_head"]),
                             CurvatureEditConfig(target_modules=["lm_head"]))
    # factors of another architecture
    other = random_eigen(edit_llama(intermediate_size=96))
    with pytest.raises(ValueError, match="different model"):
        build_curvature_edit(edit_llama(), other, CurvatureEditConfig())


def test_get_peft_model_with_factors_path_equals_convenience_builder(tmp_path):
    eigen = random_eigen(edit_llama())
    path = eigen.save(tmp_path / "eigen.safetensors")
    x = ids()
    a = get_peft_model(edit_llama(), CurvatureEditConfig(keep_mass=0.7, factors_path=str(path),
                                                          target_modules=["up_proj", "gate_proj"]))
    b = build_curvature_edit(edit_llama(), path,
                             CurvatureEditConfig(keep_mass=0.7, target_modules=["up_proj", "gate_proj"]))
    assert set(edit_layers(a)) == set(edit_layers(b)) == {k for k in eigen if "down_proj" not in k}
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    assert b.peft_config["default"].factor_source["path"] == str(path)
    assert a.peft_config["default"].factor_source["num_tokens"] == 1000


@pytest.mark.parametrize("cast", ["half", "to_bfloat16"])
def test_casting_an_edited_model_keeps_the_edit_exact(cast):
    base = edit_llama()
    model = build_curvature_edit(base, random_eigen(base), CurvatureEditConfig(keep_mass=0.6))
    x = ids()
    before = {n: (layer.edited_weight("default").clone(), layer.report("default"))
              for n, layer in edit_layers(model).items()}
    with torch.no_grad():
        ref = model(x).logits.clone()
    model = model.half() if cast == "half" else model.to(torch.bfloat16)
    low = torch.float16 if cast == "half" else torch.bfloat16
    for name, layer in edit_layers(model).items():
        assert layer.get_base_layer().weight.dtype == low
        assert {getattr(layer, s)["default"].dtype for s in ("curvedit_Q", "curvedit_B")} == {torch.float32}
        assert layer.curvedit_meta["default"].dtype == layer.curvedit_fingerprint["default"].dtype == torch.float64
        assert layer.curvedit_cutoffs["default"].dtype == torch.int64
        weight, report = before[name]
        assert torch.equal(layer.edited_weight("default"), weight)  # the factorization itself is untouched
        # every statistic is unchanged; only the weight it replaces is smaller now
        after = layer.report("default")
        assert dataclasses.replace(after, weight_bytes=report.weight_bytes) == report
        assert after.weight_bytes == report.weight_bytes // 2
    model.base_model.check_base_model()  # a half-precision copy of the right base is still the right base
    with torch.no_grad():
        out = model(x).logits
    assert out.dtype == low
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_merge_with_safe_merge_and_adapter_names():
    base = edit_llama()
    eigen = random_eigen(base)
    model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6), adapter_name="r6")
    model = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=0.9), adapter_name="r9")
    model.set_adapter("r6")
    layers = edit_layers(model)
    originals = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    # adapter_names picks which edit is merged, whichever is active
    model.base_model.merge_adapter(adapter_names=["r9"], safe_merge=True)
    for name, layer in layers.items():
        assert layer.merged_adapters == ["r9"]
        torch.testing.assert_close(layer.get_base_layer().weight, layer.edited_weight("r9"), rtol=0, atol=0)
    model.base_model.unmerge_adapter()
    # two edits cannot be merged together: each replaces the weight
    with pytest.raises(ValueError, match="only one can be merged"):
        model.base_model.merge_adapter(adapter_names=["r6", "r9"])
    # safe_merge refuses an edit with non-finite values and leaves the weight as it was
    name, layer = next(iter(layers.items()))
    layer.curvedit_B["r6"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True, adapter_names=["r6"])
    assert not layer.merged and torch.equal(layer.get_base_layer().weight, originals[name])


def test_one_target_grammar_globs_fit_build_save_and_load(tmp_path):
    from datasets import Dataset
    from peft import PeftModel

    from hf_curvedit import FactorConfig, fit_factors

    glob = ["model.layers.1.mlp.*_proj"]
    base = edit_llama()
    base.save_pretrained(tmp_path / "base")
    rows = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    factors = fit_factors(base, Dataset.from_dict({"input_ids": rows}),
                          FactorConfig(target_modules=glob, seq_len=16, batch_size=4), progress=False)
    expected = {f"model.layers.1.mlp.{leaf}" for leaf in ("gate_proj", "up_proj", "down_proj")}
    assert set(factors.module_names) == expected
    model = build_curvature_edit(base, factors, CurvatureEditConfig(target_modules=glob))
    assert set(edit_layers(model)) == expected
    with torch.no_grad():
        want = model(ids()).logits.clone()
    model.save_pretrained(tmp_path / "edit")
    # PEFT's own loading matches modules with the same grammar, globs included
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "edit")
    assert set(edit_layers(loaded)) == expected
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, want)


def test_compute_dtype_bf16_is_close_to_the_fp32_path_and_cached():
    """Default compute dtype on a bf16 model: bf16 matmuls from factors cast once; float32 keeps the exact path.

    Bound: bf16 keeps 8 significant bits (unit round-off 2⁻⁸ ≈ 0.4%); the input, two products and the output are
    rounded, so the layer output of the bf16 path is within 2% (relative Frobenius norm) of the float32 path.
    """
    base = edit_llama()
    eigen = random_eigen(base)
    exact = build_curvature_edit(copy.deepcopy(base), eigen,
                                 CurvatureEditConfig(keep_mass=0.6, compute_dtype="float32"))
    fast = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=0.6))
    exact, fast = exact.to(torch.bfloat16), fast.to(torch.bfloat16)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for name, layer in edit_layers(fast).items():
        ref_layer = edit_layers(exact)[name]
        assert layer.compute_dtype("default") == torch.bfloat16 and ref_layer.compute_dtype("default") == torch.float32
        xin = x if layer.in_features == 64 else torch.randn(3, 7, layer.in_features).to(torch.bfloat16)
        with torch.no_grad():
            y, y_ref = layer(xin), ref_layer(xin)
        assert y.dtype == y_ref.dtype == torch.bfloat16
        # the float32 path is the stored factors' own product
        Q, B = ref_layer.curvedit_Q["default"], ref_layer.curvedit_B["default"]
        h = xin.float()
        exact_y = (h @ Q) @ B.T if ref_layer._curvedit_q_side["default"] == "input" else (h @ B) @ Q.T
        assert torch.equal(y_ref, exact_y.to(torch.bfloat16))
        err = float((y.float() - y_ref.float()).norm() / y_ref.float().norm())
        assert err < 0.02, (name, err)
        # the cast copies are made once and reused until the factors change
        cached = layer._compute_matrices("default", torch.bfloat16)
        assert all(m.dtype == torch.bfloat16 for m in cached)
        assert layer._compute_matrices("default", torch.bfloat16) is cached
        layer.curvedit_B["default"].mul_(1.0)  # an in-place write (as load_state_dict does) invalidates the copies
        again = layer._compute_matrices("default", torch.bfloat16)
        assert again is not cached
        # so does a replaced tensor (a device move, transformers' loader), and the cache does not keep the old one
        old = weakref.ref(layer.curvedit_Q["default"])
        layer.curvedit_Q["default"] = layer.curvedit_Q["default"].clone()
        assert layer._compute_matrices("default", torch.bfloat16) is not again
        gc.collect()
        assert old() is None


def test_dense_path_when_the_factorization_is_not_smaller():
    base = edit_llama()
    eigen = random_eigen(base)
    # ρ = 1 keeps every component: k = min(d_out, d_in), so k·(d_in + d_out) ≥ d_in·d_out
    model = build_curvature_edit(base, eigen, CurvatureEditConfig(keep_mass=1.0, target_modules=["up_proj"]))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    for layer in edit_layers(model).values():
        k = layer.curvedit_Q["default"].shape[1]
        assert k * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features
        assert layer.runs_dense("default")
        with torch.no_grad():
            y = layer(x)
        (dense,) = layer._compute_matrices("default", torch.float32)
        torch.testing.assert_close(dense, layer.edited_weight("default"))
        torch.testing.assert_close(y, x @ layer.edited_weight("default").T, rtol=1e-5, atol=1e-6)
        # ρ = 1 keeps W itself (up to the eigenbasis round trip)
        torch.testing.assert_close(y, layer.base_layer(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown dtype"):
        CurvatureEditConfig(compute_dtype="float8")
