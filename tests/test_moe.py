"""Mixture-of-experts: per-expert factors against brute force, the under-sampled expert policy, and the expert adapter
through every loading path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from family_configs import tiny_causal_lm
from testing_utils import brute_force_mask, mixed_experts_projection, random_token_rows

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors, load_factors
from hf_curvedit.curvature.experts import recording_experts
from hf_curvedit.targets import is_experts_module, resolve_target_modules, weight_targets
from hf_curvedit.tuner import WrongBaseModelError
from hf_curvedit.tuner.experts import CurvatureEditExperts
from hf_curvedit.tuner.experts_forward import BASE, DENSE, FACTORED

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def experts_modules(model):
    return {n: m for n, m in model.named_modules() if is_experts_module(m)}


def padded(rows, length):
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def token_data(n=24, lo=6, hi=20, seed=0):
    return Dataset.from_dict({"input_ids": [[t % 127 + 1 for t in r] for r in random_token_rows(n, lo, hi, seed)]})


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_recording_forward_computes_what_each_experts_implementation_computes(family, implementation):
    model = tiny_causal_lm(family)
    model.config._experts_implementation = implementation
    for sub in (getattr(model.config, "text_config", None),):
        if sub is not None:
            sub._experts_implementation = implementation
    ids, mask = padded(random_token_rows(3, 8, 12, seed=1), 12)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with recording_experts({m: lambda *a: None for m in experts_modules(model).values()}):
            got = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, want), "the class's own forward is back after collection"


def brute_force_expert_factors(model, ids, mask):
    """Per-token K-FAC of every expert projection: each (token, routed expert) pair is computed on its own with a zero
    probe added to each projection's output; autograd on the probes gives g. float64 sums, empirical labels."""
    records = []

    def reference(module, name):
        def forward(hidden, top_k_index, top_k_weights):
            rows = []
            for t in range(hidden.shape[0]):
                out = torch.zeros_like(hidden[t])
                for k in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, k])
                    a = hidden[t]
                    p1 = torch.zeros(module.gate_up_proj.shape[1], requires_grad=True)
                    y1 = module.gate_up_proj[e] @ a + p1
                    z = module._apply_gate(y1)
                    p2 = torch.zeros(module.down_proj.shape[1], requires_grad=True)
                    y2 = module.down_proj[e] @ z + p2
                    records.append((name, t, e, a.detach(), p1, z.detach(), p2))
                    out = out + top_k_weights[t, k] * y2
                rows.append(out)
            return torch.stack(rows)
        return forward

    mods = experts_modules(model)
    for name, m in mods.items():
        m.forward = reference(m, name)
    emb = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        emb.remove()
        for m in mods.values():
            del m.forward
    B, T = ids.shape
    valid = torch.zeros(B * T, dtype=torch.bool)
    for b in range(B):
        for t in range(T - 1):
            valid[b * T + t] = bool(mask[b, t] and mask[b, t + 1])
    pos = valid.nonzero().squeeze(1).tolist()
    labels = torch.tensor([int(ids.reshape(-1)[p + 1]) for p in pos])
    loss = F.cross_entropy(logits.reshape(B * T, -1)[pos], labels, reduction="sum")
    kept = [r for r in records if valid[r[1]]]
    grads = torch.autograd.grad(loss, [p for r in kept for p in (r[4], r[6])], allow_unused=True)
    out = {}
    for i, (name, t, e, a, p1, z, p2) in enumerate(kept):
        g1, g2 = grads[2 * i], grads[2 * i + 1]
        for param, x, g in (("gate_up_proj", a, g1), ("down_proj", z, g2)):
            key = f"{name}.{param}"
            num = mods[name].num_experts
            if key not in out:
                out[key] = [torch.zeros(num, x.numel(), x.numel(), dtype=torch.float64),
                            torch.zeros(num, g.numel(), g.numel(), dtype=torch.float64), [0] * num]
            out[key][0][e] += torch.outer(x.double(), x.double())
            out[key][1][e] += torch.outer(g.double(), g.double())
            out[key][2][e] += 1
    for A, G, count in out.values():
        for e, c in enumerate(count):
            if c:
                A[e] /= c
                G[e] /= c
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_factors_match_brute_force_with_top2_routing_and_padding(family):
    model = tiny_causal_lm(family)
    assert model.config.num_experts_per_tok == 2, "a token must reach several experts"
    rows = random_token_rows(6, lo=5, hi=16, seed=2)
    ds = Dataset.from_dict({"input_ids": rows})
    cfg = FactorConfig(label_mode="empirical", seq_len=16, batch_size=6, packing=False, accumulate_dtype="float64",
                       target_modules=["mlp.experts"])
    factors = fit_factors(model, ds, cfg, progress=False)
    ids, mask = padded(rows, 16)
    assert (mask == 0).any()
    want = brute_force_expert_factors(model, ids, mask)
    assert set(factors.module_names) == set(want)
    for n, (A, G, count) in want.items():
        assert factors.num_tokens[n] == count
        assert sum(count) == 2 * sum(len(r) - 1 for r in rows), "every valid token counts once per expert it reaches"
        assert factors.A[n].shape == A.shape and factors.G[n].shape == G.shape
        for got, ref in ((factors.A[n], A), (factors.G[n], G)):
            assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
            assert torch.equal(got, got.mT)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_factors_are_the_same_whatever_experts_implementation_the_model_uses(implementation):
    """The fit runs the experts through its recording forward in place of the model's kernel. Its gradients are the
    kernel's (every parameter's, through the whole network), and every factor of every expert projection equals the
    one the eager implementation gives."""
    model = tiny_causal_lm("mixtral")
    _set_implementation(model, implementation)
    ids = torch.tensor([[t % 127 + 1 for t in r] for r in random_token_rows(4, 16, 16, seed=2)])
    grads = {}
    for recording in (False, True):
        model.zero_grad()
        with recording_experts({m: lambda *a: None for m in experts_modules(model).values()}) if recording \
                else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
        grads[recording] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6, msg=n)

    cfg = FactorConfig(seq_len=16, batch_size=4, accumulate_dtype="float64")
    ds = token_data(8)
    got = fit_factors(model, ds, cfg, progress=False)
    assert model.config._experts_implementation == implementation, "the fit leaves the model's implementation"
    _set_implementation(model, "eager")
    eager = fit_factors(model, ds, cfg, progress=False)
    experts = [n for n in eager.module_names if ".experts." in n]
    assert experts and got.num_tokens == eager.num_tokens
    for n in experts:
        torch.testing.assert_close(got.A[n], eager.A[n], rtol=1e-12, atol=0, msg=n)
        torch.testing.assert_close(got.G[n], eager.G[n], rtol=1e-12, atol=0, msg=n)


