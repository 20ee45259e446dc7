"""Allocating ρ across layers: the groups and their keep_mass_pattern, the search on a landscape whose optimum is known,
and the sweep's per-layer search on tiny models (every candidate recorded, the pick reproduced from sweep.json, and
composed with protected domains, EK-FAC selection, experts and the predicted-cost pick)."""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset
from testing_utils import fitted_tiny_llama, random_token_rows, slow, tiny_llama

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors
from hf_curvedit.evaluation import RecitationSet, TextSet, evaluate_recitation
from hf_curvedit.evaluation.perplexity import perplexity_from_nll, score_text
from hf_curvedit.sweep import SweepConfig, SweepPoint, SweepResult, pick_edit, sweep_edits
from hf_curvedit.sweep.allocation import SearchSpace, allocation_pattern, group_label, module_groups, removal_rho
from hf_curvedit.sweep.scale import default_layer_choices, scale_layer_choice
from hf_curvedit.sweep.search import search_allocation
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
def test_the_space_splits_groups_that_a_layer_choice_takes_in_part():
    gate_up = [n for n in LLAMA if "down" not in n]
    space = SearchSpace.of({"in": gate_up, "all": LLAMA}, "per_layer")
    assert space.groups == {"1 gate/up": LLAMA[:2], "1 down": LLAMA[2:3], "11 gate/up": LLAMA[3:5],
                            "11 down": LLAMA[5:]}
    assert space.allocation_of(gate_up, 0.9) == {"1 gate/up": 0.9, "11 gate/up": 0.9}
    assert space.allocation_of(LLAMA[:1], 0.9) is None, "half a group is not an allocation of this space"
    whole = SearchSpace.of({"all": LLAMA}, "per_layer")
    assert whole.groups == {"1": LLAMA[:3], "11": LLAMA[3:]}


def test_moves_scale_the_removed_mass_drop_add_and_trade():
    names = {i: [f"m.layers.{i}.mlp.up_proj"] for i in range(4)}
    space = SearchSpace({str(i): n for i, n in names.items()})
    moves = space.moves({"1": 0.9, "2": 0.8}, 2.0)
    assert moves["up"] == [{"1": 0.8, "2": 0.8}, {"1": 0.9, "2": 0.6}]
    assert moves["down"] == [{"1": 0.95, "2": 0.8}, {"1": 0.9, "2": 0.9}]
    # an unedited neighbour joins at the removed mass of the edited group next to it; layer 3 is next to 2 only
    assert moves["add"] == [{"0": 0.9, "1": 0.9, "2": 0.8}, {"1": 0.9, "2": 0.8, "3": 0.8}]
    assert {"1": 0.8, "2": 0.9} in moves["trade"] and {"0": 0.9, "1": 0.95, "2": 0.8} in moves["trade"]
    # below the floor a group is dropped (ρ = 1), unless it is the only one left; above the ceiling nothing moves up
    low = space.moves({"1": 1 - 1.5e-5, "2": 0.8}, 2.0)
    assert {"2": 0.8} in low["down"]
    assert space.moves({"1": 1 - 1.5e-5}, 2.0)["down"] == []
    assert space.moves({"1": 0.1}, 2.0)["up"] == []


GROUPS4 = {g: [f"m.layers.{g[0]}.mlp.{'down' if g.endswith('down') else 'up'}_proj"]
           for g in ("1", "2", "3 gate/up", "3 down")}


def landscape(allocation: dict[str, float], start: int | None = None, label: str = "") -> SweepPoint:
    """A memorized set held by layer 2 (up to 0.3 of it), layers 1 and 3 (linearly) and a little by layer 3's down
    projection; layer 3 costs four times the perplexity of layer 2 and its down projection ten times. Strict counts
    whole tenths of what is left (a step function); the margin is what is left while anything is recited."""
    r = {g: 1 - allocation.get(g, 1.0) for g in GROUPS4}
    left = 0.5 - (min(3 * r["2"], 0.3) + r["1"] + r["3 gate/up"] + 0.2 * r["3 down"])
    strict = round(max(0.0, int(round(left, 9) * 10) / 10), 9)
    ppl = round(1 + 0.5 * r["1"] + r["2"] + 4 * r["3 gate/up"] + 10 * r["3 down"], 9)
    edited = {g: rho for g, rho in allocation.items() if rho < 1}
    uniform = len(set(edited.values())) == 1 and start is None
    return SweepPoint("curvedit", label or "+".join(edited), "m", min(edited.values()), None,
                      {"mem": {"strict": strict, "margin": round(left, 9) if strict else 0.0}}, ppl, ppl - 1,
                      allocation=None if uniform else dict(edited), search_round=start)


