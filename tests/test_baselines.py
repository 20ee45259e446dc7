"""Baselines: BalancedSubnet's mask has exactly the requested sparsity, its straight-through gradient reaches the
scores only, the base weights stay untouched until the mask is baked, and training moves the memorized loss up."""

from __future__ import annotations

import pytest
import torch
from testing_utils import random_token_rows, tiny_llama

from hf_curvedit.baselines import BalancedSubnetConfig, BalancedSubnetMasks, svd_truncation, train_balanced_subnet
from hf_curvedit.baselines.balanced_subnet import _DropLowest, n_dropped

MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


def test_mask_drops_exactly_the_lowest_scores_with_a_straight_through_gradient():
    scores = torch.tensor([[0.3, -1.0, 2.0], [0.1, 0.1, -0.5]], requires_grad=True)
    mask = _DropLowest.apply(scores, 2)
    assert mask.tolist() == [[1, 0, 1], [1, 1, 0]]
    upstream = torch.arange(6.0).reshape(2, 3)
    (mask * upstream).sum().backward()
    torch.testing.assert_close(scores.grad, upstream)  # straight through: d mask / d scores = identity


@pytest.fixture(scope="module")
def trained():
    model = tiny_llama(seed=0)
    memorized = random_token_rows(12, lo=10, hi=16, seed=1)
    clean = random_token_rows(24, lo=10, hi=16, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = BalancedSubnetConfig(ratio=0.01, epochs=3, lr=0.3, batch_size=4, target_modules=MLP)
    masks = train_balanced_subnet(model, memorized, clean, config, show_progress=False)
    return model, memorized, clean, before, masks


def test_masks_have_the_requested_sparsity_and_weights_are_untouched(trained):
    model, _, _, before, masks = trained
    assert len(masks.masks) == 6  # gate, up, down in both layers
    for name, mask in masks.masks.items():
        w = model.get_submodule(name).weight
        assert mask.shape == w.shape and mask.dtype == torch.bool
        assert int((~mask).sum()) == n_dropped(w.numel(), 0.01) > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed before baking"
        assert p.grad is None, f"{n} got a gradient: only the scores may"
        assert p.requires_grad, "requires_grad is restored"
    assert len(masks.history) == 3


def _ce(model, seqs):
    ids = torch.tensor([s[:10] for s in seqs])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_applied_bakes_temporarily_and_bake_is_permanent(trained, tmp_path):
    model, memorized, _, before, masks = trained
    base_mem = _ce(model, memorized)
    with masks.applied(model):
        for name, mask in masks.masks.items():
            w = model.get_submodule(name).weight
            assert torch.equal(w, before[f"{name}.weight"] * mask)
        masked_mem = _ce(model, memorized)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert masked_mem > base_mem, "the ascent on the memorized text raised its loss"

    path = masks.save(tmp_path / "masks.safetensors")
    loaded = BalancedSubnetMasks.load(path)
    assert loaded.config == masks.config and loaded.history == masks.history
    assert all(torch.equal(loaded.masks[n], m) for n, m in masks.masks.items())
    baked = loaded.bake(tiny_llama(seed=0))
    for name, mask in masks.masks.items():
        assert torch.equal(baked.get_submodule(name).weight, before[f"{name}.weight"] * mask)


@pytest.mark.parametrize("bad, match", [(dict(ratio=0), "ratio must be in"), (dict(lam=1.5), "lam must be in"),
                                        (dict(epochs=0), "epochs must be a positive"), (dict(lr=0), "lr must be")])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        BalancedSubnetConfig(**bad)


def test_bad_data_is_refused():
    with pytest.raises(ValueError, match="memorized data has no sequence of 2 or more tokens"):
        train_balanced_subnet(tiny_llama(), [[1]], [[1, 2, 3]])


def test_svd_truncation_moved_but_still_importable_from_sweep():
    from hf_curvedit.sweep import svd_truncation as from_sweep

    assert from_sweep is svd_truncation


def test_long_sequences_are_cut_into_pieces():
    from hf_curvedit.baselines.balanced_subnet import _sequences

    pieces = _sequences([list(range(10)), [1, 2, 3]], "clean", max_length=4)
    assert pieces == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [1, 2, 3]]
