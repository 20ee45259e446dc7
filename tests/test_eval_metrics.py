"""Metrics of hf_curvedit.evaluation against hand-computed cases (fake models with known logits)."""

import math
from types import SimpleNamespace

import pytest
import torch

from hf_curvedit.evaluation import (
    available_metrics,
    exact_prefix_match,
    metric_path,
    ndcg_at_k,
    ndcg_per_position,
    perplexity,
    recitation_scores,
    sliding_windows,
    split_suffix,
    stress_test,
    stress_variants,
)
from hf_curvedit.evaluation.perplexity import score_text


class TableLM(torch.nn.Module):
    """Next-token logits depend only on the current token: ``logits = table[input_ids]``. No KV cache."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


class LengthLM(torch.nn.Module):
    """Predicts the number of real (unmasked) tokens seen so far, modulo the vocabulary: it exposes any
    mistake in left padding or in how prompts are built."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        seen = attention_mask.cumsum(-1)[:, -input_ids.shape[1]:] if attention_mask is not None else \
            torch.arange(1, input_ids.shape[1] + 1).expand_as(input_ids)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(seen % self.vocab, self.vocab).float(),
                               past_key_values=None)


def successor_lm(vocab: int = 64) -> TableLM:
    """Greedy next token of t is (t + 1) mod vocab."""
    return TableLM(torch.nn.functional.one_hot((torch.arange(vocab) + 1) % vocab, vocab).float() * 5)


# ---------------------------------------------------------------- recitation

def test_recitation_scores_hand_computed():
    refs = [[1, 2, 3, 4]] * 5
    preds = [
        [1, 2, 3, 4],  # d = 0: strict and loose
        [1, 2, 3, 5],  # d = 1: 1 - 1/4 = 0.75 >= 0.75, loose (threshold inclusive)
        [1, 3, 2, 4],  # d = 2 (two substitutions)
        [2, 3, 4, 5],  # d = 2 (delete 1, insert 5): Levenshtein, not Hamming (which would be 4)
        [9, 9, 9, 9],  # d = 4
    ]
    res = recitation_scores(preds, refs)
    assert [e.distance for e in res.examples] == [0, 1, 2, 2, 4]
    assert res.strict == pytest.approx(1 / 5)
    assert res.loose == pytest.approx(2 / 5)
    assert res.avg_lev == pytest.approx((0 + 0.25 + 0.5 + 0.5 + 1.0) / 5)
    assert [e.strict() for e in res.examples] == [True, False, False, False, False]
    assert recitation_scores(preds, refs, loose_threshold=0.5).loose == pytest.approx(4 / 5)


def test_recitation_scores_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        recitation_scores([[1], [2]], [[1]])
    with pytest.raises(ValueError, match="empty"):
        recitation_scores([[1]], [[]])
    with pytest.raises(ValueError, match="loose_threshold"):
        recitation_scores([[1]], [[1]], loose_threshold=1.5)
    with pytest.raises(TypeError, match="tokenizer"):
        recitation_scores(["abc"], [[1]])


def test_split_suffix_on_token_ids_and_errors():
    prefixes, suffixes = split_suffix([[1, 2, 3, 4, 5], [7, 8, 9]], suffix_tokens=2)
    assert prefixes == [[1, 2, 3], [7]] and suffixes == [[4, 5], [8, 9]]
    with pytest.raises(ValueError, match="too short"):
        split_suffix([[1, 2]], suffix_tokens=2)
    with pytest.raises(ValueError, match="positive"):
        split_suffix([[1, 2]], suffix_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        split_suffix(["a famous quote"], suffix_tokens=2)


# ---------------------------------------------------------------- perplexity

def _bigram_table(vocab: int = 4) -> torch.Tensor:
    # P[0,1] = 1/2, P[1,2] = 1/4, P[2,3] = 1/2; the rest of each row uniform.
    probs = torch.full((vocab, vocab), 0.0)
    probs[0] = torch.tensor([1 / 6, 1 / 2, 1 / 6, 1 / 6])
    probs[1] = torch.tensor([1 / 4, 1 / 4, 1 / 4, 1 / 4])
    probs[2] = torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    probs[3] = torch.tensor([1 / 4, 1 / 4, 1 / 4, 1 / 4])
    return probs.log()


def test_perplexity_hand_computed():
    model = TableLM(_bigram_table())
    # NLL = ln 2 + ln 4 + ln 2 = 4 ln 2 over 3 scored tokens (the first token has no prediction).
    res = perplexity(model, [[0, 1, 2, 3]], block_size=4, show_progress=False)
    assert res.n_tokens == 3
    assert res.nll_sum == pytest.approx(4 * math.log(2), rel=1e-6)
    assert res.perplexity == pytest.approx(2 ** (4 / 3), rel=1e-6)
    # A second document [3, 0] adds -ln(1/4) = ln 4 over one token: exp(6 ln 2 / 4) = 2^(3/2).
    # Padding it in the same batch must not add anything (pads masked).
    res2 = perplexity(model, [[0, 1, 2, 3], [3, 0]], block_size=4, batch_size=2, show_progress=False)
    assert res2.n_tokens == 4
    assert res2.perplexity == pytest.approx(2 ** 1.5, rel=1e-6)


class CharTokenizer:
    """No pad token, one id per lowercase letter (a = 0)."""

    pad_token_id = None
    eos_token_id = None

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) - ord("a") for c in t] for t in texts]}


