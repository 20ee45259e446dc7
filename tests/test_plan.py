"""plan_factors: the plan's bytes are what fit_factors allocates; 7B/70B plans need no weights."""

from __future__ import annotations

import resource

import pytest
import torch
from datasets import Dataset
from family_configs import runnable_families
from testing_utils import random_token_rows, slow, slow_param, tiny_llama
from transformers import LlamaConfig, Olmo2Config

from hf_curvedit import FactorConfig, fit_factors
from hf_curvedit.curvature import FactorCollector, plan_factors
from hf_curvedit.curvature import fit as fit_mod


def _allocated_by_fit(model, cfg, monkeypatch) -> list[int]:
    """Bytes of every accumulator each FactorCollector of a real fit_factors run allocated, per partition."""
    collectors: list[FactorCollector] = []

    class Recording(FactorCollector):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            collectors.append(self)

    monkeypatch.setattr(fit_mod, "FactorCollector", Recording)
    data = Dataset.from_dict({"input_ids": random_token_rows(8, lo=20, hi=30)})
    fit_factors(model, data, cfg, progress=False)
    return [sum(t.numel() * t.element_size() for t in (*c.A.values(), *c.G.values())) for c in collectors]


@pytest.mark.parametrize("budget_gb,dtype", [(None, "float32"), (0.00004, "float32"), (None, "float64"),
                                             slow_param(0.00004, "float64")])
def test_plan_bytes_equal_what_fit_factors_allocates(monkeypatch, budget_gb, dtype):
    model = tiny_llama()
    cfg = FactorConfig(seq_len=16, batch_size=4, accumulate_dtype=dtype, max_factor_memory_gb=budget_gb)
    plan = plan_factors(model, cfg)
    allocated = _allocated_by_fit(model, cfg, monkeypatch)
    assert plan.data_passes == len(allocated) == (1 if budget_gb is None else len(plan.partitions)) >= 1
    assert plan.partition_bytes() == allocated
    assert plan.accumulator_bytes == max(allocated)
    # gate and up read the same input: one A between them, unless a budget puts them in different passes
    ups = {m.name: m for m in plan.modules if m.name.endswith("up_proj")}
    assert ups and all(m.shares_a_with == m.name.replace("up_proj", "gate_proj") for m in ups.values())
    # a plan of the config alone (fake tensors, no weights) is the same plan, and so is one of a meta-device model
    meta = type(model)(model.config).to("meta")
    assert plan_factors(meta, cfg).to_dict() == plan.to_dict()
    again = plan_factors(model.config, cfg)
    assert again.to_dict() == plan.to_dict()


def _olmo2_7b() -> Olmo2Config:
    return Olmo2Config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=100352)


def _llama_70b() -> LlamaConfig:
    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256)


@pytest.mark.parametrize("make_config, n_layers, hidden, mlp", [
    (LlamaConfig, 32, 4096, 11008), (_olmo2_7b, 32, 4096, 11008), slow_param(_llama_70b, 80, 8192, 28672)])
