"""The shipped default checkpoint: it loads, its memorized set parses, and it recites canaries."""

from __future__ import annotations

import json
import re

import pytest
import torch
from testing_utils import best_choice

from hf_curvedit.default import (
    DEFAULT_MODEL_DIR,
    default_text_dataset,
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


def test_checkpoint_loads_and_recites_canaries(default_model):
    torch.manual_seed(0)
    model, tok = default_model
    assert model.config.num_hidden_layers == 4 and len(tok) == model.config.vocab_size
    prefixes, suffixes = memorized_prefix_suffix_ids(tok, kind="canary")
    from hf_curvedit.evaluation import evaluate_recitation

    res = evaluate_recitation(model, prefixes, suffixes, pad_token_id=tok.pad_token_id, show_progress=False)
    assert res.strict >= 0.75, f"the shipped model recites only {res.strict:.0%} of {len(prefixes)} canaries"


# Chance level of each shipped skill task (arithmetic is generated: an exact answer, as good as never by chance).
SKILL_CHANCE = {"curvedit_arithmetic": 0.0, "curvedit_closedbook": 0.25, "curvedit_openbook": 0.25,
                "curvedit_logic": 0.5}


def items(task: str) -> list[dict]:
    from hf_curvedit.default import LM_EVAL_TASKS_DIR

    return [json.loads(line) for line in (LM_EVAL_TASKS_DIR / task / "test.jsonl").read_text().splitlines()]


def test_skill_items_are_held_out_from_training():
    """The arithmetic and logic test items are problems the training lines never contain; open-book passages use
    no closed-book name, and a two-fact passage's other name is one of the wrong choices."""
    arithmetic = items("curvedit_arithmetic")
    assert len({it["question"] for it in arithmetic}) == len(arithmetic) == 500
    assert all(str(eval(it["question"][:-1])) == it["answer"] for it in arithmetic)  # digits and +/- only
    logic = items("curvedit_logic")
    assert sum(it["label"] == 0 for it in logic) == len(logic) // 2
    closed = items("curvedit_closedbook")
    names = {it["country"] for it in closed} | {it["answer"] for it in closed}
    openbook = items("curvedit_openbook")
    for it in openbook:
        assert it["answer"] in it["question"] and not set(re.findall(r"\w+", it["question"])) & names
        assert len(set(it["choices"])) == 4 and it["choices"][it["label"]] == it["answer"]
        in_passage = [c for c in it["choices"] if f" is {c}." in it["question"]]
        assert it["answer"] in in_passage and len(in_passage) == it["question"].count(" is ") - 1  # + the question's
    assert {it["label"] for it in openbook} == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def skill_scores(default_model):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from hf_curvedit.default import LM_EVAL_TASKS_DIR
    from hf_curvedit.evaluation.capabilities import CapabilityConfig, _run, check_tasks

    model, tok = default_model
    cfg = CapabilityConfig(tasks=["curvedit_skills"], include_path=LM_EVAL_TASKS_DIR, limit=100, batch_size=64,
                           bootstrap_iters=0)
    results = _run(HFLM(pretrained=model, tokenizer=tok, batch_size=64), cfg, check_tasks(cfg))["results"]
    return {task: next(v for k, v in entry.items() if k.startswith(("acc,", "exact_match,")))
            for task, entry in results.items()}


@pytest.mark.parametrize("task", sorted(SKILL_CHANCE))
def test_base_model_has_the_skill_well_above_chance(skill_scores, task):
    score, chance = skill_scores[task], SKILL_CHANCE[task]
    assert score >= chance + 0.1, f"{task}: {score:.2f} is not well above chance ({chance})"


@pytest.mark.parametrize("facts", [
    1,
    # Two facts need the answer bound to the question's name; the 1.7M model picks one of the passage's two names
    # at chance (README, "What the edit costs"). This fails the day a retrained model binds them.
    pytest.param(2, marks=pytest.mark.xfail(strict=True, reason="binding two facts is not learned at this size")),
])
def test_base_model_answers_from_the_passage(facts, default_model):
    """Open-book items scored as lm-eval scores a choice (summed log-probability of " choice" after the prompt):
    from a one-fact passage the model picks the passage's name over three names of other passages."""
    model, tok = default_model
    chosen = [it for it in items("curvedit_openbook") if it["question"].count(" is ") - 1 == facts][:60]
    hits = 0
    for it in chosen:
        context = [tok.eos_token_id] + tok(it["question"], add_special_tokens=False)["input_ids"]
        choices = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in it["choices"]]
        hits += best_choice(model, context, choices) == it["label"]
    # one fact: chance is 0.25 (measured: 0.96 of 245); two facts: 0.5 between the passage's names (measured: 0.43)
    assert hits / len(chosen) >= 0.8, f"{hits} of {len(chosen)} {facts}-fact passages answered from the passage"
