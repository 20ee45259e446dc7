"""Greedy generation with left padding gives the same continuations as unpadded, one-at-a-time decoding."""

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_curvedit.evaluation import (
    evaluate_recitation,
    evaluate_text_recitation,
    greedy_generate,
    recitation_margins,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # eos_token_id stays 50256 (outside this vocabulary): the pad id must not be taken from it.
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=64)).eval()


def tiny_bloom(seed: int = 0) -> BloomForCausalLM:
    # ALiBi positions from the attention mask; its forward does not accept position_ids.
    torch.manual_seed(seed)
    return BloomForCausalLM(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=64)).eval()


def reference_greedy(model, prompt, steps):
    """Plain decoding: no padding, no cache, full sequence every step."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bloom], ids=["llama", "gpt2", "bloom"])
def test_padding_does_not_change_continuations(build):
    model = build()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 11, 6, 17, 1)]
    batched = greedy_generate(model, prompts, 8, batch_size=5, show_progress=False)
    alone = [greedy_generate(model, [p], 8, show_progress=False)[0] for p in prompts]
    assert batched == alone
    # ...and both equal uncached, unpadded decoding (so the cache + position ids are right).
    assert batched == [reference_greedy(model, p, 8) for p in prompts]
    assert all(len(c) == 8 for c in batched)
    # The batch really was padded: prompts of different lengths shared one forward pass.
    assert len({len(p) for p in prompts}) > 1


def test_generation_restores_training_mode_and_per_prompt_lengths():
    model = tiny_gpt2().train()
    out = greedy_generate(model, [[1, 2, 3], [4, 5]], [2, 5], show_progress=False)
    assert [len(o) for o in out] == [2, 5]
    assert model.training
    model.eval()
    assert out == [reference_greedy(model, [1, 2, 3], 2), reference_greedy(model, [4, 5], 5)]


def test_generation_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="positive"):
        greedy_generate(model, [[1, 2]], 0, show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        greedy_generate(model, [[]], 3, show_progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        greedy_generate(model, [[1]], 3, pad_token_id=64, show_progress=False)
    with pytest.raises(ValueError, match="2 continuation lengths for 1"):
        greedy_generate(model, [[1]], [1, 2], show_progress=False)


def test_recitation_of_the_models_own_continuation_is_strict():
    model = tiny_llama()
    prefixes = [[5, 6, 7, 8], [1, 2], [9, 9, 9, 9, 9, 9]]
    suffixes = greedy_generate(model, prefixes, 6, show_progress=False)
    res = evaluate_recitation(model, prefixes, suffixes, batch_size=2, show_progress=False)
    assert res.strict == 1.0 and res.loose == 1.0 and res.avg_lev == 0.0
    # Corrupting the last two gold tokens of one example: d = 2, L = 6 -> 1 - 1/3 < 0.75 (not loose).
    bad = [list(s) for s in suffixes]
    bad[0][-2:] = [(t + 1) % 64 for t in bad[0][-2:]]
    res = evaluate_recitation(model, prefixes, bad, show_progress=False)
    assert [e.distance for e in res.examples] == [2, 0, 0]
    assert res.strict == pytest.approx(2 / 3) and res.loose == pytest.approx(2 / 3)
    assert res.avg_lev == pytest.approx((2 / 6) / 3)
    # Quotes given as token ids: the last n tokens are the suffix.
    quotes = [p + s for p, s in zip(prefixes, suffixes)]
    assert evaluate_text_recitation(model, quotes, suffix_tokens=6, show_progress=False).strict == 1.0


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bloom], ids=["llama", "gpt2", "bloom"])
def test_the_recitation_margin_is_positive_exactly_where_greedy_decoding_recites(build):
    """The teacher-forced margin of the gold token over the best other one, at the worst suffix position, has the sign
    of Strict; the mean log-probability is the per-token brute force."""
    model = build()
    g = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (3, 7, 5, 9, 4, 6)]
    own = greedy_generate(model, prefixes, 5, show_progress=False)
    # half the suffixes are the model's own continuation, the others have one token changed
    suffixes = [s if i % 2 == 0 else s[:2] + [(s[2] + 1) % 64] + s[3:] for i, s in enumerate(own)]
    strict = [e.strict() for e in evaluate_recitation(model, prefixes, suffixes, batch_size=4,
                                                      show_progress=False).examples]
    margins = recitation_margins(model, prefixes, suffixes, batch_size=4)
    assert strict == [True, False] * 3 and [m > 0 for m in margins.min_margin] == strict
    assert margins.margin == pytest.approx(sum(max(m, 0) for m in margins.min_margin) / 6) and margins.margin > 0
    for i, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
        with torch.no_grad():
            logits = model(torch.tensor([prefix + suffix])).logits[0, len(prefix) - 1:-1].double()
        gold = logits.gather(1, torch.tensor(suffix)[:, None]).squeeze(1)
        other = logits.scatter(1, torch.tensor(suffix)[:, None], float("-inf")).amax(1)
        assert margins.min_margin[i] == pytest.approx(float((gold - other).min()), abs=1e-4)
        assert margins.mean_logprob[i] == pytest.approx(float(logits.log_softmax(-1).gather(
            1, torch.tensor(suffix)[:, None]).mean()), abs=1e-4)


class CharTokenizer:
    """A tokenizer without a pad token, like GPT-2's: one id per lowercase letter."""

    pad_token_id = None
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) - ord("a") + 1 for c in t] for t in texts]}


def test_text_recitation_with_tokenizer_without_pad_token():
    model = tiny_llama()
    tok = CharTokenizer()
    res = evaluate_text_recitation(model, ["abcdefghij", "hello"], tokenizer=tok, suffix_tokens=3, show_progress=False)
    assert res.n == 2 and all(e.length == 3 and len(e.prediction) == 3 for e in res.examples)
    expected = greedy_generate(model, [[1, 2, 3, 4, 5, 6, 7], [8, 5]], 3, show_progress=False)
    assert [e.prediction for e in res.examples] == expected
