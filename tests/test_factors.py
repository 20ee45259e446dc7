"""K-FAC factors against brute force, storage, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors import safe_open
from testing_utils import random_token_rows, record_module_io, slow, slow_param, tiny_gpt2, tiny_llama

from hf_curvedit import FactorConfig, fit_factors, load_factors
from hf_curvedit.curvature import passes as passes_mod
from hf_curvedit.curvature.partitions import plan_partitions
from hf_curvedit.curvature.sums import accumulate_upper, mirror_upper
from hf_curvedit.curvature.tasks import batch_generator, sample_labels, valid_position_mask
from hf_curvedit.data import pack_into_blocks
from hf_curvedit.targets import resolve_target_modules


def brute_force_factors(model, input_ids, attention_mask, names, label_mode, seed=0, batch_index=0, chunk=2048):
    """Explicit per-token outer products from autograd, one position at a time, in float64."""
    emb_hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
    try:
        with record_module_io(model, names) as (ins, outs):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        emb_hook.remove()
    B, T = input_ids.shape
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T - 1):
            valid[b, t] = bool(attention_mask[b, t]) and bool(attention_mask[b, t + 1])
    pos = [(b, t) for b in range(B) for t in range(T) if valid[b, t]]
    sel = torch.stack([logits[b, t] for b, t in pos])
    if label_mode == "empirical":
        labels = torch.tensor([int(input_ids[b, t + 1]) for b, t in pos])
    else:
        labels = sample_labels(sel.detach(), batch_generator(seed, batch_index, sel.device), chunk)
    loss_dtype = torch.promote_types(sel.dtype, torch.float32)
    loss = sum(F.cross_entropy(sel[i:i + 1].to(loss_dtype), labels[i:i + 1], reduction="sum") for i in range(len(pos)))
    grads = torch.autograd.grad(loss, [outs[n] for n in names])
    A, G = {}, {}
    for n, g in zip(names, grads):
        a_rows = [ins[n][b, t].double() for b, t in pos]
        g_rows = [g[b, t].double() for b, t in pos]
        A[n] = sum(torch.outer(a, a) for a in a_rows) / len(pos)
        G[n] = sum(torch.outer(x, x) for x in g_rows) / len(pos)
    return A, G, len(pos)


def padded_batch(rows, length):
    """``(input_ids, attention_mask)`` of ``rows`` right-padded to ``length``."""
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def padded_dataset(n=6, seed=0):
    return Dataset.from_dict({"input_ids": random_token_rows(n, lo=5, hi=20, seed=seed)})


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("label_mode", ["empirical", "sampled"])
def test_factors_match_brute_force_with_padding(make_model, label_mode):
    model = make_model()
    ds = padded_dataset()
    cfg = FactorConfig(label_mode=label_mode, seq_len=20, batch_size=6, packing=False, accumulate_dtype="float64")
    factors = fit_factors(model, ds, cfg, progress=False)

    rows = ds["input_ids"]
    ids, mask = padded_batch(rows, 20)
    assert (mask == 0).any(), "the batch must contain padding"
    names = resolve_target_modules(model)
    A, G, n_tok = brute_force_factors(model, ids, mask, names, label_mode)
    assert factors.module_names == names  # model order
    for n in names:
        assert factors.num_tokens[n] == n_tok == sum(len(r) - 1 for r in rows)
        # The model runs in fp32, so entries agree to fp32 round-off relative to the largest entry.
        for got, want in ((factors.A[n], A[n]), (factors.G[n], G[n])):
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
        assert torch.equal(factors.A[n], factors.A[n].T) and torch.equal(factors.G[n], factors.G[n].T)
    if make_model is tiny_llama:
        # gate and up read the same input: one A, shared.
        assert any(n.endswith("up_proj") for n in factors.a_alias)


@pytest.mark.parametrize("label_mode", ["empirical", "sampled"])
def test_float64_fit_is_float64_end_to_end(label_mode):
    """A float64 model fitted with float64 accumulation agrees with a float64 brute force to float64 round-off, in G
    too: the loss is not passed through a float32 softmax."""
    model = tiny_llama().double()
    ds = padded_dataset()
    cfg = FactorConfig(label_mode=label_mode, seq_len=20, batch_size=6, packing=False, accumulate_dtype="float64")
    factors = fit_factors(model, ds, cfg, progress=False)
    rows = ds["input_ids"]
    ids, mask = padded_batch(rows, 20)
    names = resolve_target_modules(model)
    A, G, _ = brute_force_factors(model, ids, mask, names, label_mode)
    eigen = factors.eigendecompose()
    for n in names:
        for got, want in ((factors.A[n], A[n]), (factors.G[n], G[n])):
            assert got.dtype == torch.float64
            assert (got - want).abs().max() <= 1e-13 * want.abs().max()
        assert eigen[n].eigvecs_A.dtype == eigen[n].eigvecs_G.dtype == torch.float64


def test_padded_batch_equals_unpadded_rows(llama):
    """Padding changes nothing: a right-padded batch gives the sums of its rows run one by one."""
    from hf_curvedit.curvature import collect_factor_sums

    rows = random_token_rows(4, lo=6, hi=12, seed=3)
    T = max(map(len, rows))
    ids = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    cfg = FactorConfig(label_mode="empirical", seq_len=T, accumulate_dtype="float64")
    names = resolve_target_modules(llama)
    padded = collect_factor_sums(llama, [(0, {"input_ids": ids, "attention_mask": mask})], names, cfg).finalized_sums()
    singles = [collect_factor_sums(llama, [(0, {"input_ids": torch.tensor([r]),
                                                "attention_mask": torch.ones(1, len(r), dtype=torch.long)})],
                                   names, cfg).finalized_sums() for r in rows]
    for k in range(2):
        for n in padded[k]:
            want = sum(s[k][n] for s in singles)
            assert (padded[k][n] - want).abs().max() <= 1e-5 * want.abs().max()


def test_valid_position_mask():
    am = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(valid_position_mask(am), expected)


def test_sampled_labels_follow_the_model_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    labels = sample_labels(logits, batch_generator(0, 0, torch.device("cpu")), chunk_size=777)
    freq = torch.bincount(labels, minlength=3).double() / labels.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.015, rtol=0)


def test_no_weight_gradients_are_accumulated(llama):
    fit_factors(llama, padded_dataset(), FactorConfig(seq_len=20, batch_size=3, packing=False), progress=False)
    assert all(p.grad is None for p in llama.parameters())
    assert not llama.training


def test_save_load_roundtrip_and_metadata(tmp_path, llama):
    cfg = FactorConfig(seq_len=16, batch_size=2, label_mode="empirical")
    ds = Dataset.from_dict({"input_ids": random_token_rows(10, lo=10, hi=30)})
    f = fit_factors(llama, ds, cfg, tmp_path, progress=False)
    assert (tmp_path / "factors.safetensors").exists()
    assert not (tmp_path / "checkpoint").exists()
    with safe_open(str(tmp_path / "factors.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["config"])["label_mode"] == "empirical"
    assert json.loads(meta["num_tokens"]) == f.num_tokens
    g = load_factors(tmp_path, llama)
    assert g.num_tokens == f.num_tokens and g.a_alias == f.a_alias
    for n in f.module_names:
        assert torch.equal(f.A[n], g.A[n]) and torch.equal(f.G[n], g.G[n])
    # a second call with the same settings loads instead of refitting
    again = fit_factors(llama, ds, cfg, tmp_path, progress=False)
    assert again.factors_id == f.factors_id


def test_text_input_with_tokenizer_and_streaming(tmp_path, llama):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1, 61)} | {"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<unk>")
    texts = [" ".join(f"w{(i * 7 + j) % 60 + 1}" for j in range(40)) for i in range(8)]
    (tmp_path / "a.txt").write_text(texts[0] + "\n" + texts[1])
    cfg = FactorConfig(seq_len=16, batch_size=2, label_mode="empirical", max_tokens=64)
    from_file = fit_factors(llama, tmp_path / "a.txt", cfg, tokenizer=tokenizer, progress=False)
    assert max(from_file.num_tokens.values()) == 4 * 15  # 64 tokens = 4 blocks, 15 valid positions each

    ds = Dataset.from_dict({"text": texts})
    full = fit_factors(llama, ds, cfg, tokenizer=tokenizer, progress=False)
    streamed = fit_factors(llama, ds.to_iterable_dataset(num_shards=2), cfg, tokenizer=tokenizer, progress=False)
    for n in full.module_names:
        torch.testing.assert_close(full.G[n], streamed.G[n])
        torch.testing.assert_close(full.A[n], streamed.A[n])


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("streaming", [slow_param(False), True])
def test_resume_after_crash_equals_uninterrupted(tmp_path, llama, monkeypatch, streaming):
    ds = Dataset.from_dict({"input_ids": random_token_rows(40, lo=10, hi=30, seed=1)})
    data = ds.to_iterable_dataset() if streaming else ds
    cfg = FactorConfig(seq_len=16, batch_size=2, checkpoint_every=2, seed=7)
    reference = fit_factors(llama, data, cfg, progress=False)
    n_batches = -(-len(pack_into_blocks(ds, None, 16)) // 2)
    assert n_batches >= 8

    seen: list[int] = []
    real = passes_mod.collect_factor_sums

    def crashing(model, batches, *a, **kw):
        def gen():
            for b, batch in batches:
                if b == 5:
                    raise _Crash("killed")
                seen.append(b)
                yield b, batch
        return real(model, gen(), *a, **kw)

    monkeypatch.setattr(passes_mod, "collect_factor_sums", crashing)
    with pytest.raises(_Crash):
        fit_factors(llama, data, cfg, tmp_path, progress=False)
    assert not (tmp_path / "factors.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        load_factors(tmp_path)

    monkeypatch.setattr(passes_mod, "collect_factor_sums", lambda m, batches, *a, **kw: real(
        m, ((seen.append(b), (b, x))[1] for b, x in batches), *a, **kw))
    seen.clear()
    resumed = fit_factors(llama, data, cfg, tmp_path, progress=False)
    assert seen[0] == 4, "the run resumes at the last checkpoint (after 4 batches), not at 0"
    assert seen == list(range(4, n_batches))
    assert resumed.num_tokens == reference.num_tokens
    for n in reference.module_names:
        torch.testing.assert_close(resumed.A[n], reference.A[n], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(resumed.G[n], reference.G[n], rtol=1e-6, atol=1e-8)
    assert not (tmp_path / "checkpoint").exists()


def test_memory_budget_splits_into_partitions(llama, caplog):
    ds = Dataset.from_dict({"input_ids": random_token_rows(8, lo=10, hi=30)})
    cfg = FactorConfig(seq_len=16, batch_size=2, label_mode="empirical")
    one = fit_factors(llama, ds, cfg, progress=False)
    per_module = (32 * 32 + 64 * 64) * 4 / 1024**3
    split_cfg = FactorConfig(seq_len=16, batch_size=2, label_mode="empirical", max_factor_memory_gb=per_module * 2.5)
    parts = plan_partitions(llama, one.module_names, split_cfg)
    assert len(parts) == 3 and sum(map(len, parts)) == 6
    split = fit_factors(llama, ds, split_cfg, progress=False)
    for n in one.module_names:
        torch.testing.assert_close(split.A[n], one.A[n])
        torch.testing.assert_close(split.G[n], one.G[n])
    with pytest.raises(ValueError, match="too small"):
        fit_factors(llama, ds, FactorConfig(seq_len=16, max_factor_memory_gb=1e-9), progress=False)


def test_bf16_model(llama):
    ds = Dataset.from_dict({"input_ids": random_token_rows(6, lo=10, hi=30)})
    cfg = FactorConfig(seq_len=16, batch_size=3, label_mode="empirical")
    ref = fit_factors(llama, ds, cfg, progress=False)
    bf = fit_factors(llama.to(torch.bfloat16), ds, cfg, progress=False)
    for n in ref.module_names:
        assert bf.G[n].dtype == torch.float32
        rel = (bf.A[n] - ref.A[n]).norm() / ref.A[n].norm()
        assert rel < 0.05


def test_eigendecompose_is_cached_and_correct(tmp_path, llama):
    ds = Dataset.from_dict({"input_ids": random_token_rows(8, lo=10, hi=30)})
    f = fit_factors(llama, ds, FactorConfig(seq_len=16, batch_size=2), tmp_path, progress=False)
    eig = f.eigendecompose()
    assert (tmp_path / "eigen.safetensors").exists()
    for n in f.module_names:
        e = eig[n]
        assert e.eigvals_A.dtype == torch.float64 and (e.eigvals_A >= 0).all()
        assert (e.eigvals_G[:-1] >= e.eigvals_G[1:]).all()
        # decomposed in float64, eigenvectors kept in the factors' float32
        assert e.eigvecs_A.dtype == e.eigvecs_G.dtype == torch.float32
        UG, UA = e.eigvecs_G.double(), e.eigvecs_A.double()
        rebuilt = UG @ torch.diag(e.eigvals_G) @ UG.T
        torch.testing.assert_close(rebuilt, f.G[n].double(), atol=1e-6, rtol=1e-5)
        rebuilt = UA @ torch.diag(e.eigvals_A) @ UA.T
        torch.testing.assert_close(rebuilt, f.A[n].double(), atol=1e-6, rtol=1e-5)
    mtime = (tmp_path / "eigen.safetensors").stat().st_mtime_ns
    again = load_factors(tmp_path).eigendecompose()
    assert (tmp_path / "eigen.safetensors").stat().st_mtime_ns == mtime
    assert torch.equal(again[f.module_names[0]].eigvecs_G, eig[f.module_names[0]].eigvecs_G)


def test_wrong_target_names_give_a_clear_error(llama):
    with pytest.raises(ValueError, match=r"(?s)No linear layer matches.*nonexistent_proj.*layers\.\*\.mlp\.gate_proj"):
        fit_factors(llama, padded_dataset(), FactorConfig(target_modules=["nonexistent_proj"]), progress=False)
    with pytest.raises(ValueError, match=r"\['nope'\] match no linear layer"):
        resolve_target_modules(llama, ["gate_proj", "nope"])


def test_unknown_architecture_lists_linear_modules():
    import torch.nn as nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    with pytest.raises(ValueError, match=r"no default target modules.*\n.*body\.0"):
        resolve_target_modules(Toy())
    assert resolve_target_modules(Toy(), r"body\.\d") == ["body.0", "body.2"]
    assert resolve_target_modules(Toy(), ["body.*"]) == ["body.0", "body.2"]


def test_factors_from_another_model_are_refused(tmp_path, llama):
    ds = Dataset.from_dict({"input_ids": random_token_rows(8, lo=10, hi=30)})
    fit_factors(llama, ds, FactorConfig(seq_len=16, batch_size=2), tmp_path, progress=False)
    wider = tiny_llama(intermediate_size=48)
    with pytest.raises(ValueError,
                       match=r"gate_proj: factors are for \(d_out, d_in\)=\(64, 32\), the model has \(48, 32\)"):
        load_factors(tmp_path, wider)
    with pytest.raises(ValueError, match="model_type: factors are for 'llama', the model is 'gpt2'"):
        load_factors(tmp_path, tiny_gpt2())
    with pytest.raises(FileExistsError, match="other settings"):
        fit_factors(llama, ds, FactorConfig(seq_len=16, batch_size=2, label_mode="empirical"), tmp_path, progress=False)


def test_bad_config_values():
    with pytest.raises(ValueError, match="label_mode"):
        FactorConfig(label_mode="gold")
    with pytest.raises(ValueError, match="seq_len"):
        FactorConfig(seq_len=1)
    with pytest.raises(ValueError, match="unknown FactorConfig fields"):
        FactorConfig.from_dict({"seq_length": 3})


def test_missing_text_column(llama):
    with pytest.raises(KeyError, match="text_column"):
        fit_factors(llama, Dataset.from_dict({"content": ["a b"]}), FactorConfig(), progress=False)


@pytest.mark.parametrize("d,acc_dtype", [(517, torch.float32), (300, torch.float64), (64, torch.float32)])
def test_upper_triangle_accumulation_equals_full_gram(d, acc_dtype):
    x = torch.randn(40, d, dtype=torch.float32)
    acc = torch.zeros(d, d, dtype=acc_dtype)
    accumulate_upper(acc, x)
    accumulate_upper(acc, 2 * x)
    full = mirror_upper(acc)
    want = 5 * (x.double().T @ x.double())
    assert torch.equal(full, full.T)
    torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-4)
    # in place and idempotent: a resumed run accumulates into a mirrored sum and mirrors again
    assert full is acc
    accumulate_upper(acc, x)
    again = mirror_upper(acc)
    assert torch.equal(again, again.T)
    torch.testing.assert_close(again.double(), want * 6 / 5, rtol=1e-5, atol=1e-4)
    stack = torch.zeros(2, d, d, dtype=acc_dtype)
    accumulate_upper(stack[1], x)
    mirror_upper(stack)
    assert not stack[0].any() and torch.equal(stack[1], stack[1].T)
    torch.testing.assert_close(stack[1].double(), want / 5, rtol=1e-5, atol=1e-4)


@slow
def test_device_map_and_fp16_loaded_models(tmp_path, llama):
    """Models loaded with device_map (accelerate hooks) or in fp16 give the fp32 factors."""
    from transformers import AutoModelForCausalLM

    llama.save_pretrained(tmp_path / "m")
    ds = Dataset.from_dict({"input_ids": random_token_rows(6, lo=10, hi=30)})
    cfg = FactorConfig(seq_len=16, batch_size=3, label_mode="empirical")
    ref = fit_factors(llama, ds, cfg, progress=False)
    from accelerate import dispatch_model

    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="cpu")
    # transformers 5 attaches no hooks for a single-device map; dispatch per block as a multi-device map would
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    mapped = dispatch_model(mapped, device_map=device_map, force_hooks=True)
    assert hasattr(mapped, "hf_device_map") and any(hasattr(m, "_hf_hook") for m in mapped.modules())
    got = fit_factors(mapped, ds, cfg, progress=False)
    half = fit_factors(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float16), ds, cfg,
                       progress=False)
    for n in ref.module_names:
        torch.testing.assert_close(got.G[n], ref.G[n])
        torch.testing.assert_close(got.A[n], ref.A[n])
        assert half.A[n].dtype == torch.float32 and torch.isfinite(half.G[n]).all()
        assert (half.A[n] - ref.A[n]).norm() / ref.A[n].norm() < 0.01


class LastTokenClassificationTask:
    """A user's own task: sequence classification from the last token (not shipped; shows the FactorTask protocol).

    Samples are every real token; the loss is the summed cross-entropy of the class logits against the data's labels.
    """

    name = "sequence-classification"
    unit = "seq"

    def validate(self, model, config):
        if config.label_mode != "empirical":
            raise ValueError("this task reads labels from the data")

    def prepare_data(self, model, data, config, processor):
        from hf_curvedit.curvature import PreparedData

        def to_tensors(rows):
            return {"input_ids": torch.tensor(rows["input_ids"]), "attention_mask": torch.ones(len(rows["input_ids"]),
                    len(rows["input_ids"][0]), dtype=torch.long), "labels": torch.tensor(rows["label"])}

        return PreparedData(data, to_tensors, None, len(data[0]["input_ids"]))

    def sample_positions(self, batch, config):
        return batch["attention_mask"].bool()

    def compute_loss(self, model, batch, config, batch_index):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def example_batch(self, model, config):
        return {"input_ids": torch.zeros(1, 2, dtype=torch.long)}


def test_a_users_own_task_collects_factors_that_match_brute_force():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hf_curvedit.curvature import FactorTask

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=61, num_labels=3, pad_token_id=0)).eval()
    task = LastTokenClassificationTask()
    assert isinstance(task, FactorTask)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 61, (6, 10), generator=gen)
    labels = torch.randint(0, 3, (6,), generator=gen)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "label": labels.tolist()})
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    cfg = FactorConfig(target_modules=names, label_mode="empirical", batch_size=4, accumulate_dtype="float64")
    factors = fit_factors(model, ds, cfg, task=task, progress=False)

    # brute force: every token is a sample; g is the gradient of the summed loss w.r.t. the module's output
    with record_module_io(model, names) as (ins, outs):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        for o in outs.values():
            o.retain_grad()
        torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").backward()
    for n in names:
        a = ins[n].detach().reshape(-1, ins[n].shape[-1]).double()
        g = outs[n].grad.reshape(-1, outs[n].shape[-1]).double()
        assert factors.num_tokens[n] == ids.numel()
        torch.testing.assert_close(factors.A[n], a.T @ a / ids.numel(), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(factors.G[n], g.T @ g / ids.numel(), rtol=1e-5, atol=1e-10)
    with pytest.raises(ValueError, match="reads labels from the data"):
        fit_factors(model, ds, FactorConfig(target_modules=names), task=task, progress=False)


@pytest.mark.parametrize("dtype,loss_dtype,tol", [(torch.float32, torch.float32, 1e-6), (torch.float64, torch.float64,
                                                                                       1e-13),
                                                  (torch.bfloat16, torch.float32, 1e-2)])
def test_summed_cross_entropy_is_the_cross_entropy(dtype, loss_dtype, tol):
    """The chunked loss of the causal-LM task gives F.cross_entropy's value and gradient (ignored rows included),
    over more rows than one chunk holds."""
    from hf_curvedit.curvature.tasks import summed_cross_entropy

    g = torch.Generator().manual_seed(0)
    z = torch.randn(700, 9000, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 9000, (700,), generator=g)
    t[::7] = -100
    got = summed_cross_entropy(z * 1.0, t, loss_dtype)
    (g_got,) = torch.autograd.grad(got * 2.5, z)
    want = F.cross_entropy((z * 1.0).to(loss_dtype), t, ignore_index=-100, reduction="sum")
    (g_want,) = torch.autograd.grad(want * 2.5, z)
    assert got.dtype == loss_dtype and abs(float(got) - float(want)) <= tol * abs(float(want))
    assert g_got.dtype == dtype and (g_got.double() - g_want.double()).abs().max() <= tol
    assert not g_got[::7].any()


def test_bfloat16_storage_halves_the_file_and_keeps_the_selection(tmp_path, llama):
    """storage_dtype='bfloat16' writes and keeps the finished factors in bfloat16 (accumulated in float32); they load,
    verify and eigendecompose, and the edit keeps almost the same staircase."""
    from hf_curvedit.selection import curvature_mass_cutoffs

    ds = Dataset.from_dict({"input_ids": random_token_rows(8, lo=10, hi=30)})
    full = fit_factors(llama, ds, FactorConfig(seq_len=16, batch_size=2), tmp_path / "f32", progress=False)
    half = fit_factors(llama, ds, FactorConfig(seq_len=16, batch_size=2, storage_dtype="bfloat16"), tmp_path / "bf16",
                       progress=False)
    size = lambda d: (d / "factors.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "bf16") < 0.6 * size(tmp_path / "f32")
    loaded = load_factors(tmp_path / "bf16")
    for n in full.module_names:
        assert loaded.A[n].dtype == loaded.G[n].dtype == half.G[n].dtype == torch.bfloat16
        torch.testing.assert_close(loaded.G[n].float(), full.G[n], rtol=1e-2, atol=1e-2 * float(full.G[n].abs().max()))
    e32, e16 = full.eigendecompose(), loaded.eigendecompose()
    for n in full.module_names:
        a = curvature_mass_cutoffs(e32[n].eigvals_G, e32[n].eigvals_A, 0.8).mask()
        b = curvature_mass_cutoffs(e16[n].eigvals_G, e16[n].eigvals_A, 0.8).mask()
        assert (a != b).double().mean() < 0.02
    with pytest.raises(ValueError, match="storage_dtype"):
        FactorConfig(storage_dtype="float16")
