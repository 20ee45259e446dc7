"""Sweeps over ρ and layer choices, the SVD baseline, and the pick within a perplexity budget."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from testing_utils import fitted_tiny_llama, random_token_rows, slow, tiny_llama

from hf_curvedit import FactorConfig, fit_factors
from hf_curvedit.evaluation import RecitationSet, TextSet
from hf_curvedit.sweep import SweepConfig, SweepResult, svd_truncation, sweep_edits

# these tests measure grids: one layer choice of every MLP projection, one ρ per candidate
GRID = {"layer_choices": {"all": r".*mlp\.\w+_proj"}, "allocation": "uniform"}


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    eigen = fitted_tiny_llama(2)[2]
    rows = random_token_rows(6, lo=12, hi=14, seed=4)
    rec = RecitationSet([r[:8] for r in rows], [r[8:] for r in rows])
    heldout = TextSet(random_token_rows(6, lo=10, hi=20, seed=9))
    return model, eigen, rec, heldout


def test_sweep_measures_every_point_and_picks_within_budget(setup):
    model, eigen, rec, heldout = setup
    x = torch.tensor([random_token_rows(1, lo=10, hi=10, seed=5)[0]])
    with torch.no_grad():
        before = model(x).logits.clone()
    config = SweepConfig(keep_masses=(0.3, 0.9), perplexity_budget=0.5, svd_ranks=[2, 8, 16], allocation="uniform",
                         layer_choices={"L1": r".*layers\.1\.mlp\.(gate|up)_proj", "all": r".*mlp\.\w+_proj"})
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, config)
    edits = [p for p in result.points if p.method == "curvedit"]
    assert [(p.layers, p.keep_mass) for p in edits] == [("L1", 0.3), ("L1", 0.9), ("all", 0.3), ("all", 0.9)]
    for p in edits:
        assert p.perplexity_change == pytest.approx(p.perplexity / result.base.perplexity - 1)
    within = [p for p in edits if p.perplexity_change <= 0.5]
    assert result.chosen in within
    assert result.chosen.recitation["mem"]["strict"] == min(p.recitation["mem"]["strict"] for p in within)
    # a stronger edit moves the model further: ρ=0.3 on all MLPs changes perplexity more than ρ=0.9
    assert abs(edits[2].perplexity_change) > abs(edits[3].perplexity_change)
    svd = [p for p in result.points if p.method == "svd"]
    assert [p.rank for p in svd] == [2, 8, 16] and result.svd_match in svd
    assert "(chosen)" in result.to_markdown()
    with torch.no_grad():
        assert torch.equal(model(x).logits, before), "the sweep leaves the model unedited"


def test_svd_truncation_is_rank_k_and_restores(setup):
    model = setup[0]
    name = "model.layers.0.mlp.up_proj"
    w = dict(model.named_modules())[name].weight
    original = w.detach().clone()
    with svd_truncation(model, [name], 3):
        assert torch.linalg.matrix_rank(w.detach().double(), rtol=1e-5) == 3
        s = torch.linalg.svdvals(original.double())
        err = (w.detach().double() - original.double()).norm()
        torch.testing.assert_close(err, s[3:].norm(), rtol=1e-4, atol=1e-6)  # Eckart–Young
    assert torch.equal(w, original)


def test_sweep_rejects_modules_without_factors(setup):
    model, eigen, rec, heldout = setup
    with pytest.raises(ValueError, match="without factors"):
        sweep_edits(model, eigen, {"mem": rec}, heldout, SweepConfig(layer_choices={"attn": r".*self_attn\.q_proj"}))


def test_sweep_result_round_trips_and_plots(setup, tmp_path):
    from hf_curvedit.publish.plots import plot_sweep

    model, eigen, rec, heldout = setup
    config = SweepConfig(keep_masses=(0.5,), perplexity_budget=10.0, svd_ranks=[4], **GRID)
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, config)
    loaded = SweepResult.load(result.save(tmp_path / "sweep.json"))
    assert loaded == result and loaded.chosen is loaded.points[0] and loaded.svd_match is loaded.points[1]
    assert loaded.to_markdown() == result.to_markdown() and loaded.summary().startswith("chosen: all ρ=0.5")
    assert plot_sweep(loaded, tmp_path / "plots" / "sweep.png").stat().st_size > 1000
    loaded.chosen = None
    assert loaded.summary().startswith("no edit keeps the perplexity increase within +1000%: the closest, all ρ=0.5, "
                                       "costs")


def test_sweep_measures_the_baselines_at_matched_perplexity(setup):
    from hf_curvedit.baselines import BalancedSubnetConfig, train_balanced_subnet
    from hf_curvedit.evaluation import evaluate_recitation

    model, eigen, rec, heldout = setup
    clean = TextSet(random_token_rows(12, lo=10, hi=20, seed=11))
    x = torch.tensor([random_token_rows(1, lo=10, hi=10, seed=5)[0]])
    with torch.no_grad():
        before = model(x).logits.clone()
    settings = BalancedSubnetConfig(epochs=2, batch_size=4, target_modules=r".*mlp\.\w+_proj")
    config = SweepConfig(keep_masses=(0.5,), perplexity_budget=10.0, svd_ranks=[4, 8],
                         baselines=["svd", "balanced_subnet"], balanced_subnet=settings,
                         balanced_subnet_ratios=(0.01, 0.2), **GRID)
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, config, clean=clean)
    subnet = [p for p in result.points if p.method == "balanced_subnet"]
    assert [p.ratio for p in subnet] == [0.01, 0.2]
    for name in ("svd", "balanced_subnet"):
        pts = [p for p in result.points if p.method == name]
        best = min(abs(p.perplexity_change - result.chosen.perplexity_change) for p in pts)
        assert abs(result.matches[name].perplexity_change - result.chosen.perplexity_change) == best
    assert result.base.ndcg == 1.0 and all(0.0 <= p.ndcg <= 1.0 for p in result.points)
    # a sweep point is what the baseline itself gives: the same masks, measured directly
    memorized = [p + s for p, s in zip(rec.prefixes, rec.suffixes)]
    import dataclasses

    masks = train_balanced_subnet(model, memorized, clean, dataclasses.replace(settings, ratio=0.2),
                                  show_progress=False)
    with masks.applied(model):
        direct = evaluate_recitation(model, rec.prefixes, rec.suffixes, show_progress=False)
    assert subnet[1].recitation["mem"]["avg_lev"] == pytest.approx(direct.avg_lev)
    table = result.comparison()
    assert table.count("\n") == 5 and "balanced_subnet (matched PPL)" in table and "svd (matched PPL)" in table
    assert "ratio=" in result.to_markdown() and "nDCG@10" in table
    with torch.no_grad():
        assert torch.equal(model(x).logits, before), "the sweep leaves the model as it found it"
    with pytest.raises(ValueError, match="needs `clean`"):
        sweep_edits(model, eigen, {"mem": rec}, heldout, SweepConfig(baselines=["balanced_subnet"]))
    with pytest.raises(ValueError, match="unknown baselines"):
        sweep_edits(model, eigen, {"mem": rec}, heldout, SweepConfig(baselines=["lora"]))


def test_sweep_result_written_before_baselines_still_loads(setup, tmp_path):
    model, eigen, rec, heldout = setup
    config = SweepConfig(keep_masses=(0.5,), perplexity_budget=10.0, svd_ranks=[4], **GRID)
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, config)
    old = result.to_dict()
    old["svd_match"] = old.pop("matches")["svd"]
    for p in [old["base"], *old["points"], old["chosen"], old["svd_match"]]:
        for key in ("ratio", "ndcg", "capabilities"):
            p.pop(key)
    import json

    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = SweepResult.load(tmp_path / "old.json")
    assert loaded.svd_match is loaded.points[1] and loaded.chosen is loaded.points[0]


@slow
def test_sweep_scores_capabilities_of_the_base_the_pick_and_each_match(tmp_path):
    pytest.importorskip("lm_eval")
    from testing_utils import write_choice_task

    from hf_curvedit import CurvatureEditConfig, build_curvature_edit
    from hf_curvedit.baselines import svd_truncation as svd
    from hf_curvedit.default import byte_tokenizer
    from hf_curvedit.evaluation import CapabilityConfig, capability_scores

    tok = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    data = Dataset.from_dict({"input_ids": random_token_rows(24, lo=10, hi=30, seed=2)})
    eigen = fit_factors(model, data, FactorConfig(seq_len=16, batch_size=8), progress=False).eigendecompose()
    rows = random_token_rows(6, lo=12, hi=14, seed=4)
    rec = RecitationSet([r[:8] for r in rows], [r[8:] for r in rows])
    heldout = TextSet(random_token_rows(6, lo=10, hi=20, seed=9))
    tasks = write_choice_task(tmp_path / "tasks", "yesno", [(f"Is {i} even?", i % 2) for i in range(12)])
    caps = CapabilityConfig(tasks=["yesno"], include_path=tasks, bootstrap_iters=0)
    config = SweepConfig(keep_masses=(0.3,), perplexity_budget=100.0, svd_ranks=[2, 8], capabilities=caps, **GRID)
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, config, tokenizer=tok)
    chosen, match = result.chosen, result.matches["svd"]
    assert set(result.base.capabilities) == {"yesno"}
    assert result.base.capabilities == capability_scores(model, tok, caps)
    edited = build_curvature_edit(model, eigen,
                                  CurvatureEditConfig(keep_mass=0.3, target_modules=chosen.target_modules))
    assert chosen.capabilities == capability_scores(edited, tok, caps)
    model = edited.unload()
    with svd(model, [n for n in eigen], match.rank):
        assert match.capabilities == capability_scores(model, tok, caps)
    assert all(p.capabilities is None for p in result.points if p is not chosen and p is not match)
    assert "yesno" in result.comparison()
    assert result.pick_mismatch({"keep_mass": 0.3, "target_modules": chosen.target_modules}) is None
    assert "keep_mass is 0.5" in result.pick_mismatch({"keep_mass": 0.5, "target_modules": chosen.target_modules})


def test_a_sweep_config_is_saved_with_its_result_and_reruns_it(setup, tmp_path):
    model, eigen, rec, heldout = setup
    config = SweepConfig(keep_masses=(0.5, 0.9), layer_choices={"L1": r".*layers\.1\.mlp\.(gate|up)_proj"},
                         perplexity_budget=2.0, svd_ranks=(4,), allocation="uniform")
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, config)
    saved = SweepResult.load(result.save(tmp_path / "sweep.json"))
    again = SweepConfig.from_dict(saved.config)
    assert again == config and again.baselines == ("svd",)
    rerun = sweep_edits(model, eigen, {"mem": rec}, heldout, again)
    assert rerun.to_markdown() == result.to_markdown(), "the same settings measure the same points"
    with pytest.warns(DeprecationWarning, match="config=SweepConfig"):
        legacy = sweep_edits(model, eigen, {"mem": rec}, heldout, keep_masses=(0.5, 0.9),
                             layer_choices={"L1": r".*layers\.1\.mlp\.(gate|up)_proj"}, perplexity_budget=2.0,
                             svd_ranks=[4], allocation="uniform")
    assert legacy.to_markdown() == result.to_markdown() and legacy.config == result.config
    with pytest.raises(TypeError, match="not both"):
        sweep_edits(model, eigen, {"mem": rec}, heldout, config, keep_masses=(0.5,))
    # a sweep.json written before the config was saved still loads
    import json

    old = json.loads((tmp_path / "sweep.json").read_text())
    del old["config"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert SweepResult.load(tmp_path / "old.json").config == {}


def test_sweep_ranks_candidates_by_predicted_cost(setup, tmp_path):
    from hf_curvedit.exposure import predict_exposure

    model, eigen, rec, heldout = setup
    tasks = {"skill": TextSet(random_token_rows(5, lo=10, hi=20, seed=11)), "other": TextSet([[3, 4, 5, 6, 7]])}
    measured = {**tasks, "mem": rec}  # a memorized set is measured by the sweep itself: no part of the cost
    choices = {"L1": r".*layers\.1\.mlp\.(gate|up)_proj", "all": r".*mlp\.\w+_proj"}
    config = SweepConfig(keep_masses=(0.3, 0.6, 0.9), perplexity_budget=10.0, layer_choices=choices,
                         pick_by="predicted_cost", recitation_tolerance=1.0, allocation="uniform")
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, config, exposure_texts=measured)
    edits = [p for p in result.points if p.method == "curvedit"]
    assert all(set(p.exposure) == set(tasks) for p in edits)
    # each candidate's exposure is the prediction from the eigenbases for the same edit
    from hf_curvedit import CurvatureEditConfig

    for label, regex in choices.items():
        pred = predict_exposure(model, eigen, tasks, [0.3, 0.6, 0.9], CurvatureEditConfig(target_modules=regex),
                                show_progress=False)
        for p in (q for q in edits if q.layers == label):
            for t in tasks:
                assert p.exposure[t] == pytest.approx(pred.exposure(f"ρ={p.keep_mass:g}", t), rel=1e-5)
    # with every candidate acceptable, the pick is the cheapest: the lightest edit of the fewest modules
    assert result.chosen is min(edits, key=lambda p: p.predicted_cost)
    assert (result.chosen.layers, result.chosen.keep_mass) == ("L1", 0.9)
    assert result.ranked_by_cost()[0] is result.chosen
    assert "predicted cost" in result.to_markdown() and "predicted capability cost" in result.summary()
    again = SweepResult.load(result.save(tmp_path / "sweep.json"))
    assert again.chosen.exposure == result.chosen.exposure
    # no tolerance: the pick has the lowest Strict, the cost breaks the tie
    config = SweepConfig(keep_masses=(0.3, 0.9), perplexity_budget=10.0, layer_choices=choices,
                         pick_by="predicted_cost", recitation_tolerance=0.0, allocation="uniform")
    tight = sweep_edits(model, eigen, {"mem": rec}, heldout, config, exposure_texts=tasks)
    best = min(p.recitation["mem"]["strict"] for p in tight.points if p.method == "curvedit")
    assert tight.chosen.recitation["mem"]["strict"] == best
    with pytest.raises(ValueError, match="pass exposure_texts"):
        sweep_edits(model, eigen, {"mem": rec}, heldout, config)
    with pytest.raises(ValueError, match="pick_by must be"):
        SweepConfig(pick_by="cheapest")
