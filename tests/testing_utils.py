"""Helpers shared by the tests: tiny models built from configs, random factors, brute-force references.

Fixtures live in ``conftest.py``; everything a test module imports lives here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_curvedit import KFACEigen, ModuleEigen
from hf_curvedit.curvature.eigen import symmetric_eigh
from hf_curvedit.targets import linear_shape, resolve_target_modules, weight_targets
from hf_curvedit.tuner import CurvatureEditLayer

VOCAB = 61


def parse_flag_from_env(key: str, default: bool = False) -> bool:
    """A yes/no environment variable, read as transformers' ``testing_utils.parse_flag_from_env`` reads it."""
    value = os.environ.get(key)
    if value is None:
        return default
    if value.lower() in ("y", "yes", "t", "true", "on", "1"):
        return True
    if value.lower() in ("n", "no", "f", "false", "off", "0"):
        return False
    raise ValueError(f"{key}={value!r}: set it to yes or no (1 or 0)")


RUN_SLOW = parse_flag_from_env("RUN_SLOW")
# a slow test is marked `slow` (`pytest -m slow` selects them) and skipped unless RUN_SLOW is set
SLOW = (pytest.mark.slow, pytest.mark.skipif(not RUN_SLOW, reason="slow: set RUN_SLOW=1 to run it"))


def slow(test_case):
    """Decorator marking a test as slow, as ``transformers.testing_utils.slow`` does: skipped unless RUN_SLOW=1 (the
    README's test command runs the others; CI runs both)."""
    for mark in SLOW:
        test_case = mark(test_case)
    return test_case


def slow_param(*values, id: str | None = None):
    """One parametrization case that is slow (see `slow`), e.g. ``slow_param("swin")``."""
    return pytest.param(*values, marks=SLOW, id=id)


@contextlib.contextmanager
def record_module_io(model: torch.nn.Module, names: list[str]) -> Iterator[tuple[dict, dict]]:
    """Record the first input and the output of each named module during the forward passes in the block."""
    mods = dict(model.named_modules())
    ins: dict = {}
    outs: dict = {}

    def capture(n):
        def hook(module, inputs, output):
            ins[n], outs[n] = inputs[0], output
        return hook

    hooks = [mods[n].register_forward_hook(capture(n)) for n in names]
    try:
        yield ins, outs
    finally:
        for h in hooks:
            h.remove()


def assert_reloads_the_same(model: torch.nn.Module, reloaded: torch.nn.Module, logits, message: str) -> None:
    """A saved and reloaded model holds the same weights, bit for bit, and gives the same logits to float round-off:
    memory-mapped tensors can sit at another alignment than freshly allocated ones, and some CPU kernels round
    differently on them (3e-8 on a tiny Gemma 4 with safetensors 0.8)."""
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys(), f"{message}: {sorted(set(ours) ^ set(theirs))}"
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not changed, f"{message}: {changed[:4]}"
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-6, msg=message)


def assert_same_adapter_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Two adapters' tensors are the same edit: every tensor bit for bit but the weight fingerprints, which a float32
    matrix product computes and which round differently with the CPU and the number of threads (by ~1e-8); they are
    compared as loading compares them (`fingerprint_mismatch`), and to 1e-7."""
    from hf_curvedit.edit.fingerprint import fingerprint_mismatch

    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k, t in want.items():
        if "curvedit_fingerprint" in k:  # one row per expert of an experts projection
            assert all(fingerprint_mismatch(a, b) is None for a, b in zip(t.reshape(-1, t.shape[-1]),
                                                                          got[k].reshape(-1, t.shape[-1]))), k
            torch.testing.assert_close(got[k], t, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(got[k], t), k


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, pad_token_id=0)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def random_token_rows(n: int, lo: int = 3, hi: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return [torch.randint(1, VOCAB, (int(length),), generator=g).tolist() for length in lengths]


@functools.cache
def fitted_tiny_llama(num_hidden_layers: int = 2) -> tuple:
    """``(data, factors, eigen)`` of `tiny_llama` with that many layers, fitted once per test run on 24 random rows
    (the sweep and allocation tests share them): every caller builds its own model, the same weights."""
    from datasets import Dataset

    from hf_curvedit import FactorConfig, fit_factors

    data = Dataset.from_dict({"input_ids": random_token_rows(24, lo=10, hi=30, seed=2)})
    factors = fit_factors(tiny_llama(num_hidden_layers=num_hidden_layers), data, FactorConfig(seq_len=16, batch_size=8),
                          progress=False)
    return data, factors, factors.eigendecompose()


# ------------------------------------------------------------ the adapter tests' models and factors
EDIT_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)


def edit_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The Llama the adapter tests edit (hidden 64, MLP 128, vocabulary 128)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**EDIT_LLAMA, **overrides})).eval()


def edit_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """The GPT-2 the adapter tests edit (Conv1D layers, tied lm_head)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    # a spread spectrum, like real activation / gradient covariances
    X = torch.randn(n, 2 * n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)[:, None]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ (X @ X.T) @ Q.T / (2 * n)


@functools.cache
def _random_eigen(shapes: tuple[tuple[str, int, int], ...], seed: int) -> KFACEigen:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d_out, d_in in shapes:
        la, va = symmetric_eigh(_spd(d_in, g))
        lg, vg = symmetric_eigh(_spd(d_out, g))
        out[name] = ModuleEigen(la, va, lg, vg)
    return KFACEigen(out, {"num_tokens": 1000, "model_name_or_path": "tiny"})


def random_eigen(model: torch.nn.Module, seed: int = 1, names: list[str] | None = None) -> KFACEigen:
    """Eigenbases of random SPD factors for the targeted modules (cached: eigh is slow on a busy 2-core box)."""
    shapes = tuple((n, *linear_shape(model.get_submodule(n))) for n in (names or resolve_target_modules(model)))
    return _random_eigen(shapes, seed)


