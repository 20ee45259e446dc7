"""Shared fixtures: tiny models built from configs (no downloads) and small token datasets."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
from typing import Iterator

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 61


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


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


def random_token_rows(n: int, lo: int = 3, hi: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return [torch.randint(1, VOCAB, (int(l),), generator=g).tolist() for l in lengths]
