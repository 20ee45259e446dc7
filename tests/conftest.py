"""Test setup: offline Hugging Face libraries, and fixtures. Shared helpers are in ``testing_utils.py``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from testing_utils import tiny_gpt2, tiny_llama  # noqa: E402

# the local Hub-compatible server and the `hub` fixture that points huggingface_hub at it
pytest_plugins = ["hub_fixtures"]


@pytest.fixture
def model_dir(tmp_path):
    """A folder holding a tiny Llama with the byte tokenizer, as `from_pretrained` and the CLI's --model read it."""
    from hf_curvedit.default import byte_tokenizer

    tok = byte_tokenizer()
    d = tmp_path / "model"
    tiny_llama(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model and its tokenizer, loaded once per test run: for tests that only read it (a test
    that edits it loads its own)."""
    from hf_curvedit.default import load_default_model

    return load_default_model()
