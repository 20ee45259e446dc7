"""Experts classes with a forward of their own (`hf_curvedit.expert_layouts`): per-expert factors against a per-token
brute force, and the expert adapter through its lifecycle (unmerged = merged, disabled = base bit for bit, every stock
loading path)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from family_configs import runnable_families, tiny_causal_lm
from testing_utils import brute_force_lambda, mixed_experts_projection, random_token_rows

from hf_curvedit import (
    CurvatureEditConfig,
    FactorConfig,
    build_curvature_edit,
    fit_eigen_correction,
    fit_factors,
    load_factors,
)
from hf_curvedit.targets import is_experts_module, resolve_target_modules, weight_targets
from hf_curvedit.tuner.experts import CurvatureEditExperts

VOCAB = 128


def _probe(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64, requires_grad=True)


# Each reference computes one experts module token by token and routed expert by routed expert, adding a zero probe
# to every projection's output; `note(param, token, expert, a, probe)` records the projection's input and probe.


def _longcat_reference(module, note):
    def forward(hidden, top_k_index, top_k_weights):
        rows = []
        for t in range(hidden.shape[0]):
            out = torch.zeros_like(hidden[t])
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                y = hidden[t]
                if e < module.num_routed_experts:
                    p1, p2 = _probe(module.gate_up_proj.shape[1]), _probe(module.down_proj.shape[1])
                    h = module.gate_up_proj[e] @ y + p1
                    note("gate_up_proj", t, e, y, p1)
                    gate, up = h.chunk(2)
                    z = module.act_fn(gate) * up
                    y = module.down_proj[e] @ z + p2
                    note("down_proj", t, e, z, p2)
                out = out + top_k_weights[t, k] * y
            rows.append(out)
        return torch.stack(rows)
    return forward


def _jetmoe_reference(module, note):
    def forward(layer_input):
        B, L, H = layer_input.shape
        x = layer_input.reshape(-1, H)
        logits = module.router.layer(x).float()
        top_logits, top_index = logits.topk(module.router.top_k, dim=1)
        gates = torch.softmax(top_logits, dim=1).type_as(x)
        w_in, w_out = module.input_linear.weight, module.output_linear.weight
        rows = []
        for t in range(x.shape[0]):
            out = torch.zeros_like(x[t])
            for k in range(top_index.shape[1]):
                e = int(top_index[t, k])
                p1, p2 = _probe(w_in.shape[1]), _probe(w_out.shape[1])
                h = w_in[e] @ x[t] + p1
                note("input_linear", t, e, x[t], p1)
                c0, c1 = h.chunk(2)
                z = module.activation(c0) * c1
                note("output_linear", t, e, z, p2)
                out = out + gates[t, k] * (w_out[e] @ z + p2)
            rows.append(out)
        return (torch.stack(rows) + module.bias).view(B, L, H)
    return forward


def _dbrx_reference(module, note):
    # DBRX checkpoints' computation (transformers#47671): gate = w1_e x, up = v1_e x, out = w2_eᵀ (act(gate) * up)
    glu = module.mlp
    E, F_, H = module.num_experts, module.ffn_hidden_size, module.hidden_size
    w1, v1, w2 = (getattr(glu, p).view(E, F_, H) for p in ("w1", "v1", "w2"))

    def forward(hidden, top_k_index, top_k_weights):
        x = hidden.reshape(-1, H)
        rows = []
        for t in range(x.shape[0]):
            out = torch.zeros_like(x[t])
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                p1, p2, p3 = _probe(F_), _probe(F_), _probe(H)
                gate, up = w1[e] @ x[t] + p1, v1[e] @ x[t] + p2
                note("w1", t, e, x[t], p1)
                note("v1", t, e, x[t], p2)
                z = glu.activation_fn(gate) * up
                note("w2", t, e, z, p3)
                out = out + top_k_weights[t, k] * (w2[e].T @ z + p3)
            rows.append(out)
        return torch.stack(rows).view(hidden.shape[0], -1, H)
    return forward


def _llama4_reference(block, note):
    # the whole Llama4TextMoe (its experts module is never told which rows were routed): per token, each expert of the
    # router's top k computes on the token scaled by its score, sigmoid(top logit); the outputs join unscaled
    experts = block.experts

    def forward(hidden_states):
        x = hidden_states.reshape(-1, block.hidden_dim)
        scores, logits = block.router(x)
        top_index = logits.topk(block.router.top_k, dim=1).indices
        shared = block.shared_expert(x)
        rows = []
        for t in range(x.shape[0]):
            out = shared[t]
            for k in range(top_index.shape[1]):
                e = int(top_index[t, k])
                p1, p2 = _probe(experts.gate_up_proj.shape[2]), _probe(experts.down_proj.shape[2])
                a = x[t] * scores[t, e]
                h = experts.gate_up_proj[e].T @ a + p1
                note("gate_up_proj", t, e, a, p1)
                gate, up = h.chunk(2)
                z = up * experts.act_fn(gate)
                note("down_proj", t, e, z, p2)
                out = out + experts.down_proj[e].T @ z + p2
            rows.append(out)
        return torch.stack(rows), logits
    return forward


REFERENCES = {"longcat_flash": _longcat_reference, "jetmoe": _jetmoe_reference, "dbrx": _dbrx_reference,
              "llama4_text": _llama4_reference, "llama4": _llama4_reference}
# Llama 4's reference replaces the experts module's parent, the MoE block that holds the router
_BLOCK_REFERENCES = {"llama4_text", "llama4"}


@pytest.mark.parametrize("family", runnable_families(list(REFERENCES)))
def test_recording_forward_computes_what_the_model_computes(family):
    from hf_curvedit.curvature.experts import recording_experts

    model = tiny_causal_lm(family)
    ids, mask = padded(random_token_rows(3, 8, 12, seed=1), 12)
    mods = [m for m in model.modules() if is_experts_module(m)]
    assert mods
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with recording_experts({m: lambda *a: None for m in mods}, model):
            got = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, want), "the class's own forward is back after collection"


@pytest.mark.parametrize("family", runnable_families(["llama4_text"]))
def test_llama4_records_the_routers_choice_not_the_nonzero_rows(family):
    """Llama 4's experts are handed a zero row for every expert the router did not pick, and a routed token whose
    score underflows to 0 is a zero row too: the recording follows the router's top-k choice, so that token is a
    sample of its top-k experts (with its zero input) and every token of those and no other experts."""
    from hf_curvedit.curvature.experts import recording_experts

    model = tiny_causal_lm(family)
    block = next(m for m in model.modules() if type(m).__name__ == "Llama4TextMoe")
    u = torch.randn(block.hidden_dim, generator=torch.Generator().manual_seed(0))
    # the logits of a token x are (100 + 10 e)·c for c = u·x / |u|²: c < 0 picks experts 0 and 1, c > 0 experts 3, 2
    ramp = torch.arange(block.num_experts, dtype=torch.float32)[:, None] * 10 + 100
    with torch.no_grad():
        block.router.weight.copy_(ramp * u / u.square().sum())
    x = torch.stack([-10 * u, 0.05 * u, -0.001 * u])[None]  # token 0: logits -1000, -1100, ...: scores exactly 0
    seen = {}

    def record(param, expert, tokens, num_rows, a, y):
        seen[(param, expert)] = (tokens.tolist(), num_rows, a)

    with torch.no_grad():
        scores, _ = block.router(x[0])
        assert scores[0].eq(0).all() and scores[1:].gt(0).sum() == 4, "token 0 routed with an underflowed score"
        want = block(x)[0]
        with recording_experts({block.experts: record}, model):
            got = block(x)[0]
    torch.testing.assert_close(got, want)
    routed = {0: [0, 2], 1: [0, 2], 2: [1], 3: [1]}
    for param in ("gate_up_proj", "down_proj"):
        assert {e: seen[(param, e)][0] for e in routed} == routed
        assert all(seen[(param, e)][1] == 3 for e in routed)
    for e in (0, 1):
        a = seen[("gate_up_proj", e)][2]
        assert not a[0].any() and a[1].abs().min() > 0, "the underflowed token is a sample, with its zero input"
        torch.testing.assert_close(a[1], x[0, 2] * scores[2, e], rtol=0, atol=0)


def padded(rows, length):
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@contextlib.contextmanager
def _reference_forwards(model, family, note):
    """Inside the block every experts module runs its family's reference, which calls ``note(projection name, token,
    expert, input, probe)`` for each projection it computes."""
    from hf_curvedit.curvature.experts import replaced_forwards

    modules = dict(model.named_modules())
    forwards = {}
    for name, m in modules.items():
        if is_experts_module(m):
            owner = modules[name.rsplit(".", 1)[0]] if family in _BLOCK_REFERENCES else m
            forwards[owner] = REFERENCES[family](
                owner, lambda p, t, e, a, probe, name=name: note(f"{name}.{p}", t, e, a, probe))
    with replaced_forwards(forwards):
        yield


def brute_force(model, family, ids, mask):
    """Per-token K-FAC factors of every expert projection (float64 sums over valid positions, empirical labels):
    {name: (A (experts, d_in, d_in), G (experts, d_out, d_out), tokens per expert)}."""
    records = []
    with _reference_forwards(model, family, lambda key, t, e, a, probe: records.append((key, t, e, a.detach(), probe))):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    B, T = ids.shape
    valid = torch.zeros(B * T, dtype=torch.bool)
    for b in range(B):
        for t in range(T - 1):
            valid[b * T + t] = bool(mask[b, t] and mask[b, t + 1])
    pos = valid.nonzero().squeeze(1).tolist()
    labels = torch.tensor([int(ids.reshape(-1)[p + 1]) for p in pos])
    loss = F.cross_entropy(logits.reshape(B * T, -1)[pos], labels, reduction="sum")
    kept = [r for r in records if valid[r[1]]]
    grads = torch.autograd.grad(loss, [r[4] for r in kept], allow_unused=True)
    targets = weight_targets(model)
    out = {}
    for (key, _, e, a, probe), g in zip(kept, grads):
        g = torch.zeros_like(probe) if g is None else g
        if key not in out:
            num = targets[key].num_experts
            out[key] = [torch.zeros(num, a.numel(), a.numel(), dtype=torch.float64),
                        torch.zeros(num, g.numel(), g.numel(), dtype=torch.float64), [0] * num]
        out[key][0][e] += torch.outer(a, a)
        out[key][1][e] += torch.outer(g, g)
        out[key][2][e] += 1
    for A, G, count in out.values():
        for e, c in enumerate(count):
            if c:
                A[e] /= c
                G[e] /= c
    return out


@pytest.mark.parametrize("family", runnable_families(list(REFERENCES)))
def test_expert_factors_match_a_per_token_brute_force(family):
    model = tiny_causal_lm(family).double()
    rows = [[t % (VOCAB - 1) + 1 for t in r] for r in random_token_rows(5, lo=5, hi=14, seed=3)]
    cfg = FactorConfig(label_mode="empirical", seq_len=14, batch_size=5, packing=False, accumulate_dtype="float64",
                       target_modules=[n for n, t in weight_targets(model).items() if t.is_experts])
    factors = fit_factors(model, Dataset.from_dict({"input_ids": rows}), cfg, progress=False)
    ids, mask = padded(rows, 14)
    assert (mask == 0).any()
    want = brute_force(model, family, ids, mask)
    assert set(factors.module_names) == set(want) and want
    for n, (A, G, count) in want.items():
        assert factors.num_tokens[n] == count, n
        assert sum(count) > 0
        for got, ref in ((factors.A[n], A), (factors.G[n], G)):
            assert got.shape == ref.shape
            assert (got.double() - ref).abs().max() <= 1e-10 * ref.abs().max(), n


@pytest.mark.parametrize("family", runnable_families(list(REFERENCES), fast={"llama4_text"}))
def test_expert_lambda_matches_a_per_sequence_brute_force(family, tmp_path):
    """EK-FAC on each layout: every expert's Λ_e equals autograd's per-sequence gradient of the stored parameter,
    rotated into that expert's eigenbasis and squared (float64, padded batches), and `ekfac_mass` edits with it."""
    model = tiny_causal_lm(family).double()
    rows = [[t % (VOCAB - 1) + 1 for t in r] for r in random_token_rows(5, lo=5, hi=14, seed=3)]
    names = [n for n, t in weight_targets(model).items() if t.is_experts]
    data = Dataset.from_dict({"input_ids": rows})
    cfg = FactorConfig(label_mode="empirical", seq_len=14, batch_size=3, packing=False, accumulate_dtype="float64",
                       target_modules=names)
    factors = fit_factors(model, data, cfg, tmp_path, progress=False)
    corr = fit_eigen_correction(model, data, factors, progress=False)
    assert names and set(corr) == set(names)
    eigen = factors.eigendecompose()
    want = brute_force_lambda(model, rows, names, eigen)
    for n in names:
        assert corr[n].shape == want[n].shape, n
        assert (corr[n] - want[n]).abs().max() <= 1e-10 * want[n].abs().max(), n
    config = dict(keep_mass=0.7, target_modules=names, min_expert_tokens=1)
    ekfac = build_curvature_edit(tiny_causal_lm(family).double(), load_factors(tmp_path).eigendecompose(),
                                 CurvatureEditConfig(selection="ekfac_mass", **config))
    kfac = build_curvature_edit(tiny_causal_lm(family).double(), eigen, CurvatureEditConfig(**config))
    x = torch.tensor([rows[0]])
    with torch.no_grad():
        assert not torch.allclose(ekfac(input_ids=x).logits, kfac(input_ids=x).logits)


