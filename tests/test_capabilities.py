"""Capability evaluation through lm-evaluation-harness: the numbers equal a by-hand scoring of the same items, the base
comes from the same model object with the adapter disabled, and the results round-trip through the report and card."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch

pytest.importorskip("lm_eval")

from huggingface_hub import ModelCard  # noqa: E402
from testing_utils import best_choice, edit_llama, random_eigen, slow  # noqa: E402

from hf_curvedit import CurvatureEditConfig, build_curvature_edit  # noqa: E402
from hf_curvedit.default import LM_EVAL_TASKS_DIR, byte_tokenizer  # noqa: E402
from hf_curvedit.evaluation import (  # noqa: E402
    CapabilityConfig,
    CapabilityError,
    EditReport,
    TextSet,
    check_tasks,
    evaluate_capabilities,
    evaluate_edit,
)

PROMPTS = ["The cat sat on", "12+7=", "Q: What is red? A:", "Hello there", "abc def", "zzz", "On the hill",
           "x = 3;"]
GEN_TOKS = 5


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def edited(tok):
    base = edit_llama(seed=3, vocab_size=len(tok))
    return build_curvature_edit(base, random_eigen(base, seed=2), CurvatureEditConfig(keep_mass=0.3)).eval()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _greedy(model, tok, prompt: str) -> str:
    ids = torch.tensor([_ids(tok, prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_TOKS, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split("\n")[0].lstrip()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, edited, tok):
    """Two local tasks in lm-eval's own JSON form: generation (exact match) and multiple choice (accuracy). Half of the
    generation targets are the base model's own greedy output, so the base scores well above zero."""
    folder = tmp_path_factory.mktemp("tasks")
    with edited.disable_adapter():
        base_out = [_greedy(edited, tok, p) for p in PROMPTS]
    gen = [{"q": p, "a": o if i % 2 == 0 else "nope"} for i, (p, o) in enumerate(zip(PROMPTS, base_out))]
    mc = [{"q": p, "choices": ["yes", "no", "maybe"], "label": i % 3} for i, p in enumerate(PROMPTS)]
    for name, rows in (("gen", gen), ("mc", mc)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_gen.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_gen
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: {folder / 'gen.jsonl'}}}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{q}}}}"
        doc_to_target: "{{{{a}}}}"
        generation_kwargs: {{until: ["\\n"], max_gen_toks: {GEN_TOKS}, do_sample: false}}
        filter_list:
          - name: strip
            filter: [{{function: remove_whitespace}}, {{function: take_first}}]
        metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
        metadata: {{version: 1.0}}
        """))
    (folder / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: {folder / 'mc.jsonl'}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
        metadata: {{version: 1.0}}
        """))
    return folder, gen, mc


def _by_hand(model, tok, gen, mc) -> dict[str, float]:
    em = sum(_greedy(model, tok, r["q"]) == r["a"] for r in gen) / len(gen)
    acc = 0
    for r in mc:
        acc += best_choice(model, _ids(tok, r["q"]), [_ids(tok, " " + c) for c in r["choices"]]) == r["label"]
    return {"tiny_gen": em, "tiny_mc": acc / len(mc)}


@pytest.fixture(scope="module")
def results(edited, tok, task_dir):
    folder, _, _ = task_dir
    cfg = CapabilityConfig(tasks="tiny_gen,tiny_mc", include_path=folder, batch_size=4, bootstrap_iters=10)
    return evaluate_capabilities(edited, tok, cfg)


def test_scores_equal_scoring_the_same_items_by_hand(edited, tok, task_dir, results):
    _, gen, mc = task_dir
    with edited.disable_adapter():
        base = _by_hand(edited, tok, gen, mc)
    edit = _by_hand(edited, tok, gen, mc)
    assert base["tiny_gen"] == 0.5  # the fixture's construction: half the targets are the base's own output
    for task in ("tiny_gen", "tiny_mc"):
        assert results[task].base == pytest.approx(base[task], abs=0)
        assert results[task].edited == pytest.approx(edit[task], abs=0)
        assert results[task].n == len(PROMPTS)
    assert (results["tiny_gen"].metric, results["tiny_gen"].filter) == ("exact_match", "strip")
    assert (results["tiny_mc"].metric, results["tiny_mc"].output_type) == ("acc", "multiple_choice")
    assert results["tiny_gen"].base_stderr == pytest.approx((0.5 * 0.5 / (len(PROMPTS) - 1)) ** 0.5)  # mean's stderr
    assert results["tiny_gen"].dataset is None  # local JSON is no Hub dataset


