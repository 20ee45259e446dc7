"""EditReport JSON round trip and evaluate_edit on a PeftModel (adapter on/off) and on a base + edited pair."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_curvedit
from hf_curvedit.evaluation import (
    CoherenceResult,
    EditReport,
    EvalConfig,
    PerplexityComparison,
    PerplexityResult,
    RecitationComparison,
    RecitationMetrics,
    RecitationSet,
    ReportMetadata,
    StressComparison,
    StressResult,
    TextSet,
    as_eval_set,
    evaluate_edit,
    evaluate_recitation,
    greedy_generate,
    ndcg_at_k,
    next_token_topk,
    perplexity,
    stress_test,
)

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        name_or_path="tiny-llama")).eval()


def sample_report() -> EditReport:
    rec = lambda s, lo, lev, d: RecitationMetrics(s, lo, lev, 0.75, d, [8] * len(d))  # noqa: E731
    stress = lambda m, f: StressResult(m, f, [3, 7], [[0, 5], [20, 0]], [13, 8], 18)  # noqa: E731
    return EditReport(
        recitation={"memorized": RecitationComparison(rec(0.985, 1.0, 0.1 / 3, [0, 0, 1]),
                                                      rec(0.005, 0.0123456789012345, 0.7612345678901234, [8, 6, 7]))},
        perplexity={"heldout": PerplexityComparison(PerplexityResult(6.01, 1234.5678, 689, 512, 511),
                                                    PerplexityResult(6.78, 1317.25, 689, 512, 511))},
        coherence={"heldout": CoherenceResult(0.912345678901, 10, 689)},
        stress={"memorized": StressComparison(stress(5.0, 0.5), stress(1.0 / 3, 0.0))},
        metadata=ReportMetadata("tiny-llama", "rho0.6", "CURVEDIT", "0.1.0", "2026-01-01T00:00:00+00:00",
                                {"batch_size": 16, "stress_extend": [0, 5]}, {"note": "ρ = 0.6"}),
    )


def test_report_round_trips_through_json(tmp_path):
    report = sample_report()
    text = report.to_json()
    json.loads(text)  # valid JSON
    again = EditReport.from_json(text)
    assert again == report
    assert again.to_json() == text
    assert again.recitation["memorized"].edited.loose == 0.0123456789012345  # floats are exact
    path = report.save(tmp_path / "sub" / "report.json")
    assert EditReport.load(path) == report
    with pytest.raises(ValueError, match="format_version"):
        EditReport.from_dict({**report.to_dict(), "format_version": 99})
    with pytest.raises(ValueError, match="not a valid EditReport"):
        EditReport.from_dict({"recitation": {"x": {"base": {}}}})


def test_table_rows():
    rows = sample_report().to_table_rows()
    assert [(r.metric, r.set) for r in rows] == [
        ("Strict", "memorized"), ("Loose@0.75", "memorized"), ("AvgLev", "memorized"),
        ("Stress longest match", "memorized"), ("Stress full match", "memorized"),
        ("Perplexity", "heldout"), ("nDCG@10", "heldout"),
    ]
    assert rows[0] == ("Strict", "memorized", 0.985, 0.005)
    assert rows[5].base == 6.01 and rows[5].edited == 6.78
    assert rows[6] == ("nDCG@10", "heldout", 1.0, 0.912345678901)


def _sets():
    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return {
        "memorized": RecitationSet([rnd(10) for _ in range(5)], [rnd(6) for _ in range(5)],
                                   contexts=[rnd(4) for _ in range(5)]),
        "quotes": [(rnd(7), rnd(4)), (rnd(3), rnd(4))],
        "heldout": TextSet([rnd(40), rnd(25), rnd(3)]),
    }


def test_evaluate_edit_on_peft_model_uses_adapter_on_and_off():
    base = tiny_llama()
    base_copy = copy.deepcopy(base)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    merged = copy.deepcopy(model).merge_and_unload().eval()  # the edited model, independently materialized
    sets = _sets()
    cfg = EvalConfig(batch_size=3, block_size=16, stride=12, stress_extend=(0, 2, 4), stress_shorten=(0, 3),
                     show_progress=False)
    report = evaluate_edit(model, sets, config=cfg, metadata={"run": 1})

    # The adapter is on again afterwards, and the report's numbers are those of the two real models.
    assert isinstance(model, PeftModel)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(model(ids).logits, base_copy(ids).logits, atol=1e-3)
    for which, ref in (("base", base_copy), ("edited", merged)):
        for name in ("memorized", "quotes"):
            s = as_eval_set(sets[name])
            direct = evaluate_recitation(ref, s.prefixes, s.suffixes, show_progress=False)
            got = getattr(report.recitation[name], which)
            assert got.distances == [e.distance for e in direct.examples]
            assert got.strict == direct.strict and got.avg_lev == pytest.approx(direct.avg_lev)
        st = stress_test(ref, sets["memorized"].prefixes, sets["memorized"].suffixes,
                         contexts=sets["memorized"].contexts, extend=(0, 2, 4), shorten=(0, 3), show_progress=False)
        assert getattr(report.stress["memorized"], which).longest_match == st.longest_match
        ppl = perplexity(ref, sets["heldout"].sequences, block_size=16, stride=12, show_progress=False)
        got_ppl = getattr(report.perplexity["heldout"], which)
        assert got_ppl.n_tokens == ppl.n_tokens == 39 + 24 + 2
        assert got_ppl.perplexity == pytest.approx(ppl.perplexity, rel=1e-4)
    assert report.perplexity["heldout"].base.perplexity != pytest.approx(report.perplexity["heldout"].edited.perplexity)
    # nDCG against the base, from the two real models.
    kw = dict(block_size=16, stride=12, show_progress=False)
    expected = ndcg_at_k(next_token_topk(merged, sets["heldout"].sequences, **kw),
                         next_token_topk(base_copy, sets["heldout"].sequences, **kw))
    assert report.coherence["heldout"].ndcg == pytest.approx(expected, abs=1e-6)
    assert report.coherence["heldout"].ndcg < 0.99 and report.coherence["heldout"].n_positions == 65
    meta = report.metadata
    assert (meta.adapter_name, meta.peft_type, meta.base_model) == ("default", "LORA", "tiny-llama")
    assert meta.settings["block_size"] == 16 and meta.extra == {"run": 1}
    assert meta.library_version == hf_curvedit.__version__
    assert EditReport.from_json(report.to_json()) == report
    with pytest.raises(ValueError, match="do not pass `base_model`"):
        evaluate_edit(model, sets, base_model=base_copy, config=cfg)


def test_evaluate_edit_on_base_and_edited_pair():
    base = tiny_llama()
    edited = copy.deepcopy(base)
    with torch.no_grad():
        edited.model.layers[1].mlp.up_proj.weight.mul_(0.0)  # a crude "edit"
    sets = {"heldout": _sets()["heldout"], "memorized": _sets()["memorized"]}
    # Make the memorized set memorized by the base: its suffixes are the base's own greedy continuations.
    mem = sets["memorized"]
    mem.suffixes = greedy_generate(base, mem.prefixes, 6, show_progress=False)
    report = evaluate_edit(edited, sets, base_model=base, batch_size=4, block_size=16, stress=False,
                           show_progress=False)
    assert report.recitation["memorized"].base.strict == 1.0
    assert report.recitation["memorized"].base.avg_lev == 0.0
    assert report.recitation["memorized"].edited.avg_lev > 0.0
    assert report.stress == {} and report.metadata.adapter_name is None
    assert report.perplexity["heldout"].base.stride == 15  # default: block_size - 1
    # The base against a copy of itself: nothing changed.
    same = evaluate_edit(copy.deepcopy(base), sets, base_model=base, block_size=16, show_progress=False)
    assert same.coherence["heldout"].ndcg == pytest.approx(1.0)
    assert same.perplexity["heldout"].base == same.perplexity["heldout"].edited
    assert same.recitation["memorized"].edited.strict == 1.0
    assert same.stress["memorized"].base.full_match_rate == 1.0
    with pytest.raises(ValueError, match="base_model="):
        evaluate_edit(edited, sets, show_progress=False)
    with pytest.raises(ValueError, match="same object"):
        evaluate_edit(base, sets, base_model=base, show_progress=False)


def test_eval_set_coercion_errors():
    with pytest.raises(TypeError, match="ambiguous"):
        as_eval_set(["a quote", "another"])
    with pytest.raises(ValueError, match="2 prefixes but 1"):
        RecitationSet([[1], [2]], [[3]])
    with pytest.raises(ValueError, match="empty prefix or suffix"):
        RecitationSet([[1]], [[]])
    with pytest.raises(ValueError, match="2 or more tokens"):
        TextSet([[1]])
    assert isinstance(as_eval_set([[1, 2, 3], [4, 5]]), TextSet)
    assert isinstance(as_eval_set([([1, 2], [3])]), RecitationSet)
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(TypeError, match="JSON-serializable"):
        ReportMetadata(extra={"x": object()})