CHOICES = {"A": ["2", "3 gate/up"], "B": ["1", "2", "3 gate/up", "3 down"]}


def grid():
    return [landscape({g: rho for g in groups}, label=label) for label, groups in CHOICES.items()
            for rho in (0.99, 0.95, 0.9)]


def run_search(choices, starts, steps=(2.0, 1.41), cap=24):
    """Search ``choices``' space from ``starts`` (indices into the grid) with the landscape as the measurement."""
    config = SweepConfig(perplexity_budget=0.3)
    points = grid()
    space = SearchSpace({g: GROUPS4[g] for g in GROUPS4 if any(g in CHOICES[label] for label in choices)})
    calls = []

    def measure(allocation, start):
        calls.append(allocation)
        return landscape(allocation, start)

    def allocation_of(point):
        groups = CHOICES[point.layers]
        return point.allocation or ({g: point.keep_mass for g in groups} if set(groups) <= set(space.groups) else None)

    record = search_allocation(points, [points[i] for i in starts], space, allocation_of, measure, "mem", 0.3,
                               steps, cap, show_progress=False)
    return points, record, calls, pick_edit(points, "mem", config)


def test_the_whole_sweep_space_finds_what_the_grid_picks_layers_cannot():
    """The grid's pick edits layers 2-3 (the cheaper of the uniform choices); the best edit within the budget moves
    layer 3's removal to layer 1, which only the other layer choice holds. A search confined to the pick's layers stops
    at 10% Strict; the search over every layer of every choice reaches 0% within the budget."""
    config = SweepConfig(perplexity_budget=0.3)
    pick = pick_edit(grid(), "mem", config)
    assert pick.layers == "A" and pick.keep_mass == 0.95 and pick.recitation["mem"]["strict"] == 0.3
    start = [i for i, p in enumerate(grid()) if p == pick]
    _, confined, _, old = run_search(["A"], start)
    points, record, calls, new = run_search(["A", "B"], start)
    assert old.recitation["mem"]["strict"] == pytest.approx(0.1) and old.perplexity_change <= 0.3
    assert new.recitation["mem"]["strict"] == 0.0 and new.perplexity_change <= 0.3
    assert "1" in new.allocation and 1 - new.allocation.get("3 gate/up", 1.0) < 0.05, "layer 1 joined, 3 gave way"
    # every candidate is new, each is one move from where the search stood, and the path only improves
    assert len({tuple(sorted(a.items())) for a in calls}) == len(calls) == record["candidates"]
    run = record["starts"][0]
    key = lambda p: (p.recitation["mem"]["strict"], p.recitation["mem"]["margin"], p.perplexity)  # noqa: E731
    path = [points[i] for i in run["path"]]
    assert all(key(b) < key(a) for a, b in zip(path, path[1:])) and path[-1] is new


def test_the_search_stops_at_its_candidate_cap_and_shares_it_between_starts():
    points, record, calls, _ = run_search(["A", "B"], [1, 4], cap=3)
    assert record["candidates"] == len(calls) == 3
    assert [run["candidates"] for run in record["starts"]] == [1, 2], "an equal share of what is left, in order"
    assert {run["stopped"] for run in record["starts"]} == {"candidate cap"}
    assert [p.search_round for p in points[6:]] == [0, 1, 1]


def test_finer_factors_follow_the_coarse_ones():
    _, record, calls, _ = run_search(["A"], [1], steps=(2.0, 1.41), cap=40)
    removed = {round((1 - r) / (1 - 0.95), 2) for a in calls for r in a.values()}
    assert {2.0, 0.5} & removed and {1.41, 0.71} & removed, "moves of both factors were measured"
    assert record["steps"] == [2.0, 1.41] and record["starts"][0]["stopped"] == "converged"