def _brute_exposure(model, family, edits, sequences):
    """Per token and per expert the router sent it to (the reference forward's own routing, one unpadded sequence at a
    time): Σ‖(W_e − W′_e) a‖² / Σ‖W_e a‖² for each expert projection."""
    targets = weight_targets(model)
    removed = {n: 0.0 for n in edits}
    total = {n: 0.0 for n in edits}
    weights = {n: (targets[n].logical_weight().double(), edits[n].dense(targets[n].logical_weight()).double())
               for n in edits}

    def note(key, t, e, a, probe):
        if key in weights:
            W, W_new = weights[key]
            total[key] += float((W[e] @ a.double()).square().sum())
            removed[key] += float(((W[e] - W_new[e]) @ a.double()).square().sum())

    with torch.no_grad(), _reference_forwards(model, family, note):
        for seq in sequences:
            model(input_ids=torch.tensor([seq]), use_cache=False)
    return {n: removed[n] / total[n] for n in edits}


@pytest.mark.parametrize("family", runnable_families(list(REFERENCES)))
def test_expert_exposure_matches_a_per_token_brute_force(family):
    """Exposure on each layout counts every token once for each expert it was routed to, with the input that expert
    computes on; the prediction from the factors and the measurement through the adapter agree."""
    from hf_curvedit.evaluation import TextSet
    from hf_curvedit.exposure import adapter_exposure, predict_exposure
    from hf_curvedit.tuner import compute_module_edits

    model = tiny_causal_lm(family, seed=2).double()
    rows = [[t % (VOCAB - 1) + 1 for t in r] for r in random_token_rows(12, lo=6, hi=16, seed=3)]
    names = [n for n, t in weight_targets(model).items() if t.is_experts]
    factors = fit_factors(model, Dataset.from_dict({"input_ids": rows}),
                          FactorConfig(seq_len=16, batch_size=4, accumulate_dtype="float64", target_modules=names),
                          progress=False)
    eigen = factors.eigendecompose()
    config = CurvatureEditConfig(keep_mass=0.7, target_modules=names, min_expert_tokens=1)
    tasks = {"a": TextSet(random_token_rows(5, lo=4, hi=12, seed=7)),
             "b": TextSet([[t % (VOCAB - 1) + 1 for t in r] for r in random_token_rows(4, lo=4, hi=12, seed=8)])}
    report = predict_exposure(model, eigen, tasks, [0.7], config, batch_size=3, show_progress=False)
    edits = compute_module_edits(model, eigen, config)
    assert set(edits) == set(names) and all(bool(e.edited.any()) for e in edits.values())
    for task, ts in tasks.items():
        want = _brute_exposure(model, family, edits, ts.sequences)
        got = report.shares["ρ=0.7"][task]
        assert set(got) == set(names)
        for n in names:
            assert 0 < want[n] < 1, n
            assert got[n] == pytest.approx(want[n], rel=1e-9, abs=1e-12), (task, n)
    edited = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=0.7, target_modules=names,
                                                                    min_expert_tokens=1))
    measured = adapter_exposure(edited, tasks, batch_size=3, show_progress=False)
    for task in tasks:
        assert measured.exposure("default", task) == pytest.approx(report.exposure("ρ=0.7", task), rel=1e-9)