@slow
def test_base_is_the_same_object_with_adapter_disabled_and_edit_is_seen(edited, tok, task_dir, results):
    """The base run equals lm-eval on an independent copy of the base model, the edited run equals lm-eval on a merged
    copy, and the edit changes at least one score: HFLM saw the adapter, and disabling it gave the base."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder, _, _ = task_dir
    tm = TaskManager(include_path=str(folder))

    def run(model):
        r = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
                                    tasks=["tiny_gen", "tiny_mc"], task_manager=tm, bootstrap_iters=0)
        return {"tiny_gen": r["results"]["tiny_gen"]["exact_match,strip"],
                "tiny_mc": r["results"]["tiny_mc"]["acc,none"]}

    unloaded = copy.deepcopy(edited).unload()
    merged = copy.deepcopy(edited).merge_and_unload()
    assert run(unloaded) == {t: results[t].base for t in results}
    assert run(merged) == {t: results[t].edited for t in results}
    assert any(results[t].base != results[t].edited for t in results)


def test_evaluate_edit_stores_capabilities_and_they_round_trip(edited, tok, task_dir, tmp_path):
    folder, _, _ = task_dir
    cfg = CapabilityConfig(tasks=["tiny_mc"], include_path=[folder], limit=4, bootstrap_iters=0)
    report = evaluate_edit(edited, {"heldout": TextSet.from_texts(["some held-out text here."] * 2, tok)}, tok,
                           capabilities=cfg, show_progress=False)
    assert set(report.capabilities) == {"tiny_mc"} and report.capabilities["tiny_mc"].n == 4
    assert report.metadata.extra["capabilities"]["tasks"] == ["tiny_mc"]
    path = report.save(tmp_path / "report.json")
    assert EditReport.load(path) == report


def test_card_capability_table_and_model_index_round_trip(edited, results, tmp_path):
    from hf_curvedit.publish import stage_folder, write_card

    staged = stage_folder(edited, tmp_path / "staged", EditReport(capabilities=results))
    write_card(staged, "user/edited", lookup_license=False)
    card = ModelCard.load(staged.folder / "README.md")
    index = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    for task, res in results.items():
        entry = index[(task, res.metric)]
        assert (entry.task_type, entry.dataset_type) == ("text-generation", task)
        assert entry.metric_value == pytest.approx(res.edited)
    assert "## Capabilities" in card.text
    row = next(line for line in card.text.splitlines() if line.startswith("| tiny_mc"))
    assert f"{results['tiny_mc'].base:.3f}" in row and f"{results['tiny_mc'].edited:.3f}" in row


@slow
def test_unknown_task_lists_close_matches(tmp_path, task_dir):
    folder, _, _ = task_dir
    with pytest.raises(CapabilityError, match=r"unknown lm-eval task.*'tiny_gen'"):
        check_tasks(CapabilityConfig(tasks=["tiny_gne"], include_path=folder))


@slow
def test_hub_task_while_offline_names_the_offline_alternative(tmp_path, monkeypatch):
    from huggingface_hub import constants

    (tmp_path / "hub_task.yaml").write_text(textwrap.dedent("""\
        task: needs_hub
        dataset_path: hf-curvedit-tests/definitely-not-cached
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{q}}"
        doc_to_choice: ["a", "b"]
        doc_to_target: 0
        metric_list: [{metric: acc}]
        """))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CapabilityError, match=r"'hf-curvedit-tests/definitely-not-cached' from the Hugging Face Hub"
                                               r".*HF_HUB_OFFLINE=1.*include_path"):
        check_tasks(CapabilityConfig(tasks=["needs_hub"], include_path=tmp_path))


@pytest.mark.parametrize("bad, match", [
    (dict(tasks=[]), "tasks is empty"),
    (dict(tasks=["x"], limit=0), "limit must be positive"),
    (dict(tasks=["x"], include_path="/no/such/folder"), "is not a folder"),
])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(CapabilityError, match=match):
        CapabilityConfig(**bad)


@slow
def test_shipped_skill_tasks_load_offline():
    manager = check_tasks(CapabilityConfig(tasks=["curvedit_skills"], include_path=LM_EVAL_TASKS_DIR))
    assert {"curvedit_arithmetic", "curvedit_closedbook", "curvedit_openbook", "curvedit_logic"} <= set(
        manager.all_tasks)


@slow
def test_task_manager_is_reused_until_a_task_file_changes(task_dir):
    import os

    from hf_curvedit.evaluation.capabilities import task_manager

    folder, _, _ = task_dir
    cfg = CapabilityConfig(tasks=["tiny_mc"], include_path=folder)
    first = task_manager(cfg)
    assert task_manager(CapabilityConfig(tasks=["tiny_gen"], include_path=[folder])) is first
    yaml = next(folder.glob("*.yaml"))
    st = yaml.stat()
    os.utime(yaml, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert task_manager(cfg) is not first


@slow
def test_run_refuses_an_unknown_task_before_any_step(tmp_path):
    from hf_curvedit.pipeline import PipelineConfig, UsageError, run_pipeline

    cfg = PipelineConfig.from_dict({"output_dir": str(tmp_path / "run"), "fit": {"max_tokens": 1000},
                                    "evaluate": {"capabilities": {"tasks": ["curvedit_arithmetc"]}}})
    with pytest.raises(UsageError, match="did you mean 'curvedit_arithmetic'"):
        run_pipeline(cfg, echo=lambda _: None)
    assert not (tmp_path / "run" / "factors").exists()