def _starve(model, expert: int):
    """Route no token to ``expert`` in every experts module (its slots go to expert 0)."""
    def hook(module, args):
        hidden, index, weights = args
        return hidden, torch.where(index == expert, torch.zeros_like(index), index), weights
    return [m.register_forward_pre_hook(hook) for m in experts_modules(model).values()]


@pytest.fixture(scope="module")
def starved():
    """A Mixtral whose expert 3 never gets a token, its factors and the edit (experts only)."""
    model = tiny_causal_lm("mixtral")
    hooks = _starve(model, 3)
    factors = fit_factors(model, token_data(48), FactorConfig(seq_len=16, batch_size=8, target_modules=["mlp.experts"]),
                          progress=False)
    return model, factors, hooks


def test_an_expert_no_token_reached_is_never_edited_and_is_recorded(starved):
    model, factors, _ = starved
    n = "model.layers.0.mlp.experts.gate_up_proj"
    assert factors.num_tokens[n][3] == 0 and min(factors.num_tokens[n][:3]) > 0
    assert not factors.A[n][3].any() and not factors.G[n][3].any()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.6, min_expert_tokens=0))
    cfg = edited.peft_config["default"]
    entry = cfg.edited_modules[n]
    assert entry["unedited_experts"] == [3] and entry["edited_experts"] == 3
    assert entry["expert_tokens"] == factors.num_tokens[n]
    layer = edited.get_submodule("base_model.model.model.layers.0.mlp.experts")
    assert isinstance(layer, CurvatureEditExperts)
    assert torch.equal(layer.curvedit_tokens_gate_up_proj["default"], torch.tensor(factors.num_tokens[n]))
    w_new = layer.edited_weight("default", "gate_up_proj")
    w_old = before["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(w_new[3].to(w_old.dtype), w_old[3]), "the unreached expert keeps its weight bit for bit"
    assert not torch.allclose(w_new[0], w_old[0])
    report = {r.module: r for r in edited.base_model.edit_report()}[n]
    assert (report.num_experts, report.edited_experts, report.expert_tokens) == (4, 3, factors.num_tokens[n])
    edited.unload()


def test_min_expert_tokens_leaves_under_sampled_experts_alone(starved):
    model, factors, _ = starved
    n = "model.layers.1.mlp.experts.down_proj"
    counts = factors.num_tokens[n]
    threshold = sorted(counts[:3])[1]  # the least-used reached expert falls below it
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.6, min_expert_tokens=threshold))
    entry = edited.peft_config["default"].edited_modules[n]
    assert entry["unedited_experts"] == sorted(e for e, c in enumerate(counts) if c < threshold)
    edited.unload()
    # the default asks for max(d_out, d_in) tokens of each expert's matrix
    targets = weight_targets(model)
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.6))
    for name, entry in edited.peft_config["default"].edited_modules.items():
        need = max(targets[name].d_out, targets[name].d_in)
        assert entry["unedited_experts"] == [e for e, c in enumerate(factors.num_tokens[name]) if c < need]
    edited.unload()
    few = fit_factors(model, token_data(4), FactorConfig(seq_len=16, batch_size=4, target_modules=["mlp.experts"]),
                      progress=False)
    assert max(max(c) for c in few.num_tokens.values()) < 64 <= min(max(t.d_out, t.d_in) for t in targets.values()
                                                                     if t.is_experts)
    edited = build_curvature_edit(model, few, CurvatureEditConfig(keep_mass=0.6))
    assert all(e["edited_experts"] == 0 for e in edited.peft_config["default"].edited_modules.values())
    edited.unload()
    with pytest.raises(ValueError, match="min_expert_tokens must be a non-negative integer"):
        CurvatureEditConfig(min_expert_tokens=-1)