@pytest.fixture(scope="module", params=runnable_families(list(REFERENCES)))
def saved(request, tmp_path_factory):
    """A family's tiny model saved as a base folder, its default edit (routed experts included) and the edit saved."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = tiny_causal_lm(family)
    model.save_pretrained(root / "base")
    data = Dataset.from_dict({"input_ids": [[t % (VOCAB - 1) + 1 for t in r]
                                            for r in random_token_rows(48, 6, 20, seed=0)]})
    factors = fit_factors(model, data, FactorConfig(seq_len=16, batch_size=8), progress=False)
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.6, min_expert_tokens=8))
    edited.peft_config["default"].base_model_name_or_path = str(root / "base")
    edited.save_pretrained(root / "edit")
    x = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = edited(input_ids=x).logits
    return family, root, edited, x, out


def test_default_targets_edit_the_routed_experts(saved):
    family, _, edited, _, _ = saved
    fresh = tiny_causal_lm(family)
    names = resolve_target_modules(fresh)
    assert any(weight_targets(fresh)[n].is_experts for n in names)
    entries = edited.peft_config["default"].edited_modules
    experts = [n for n, e in entries.items() if e.get("experts")]
    assert experts and all(n in names for n in experts)
    assert any(e["edited_experts"] > 0 for n, e in entries.items() if n in experts), "some expert was edited"


def test_expert_adapter_toggles_merges_and_unmerges(saved):
    family, _, edited, x, out = saved
    with torch.no_grad():
        base = tiny_causal_lm(family)(input_ids=x).logits
        with edited.disable_adapter():
            assert torch.equal(edited(input_ids=x).logits, base), "disabled = the base model, bit for bit"
        assert not torch.allclose(out, base)
        edited.merge_adapter()
        merged = edited(input_ids=x).logits
        edited.unmerge_adapter()
        again = edited(input_ids=x).logits
        with edited.disable_adapter():
            assert torch.equal(edited(input_ids=x).logits, base)
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-6)  # factored (x in_e) out_eᵀ against merged W'_e
    assert torch.equal(again, out)


def test_expert_adapter_loads_identically_through_every_stock_path(saved):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    import hf_curvedit  # noqa: F401  (registers the PEFT method)

    family, root, _, x, out = saved
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
    base = AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    changed = {k for k, v in reloaded.state_dict().items() if not torch.equal(v, base[k])}
    targets = weight_targets(reloaded)
    edited_experts = [t for t in targets.values() if t.is_experts]
    assert any(not torch.equal(t.parameter(), base[_state_key(reloaded, t)]) for t in edited_experts), changed


def _state_key(model, target) -> str:
    return next(k for k, p in model.named_parameters() if p is target.parameter())


@pytest.mark.parametrize("family", runnable_families(["llama4_text"]))
def test_llama4_factored_forward_equals_the_dense_substitution(family):
    """Llama 4's unmerged forward with unedited, factored and dense experts side by side equals its experts module's
    own forward with the dense W' stack substituted for each parameter (float64, gradients included), on rows as
    Llama4TextMoe hands them over (a block per expert, zero rows for the experts a token was not routed to). With no
    projection edited it is the module's own forward, bit for bit."""
    from hf_curvedit.targets import experts_target
    from hf_curvedit.tuner.experts_forward import FACTORED, ExpertsProjection
    from hf_curvedit.tuner.layout_forwards import edited_forwards

    model = tiny_causal_lm(family).double()
    module = next(m for m in model.modules() if is_experts_module(m))
    g = torch.Generator().manual_seed(3)
    projections, substituted = {}, {}
    for shift, param in enumerate(("gate_up_proj", "down_proj")):
        target = experts_target(module, param)
        projections[param], substituted[param] = mixed_experts_projection(target, g, shift, width=8)
    tokens = 7
    rows = torch.randn(module.num_experts, tokens, module.hidden_size, generator=g).double()
    rows[torch.rand(module.num_experts, tokens, generator=g) < 0.5] = 0  # the experts a token was not routed to
    rows = rows.reshape(-1, module.hidden_size)
    forward = edited_forwards(module, projections)[module]
    x, y = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    got = forward(x)
    want = torch.func.functional_call(module, substituted, (y,))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(edited_forwards(module, {})[module](rows), module(rows))
        # every expert factored in another dtype (CurvatureEditConfig.compute_dtype), before an unedited projection
        target = experts_target(module, "gate_up_proj")
        num, d_out, d_in = target.shape
        out, inp = torch.randn(num, d_out, 4, generator=g).double(), torch.randn(num, d_in, 4, generator=g).double()
        in_float32 = ExpertsProjection(torch.full((num,), FACTORED), (FACTORED,), torch.arange(num), inp.float(),
                                       out.mT.float())
        got = edited_forwards(module, {"gate_up_proj": in_float32})[module](rows)
        want = torch.func.functional_call(module, {"gate_up_proj": target.to_storage(out @ inp.mT)}, (rows,))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
