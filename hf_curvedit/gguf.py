"""GGUF in: a model read from a GGUF file (llama.cpp's format: what Ollama, LM Studio and llama.cpp run) as an
ordinary transformers model, and the file an edit was built on recorded by its SHA-256. Writing an edit back as GGUF
is `hf_curvedit.publish.gguf.export_gguf`.

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``) and dequantizes it; the `gguf` package (the
``[gguf]`` extra) reads, writes and quantizes the files.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .utils import parse_dtype

__all__ = ["GGUF_SOURCE_ATTR", "INSTALL_HINT", "gguf_source", "gguf_source_of", "load_gguf_model", "require_gguf",
           "split_gguf_path"]

INSTALL_HINT = "pip install 'hf-curvedit[gguf]'"
# where a model loaded by `load_gguf_model` keeps which file it came from (read when an edit is built or loaded)
GGUF_SOURCE_ATTR = "curvedit_gguf_source"


def require_gguf() -> Any:
    """The `gguf` module, or an error that names the extra to install."""
    try:
        import gguf
    except ImportError:
        raise InputError(f"reading or writing GGUF files needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def split_gguf_path(model: str | Path | None, gguf_file: str | Path) -> tuple[Path, str]:
    """``(folder, file name)`` of a GGUF file given as a name inside the folder ``model``, or as a path (then
    ``model`` may be None)."""
    path = Path(gguf_file).expanduser()
    if model is not None and not path.is_absolute() and (Path(model).expanduser() / path).exists():
        path = Path(model).expanduser() / path
    if not path.is_file():
        where = f" in {model}" if model is not None else ""
        raise InputError(f"GGUF file {str(gguf_file)!r} not found{where}: give --gguf-file as a file name inside "
                         "--model's folder or as a path to a .gguf file")
    return path.parent, path.name


def gguf_source(path: str | Path) -> dict[str, str]:
    """``{"file": name, "sha256": digest}`` of a GGUF file (huggingface_hub's streaming SHA-256)."""
    from huggingface_hub.utils import sha

    path = Path(path)
    with open(path, "rb") as f:
        return {"file": path.name, "sha256": sha.sha_fileobj(f).hex()}


def gguf_source_of(model: torch.nn.Module) -> dict[str, str] | None:
    """The GGUF file ``model`` was read from (`gguf_source`), when it was read from one: `load_gguf_model` records it;
    transformers' own GGUF loader leaves its path in the quantization config (transformers >= 5.23)."""
    base = getattr(model, "get_base_model", lambda: model)()
    recorded = getattr(base, GGUF_SOURCE_ATTR, None)
    if recorded is not None:
        return dict(recorded)
    qc = getattr(getattr(base, "config", None), "quantization_config", None)
    name = getattr(qc, "gguf_file", None) or (qc.get("gguf_file") if isinstance(qc, dict) else None)
    if not name:
        return None
    path = Path(name) if Path(name).is_file() else Path(getattr(base, "name_or_path", "")) / name
    return gguf_source(path) if path.is_file() else None


def load_gguf_model(model: str | Path | None, gguf_file: str | Path, dtype: str | torch.dtype = "float32"
                    ) -> tuple[Any, Any]:
    """``(model, tokenizer)`` read from a GGUF file by transformers, dequantized into plain weights that an edit can
    change and ``save_pretrained`` can write as safetensors; the file and its SHA-256 are recorded on the model.

    Args:
        model: the folder that holds the file (or None when ``gguf_file`` is a path).
        gguf_file: the file's name in ``model``, or its path.
        dtype: the dtype the weights are dequantized to.
    """
    require_gguf()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = split_gguf_path(model, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": name, "dtype": parse_dtype(dtype)}
    config_class = getattr(transformers, "GgufConfig", None)
    if config_class is not None and "dequantize" in inspect.signature(config_class).parameters:
        # transformers >= 5.23 can keep GGUF blocks packed behind a kernel; an edit needs the weights themselves
        kwargs["quantization_config"] = config_class(dequantize=True)
    try:
        net = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"transformers could not read {folder / name} as a GGUF model: {e}") from e
    # the weights are plain tensors now: what refuses save_pretrained ("quantized with gguf and is not serializable")
    # is only the loader's record of where they came from
    net.hf_quantizer = None
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(net):
            delattr(net, attr)
    setattr(net, GGUF_SOURCE_ATTR, gguf_source(folder / name))
    return net.eval(), tokenizer
