"""Sweeps over ρ and layer choices, the SVD baseline, and the pick within a perplexity budget."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from testing_utils import random_token_rows, tiny_llama

from hf_curvedit import FactorConfig, fit_factors
from hf_curvedit.evaluation import RecitationSet, TextSet
from hf_curvedit.sweep import SweepResult, svd_truncation, sweep_edits


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    data = Dataset.from_dict({"input_ids": random_token_rows(24, lo=10, hi=30, seed=2)})
    eigen = fit_factors(model, data, FactorConfig(seq_len=16, batch_size=8), progress=False).eigendecompose()
    rows = random_token_rows(6, lo=12, hi=14, seed=4)
    rec = RecitationSet([r[:8] for r in rows], [r[8:] for r in rows])
    heldout = TextSet(random_token_rows(6, lo=10, hi=20, seed=9))
    return model, eigen, rec, heldout


def test_sweep_measures_every_point_and_picks_within_budget(setup):
    model, eigen, rec, heldout = setup
    x = torch.tensor([random_token_rows(1, lo=10, hi=10, seed=5)[0]])
    with torch.no_grad():
        before = model(x).logits.clone()
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, keep_masses=(0.3, 0.9),
                         layer_choices={"L1": r".*layers\.1\.mlp\.(gate|up)_proj", "all": r".*mlp\.\w+_proj"},
                         perplexity_budget=0.5, svd_ranks=[2, 8, 16])
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
        sweep_edits(model, eigen, {"mem": rec}, heldout, layer_choices={"attn": r".*self_attn\.q_proj"})


def test_sweep_result_round_trips_and_plots(setup, tmp_path):
    from hf_curvedit.publish.plots import plot_sweep

    model, eigen, rec, heldout = setup
    result = sweep_edits(model, eigen, {"mem": rec}, heldout, keep_masses=(0.5,), perplexity_budget=10.0,
                         svd_ranks=[4])
    loaded = SweepResult.load(result.save(tmp_path / "sweep.json"))
    assert loaded == result and loaded.chosen is loaded.points[0] and loaded.svd_match is loaded.points[1]
    assert loaded.to_markdown() == result.to_markdown() and loaded.summary().startswith("chosen: all ρ=0.5")
    assert plot_sweep(loaded, tmp_path / "plots" / "sweep.png").stat().st_size > 1000
    loaded.chosen = None
    assert loaded.summary() == "no edit keeps the perplexity increase within 1000%"