def test_each_edited_expert_is_the_brute_force_projection(starved):
    model, factors, _ = starved
    eigen = factors.eigendecompose()
    n = "model.layers.1.mlp.experts.gate_up_proj"
    edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=0.7, min_expert_tokens=1,
                                                                     target_modules=[n]))
    layer = edited.get_submodule("base_model.model.model.layers.1.mlp.experts")
    got = layer.edited_weight("default", "gate_up_proj").double()
    W = layer.base_weight("gate_up_proj")
    for e in range(3):
        basis = eigen[n].expert(e)
        UG, UA = basis.eigvecs_G.double(), basis.eigvecs_A.double()
        C = UG.T @ W[e].double() @ UA
        want = UG @ (C * brute_force_mask(basis.eigvals_G, basis.eigvals_A, 0.7)) @ UA.T
        torch.testing.assert_close(got[e], want, atol=1e-5, rtol=1e-4)
    assert set(edited.peft_config["default"].edited_modules) == {n}, "down_proj, router and attention untouched"
    edited.unload()


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    """A Qwen2-MoE (routed and shared experts) saved as a base folder, its edit and the edit saved next to it."""
    root = tmp_path_factory.mktemp("moe")
    model = tiny_causal_lm("qwen2_moe")
    model.save_pretrained(root / "base")
    factors = fit_factors(model, token_data(48), FactorConfig(seq_len=16, batch_size=8), progress=False)
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.6, min_expert_tokens=8))
    edited.peft_config["default"].base_model_name_or_path = str(root / "base")
    edited.save_pretrained(root / "edit")
    x = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = edited(input_ids=x).logits
        with edited.disable_adapter():
            base = edited(input_ids=x).logits
    return root, edited, x, out, base


