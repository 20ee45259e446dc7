"""Memorized-window discovery on a tiny GPT-2 trained (here, on CPU) to memorize four random sequences."""

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_curvedit.evaluation import RecitationSet, evaluate_recitation, find_memorized_windows

VOCAB, P, S = 64, 8, 8


@pytest.fixture(scope="module")
def memorizer():
    """A tiny GPT-2 that memorized 4 fixed random 16-token sequences, trained alongside fresh random data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    memorized = torch.randint(0, VOCAB, (4, P + S), generator=g)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    # One thread: on a small shared CPU, two OpenMP threads on tiny matmuls are several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(250):
            noise = torch.randint(0, VOCAB, (4, P + S), generator=g)  # fresh each step: never memorizable
            batch = torch.cat([memorized, noise])
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():  # the premise of the tests below: all four are memorized
        assert (model(memorized).logits[:, P - 1 : -1].argmax(-1) == memorized[:, P:]).all()
    return model, memorized.tolist(), g


def test_windows_found_are_exactly_the_memorized_sequences(memorizer, tmp_path):
    model, mem, g = memorizer
    rnd = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    rows = [
        mem[0],                       # the whole row: offset 0
        rnd(16) + mem[1],             # after 16 random tokens: offset 16
        rnd(32),                      # random only
        mem[2] + rnd(16),             # at the start of a longer row
        rnd(5) + mem[3] + rnd(3),     # at an offset that a stride of P+S would miss
        rnd(10),                      # shorter than a window
    ]
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    found = find_memorized_windows(model, ds, prefix_len=P, suffix_len=S, stride=1, context_len=4,
                                   batch_size=7, show_progress=False)
    got = sorted(zip(found["source_index"], found["token_offset"]))
    assert got == [(0, 0), (1, 16), (3, 0), (4, 5)]
    by_row = {r: i for i, r in enumerate(found["source_index"])}
    for row, k in [(0, 0), (1, 1), (3, 2), (4, 3)]:
        i = by_row[row]
        assert found[i]["prefix_ids"] == mem[k][:P] and found[i]["suffix_ids"] == mem[k][P:]
        assert found[i]["memorized"] and found[i]["suffix_matches"] == S
    assert found[by_row[1]]["context_ids"] == rows[1][12:16]
    assert found[by_row[4]]["context_ids"] == rows[4][1:5]
    assert found[by_row[0]]["context_ids"] == []

    # Saved and reloaded with datasets' own functions, it is the same dataset.
    found.save_to_disk(str(tmp_path / "windows"))
    again = datasets.load_from_disk(str(tmp_path / "windows"))
    assert again.to_dict() == found.to_dict() and again.features == found.features

    # Teacher-forced memorization implies greedy recitation (greedy feeds back the same gold tokens).
    rs = RecitationSet.from_dataset(again)
    assert evaluate_recitation(model, rs.prefixes, rs.suffixes, show_progress=False).strict == 1.0


def test_return_all_and_provenance_of_every_window(memorizer):
    model, mem, g = memorizer
    rows = [list(range(40))[:20], mem[1]]  # 20 tokens: windows at 0 and 4 with stride 4
    ds = find_memorized_windows(model, rows, prefix_len=P, suffix_len=S, stride=4, return_all=True,
                                show_progress=False)
    assert list(zip(ds["source_index"], ds["token_offset"])) == [(0, 0), (0, 4), (1, 0)]
    assert ds["memorized"] == [False, False, True]
    assert ds[1]["prefix_ids"] == list(range(4, 12)) and ds[1]["suffix_ids"] == list(range(12, 20))
    assert all(0 <= m < S for m in ds["suffix_matches"][:2])
    capped = find_memorized_windows(model, rows, prefix_len=P, suffix_len=S, stride=4, return_all=True,
                                    max_windows=2, show_progress=False)
    assert len(capped) == 2


def test_window_bad_input(memorizer):
    model = memorizer[0]
    with pytest.raises(ValueError, match="positive"):
        find_memorized_windows(model, [[1] * 20], prefix_len=0, suffix_len=4, show_progress=False)
    with pytest.raises(ValueError, match="stride"):
        find_memorized_windows(model, [[1] * 20], prefix_len=4, suffix_len=4, stride=0, show_progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        find_memorized_windows(model, ["some text"], prefix_len=4, suffix_len=4, show_progress=False)
    with pytest.raises(ValueError, match="neither"):
        find_memorized_windows(model, datasets.Dataset.from_dict({"x": [1]}), show_progress=False)
    empty = find_memorized_windows(model, [[1, 2, 3]], prefix_len=4, suffix_len=4, show_progress=False)
    assert len(empty) == 0 and "prefix_ids" in empty.column_names


def test_evaluate_edit_on_found_windows(memorizer):
    """The discovered set feeds evaluate_edit directly; the stress test uses its stored context."""
    import copy

    from hf_curvedit.evaluation import evaluate_edit

    model, mem, g = memorizer
    rows = [torch.randint(0, VOCAB, (6,), generator=g).tolist() + m for m in mem]
    found = find_memorized_windows(model, rows, prefix_len=P, suffix_len=S, stride=1, show_progress=False)
    assert sorted(found["source_index"]) == [0, 1, 2, 3] and set(found["token_offset"]) == {6}
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.transformer.h[1].mlp.c_fc.weight.zero_()
        edited.transformer.h[0].mlp.c_fc.weight.zero_()
    report = evaluate_edit(edited, {"memorized": found}, base_model=model, stress_extend=(0, 6),
                           stress_shorten=(0, 4), show_progress=False)
    rec, st = report.recitation["memorized"], report.stress["memorized"]
    assert rec.base.strict == 1.0 and rec.base.distances == [0, 0, 0, 0]
    assert rec.edited.strict < 1.0 and rec.edited.avg_lev > 0
    assert st.base.full_match_rate == 1.0 and st.base.longest_match[0] >= S
    # (0,0), (6,0) with the 6 stored context tokens, (0,4): three variants per window.
    assert st.base.n_variants == 3 * 4
