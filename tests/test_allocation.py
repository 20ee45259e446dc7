"""Allocating ρ across layers: the groups and their keep_mass_pattern, the search on a landscape whose optimum is known,
and the sweep's per-layer search on tiny models (every candidate recorded, the pick reproduced from sweep.json, and
composed with protected domains, EK-FAC selection, experts and the predicted-cost pick)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from testing_utils import random_token_rows, tiny_llama

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors
from hf_curvedit.evaluation import RecitationSet, TextSet, evaluate_recitation
from hf_curvedit.evaluation.perplexity import perplexity_from_nll, score_text
from hf_curvedit.sweep import SweepConfig, SweepPoint, SweepResult, pick_edit, sweep_edits
from hf_curvedit.sweep.allocation import allocation_pattern, group_label, module_groups, search_allocation
from hf_curvedit.tuner.locate import iter_layers

LLAMA = [f"model.layers.{i}.mlp.{leaf}" for i in (1, 11) for leaf in ("gate_proj", "up_proj", "down_proj")]
MOE = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
       "model.layers.1.mlp.shared_expert.gate_proj", "model.layers.1.mlp.shared_expert.up_proj",
       "model.layers.1.mlp.shared_expert.down_proj", "model.layers.2.mlp.experts.gate_up_proj"]


def test_groups_follow_layers_and_projection_kinds():
    assert module_groups(LLAMA) == {"1": LLAMA[:3], "11": LLAMA[3:]}
    assert module_groups(LLAMA, "per_projection") == {"1 gate/up": LLAMA[:2], "1 down": LLAMA[2:3],
                                                      "11 gate/up": LLAMA[3:5], "11 down": LLAMA[5:]}
    # a layer's routed experts and its shared expert share its group(s)
    assert module_groups(MOE) == {"1": MOE[:5], "2": MOE[5:]}
    assert module_groups(MOE, "per_projection") == {"1 gate/up": [MOE[0], MOE[2], MOE[3]], "1 down": [MOE[1], MOE[4]],
                                                    "2 gate/up": MOE[5:]}
    assert group_label("lm_head") == "lm_head" and group_label("transformer.h.3.mlp.c_fc", "per_projection") == "3 c_fc"


@pytest.mark.parametrize("names,allocation", [(LLAMA, "per_layer"), (LLAMA, "per_projection"),
                                              (MOE, "per_layer"), (MOE, "per_projection")])
def test_the_pattern_gives_every_module_its_groups_rho_and_nothing_else(names, allocation):
    groups = module_groups(names, allocation)
    rhos = {g: round(0.5 + 0.1 * i, 2) for i, g in enumerate(groups)}
    config = CurvatureEditConfig(keep_mass=0.99, keep_mass_pattern=allocation_pattern(groups, rhos))
    for group, members in groups.items():
        for name in members:
            assert config.keep_mass_for(name) == rhos[group]
            assert config.keep_mass_for("base_model.model." + name) == rhos[group]  # as PEFT's wrapper names it
    # layer 1's pattern does not reach layer 11 nor another leaf
    for other in ("model.layers.21.mlp.gate_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate"):
        assert config.keep_mass_for(other) == 0.99


# ------------------------------------------------------------------------ the search on a known landscape
GROUPS = {"0": ["m.layers.0.mlp.up_proj"], "1": ["m.layers.1.mlp.up_proj"]}


def landscape(allocation: dict[str, float], round_: int | None = None) -> SweepPoint:
    """Recitation falls with the total removal and is gone once 0.3 of ρ is removed in all; removing from layer 0
    costs four times the perplexity of removing from layer 1. Optimum: ρ = 1.0 for layer 0, 0.7 for layer 1."""
    r0, r1 = 1 - allocation["0"], 1 - allocation["1"]
    strict = round(max(0.0, 0.3 - r0 - r1), 9)
    ppl = round(1 + 2 * r0 + 0.5 * r1, 9)
    uniform = len(set(allocation.values())) == 1
    return SweepPoint("curvedit", "both", "m", allocation["0"], None, {"mem": {"strict": strict}}, ppl, ppl - 1,
                      allocation=None if uniform else dict(allocation), search_round=round_)


def run_search(steps=(0.05,), cap=50):
    config = SweepConfig(perplexity_budget=10.0)
    points = [landscape({"0": rho, "1": rho}) for rho in (0.8, 0.85, 0.9)]
    calls = []

    def measure(current, allocation, round_):
        calls.append((dict(current.allocation or {}), allocation))
        return landscape(allocation, round_)

    record = search_allocation(points, lambda pts: pick_edit(pts, "mem", config), measure, lambda regex: GROUPS,
                               steps, cap, show_progress=False)
    return points, record, calls, pick_edit(points, "mem", config)


def test_the_search_descends_to_the_known_optimum_through_trades():
    points, record, calls, chosen = run_search()
    assert chosen.allocation == {"0": 1.0, "1": 0.7} and chosen.perplexity == pytest.approx(1.15)
    assert record["stopped"] == "converged" and record["start"] == 1, "it starts from the grid's pick, ρ = 0.85"
    assert points[record["path"][-1]] is chosen and record["candidates"] == len(points) - 3 == len(calls)
    # no single step improves on the start: the first move is a trade of one step (layer 0 up, layer 1 down)
    assert points[record["path"][1]].allocation == {"0": 0.9, "1": 0.8}
    # every point of the path is preferred to the one before by the pick rule, and every candidate is new
    key = lambda p: (p.recitation["mem"]["strict"], p.perplexity)  # noqa: E731
    path = [points[i] for i in record["path"]]
    assert all(key(b) < key(a) for a, b in zip(path, path[1:]))
    measured = [tuple(sorted(a.items())) for _, a in calls]
    assert len(set(measured)) == len(measured)
    assert not [a for _, a in calls if a["0"] == a["1"] in (0.8, 0.85, 0.9)], "grid points are not measured again"
    # each candidate is one step (or one trade) from the point the search stood on
    for current, allocation in calls:
        start = current or {"0": 0.85, "1": 0.85}
        moves = sorted(round(allocation[g] - start[g], 9) for g in allocation)
        assert moves in ([-0.05, 0.0], [0.0, 0.05], [-0.05, 0.05])


def test_the_search_stops_at_its_candidate_cap_in_its_stated_order():
    points, record, calls, chosen = run_search(cap=3)
    assert record["stopped"] == "candidate cap" and record["candidates"] == 3
    assert [a for _, a in calls] == [{"0": 0.8, "1": 0.85}, {"0": 0.9, "1": 0.85}, {"0": 0.85, "1": 0.8}]
    assert chosen is points[1], "none of the three beats the start"


def test_finer_steps_follow_the_coarse_ones():
    points, record, calls, chosen = run_search(steps=(0.1, 0.05))
    assert chosen.allocation == {"0": 1.0, "1": 0.7} and record["steps"] == [0.1, 0.05]
    sizes = {round(max(abs(a[g] - (c or {"0": 0.85, "1": 0.85})[g]) for g in a), 9) for c, a in calls}
    assert sizes == {0.1, 0.05}


# --------------------------------------------------------------------------------- the sweep on tiny models
def edited_weights(peft_model) -> dict[str, torch.Tensor]:
    return {layer.unit_name(u, name): layer.edited_weight("default", u).detach().clone()
            for name, layer in iter_layers(peft_model) for u in layer.units_of("default")}


def check_candidates(model, eigen, result, sets, heldout, **edit):
    """Each search candidate is the edit whose every module has its group's ρ (module by module, the uniform edit at
    that ρ), and its saved settings rebuild what it measured. Returns the model, unedited."""
    from hf_curvedit.targets import resolve_target_modules

    uniform: dict[float, dict[str, torch.Tensor]] = {}
    searched = [p for p in result.points if p.search_round is not None]
    assert searched, "the search measured candidates"
    for point in searched:
        groups = module_groups(resolve_target_modules(model, point.target_modules),
                               result.extra["allocation_search"]["allocation"])
        assert set(point.allocation) == set(groups) and len(groups) > 1
        peft_model = build_curvature_edit(model, eigen, CurvatureEditConfig(**point.edit_settings(), **edit))
        weights = edited_weights(peft_model)
        rec = evaluate_recitation(peft_model, sets["mem"].prefixes, sets["mem"].suffixes, show_progress=False)
        nll, n, _ = score_text(peft_model, heldout.sequences, show_progress=False)
        model = peft_model.unload()
        assert rec.strict == point.recitation["mem"]["strict"]
        assert rec.avg_lev == pytest.approx(point.recitation["mem"]["avg_lev"])
        assert perplexity_from_nll(nll, n) == pytest.approx(point.perplexity, rel=1e-6)
        for group, names in groups.items():
            rho = point.allocation[group]
            if rho not in uniform:
                peft_model = build_curvature_edit(model, eigen, CurvatureEditConfig(
                    keep_mass=rho, target_modules=point.target_modules, **edit))
                uniform[rho] = edited_weights(peft_model)
                model = peft_model.unload()
            for name in names:
                assert torch.equal(weights[name], uniform[rho][name]), name
    return model


@pytest.fixture(scope="module")
def llama_setup():
    model = tiny_llama(num_hidden_layers=3)
    data = Dataset.from_dict({"input_ids": random_token_rows(24, lo=10, hi=30, seed=2)})
    factors = fit_factors(model, data, FactorConfig(seq_len=16, batch_size=8), progress=False)
    rows = random_token_rows(6, lo=12, hi=14, seed=4)
    sets = {"mem": RecitationSet([r[:8] for r in rows], [r[8:] for r in rows])}
    heldout = TextSet(random_token_rows(6, lo=10, hi=20, seed=9))
    return model, data, factors, sets, heldout


def test_a_per_layer_sweep_records_every_candidate_and_its_pick_is_reproducible(llama_setup, tmp_path, capsys):
    model, _, factors, sets, heldout = llama_setup
    eigen = factors.eigendecompose()
    choices = {"mlp": r"model\.layers\.\d+\.mlp\.\w+_proj", "L12": r"model\.layers\.[12]\.mlp\.\w+_proj"}
    config = SweepConfig(keep_masses=(0.5, 0.7), layer_choices=choices, perplexity_budget=10.0, svd_ranks=(4,),
                         allocation="per_layer", allocation_max_candidates=7)
    result = sweep_edits(model, eigen, sets, heldout, config)
    grid = [p for p in result.points if p.method == "curvedit" and p.search_round is None]
    searched = [p for p in result.points if p.search_round is not None]
    search = result.extra["allocation_search"]
    assert len(grid) == 4 and 0 < len(searched) == search["candidates"] <= 7
    assert result.points[search["start"]] is pick_edit(grid, "mem", config), "it starts from the grid's pick"
    assert result.points[search["path"][-1]] is result.chosen is pick_edit(result.points, "mem", config)
    assert search["allocation"] == "per_layer" and search["seconds"] >= 0 and search["stopped"] in (
        "converged", "candidate cap")
    assert all(p.keep_mass_pattern and p.layers == result.points[search["start"]].layers for p in searched)
    assert "allocation search" in capsys.readouterr().err, "the search shows a progress bar"
    assert f"allocation search: {len(searched)} candidates in" in result.summary()
    assert "| mlp | ρ per layer 0: 0.7, 1: 0.75, 2: 0.7 |" in result.to_markdown()
    assert result.svd_match is not None, "the baselines are measured at the pick's perplexity"
    # sweep.json holds every candidate; the pick rule over its points gives its pick; its settings rerun the sweep
    loaded = SweepResult.load(result.save(tmp_path / "sweep.json"))
    assert loaded == result and loaded.chosen is loaded.points[result.points.index(result.chosen)]
    assert pick_edit(loaded.points, loaded.primary_set, SweepConfig.from_dict(loaded.config)) is loaded.chosen
    assert SweepConfig.from_dict(loaded.config) == config
    rerun = sweep_edits(model, eigen, sets, heldout, SweepConfig.from_dict(loaded.config))
    assert rerun.to_markdown() == result.to_markdown()
    check_candidates(model, eigen, loaded, sets, heldout)
    # the edit of the pick, as the adapter the edit step makes, is the pick
    settings = loaded.chosen.edit_settings()
    assert loaded.pick_mismatch(settings) is None
    assert "keep_mass_pattern" in loaded.pick_mismatch({**settings, "keep_mass_pattern": {}})


def test_the_search_caps_its_candidates_and_refuses_bad_settings(llama_setup):
    model, _, factors, sets, heldout = llama_setup
    eigen = factors.eigendecompose()
    config = SweepConfig(keep_masses=(0.6,), perplexity_budget=10.0, allocation="per_projection",
                         allocation_max_candidates=2)
    result = sweep_edits(model, eigen, sets, heldout, config)
    searched = [p for p in result.points if p.search_round is not None]
    assert len(searched) == 2 and result.extra["allocation_search"]["stopped"] == "candidate cap"
    # per projection: 3 layers × (gate/up, down); the first moves are the first group's ρ down, then up
    assert [p.allocation["0 gate/up"] for p in searched] == [0.55, 0.65]
    assert all(len(p.allocation) == 6 for p in searched)
    nothing = sweep_edits(model, eigen, sets, heldout, SweepConfig(keep_masses=(0.1,), perplexity_budget=1e-9,
                                                                   allocation="per_layer"))
    assert nothing.chosen is None and nothing.extra["allocation_search"]["stopped"] == "nothing within the budget"
    for bad, message in (({"allocation": "per_head"}, "allocation must be one of"),
                         ({"allocation_steps": (0.05, 1.5)}, "allocation_steps are the ρ moves"),
                         ({"allocation_steps": ()}, "allocation_steps are the ρ moves"),
                         ({"allocation_max_candidates": 0}, "allocation_max_candidates is the most candidates")):
        with pytest.raises(ValueError, match=message):
            SweepConfig(**bad)


def test_the_search_composes_with_protection_ekfac_selection_and_the_predicted_cost_pick(llama_setup, tmp_path):
    from hf_curvedit.curvature import fit_eigen_correction
    from hf_curvedit.curvature.correction import attach_correction

    model, data, factors, sets, heldout = llama_setup
    eigen = attach_correction(factors.eigendecompose(), fit_eigen_correction(model, data, factors, progress=False))
    assert all(e.eigvals_corrected is not None for e in eigen.values())
    domain = Dataset.from_dict({"input_ids": random_token_rows(16, lo=10, hi=30, seed=7)})
    domain_factors = fit_factors(model, domain, FactorConfig(seq_len=16, batch_size=8), progress=False)
    # a protected domain's selection is the sweep's: EK-FAC, with the domain's own corrected eigenvalues
    domain_eigen = attach_correction(domain_factors.eigendecompose(),
                                     fit_eigen_correction(model, domain, domain_factors, progress=False))
    tasks = {"skill": TextSet(random_token_rows(5, lo=10, hi=20, seed=11)), **sets}
    config = SweepConfig(keep_masses=(0.6, 0.8), perplexity_budget=10.0, protect={"math": 0.5},
                         selection="ekfac_mass", pick_by="predicted_cost", recitation_tolerance=1.0,
                         allocation="per_layer", allocation_max_candidates=6)
    result = sweep_edits(model, {"general": eigen, "math": domain_eigen}, sets, heldout, config, exposure_texts=tasks)
    searched = [p for p in result.points if p.search_round is not None]
    assert searched and all(set(p.exposure) == {"skill"} for p in result.points if p.method == "curvedit")
    # the pick is the cheapest candidate by predicted cost (everything is within the tolerance), search included
    curvedit = [p for p in result.points if p.method == "curvedit"]
    assert result.chosen is min(curvedit, key=lambda p: (p.predicted_cost, p.recitation["mem"]["strict"],
                                                          p.perplexity))
    loaded = SweepResult.load(result.save(tmp_path / "sweep.json"))
    assert pick_edit(loaded.points, "mem", SweepConfig.from_dict(loaded.config)) is loaded.chosen
    assert loaded.extra["protect"] == {"math": 0.5} and loaded.extra["selection"] == "ekfac_mass"
    model = check_candidates(model, {"general": eigen, "math": domain_eigen}, loaded, sets, heldout,
                             protect={"math": 0.5}, selection="ekfac_mass")
    # each candidate's exposure is the one of its own edit
    from hf_curvedit.exposure import adapter_exposure

    point = searched[-1]
    peft_model = build_curvature_edit(model, {"general": eigen, "math": domain_eigen}, CurvatureEditConfig(
        **point.edit_settings(), protect={"math": 0.5}, selection="ekfac_mass"))
    try:
        own = adapter_exposure(peft_model, {"skill": tasks["skill"]}, show_progress=False)
        assert own.exposure(own.candidates[0], "skill") == pytest.approx(point.exposure["skill"], rel=1e-5)
    finally:
        peft_model.unload()


def test_the_search_allocates_the_experts_of_a_layer_routed_and_shared_together():
    from family_configs import tiny_causal_lm

    model = tiny_causal_lm("qwen2_moe", num_hidden_layers=2)
    data = Dataset.from_dict({"input_ids": [[t % 127 + 1 for t in r] for r in random_token_rows(48, 6, 20, seed=0)]})
    factors = fit_factors(model, data, FactorConfig(seq_len=16, batch_size=8), progress=False)
    eigen = factors.eigendecompose()
    assert any(".experts." in n for n in eigen) and any("shared_expert." in n for n in eigen)
    rows = [[t % 127 + 1 for t in r] for r in random_token_rows(6, lo=12, hi=14, seed=4)]
    sets = {"mem": RecitationSet([r[:8] for r in rows], [r[8:] for r in rows])}
    heldout = TextSet([[t % 127 + 1 for t in r] for r in random_token_rows(6, lo=10, hi=20, seed=9)])
    config = SweepConfig(keep_masses=(0.7,), perplexity_budget=10.0, allocation="per_layer",
                         allocation_max_candidates=3, batch_size=4)
    result = sweep_edits(model, eigen, sets, heldout, config)
    searched = [p for p in result.points if p.search_round is not None]
    assert len(searched) == 3 and all(set(p.allocation) == {"0", "1"} for p in searched)
    check_candidates(model, eigen, result, sets, heldout, min_expert_tokens=0)
