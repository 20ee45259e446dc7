"""The shipped default checkpoint: it loads, its memorized set parses, and it recites canaries."""

from __future__ import annotations

import pytest
import torch

from hf_curvedit.default import (
    DEFAULT_MODEL_DIR,
    default_text_dataset,
    load_default_model,
    load_heldout_text,
    load_memorized_set,
    memorized_prefix_suffix_ids,
)

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(),
                                reason="no trained default checkpoint shipped")


def test_checkpoint_is_small_safetensors():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith(".bin") for n in files)
    assert files["model.safetensors"] < 8 * 2**20


def test_memorized_set_parses():
    items = load_memorized_set()
    kinds = {it["kind"] for it in items}
    assert kinds == {"canary", "passage"}
    assert len(load_memorized_set(kind="canary")) >= 20 and len(load_memorized_set(kind="passage")) >= 100
    for it in items:
        assert it["prefix"] + it["suffix"] == it["text"] and it["prefix"] and it["suffix"]
        assert it["repeats"] > 1
        if it["kind"] == "canary":
            assert it["suffix"] == it["secret"] + "."
    assert len({it["text"] for it in items}) == len(items)


def test_heldout_is_disjoint_from_training_text():
    heldout = load_heldout_text()
    assert heldout
    train = set(default_text_dataset("train")["text"])
    memorized = [it["text"] for it in load_memorized_set()]
    for doc in heldout:
        assert doc not in train
        assert not any(m in doc for m in memorized)


def test_checkpoint_loads_and_recites_canaries():
    torch.manual_seed(0)
    model, tok = load_default_model()
    assert model.config.num_hidden_layers == 4 and len(tok) == model.config.vocab_size
    prefixes, suffixes = memorized_prefix_suffix_ids(tok, kind="canary")
    prefixes, suffixes = prefixes[:8], suffixes[:8]
    from hf_curvedit.evaluation import evaluate_recitation

    res = evaluate_recitation(model, prefixes, suffixes, pad_token_id=tok.pad_token_id, show_progress=False)
    assert res.strict >= 0.75, f"the shipped model recites only {res.strict:.0%} of 8 canaries"