def test_the_scale_brackets_the_budget_and_refines_where_the_pick_is():
    """A layer choice whose perplexity grows with the removed mass r as 1 + 20 r, and whose recitation is gone from
    r = 0.004 on: from r = 0.1 the walk goes milder until it is within +10% (r = 0.005, nothing recited), the next
    rung (0.002) brackets the edge of recitation, and the midpoints close in on it."""
    measured = []

    def measure(rho):
        r = round(1 - rho, 9)
        measured.append(r)
        strict = 0.0 if r >= 0.004 else 0.5
        return SweepPoint("curvedit", "c", "m", rho, None, {"mem": {"strict": strict}}, 1 + 20 * r, 20 * r)

    points = scale_layer_choice(measure, "mem", 0.1, refinements=3)
    assert measured == [0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.00316, 0.00397]
    best = pick_edit(points, "mem", SweepConfig(perplexity_budget=0.1))
    assert best.recitation["mem"]["strict"] == 0.0 and 1 - best.keep_mass == pytest.approx(0.005)
    # with recitation left at the budget, the refinements close in on the budget from within
    points = scale_layer_choice(lambda rho: SweepPoint("curvedit", "c", "m", rho, None, {"mem": {"strict": 0.5}},
                                                       1 + 10 * (1 - rho), 10 * (1 - rho)), "mem", 0.12)
    assert [round(1 - p.keep_mass, 9) for p in points] == [0.1, 0.05, 0.02, 0.01, 0.0141, 0.0119]
    # from where another choice found the budget, and two rungs at a time while far over it
    far = scale_layer_choice(lambda rho: SweepPoint("curvedit", "c", "m", rho, None, {"mem": {"strict": 0.5}},
                                                    1 + 1000 * (1 - rho), 1000 * (1 - rho)), "mem", 0.1,
                             refinements=0, start=0.004)
    assert [round(1 - p.keep_mass, 9) for p in far] == [0.005, 0.001, 0.0005, 0.0002, 0.0001]


def test_default_layer_choices_are_windows_across_the_depth():
    shapes = {f"model.layers.{i}.mlp.{leaf}": shape for i in range(30)
              for leaf, shape in (("gate_proj", (1536, 576)), ("up_proj", (1536, 576)), ("down_proj", (576, 1536)))}
    choices = default_layer_choices(shapes)
    assert list(choices)[:2] == ["layers 0–2 gate/up", "layers 0–2 gate/up+down"]
    windows = sorted({label.split(" ")[1] for label in choices}, key=lambda w: int(w.split("–")[0]))
    assert windows == ["0–2", "7–9", "14–16", "20–22", "27–29"], "five windows of three, the top one included"
    assert re.fullmatch(choices["layers 27–29 gate/up"], "model.layers.28.mlp.up_proj")
    assert not re.fullmatch(choices["layers 27–29 gate/up"], "model.layers.28.mlp.down_proj")
    small = default_layer_choices({k: v for k, v in shapes.items() if int(k.split(".")[2]) < 4})
    assert sorted({label.split(" ")[1] for label in small}) == ["0–1", "1–2", "2–3"]
    assert list(default_layer_choices({"lm_head": (10, 5)})) == ["all"]
    # a mixture-of-experts down projection can be square: its name says it writes the block's result
    moe = {f"model.layers.{i}.mlp.experts.{leaf}": shape for i in range(4)
           for leaf, shape in (("gate_up_proj", (320, 160)), ("down_proj", (160, 160)))}
    assert not re.search(default_layer_choices(moe)["layers 2–3 gate/up"], "model.layers.2.mlp.experts.down_proj")


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
    space = result.extra["allocation_search"]["groups"]
    for point in searched:
        names = resolve_target_modules(model, point.target_modules)
        assert sorted(names) == sorted(n for g in point.allocation for n in space[g]), "exactly its groups' modules"
        peft_model = build_curvature_edit(model, eigen, CurvatureEditConfig(**point.edit_settings(), **edit))
        weights = edited_weights(peft_model)
        rec = evaluate_recitation(peft_model, sets["mem"].prefixes, sets["mem"].suffixes, show_progress=False)
        nll, n, _ = score_text(peft_model, heldout.sequences, show_progress=False)
        model = peft_model.unload()
        assert rec.strict == point.recitation["mem"]["strict"]
        assert rec.avg_lev == pytest.approx(point.recitation["mem"]["avg_lev"])
        assert perplexity_from_nll(nll, n) == pytest.approx(point.perplexity, rel=1e-6)
        for group, rho in point.allocation.items():
            if rho not in uniform:
                peft_model = build_curvature_edit(model, eigen, CurvatureEditConfig(
                    keep_mass=rho, target_modules=list(n for members in space.values() for n in members), **edit))
                uniform[rho] = edited_weights(peft_model)
                model = peft_model.unload()
            for name in space[group]:
                assert torch.equal(weights[name], uniform[rho][name]), name
    return model


