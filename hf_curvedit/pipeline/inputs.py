"""The inputs the pipeline's steps share: `load_model` (a causal LM or image classifier with its tokenizer or
processor, the embedded default without a name), the recitation sets (`load_recitation_set`, `recitation_sets`,
`default_recitation_sets`) and the held-out texts for perplexity (`heldout_texts`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .fields import UsageError


def _check_local(name: str, what: str) -> None:
    # A name that reads as a path is never sent to the Hub as a repo id: a missing folder is a usage error.
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise UsageError(f"could not load {what} {name!r}: that folder does not exist")


def load_model(name: str | None = None, dtype: str = "float32", device_map: str | None = None,
               gguf_file: str | None = None) -> tuple[Any, Any]:
    """``(model, processor)``: a causal LM with its tokenizer, or an image classifier (by its config's
    architectures) with its image processor; the embedded default without ``name``. A GGUF file (``gguf_file`` in the
    folder ``name``, or ``name`` itself ending in ``.gguf``) is read by transformers and dequantized
    (`hf_curvedit.gguf.load_gguf_model`)."""
    from ..default import load_default_model
    from ..utils import parse_dtype

    if gguf_file is not None or (name is not None and str(name).endswith(".gguf")):
        from ..gguf import load_gguf_model

        return load_gguf_model(name if gguf_file is not None else None, gguf_file or str(name), dtype)
    if name is None:
        return load_default_model(parse_dtype(dtype))
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoTokenizer,
    )

    _check_local(name, "model")
    check_local_weights(name)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        archs = getattr(AutoConfig.from_pretrained(name), "architectures", None) or []
        if any(a.endswith("ForImageClassification") for a in archs):
            return (AutoModelForImageClassification.from_pretrained(name, **kwargs).eval(),
                    AutoImageProcessor.from_pretrained(name))
        return AutoModelForCausalLM.from_pretrained(name, **kwargs).eval(), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load model {name!r}: {e}") from e


def check_local_weights(name: str) -> None:
    """Read the header of every safetensors file of a local model folder, so that a truncated or damaged file is
    reported by name (with the fix) before transformers starts loading."""
    from ..integrity import open_safetensors

    folder = Path(name).expanduser()
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")):
            with open_safetensors(f, "model weights", "Download or save the model again, or restore the file"):
                pass


def load_config(name: str | None = None) -> Any:
    """The transformers config of a model id or local folder (no weights are read); the embedded default's without
    ``name``."""
    from transformers import AutoConfig

    from ..default import DEFAULT_MODEL_DIR

    if name is not None and str(name).endswith(".gguf"):  # the config a GGUF file's metadata describes
        from ..gguf import require_gguf, split_gguf_path

        require_gguf()
        folder, file = split_gguf_path(None, name)
        return AutoConfig.from_pretrained(folder, gguf_file=file)
    if name is not None:
        _check_local(name, "the config of")
    try:
        return AutoConfig.from_pretrained(name if name is not None else str(DEFAULT_MODEL_DIR))
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load the config of {name!r}: {e}") from e


def load_recitation_set(path: str | Path, tokenizer: Any, suffix_tokens: int = 8, name: str = "") -> Any:
    """A `RecitationSet` from a ``save_to_disk`` folder (prefix_ids/suffix_ids, e.g. from find_memorized_windows),
    or from a .txt (one text a line) or .jsonl (a ``text`` field) file whose last ``suffix_tokens`` tokens are the
    suffix."""
    from ..evaluation import RecitationSet

    p = Path(path)
    label = f"recitation set {name!r} ({p})" if name else f"recitation set {p}"
    if not p.exists():
        raise UsageError(f"{label}: {p} does not exist")
    if p.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(p))
        except (OSError, ValueError) as err:
            raise UsageError(f"{label}: not a folder written by Dataset.save_to_disk ({err})") from None
        missing = {"prefix_ids", "suffix_ids"} - set(ds.column_names)
        if missing:
            raise UsageError(f"{label}: the dataset has columns {ds.column_names}, and a recitation set needs "
                             f"{sorted(missing)} (token ids of each item's prefix and suffix)")
        return RecitationSet.from_dataset(ds)
    expect = ("one JSON object with a \"text\" field per line" if p.suffix == ".jsonl"
              else "one text per line (a .txt file), or a .jsonl file with a \"text\" field per line")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{label}: not UTF-8 text (byte {err.start}); it is binary or in another encoding. Give "
                         f"{expect}") from None
    lines = [(n, ln) for n, ln in enumerate(raw.splitlines(), 1) if ln.strip()]
    if not lines:
        raise UsageError(f"{label}: the file is empty; give {expect}")
    if p.suffix == ".jsonl":
        texts = []
        for n, ln in lines:
            try:
                obj = json.loads(ln)
            except ValueError as err:
                raise UsageError(f"{label}, line {n}: not valid JSON ({err}); give {expect}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise UsageError(f"{label}, line {n}: has {keys}, not a \"text\" string; give {expect}")
            texts.append(obj["text"])
    else:
        texts = [ln for _, ln in lines]
    return RecitationSet.from_texts(texts, tokenizer, suffix_tokens=suffix_tokens, add_special_tokens=False)


def recitation_sets(specs: Mapping[str, str | Path], tokenizer: Any, suffix_tokens: int = 8) -> dict[str, Any]:
    """NAME → `RecitationSet` for NAME → PATH (see `load_recitation_set`)."""
    return {n: load_recitation_set(p, tokenizer, suffix_tokens, n) for n, p in specs.items()}


def default_recitation_sets(tokenizer: Any) -> dict[str, Any]:
    """The embedded default's memorized set: its repeated passages and its secret canaries."""
    from ..default import DEFAULT_MODEL_DIR, MEMORIZED_SET_FILENAME, memorized_prefix_suffix_ids
    from ..evaluation import RecitationSet

    if not (DEFAULT_MODEL_DIR / MEMORIZED_SET_FILENAME).exists():
        raise UsageError("no recitation set given and the embedded default ships no memorized set; pass "
                         "--recitation NAME=PATH")
    return {name: RecitationSet(*memorized_prefix_suffix_ids(tokenizer, kind=kind))
            for name, kind in (("passages", "passage"), ("canaries", "canary"))}


def heldout_texts(heldout: str | None = None, text_column: str = "text", *,
                  default_model: bool = False) -> list[str]:
    """Held-out texts for perplexity: the ``text_column`` of ``heldout`` (a file, folder or dataset name); else the
    embedded default's held-out documents (``default_model``), else the held-out split of the stdlib docs."""
    if heldout:
        from ..data import load_text_dataset

        return list(load_text_dataset(heldout)[text_column])
    from ..default import DEFAULT_MODEL_DIR, HELDOUT_FILENAME, default_text_dataset, load_heldout_text

    if default_model and (DEFAULT_MODEL_DIR / HELDOUT_FILENAME).exists():
        return load_heldout_text()
    return list(default_text_dataset("test")["text"])


def clean_texts(clean: str | None = None, text_column: str = "text") -> list[str]:
    """Text a baseline may train on to keep (BalancedSubnet's λ term): the ``text_column`` of ``clean`` (a file, folder
    or dataset name), else the training split of the stdlib docs (the default factor data, never the held-out text)."""
    if clean:
        from ..data import load_text_dataset

        return list(load_text_dataset(clean)[text_column])
    from ..default import default_text_dataset

    return list(default_text_dataset("train")["text"])