def test_expert_adapter_toggles_and_unmerges_bit_exactly(saved_moe):
    _, edited, x, out, base = saved_moe
    fresh = tiny_causal_lm("qwen2_moe")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, base), "disabled = the base model, bit for bit"
        assert not torch.allclose(out, base)
        edited.merge_adapter()
        merged = edited(input_ids=x).logits
        edited.unmerge_adapter()
        again = edited(input_ids=x).logits
        with edited.disable_adapter():
            assert torch.equal(edited(input_ids=x).logits, base)
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-6)  # factors (x in_e) out_eᵀ against W'_e = out_e in_eᵀ
    assert torch.equal(again, out)
    names = set(edited.peft_config["default"].edited_modules)
    assert any(".experts." in n for n in names) and any(".shared_expert." in n for n in names)


def test_expert_adapter_loads_identically_through_every_stock_path(saved_moe):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    import hf_curvedit  # noqa: F401  (registers the PEFT method)

    root, _, x, out, _ = saved_moe
    with torch.no_grad():
        loaded = [
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "edit"),
            AutoPeftModelForCausalLM.from_pretrained(root / "edit"),
            AutoModelForCausalLM.from_pretrained(root / "edit"),
        ]
        plain = AutoModelForCausalLM.from_pretrained(root / "base")
        plain.load_adapter(str(root / "edit"))
        loaded.append(plain)
        for m in loaded:
            assert torch.equal(m(input_ids=x).logits, out)
        merged = loaded[0].merge_and_unload()
        assert not any(isinstance(m, CurvatureEditExperts) for m in merged.modules())
        merged_out = merged(input_ids=x).logits
        torch.testing.assert_close(merged_out, out, rtol=1e-5, atol=1e-6)
        merged.save_pretrained(root / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(root / "merged")
        assert torch.equal(reloaded(input_ids=x).logits, merged_out)
    base = tiny_causal_lm("qwen2_moe").state_dict()
    changed = {k for k, v in reloaded.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(".mlp.experts." in k or ".mlp.shared_expert." in k for k in changed), changed


def test_a_different_expert_is_refused_naming_it(saved_moe):
    from peft import PeftModel

    root = saved_moe[0]
    other = tiny_causal_lm("qwen2_moe")
    with torch.no_grad():
        other.model.layers[1].mlp.experts.down_proj[2].mul_(1.5)
    with pytest.raises(WrongBaseModelError, match=r"layers\.1\.mlp\.experts\.down_proj.*expert 2"):
        PeftModel.from_pretrained(other, root / "edit")


def test_default_targets_of_moe_families_are_routed_and_shared_experts():
    for family in MOE_FAMILIES:
        model = tiny_causal_lm(family)
        names = resolve_target_modules(model)
        targets = weight_targets(model)
        assert any(targets[n].is_experts for n in names), family
        shared = [n for n in targets if ".shared_expert" in n and not n.endswith("_gate")]
        assert set(shared) <= set(names), f"{family}: shared experts belong to the default"
        assert not any("self_attn" in n or n.endswith((".gate", "lm_head")) for n in names), family


@pytest.mark.parametrize("head", ["BertForSequenceClassification", "BertForTokenClassification", "BertForMaskedLM",
                                  "T5ForConditionalGeneration"])
def test_heads_no_built_in_task_covers_are_refused_before_any_work(head):
    import transformers

    if head.startswith("T5"):
        cfg = transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8)
    else:
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64)
    model = getattr(transformers, head)(cfg)
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6]] * 4})
    for mode in ("sampled", "empirical"):  # a masked LM must not silently get next-token labels either
        with pytest.raises(ValueError, match=rf"{head} is .*task=.*FactorTask"):
            fit_factors(model, data, FactorConfig(seq_len=6, label_mode=mode, target_modules=r".*dense|.*wi"),
                        progress=False)


def test_card_records_each_experts_token_count(starved, tmp_path):
    from hf_curvedit.publish import publish

    model, factors, _ = starved
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.6, min_expert_tokens=0))
    publish(edited, "user/tiny-moe", out_dir=tmp_path / "out", dry_run=True)
    card = (tmp_path / "out" / "README.md").read_text()
    n = "model.layers.0.mlp.experts.gate_up_proj"
    counts = factors.num_tokens[n]
    assert f"| `{n}` | 3 of 4 |" in card and "| 3 |" in card, "three experts edited, expert 3 left alone"
    assert f"`{n}`: " + ", ".join(f"{e}: {c:,}" for e, c in enumerate(counts)) in card
    assert "An expert that no token\nreached keeps its weights." in card
    edited.unload()