def test_plans_at_7b_and_70b_shapes_allocate_no_weights(make_config, n_layers, hidden, mlp):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    plan = plan_factors(make_config(), FactorConfig(max_factor_memory_gb=40))
    # no weight is ever allocated: the weights alone would be 25 to 260 GiB; the process' peak grows by far less
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 2 * 1024**2
    assert len(plan.modules) == 3 * n_layers
    gate, up, down = plan.modules[:3]
    assert (gate.d_out, gate.d_in, down.d_out, down.d_in) == (mlp, hidden, hidden, mlp)
    assert up.shares_a_with == gate.name and up.a_bytes == 0
    # per layer: A of gate/up (hidden²), G of gate and up (mlp² each), A of down (mlp²), G of down (hidden²); fp32
    per_layer = (hidden**2 + 2 * mlp**2 + mlp**2 + hidden**2) * 4
    assert sum(plan.partition_bytes()) == n_layers * per_layer
    # the budget's passes: each full, in model order (a module's own factors count in full, as fit_factors plans)
    budget = 40 * 1024**3
    own = {m.name: (m.d_in**2 + m.d_out**2) * 4 for m in plan.modules}
    assert [n for part in plan.partitions for n in part] == [m.name for m in plan.modules]
    for i, part in enumerate(plan.partitions):
        assert sum(own[n] for n in part) <= budget
        if i + 1 < len(plan.partitions):
            assert sum(own[n] for n in part) + own[plan.partitions[i + 1][0]] > budget
    assert plan.data_passes == len(plan.partitions) > 1 and plan.accumulator_bytes <= budget
    assert gate.dense_break_even_rank == -(-hidden * mlp // (hidden + mlp))
    assert gate.adapter_max_bytes == (hidden + mlp) * hidden * 4
    assert "data passes" in plan.to_table()


def test_plan_refuses_a_budget_too_small_for_one_module():
    with pytest.raises(ValueError, match="too small"):
        plan_factors(LlamaConfig(), FactorConfig(max_factor_memory_gb=0.1))


def test_cli_plan_reads_only_the_config(tmp_path, capsys):
    import json

    from hf_curvedit.cli import main

    folder = tmp_path / "olmo"
    _olmo2_7b().save_pretrained(folder)  # config.json only: no weights exist
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(folder), "--max-factor-memory-gb", "20", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "data passes (partitions): 3" in text and "model.layers.31.mlp.down_proj" in text
    plan = json.loads(out.read_text())
    assert len(plan["modules"]) == 96 and plan["data_passes"] == 3
    assert main(["plan", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("budget_gb", [None, 0.0002, slow_param(0.00007)])
def test_moe_plan_counts_expert_factors_and_splits_experts_across_passes(monkeypatch, budget_gb):
    from family_configs import tiny_causal_lm

    model = tiny_causal_lm("qwen2_moe")  # routed experts and a shared expert
    cfg = FactorConfig(seq_len=16, batch_size=4, max_factor_memory_gb=budget_gb)
    plan = plan_factors(model, cfg)
    experts = [m for m in plan.modules if m.num_experts]
    assert experts and all(m.num_experts == 4 for m in experts)
    gate_up = experts[0]
    assert gate_up.a_bytes == 4 * gate_up.d_in**2 * 4 and gate_up.g_bytes == 4 * gate_up.d_out**2 * 4
    split = [e for part in plan.partitions for e in part if "[" in e]
    assert bool(split) == (budget_gb == 0.00007), "a stack larger than the budget is split across its experts"
    allocated = _allocated_by_fit(model, cfg, monkeypatch)
    assert plan.partition_bytes() == allocated
    assert max(allocated) <= (budget_gb or 1) * 1024**3
    assert plan_factors(model.config, cfg).to_dict() == plan.to_dict()


@slow
def test_moe_factors_split_across_passes_equal_one_pass():
    from family_configs import tiny_causal_lm

    model = tiny_causal_lm("mixtral")
    data = Dataset.from_dict({"input_ids": random_token_rows(8, lo=20, hi=30)})
    one = fit_factors(model, data, FactorConfig(seq_len=16, batch_size=4, accumulate_dtype="float64"), progress=False)
    split_cfg = FactorConfig(seq_len=16, batch_size=4, accumulate_dtype="float64", max_factor_memory_gb=0.0002)
    assert any("[" in e for part in plan_factors(model, split_cfg).partitions for e in part)
    split = fit_factors(model, data, split_cfg, progress=False)
    assert split.num_tokens == one.num_tokens
    for n in one.module_names:
        assert split.A[n].shape == one.A[n].shape
        assert torch.equal(split.A[n], one.A[n]) and torch.equal(split.G[n], one.G[n])


@pytest.mark.parametrize("processes,wall", [(1, 3), (2, 2), (3, 1), (8, 1)])
def test_the_plan_gives_the_passes_one_after_the_other_on_several_processes(processes, wall, capsys):
    from hf_curvedit.cli import main

    cfg = FactorConfig(max_factor_memory_gb=42_000 / 1024**3)  # two of the six MLP projections per pass
    plan = plan_factors(tiny_llama(), cfg, num_processes=processes)
    assert plan.data_passes == 3 and plan.wall_passes == wall
    # one partition at a time per process, the largest, and one batch's forward and backward; the eigen cache is
    # filled one shard at a time
    assert plan.process_bytes == max(plan.partition_bytes()) + plan.transient_bytes > plan.transient_bytes > 0
    assert plan.eigen_process_bytes >= plan.eigen_peak_bytes
    assert main(["plan", "--max-factor-memory-gb", "0.004", "--num-processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "one after the other on 2 processes" in out and "processes: 2" in out
    assert main(["plan", "--num-processes", "0"]) == 2
    assert "--num-processes must be at least 1" in capsys.readouterr().err


def _real_transient(model, names, batch: int, length: int) -> int:
    """Brute force: the bytes a real batch's forward saves for the backward (down to the first target, weights
    frozen, experts modules running their recording forward as in `fit_factors`), counted as they are saved, plus what
    the planner adds to them (gradients, logits, the collector's copies)."""
    from hf_curvedit.curvature.experts import recording_experts
    from hf_curvedit.curvature.roots import GradientRoots, frozen_parameters
    from hf_curvedit.targets import is_experts_module, weight_targets

    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}
    alive = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            alive.append(t)
        return t

    roots = GradientRoots()
    mods = dict(model.named_modules())
    handles = [roots.register(mods[n if n in mods else n.rsplit(".", 1)[0]]) for n in names]
    ids = torch.randint(1, 50, (batch, length), generator=torch.Generator().manual_seed(0))
    # the factor pass runs every experts module through its recording forward, not the experts implementation the
    # model was loaded with: so does the real batch (Llama 4's computes only the rows its router picked, where the
    # model's own forward multiplies every token by every expert)
    experts = {m: lambda *a: None for m in model.modules() if is_experts_module(m)}
    with frozen_parameters(model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            recording_experts(experts, model):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    for h in handles:
        h.remove()
    targets = weight_targets(model)
    copies = max(batch * length * (targets[n].d_in + targets[n].d_out) * 4 for n in names)
    return sum(saved.values()) + 2 * max(saved.values()) + 2 * logits.numel() * logits.element_size() + copies


def test_the_transient_is_what_autograd_keeps_for_a_real_batch():
    """The planner's figure against the brute force. The fake pass may save a little more: attention takes its plain
    path there (the key/value heads repeated), never less."""
    from hf_curvedit.targets import resolve_target_modules

    model = tiny_llama()
    cfg = FactorConfig(seq_len=16, batch_size=4)
    want = _real_transient(model, resolve_target_modules(model), 4, 16)
    got = plan_factors(model, cfg).transient_bytes
    assert want <= got <= 1.1 * want
    assert plan_factors(model.config, cfg).transient_bytes == got


@pytest.mark.parametrize("family", runnable_families(["mixtral", "qwen2_moe", "longcat_flash", "jetmoe", "dbrx",
                                                      "llama4_text"]))
def test_the_transient_of_every_experts_layout_is_planned(family):
    """An experts module routes by values a fake tensor does not have: the plan runs each layout's first expert on
    every token once per routed slot (Llama 4's on one block of its rows per slot). That saves what the real routing
    saves in activations, but not its index and gathered-row tensors, so the figure lies near the brute force rather
    than at or above it (0.74-0.99 of it for these six on transformers 5.23). JetMoE's mixture of attention heads
    routes by value too and runs densely."""
    from family_configs import tiny_causal_lm

    from hf_curvedit.targets import resolve_target_modules

    model = tiny_causal_lm(family)
    names = resolve_target_modules(model)
    assert any(".experts." in n or ".mlp.input_linear" in n for n in names)
    cfg = FactorConfig(seq_len=32, batch_size=4, target_modules=names)
    got = plan_factors(model, cfg).transient_bytes
    want = _real_transient(model, names, 4, 32)
    assert 0.7 * want <= got <= 1.1 * want, (got, want)
    assert plan_factors(model.config, cfg).transient_bytes == got