@pytest.fixture(scope="module")
def llama_setup():
    model = tiny_llama(num_hidden_layers=3)
    data, factors, _ = fitted_tiny_llama(3)
    rows = random_token_rows(6, lo=12, hi=14, seed=4)
    sets = {"mem": RecitationSet([r[:8] for r in rows], [r[8:] for r in rows])}
    heldout = TextSet(random_token_rows(6, lo=10, hi=20, seed=9))
    return model, data, factors, sets, heldout


def test_a_per_layer_sweep_records_every_candidate_and_its_pick_is_reproducible(llama_setup, tmp_path, capsys):
    model, _, factors, sets, heldout = llama_setup
    eigen = fitted_tiny_llama(3)[2]
    choices = {"mlp": r"model\.layers\.\d+\.mlp\.\w+_proj", "L12": r"model\.layers\.[12]\.mlp\.\w+_proj"}
    config = SweepConfig(keep_masses=(0.5, 0.7), layer_choices=choices, perplexity_budget=10.0, svd_ranks=(4,),
                         allocation="per_layer", allocation_max_candidates=7)
    result = sweep_edits(model, eigen, sets, heldout, config)
    grid = [p for p in result.points if p.stage == "grid"]
    searched = [p for p in result.points if p.search_round is not None]
    search = result.extra["allocation_search"]
    assert len(grid) == 4 and 0 < len(searched) == search["candidates"] <= 7
    assert all(p.stage == "search" and p.seconds > 0 and p.kept for p in searched)
    assert result.points[search["starts"][0]["start"]] is pick_edit(grid, "mem", config), "the grid's pick first"
    assert result.chosen is pick_edit(result.points, "mem", config)
    assert search["allocation"] == "per_layer" and search["seconds"] >= 0
    assert all(run["stopped"] in ("converged", "candidate cap") for run in search["starts"])
    assert set(search["groups"]) == {"0", "1", "2"}, "layer 0 is in one choice and 1-2 in both: one group each"
    assert all(p.keep_mass_pattern and set(p.allocation) <= {"0", "1", "2"} for p in searched)
    assert "allocation search" in capsys.readouterr().err, "the search shows a progress bar"
    assert f"allocation search: {len(searched)} candidates from" in result.summary()
    assert all(f"| {p.knob} |" in result.to_markdown() for p in searched)
    # what each candidate keeps, per module: its share of components and of ‖W‖²
    for p in result.points:
        if p.method == "curvedit":
            assert p.kept and all(0 < c <= 1 and 0 < w <= 1 for c, w in p.kept.values())
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
    if loaded.chosen.keep_mass_pattern:
        assert "keep_mass_pattern" in loaded.pick_mismatch({**settings, "keep_mass_pattern": {}})


def test_the_default_sweep_fits_its_scale_to_each_layer_choice_and_searches_them_all(llama_setup):
    model, _, factors, sets, heldout = llama_setup
    eigen = fitted_tiny_llama(3)[2]
    result = sweep_edits(model, eigen, sets, heldout, SweepConfig(perplexity_budget=0.02, allocation_max_candidates=6))
    choices = result.extra["layer_choices"]
    assert list(choices) == ["layers 0–1 gate/up", "layers 0–1 gate/up+down", "layers 1–2 gate/up",
                             "layers 1–2 gate/up+down"]
    for label in choices:
        scale = [p for p in result.points if p.layers == label and p.stage == "scale"]
        assert scale[0].keep_mass == 0.9, "every walk starts at ρ = 0.9"
        assert any(p.perplexity_change <= 0.02 for p in scale), f"{label}: the walk reached the budget"
        assert all(p.keep_mass == removal_rho(1 - p.keep_mass) for p in scale)
    search = result.extra["allocation_search"]
    assert 0 < search["candidates"] <= 6 and len(search["starts"]) >= 2
    assert result.chosen is pick_edit(result.points, "mem", SweepConfig(perplexity_budget=0.02))
    assert SweepConfig.from_dict(result.config).keep_masses is None