def test_the_sweep_and_its_baselines_handle_expert_projections(starved):
    from hf_curvedit.baselines import BalancedSubnetConfig, svd_truncation, train_balanced_subnet

    model, factors, _ = starved
    names = ["model.layers.1.mlp.experts.down_proj"]
    w = model.get_parameter(names[0]).detach().clone()
    with svd_truncation(model, names, 3):
        truncated = model.get_parameter(names[0]).detach().clone()
    assert torch.equal(model.get_parameter(names[0]), w), "restored"
    assert all(int(torch.linalg.matrix_rank(truncated[e].double(), tol=1e-4)) <= 3 for e in range(4))
    seqs = [torch.randint(3, 128, (12,)).tolist() for _ in range(4)]
    masks = train_balanced_subnet(model, seqs, seqs, BalancedSubnetConfig(target_modules=names, epochs=1, ratio=0.1),
                                  show_progress=False)
    assert masks.masks[names[0]].shape == w.shape and not bool(masks.masks[names[0]].all())
    with masks.applied(model):
        assert not torch.equal(model.get_parameter(names[0]), w)
    assert torch.equal(model.get_parameter(names[0]), w)


def test_exposure_measures_linear_layers_and_experts_together(starved):
    from hf_curvedit.evaluation import TextSet
    from hf_curvedit.exposure import adapter_exposure, predict_exposure

    model, factors, _ = starved
    dense = fit_factors(model, token_data(24), FactorConfig(seq_len=16, batch_size=8, target_modules=["v_proj"]),
                        progress=False)
    both = {**factors.eigendecompose(), **dense.eigendecompose()}
    config = CurvatureEditConfig(target_modules=["mlp.experts", "v_proj"])
    tasks = {"t": TextSet(random_token_rows(4, lo=6, hi=12, seed=3))}
    report = predict_exposure(model, both, tasks, [0.5], config, show_progress=False)
    assert set(report.shares["ρ=0.5"]["t"]) == set(dense.module_names) | set(factors.module_names)
    assert 0 < report.exposure("ρ=0.5", "t") < 1
    edited = build_curvature_edit(model, both, CurvatureEditConfig(keep_mass=0.5, target_modules=config.target_modules))
    try:
        again = adapter_exposure(edited, tasks, show_progress=False)
        assert again.exposure("default", "t") == pytest.approx(report.exposure("ρ=0.5", "t"), rel=1e-5)
    finally:
        edited.unload()