def test_perplexity_on_text_with_tokenizer_without_pad_token():
    model = TableLM(_bigram_table())
    res = perplexity(model, ["abcd", "da"], tokenizer=CharTokenizer(), block_size=4, batch_size=2, show_progress=False)
    assert res.n_tokens == 4 and res.perplexity == pytest.approx(2 ** 1.5, rel=1e-6)


def test_uniform_model_perplexity_is_vocab_size():
    model = TableLM(torch.zeros(7, 7))
    res = perplexity(model, [[1, 2, 3, 4, 5, 6, 0, 1, 2]], block_size=3, stride=2, show_progress=False)
    assert res.n_tokens == 8
    assert res.perplexity == pytest.approx(7.0, rel=1e-6)


@pytest.mark.parametrize("block_size,stride", [(4, 3), (4, 1), (5, 3), (16, 15), (2, 1), (4, 4)])
def test_sliding_windows_score_every_token_once(block_size, stride):
    seq = list(range(11))  # token t sits at index t
    scored = []
    for w in sliding_windows(seq, block_size, stride):
        assert 2 <= len(w.ids) <= block_size
        scored += w.ids[w.first_scored:]
    if stride < block_size:
        assert scored == seq[1:]
    else:  # disjoint blocks: a block's first token has no context
        assert scored == [t for t in seq if t % block_size != 0]
    # For a context-free model the NLL is the sum over scored tokens of -log p(t | t - 1).
    model = TableLM(torch.randn(11, 11, generator=torch.Generator().manual_seed(0)))
    nll, n, _ = score_text(model, [seq], block_size=block_size, stride=stride, batch_size=3, show_progress=False)
    logp = torch.log_softmax(model.table, -1)
    expected = -sum(float(logp[t - 1, t]) for t in scored)
    assert n == len(scored) and nll == pytest.approx(expected, rel=1e-5)


def test_perplexity_bad_settings():
    model = TableLM(torch.zeros(5, 5))
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, [[1, 2, 3]], block_size=4, stride=5, show_progress=False)
    with pytest.raises(ValueError, match="block_size"):
        perplexity(model, [[1, 2, 3]], block_size=1, show_progress=False)
    with pytest.raises(ValueError, match="no token was scored"):
        perplexity(model, [[1]], block_size=4, show_progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, ["raw text"], block_size=4, show_progress=False)


# ---------------------------------------------------------------- nDCG

def test_ndcg_hand_computed():
    l3 = math.log2(3)
    # k = 2, reference [1, 2]: rel(1) = 2, rel(2) = 1; IDCG = 2 + 1/log2(3).
    idcg = 2 + 1 / l3
    assert ndcg_at_k([[1, 2]], [[1, 2]], k=2) == pytest.approx(1.0)
    assert ndcg_at_k([[2, 1]], [[1, 2]], k=2) == pytest.approx((1 + 2 / l3) / idcg)
    assert ndcg_at_k([[1, 9]], [[1, 2]], k=2) == pytest.approx(2 / idcg)
    assert ndcg_at_k([[9, 1]], [[1, 2]], k=2) == pytest.approx((2 / l3) / idcg)
    assert ndcg_at_k([[8, 9]], [[1, 2]], k=2) == 0.0
    per = ndcg_per_position([[1, 2], [8, 9]], [[1, 2], [1, 2]], k=2)
    assert per.tolist() == pytest.approx([1.0, 0.0])
    assert ndcg_at_k([[1, 2], [8, 9]], [[1, 2], [1, 2]], k=2) == pytest.approx(0.5)
    # Only the first k entries count.
    assert ndcg_at_k([[1, 2, 7]], [[1, 2, 3]], k=2) == pytest.approx(1.0)


def test_ndcg_at_10_swap_of_last_two_costs_little():
    ref = list(range(10))
    swapped = ref[:8] + [9, 8]
    d = [1 / math.log2(i + 2) for i in range(10)]
    idcg = sum((10 - i) * d[i] for i in range(10))
    dcg = idcg - (2 * d[8] + 1 * d[9]) + (1 * d[8] + 2 * d[9])
    assert ndcg_at_k([swapped], [ref]) == pytest.approx(dcg / idcg)
    assert 0.99 < ndcg_at_k([swapped], [ref]) < 1.0