def test_the_search_caps_its_candidates_and_refuses_bad_settings(llama_setup):
    model, _, factors, sets, heldout = llama_setup
    eigen = fitted_tiny_llama(3)[2]
    every = {"all": r"model\.layers\.\d+\.mlp\.\w+_proj"}
    config = SweepConfig(keep_masses=(0.6,), layer_choices=every, perplexity_budget=10.0,
                         allocation="per_projection", allocation_max_candidates=2)
    result = sweep_edits(model, eigen, sets, heldout, config)
    searched = [p for p in result.points if p.search_round is not None]
    assert len(searched) == 2 and result.extra["allocation_search"]["starts"][0]["stopped"] == "candidate cap"
    # per projection: 3 layers × (gate/up, down)
    assert set(result.extra["allocation_search"]["groups"]) == {f"{i} {k}" for i in range(3) for k in ("gate/up",
                                                                                                       "down")}
    assert all(len(p.allocation) == 6 for p in searched)
    with pytest.warns(UserWarning, match=r"no edit keeps the perplexity increase within \+1e-07%: the closest"):
        nothing = sweep_edits(model, eigen, sets, heldout, SweepConfig(
            keep_masses=(0.9,), layer_choices=every, perplexity_budget=1e-9, allocation="per_layer"))
    assert nothing.chosen is None and nothing.extra["allocation_search"]["starts"] == []
    assert "Try milder edits, removing less than 0.1" in nothing.summary() and "--keep-mass 0.95 0.98 0.99" in \
        nothing.summary()
    for bad, message in (({"allocation": "per_head"}, "allocation must be one of"),
                         ({"allocation_steps": (2.0, 0.05)}, "allocation_steps are the factors"),
                         ({"allocation_steps": ()}, "allocation_steps are the factors"),
                         ({"allocation_max_candidates": 0}, "allocation_max_candidates is the most candidates"),
                         ({"keep_masses": (0.5, 1.5)}, "keep_masses are fractions")):
        with pytest.raises(ValueError, match=message):
            SweepConfig(**bad)
    # a sweep.json written when the search moved ρ by steps of 0.05 still reads
    assert SweepConfig.from_dict({"allocation_steps": [0.05]}).allocation_steps == (2.0, 1.41)


@slow
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
                         allocation_max_candidates=3, batch_size=4, layer_choices={"all": "|".join(eigen)})
    result = sweep_edits(model, eigen, sets, heldout, config)
    searched = [p for p in result.points if p.search_round is not None]
    assert result.extra["allocation_search"]["groups"] == {
        layer: [n for n in eigen if f".{layer}." in n] for layer in ("0", "1")}, "routed and shared experts together"
    assert len(searched) == 3 and all(set(p.allocation) <= {"0", "1"} for p in searched)
    check_candidates(model, eigen, result, sets, heldout, min_expert_tokens=0)


def test_a_layers_routed_and_shared_experts_split_by_the_choices_are_named_by_the_module_that_holds_them():
    routed = [n for n in MOE if ".experts." in n]
    space = SearchSpace.of({"routed": routed, "routed + shared": MOE}, "per_layer")
    assert space.groups == {"1 experts gate/up+down": MOE[:2], "1 shared_expert gate/up+down": MOE[2:5],
                            "2": MOE[5:]}
    by_projection = SearchSpace.of({"routed": routed, "routed + shared": MOE}, "per_projection")
    assert by_projection.groups == {"1 gate/up experts": [MOE[0]], "1 gate/up shared_expert": MOE[2:4],
                                    "1 down experts": [MOE[1]], "1 down shared_expert": [MOE[4]],
                                    "2 gate/up": MOE[5:]}
    # neighbours: the same layer, or the next layer's group of the same kind
    assert space.adjacent("1 experts gate/up+down", "1 shared_expert gate/up+down")