def logical_weight(module: torch.nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def dense_edit(weight: torch.Tensor, e: ModuleEigen, rho: float) -> torch.Tensor:
    """W' = U_G (M ∘ C) U_Aᵀ in float64, with M from a brute-force sort of all products."""
    W = weight.double()
    UG, UA = e.eigvecs_G.double(), e.eigvecs_A.double()
    C = UG.T @ W @ UA
    M = brute_force_mask(e.eigvals_G, e.eigvals_A, rho)
    return UG @ (C * M) @ UA.T


def ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def edit_layers(model) -> dict[str, CurvatureEditLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, CurvatureEditLayer)}


def brute_force_mask(lam: torch.Tensor, mu: torch.Tensor, rho: float) -> torch.Tensor:
    """Sort all products by (Π desc, i asc, j asc), keep the shortest prefix whose mass reaches ρ·total."""
    lam = lam.double()
    mu = mu.double()
    prods = (lam[:, None] * mu[None, :]).reshape(-1)
    # row-major flattening + stable sort = the documented tie rule
    order = torch.sort(prods, descending=True, stable=True).indices
    positive = prods[order] > 0
    if rho >= 1.0:
        n_take = int(positive.sum())
    else:
        cum = torch.cumsum(prods[order], 0)
        total = float(cum[-1])
        n_take = int(torch.nonzero(cum >= rho * total)[0]) + 1
    mask = torch.zeros(prods.numel(), dtype=torch.bool)
    mask[order[:n_take]] = True
    return mask.reshape(lam.numel(), mu.numel())


def write_choice_task(folder: Path, name: str, items: list[tuple[str, int]]) -> Path:
    """A local lm-eval multiple-choice task ``name`` (choices yes/no; ``items`` = (question, label)) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"q": q, "label": y}) + "\n" for q, y in items))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['yes', 'no']\ndoc_to_target: '{{label}}'\n"
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\nmetadata: {version: 1.0}\n")
    return folder


@torch.no_grad()
def best_choice(model, context_ids: list[int], choices_ids: list[list[int]]) -> int:
    """The choice whose tokens have the highest summed log-probability after ``context_ids`` (the first on a tie): how
    lm-eval's ``multiple_choice`` tasks score ``acc``, computed by hand in fp64."""
    scores = []
    for cont in choices_ids:
        logp = torch.log_softmax(model(input_ids=torch.tensor([context_ids + cont])).logits[0].double(), -1)
        scores.append(float(sum(logp[len(context_ids) - 1 + i, t] for i, t in enumerate(cont))))
    return max(range(len(scores)), key=scores.__getitem__)


def brute_force_lambda(model, rows, names, eigen):
    """EK-FAC's Λ by brute force: per sequence, autograd's gradient of each target's weight (the summed next-token loss
    of that sequence alone), rotated into the eigenbasis and squared; averaged over sequences. float64. A linear
    layer's gradient is of its stored weight (a transposed basis serves a Conv1D); an expert projection's is read in
    the logical (experts, d_out, d_in) form, each expert rotated into its own basis (the tokens routed to it by the
    model's own top-k), whatever the experts layout."""
    targets = weight_targets(model)
    params = {n: targets[n].parameter() for n in names}
    for p in params.values():
        p.requires_grad_(True)
    total = {n: torch.zeros(targets[n].shape if targets[n].is_experts else params[n].shape, dtype=torch.float64)
             for n in names}

    def rotated(basis, D):
        return (basis.eigvecs_G.double().T @ D.double() @ basis.eigvecs_A.double()) ** 2

    try:
        for r in rows:
            ids = torch.tensor([r])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits.double(), ids[0, 1:], reduction="sum")
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, D in zip(names, grads):
                if targets[n].is_experts:
                    D = targets[n].to_logical(D)
                    for x in range(D.shape[0]):
                        total[n][x] += rotated(eigen[n].expert(x), D[x])
                else:
                    total[n] += rotated(eigen[n], D)
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return {n: t / len(rows) for n, t in total.items()}


def mixed_experts_projection(target, generator: torch.Generator, shift: int, width: int = 16) -> tuple:
    """An `ExpertsProjection` of the experts projection ``target`` whose experts are in turn unedited, factored (rank
    3, zero-padded to ``width`` as the stores are) and dense (float64), starting at ``shift``; and the stored parameter
    that substituting each expert's ``W'`` gives: ``(projection, substituted)``."""
    from hf_curvedit.tuner.experts_forward import BASE, DENSE, FACTORED, ExpertsProjection

    base = target.logical_weight().detach()
    num, d_out, d_in = base.shape
    kind = torch.tensor([(e + shift) % 3 for e in range(num)])  # BASE, FACTORED, DENSE in turn
    g = generator
    out, inp = torch.randn(num, d_out, width, generator=g).double(), torch.randn(num, d_in, width, generator=g).double()
    out[:, :, 3:] = 0
    dense = torch.randn(num, d_out, d_in, generator=g).double() / d_in
    want = torch.where((kind == FACTORED)[:, None, None], out @ inp.mT,
                       torch.where((kind == DENSE)[:, None, None], dense, base))
    slot = torch.zeros(num, dtype=torch.long)
    for k in (FACTORED, DENSE):
        slot[kind == k] = torch.arange(int((kind == k).sum()))
    projection = ExpertsProjection(kind, (BASE, FACTORED, DENSE), slot, inp[kind == FACTORED],
                                   out[kind == FACTORED].mT, dense[kind == DENSE].mT.contiguous())
    return projection, target.to_storage(want)