def test_ndcg_bad_input():
    with pytest.raises(ValueError, match="at least k"):
        ndcg_at_k([[1, 2]], [[1, 2]], k=3)
    with pytest.raises(ValueError, match="1 predicted rankings but 2"):
        ndcg_at_k([[1]], [[1], [2]], k=1)
    with pytest.raises(ValueError, match="positive"):
        ndcg_at_k([[1]], [[1]], k=0)


# ---------------------------------------------------------------- stress test

def test_stress_test_hand_computed_successor_model():
    model = successor_lm()
    # Example 0: from 3 the model says 4 5 6 7, gold 4 5 9 7 -> 2. Shorten by 1: prompt [1, 2], gold
    # [3, 4, 5, 9, 7] -> 3. Shorten by 2: prompt [1], gold [2, 3, 4, 5, 9, 7] -> 4 (best).
    # Example 1: from 11 the model says 12 13 = gold (2, full). Shorten by 1: [10] -> 11 12 13 (3, full).
    res = stress_test(model, [[1, 2, 3], [10, 11]], [[4, 5, 9, 7], [12, 13]], contexts=[[0], []],
                      extend=(0, 1), shorten=(0, 1, 2), show_progress=False)
    assert res.longest_match == [4, 3]
    assert res.best_variant == [[0, 2], [0, 1]]
    assert res.target_length == [6, 3]
    assert res.mean_longest_match == pytest.approx(3.5)
    assert res.full_match_rate == pytest.approx(0.5)
    # Example 0: (0,0), (1,0), (0,1), (0,2); example 1 has no context and a 2-token prefix: (0,0), (0,1).
    assert res.n_variants == 6


def test_stress_test_extension_prepends_context():
    model = LengthLM()
    # The model continues a prompt of n real tokens with n, n+1, ...; gold suffix [3, 4, 5] is matched only
    # by the unperturbed 3-token prompt; extending by 2 makes it say 5, 6, 7 (no match).
    res = stress_test(model, [[0, 0, 0]], [[3, 4, 5]], contexts=[[0, 0]], extend=(2,), shorten=(), show_progress=False)
    assert res.n_variants == 2
    assert res.longest_match == [3] and res.best_variant == [[0, 0]]
    # Gold [5, 6, 7] is what the 5-token (extended) prompt gives.
    res = stress_test(model, [[0, 0, 0]], [[5, 6, 7]], contexts=[[0, 0]], extend=(2,), shorten=(), show_progress=False)
    assert res.longest_match == [3] and res.best_variant == [[2, 0]] and res.full_match_rate == 1.0


def test_stress_variants_and_prefix_match():
    assert stress_variants((0, 5), (0, 5)) == [(0, 0), (0, 5), (5, 0)]
    assert len(stress_variants((0, 5, 10), (0, 5), grid=True)) == 6
    with pytest.raises(ValueError):
        stress_variants((-1,), ())
    assert exact_prefix_match([1, 2, 3], [1, 2, 4]) == 2
    assert exact_prefix_match([5], [1]) == 0
    assert exact_prefix_match([1, 2], [1, 2]) == 2


# ---------------------------------------------------------------- evaluate modules, offline

def test_evaluate_modules_load_offline(monkeypatch, tmp_path):
    import socket

    import evaluate

    for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    # Any attempt to reach the Hub would fail loudly.
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert available_metrics() == ["label_memorization", "ndcg", "perplexity", "recitation"]
    mem = evaluate.load(metric_path("label_memorization"), cache_dir=str(tmp_path))
    # images 1 and 2 carry noisy labels (true 0 and 2): one is predicted as its noisy label, one as its true label
    out = mem.compute(predictions=[1, 5, 2], references=[1, 5, 7], true_labels=[1, 0, 2])
    assert out == {"memorized_label_rate": 0.5, "true_label_accuracy": 0.5, "n": 2}
    assert mem.compute(predictions=[1, 5, 2], references=[1, 5, 7]) == {"accuracy": 2 / 3, "n": 3}
    rec = evaluate.load(metric_path("recitation"), cache_dir=str(tmp_path))
    out = rec.compute(predictions=[[1, 2, 3, 4], [2, 3, 4, 5]], references=[[1, 2, 3, 4], [1, 2, 3, 4]])
    assert out["distances"] == [0, 2]
    assert out["strict"] == 0.5 and out["loose"] == 0.5 and out["avg_lev"] == pytest.approx(0.25)
    ndcg = evaluate.load(metric_path("ndcg"), cache_dir=str(tmp_path))
    l3 = math.log2(3)
    assert (ndcg.compute(predictions=[[2, 1]], references=[[1, 2]], k=2)["ndcg"]
            == pytest.approx((1 + 2 / l3) / (2 + 1 / l3)))
    ppl = evaluate.load(metric_path("perplexity"), cache_dir=str(tmp_path))
    assert ppl.compute(predictions=[[-1.0, -3.0], [-2.0]])["perplexity"] == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="available"):
        metric_path("bleu")