def _set_implementation(model, implementation):
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config._experts_implementation = implementation


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_moe"])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factored_expert_forward_equals_the_dense_substitution(family, implementation, dtype):
    """Each projection with unedited, factored and dense experts side by side against the module's own forward with
    the dense W' stack substituted for its parameter: in float64 against the eager computation (torch's grouped_mm
    has no float64), in float32 against the same implementation (its kernel)."""
    from hf_curvedit.targets import experts_target
    from hf_curvedit.tuner.experts_forward import ExpertsProjection, edited_experts_forward

    model = tiny_causal_lm(family).to(dtype)
    _set_implementation(model, "eager" if dtype == torch.float64 else implementation)
    module = next(iter(experts_modules(model).values()))
    g = torch.Generator().manual_seed(3)
    projections, substituted = {}, {}
    for shift, param in enumerate(("gate_up_proj" if hasattr(module, "gate_up_proj") else "up_proj", "down_proj")):
        target = experts_target(module, param)
        projections[param], substituted[param] = mixed_experts_projection(target, g, shift)
    hidden = torch.randn(13, model.config.hidden_size, generator=g).double()
    top_k = 2
    index = torch.rand(13, module.num_experts, generator=g).topk(top_k, dim=-1).indices
    weights = torch.rand(13, top_k, generator=g).double().softmax(-1)
    projections = {p: ExpertsProjection(j.kind, j.kinds, j.slot, *(t.to(dtype) for t in (j.first, j.second, j.dense)))
                   for p, j in projections.items()}
    hidden, weights = hidden.to(dtype), weights.to(dtype)
    with torch.no_grad():
        want = torch.func.functional_call(module, {p: w.to(dtype) for p, w in substituted.items()},
                                          (hidden, index, weights))
        _set_implementation(model, implementation)
        got = edited_experts_forward(module, projections)(hidden, index, weights)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # a router that hands over its whole distribution (HunYuan-MoE, Phi-MoE on transformers 5.0) routes the same
    full = torch.zeros(13, module.num_experts, dtype=dtype).scatter(1, index, weights)
    with torch.no_grad():
        torch.testing.assert_close(edited_experts_forward(module, projections)(hidden, index, full), got, rtol=0,
                                   atol=0)
    if dtype == torch.float64:  # and autograd runs through it (the EK-FAC pass, exposure): gradients match too
        x = hidden.clone().requires_grad_()
        edited_experts_forward(module, projections)(x, index, weights).square().sum().backward()
        y = hidden.clone().requires_grad_()
        _set_implementation(model, "eager")
        torch.func.functional_call(module, substituted, (y, index, weights)).square().sum().backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_unmerged_expert_adapter_holds_no_dense_copy_where_factors_are_smaller(implementation):
    model = tiny_causal_lm("qwen3_moe")  # float32: torch's grouped_mm has no float64
    _set_implementation(model, implementation)
    factors = fit_factors(model, token_data(48), FactorConfig(seq_len=16, batch_size=8, accumulate_dtype="float64"),
                          progress=False)
    x = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.5, min_expert_tokens=8,
                                                                      target_modules=["mlp.experts"]))
    try:
        with torch.no_grad():
            out = edited(input_ids=x).logits
            edited.merge_adapter()
            merged = edited(input_ids=x).logits
            edited.unmerge_adapter()
        torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-6)
        seen = set()
        for layer in (m for m in edited.modules() if isinstance(m, CurvatureEditExperts)):
            for p in layer.units_of("default"):
                num, d_out, d_in = layer.base_weight(p).shape
                projection = layer._projection("default", p, torch.device("cpu"))
                seen.update(projection.kinds)
                n = {k: int((projection.kind == k).sum()) for k in (BASE, FACTORED, DENSE)}
                # a dense W'_e only for the experts whose (aligned) factorization is not smaller, none for the others
                assert n[DENSE] == int(layer.runs_dense("default", p).sum())
                assert projection.dense is None or projection.dense.shape == (n[DENSE], d_in, d_out)
                if n[FACTORED]:
                    k = projection.first.shape[-1]
                    assert projection.first.shape == (n[FACTORED], d_in, k) and k * (d_in + d_out) < d_in * d_out
                stores = {layer._store_of(s, p)["default"].untyped_storage().data_ptr() for s in ("out", "in")}
                extra = sum(t.numel() for t in (projection.first, projection.second, projection.dense)
                            if t is not None and t.untyped_storage().data_ptr() not in stores)
                assert extra <= (num - n[BASE]) * d_out * d_in
                if n[FACTORED] == num:  # the stores themselves, or (rank not a multiple of the kernels' alignment)
                    # one zero-padded copy of the factors, never a matrix per expert
                    width = layer._store_of("out", p)["default"].shape[-1]
                    assert extra == (0 if width == k else num * (d_in + d_out) * k)
                    assert extra < num * d_in * d_out
        assert FACTORED in seen
    finally:
        edited.unload()


def test_the_cli_fits_a_moe_folder_and_prints_each_experts_token_range(saved_moe, tmp_path, capsys):
    from hf_curvedit.cli import main

    root = saved_moe[0]
    token_data(48).to_json(tmp_path / "data.jsonl")  # the base folder has no tokenizer: token ids
    out = tmp_path / "factors"
    assert main(["fit", "--model", str(root / "base"), "--data", str(tmp_path / "data.jsonl"), "--output-dir", str(out),
                 "--seq-len", "16", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    counts = load_factors(out).num_tokens
    experts = next(n for n, c in counts.items() if isinstance(c, list))
    row = next(line for line in printed.splitlines() if line.startswith(experts + " "))
    assert f"{min(counts[experts])}–{max(counts[experts])}" in row, "the summary gives each experts stack's token range"
