"""The embedded default: a small byte-level Llama and text that every Python install ships.

Nothing here touches the network. The text is the documentation of Python's own standard library
(module, class and function docstrings), so it is "ordinary text" available offline everywhere.

The shipped checkpoint (``assets/default_model``, trained by ``scripts/train_default_model.py``) has
memorized a "memorized set" of 32 fake-secret canaries and 100 repeated passages
(:func:`load_memorized_set`); its held-out perplexity text is :func:`load_heldout_text`. Fit the
curvature factors on general text only (``default_text_dataset("train")``), never on the memorized
set: when memorized text dominates the factor data the trade-off gets worse (docs/method.md §6).
``scripts/memorization_sweep.py`` measures the edit on it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .errors import InputError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "default_model"
# Local lm-evaluation-harness tasks: the default model's held-out skills (items written by
# scripts/train_default_model.py).
LM_EVAL_TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"

# Modules whose docs make up the default factor text. Fixed and sorted so the text is the same
# on every run of the same Python version.
STDLIB_MODULES = (
    "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io",
    "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.etree.ElementTree",
    "zipfile", "zlib",
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ``<pad>`` and ``<eos>``): any text, no vocabulary file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<eos>", unk_token=None)


def stdlib_docs(modules: tuple[str, ...] = STDLIB_MODULES, min_chars: int = 200) -> list[str]:
    """Docstrings of the standard library (one document per module, class or function)."""
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            objs = [mod] + [getattr(mod, a) for a in sorted(vars(mod)) if not a.startswith("_")]
            for obj in objs:
                if obj is not mod and getattr(obj, "__module__", None) != mod.__name__:
                    continue
                doc = (inspect.getdoc(obj)
                       if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)) else None)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def default_text_dataset(split: str = "train", heldout_every: int = 10) -> Dataset:
    """Standard-library docs as a ``Dataset`` with a ``text`` column; every 10th document is ``"test"``."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    docs = stdlib_docs()
    keep = [d for i, d in enumerate(docs) if (i % heldout_every == 0) == (split == "test")]
    return Dataset.from_dict({"text": keep})


def default_model_config() -> LlamaConfig:
    """The default architecture: a 4-layer byte-level Llama (hidden 160, MLP 640)."""
    tok = byte_tokenizer()
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=160, intermediate_size=640, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The embedded default model and its tokenizer.

    The trained checkpoint shipped in ``hf_curvedit/assets/default_model`` when present; otherwise
    a randomly initialised model of the same architecture (seed 0).
    """
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=dtype)
        tok = PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL_DIR)
        return model.eval(), tok
    torch.manual_seed(0)
    model = LlamaForCausalLM(default_model_config()).to(dtype)
    model.config._name_or_path = "hf-curvedit/default-random-init"
    return model.eval(), byte_tokenizer()


MEMORIZED_SET_FILENAME = "memorized_set.jsonl"
HELDOUT_FILENAME = "heldout.jsonl"


def load_memorized_set(model_dir: str | Path = DEFAULT_MODEL_DIR, kind: str | None = None) -> list[dict]:
    """The memorized set shipped with the default model: canaries and repeated passages.

    One dict per item with ``kind`` (``"canary"`` or ``"passage"``), ``id``, ``text``, ``prefix``,
    ``suffix`` (``prefix + suffix == text``), ``repeats`` (times seen in training) and, for canaries,
    ``secret`` and ``secret_type``. ``scripts/train_default_model.py`` generates it (deterministically).

    Args:
        kind: keep only ``"canary"`` or ``"passage"`` items.
    """
    path = Path(model_dir) / MEMORIZED_SET_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train the default model with scripts/train_default_model.py")
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [it for it in items if kind is None or it["kind"] == kind]


def memorized_prefix_suffix_ids(tokenizer: PreTrainedTokenizerFast, model_dir: str | Path = DEFAULT_MODEL_DIR,
                                 kind: str | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Token-id (prefixes, suffixes) of the memorized set, for ``evaluate_recitation``.

    Each prefix starts with ``<eos>``, as every document did in training; the suffix is the last 32
    bytes of a passage, or a canary's secret plus its final period.
    """
    items = load_memorized_set(model_dir, kind)
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [[tokenizer.eos_token_id] + ids(it["prefix"]) for it in items], [ids(it["suffix"]) for it in items]


def load_heldout_text(model_dir: str | Path = DEFAULT_MODEL_DIR) -> list[str]:
    """The held-out documents (never trained on) that the default model's perplexity is measured on."""
    path = Path(model_dir) / HELDOUT_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train the default model with scripts/train_default_model.py")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
