"""GGUF out: a merged curvature edit written into a copy of the GGUF file its base was read from (llama.cpp's format:
what Ollama, LM Studio and llama.cpp run): the source's metadata and tokenizer, the edited tensors replaced, quantized
in the source's type or one the caller names, by the `gguf` package (the ``[gguf]`` extra)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..gguf import gguf_source, require_gguf
from ..utils import atomic_path

__all__ = ["WRITABLE_TYPES", "export_gguf", "gguf_card_info", "stage_gguf"]

# the types the gguf package quantizes in Python (the K-quants it can only read)
WRITABLE_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


def _field_value(gguf: Any, field: Any) -> tuple[Any, Any, Any]:
    """``(value, type, element type)`` of a metadata field as the reader holds it."""
    main = field.types[0]
    sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
    if hasattr(field, "contents"):
        return field.contents(), main, sub
    if main == gguf.GGUFValueType.ARRAY:  # gguf < 0.16 has no ReaderField.contents
        if sub == gguf.GGUFValueType.STRING:
            return [str(bytes(field.parts[i]), encoding="utf-8") for i in field.data], main, sub
        return [v for i in field.data for v in field.parts[i].tolist()], main, sub
    if main == gguf.GGUFValueType.STRING:
        return str(bytes(field.parts[-1]), encoding="utf-8"), main, sub
    return field.parts[-1][0], main, sub


def _quantize(gguf: Any, weight: torch.Tensor, qtype: Any) -> Any:
    import numpy as np

    data = weight.detach().to(torch.float32).cpu().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _edited_weights(model: Any, modules: Iterable[str] | None) -> dict[str, torch.Tensor]:
    """Module name → its weight with the edit merged: an edit's own modules (merged, read, unmerged again), or
    ``modules`` of a model whose edit is already merged."""
    from ..tuner.model import CurvatureEditModel

    if hasattr(model, "peft_config") and isinstance(getattr(model, "base_model", None), CurvatureEditModel):
        adapter = model.active_adapter
        names = list(modules or model.peft_config[adapter].edited_modules)
        model.merge_adapter()
        try:
            base = model.get_base_model()
            return {n: base.get_submodule(n).weight.detach().clone() for n in names}
        finally:
            model.unmerge_adapter()
    if modules is None:
        raise InputError("export_gguf needs the edited modules' names (modules=...) for a model whose edit is "
                         "already merged; or pass the PeftModel of the edit")
    if modules == "all":  # every weight, a fine-tuned model's
        return {n: m.weight.detach().clone() for n, m in model.named_modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor)}
    return {n: model.get_submodule(n).weight.detach().clone() for n in modules}


def export_gguf(model: Any, source: str | Path, output: str | Path, *, qtype: str | None = None,
                modules: Iterable[str] | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s edit into a copy of the GGUF file ``source`` at ``output``.

    Every metadata field and every tensor of ``source`` is copied as it is (the tokenizer, the chat template, the
    quantized weights of the modules the edit leaves alone); each edited weight replaces its tensor, quantized in that
    tensor's type in ``source`` or in ``qtype`` (one of `WRITABLE_TYPES`). Keys ``hf_curvedit.*`` record the source
    file's SHA-256 and the tensors replaced.

    Args:
        model: the `PeftModel` of a curvature edit (its edit is merged for the copy and unmerged again), or a model
            whose edit is merged, with ``modules``.
        source: the GGUF file the edited model was read from.
        output: the file to write (atomically).
        qtype: the type of the replaced tensors (default: each one's type in ``source``).
        modules: the edited modules' names (default: the edit's).
        metadata: extra string fields to write (``{"general.name": ...}`` overrides the source's).
    """
    gguf = require_gguf()
    source = Path(source)
    if qtype is not None and qtype.upper() not in WRITABLE_TYPES:
        raise InputError(f"qtype {qtype!r}: the gguf package quantizes {', '.join(WRITABLE_TYPES)} in Python")
    reader = gguf.GGUFReader(str(source))
    arch_name = _field_value(gguf, reader.fields["general.architecture"])[0]
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    blocks = int(_field_value(gguf, reader.fields[f"{arch_name}.block_count"])[0])
    if arch is None:
        raise InputError(f"{source} is a GGUF of architecture {arch_name!r}, which this gguf package does not name")
    names = gguf.get_tensor_name_map(arch, blocks)
    weights = _edited_weights(model, modules)
    tensors = {t.name: t for t in reader.tensors}
    replaced: dict[str, torch.Tensor] = {}
    for module, weight in weights.items():
        key = module.removeprefix("base_model.model.")
        mapped = names.get_name(key)
        if modules == "all" and (mapped is None or f"{mapped}.weight" not in tensors):
            continue  # a weight the file does not hold: a head tied to the embedding, a rotary buffer
        if module.endswith((".q_proj", ".k_proj")):
            if arch_name != "llama":
                raise InputError(f"{module}: how {arch_name} GGUF files store attention q/k is not written here; "
                                 "GGUF export writes their MLP and other projections")
            # llama.cpp interleaves the rotary halves of each head's rows (transformers' loader undoes it)
            key = "llama.attention.head_count" + ("" if module.endswith(".q_proj") else "_kv")
            heads = int(_field_value(gguf, reader.fields[key])[0])
            weight = weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).transpose(1, 2).reshape(weight.shape)
        if mapped is None:
            raise InputError(f"{module} has no tensor name in GGUF's {arch_name} layout (gguf.get_tensor_name_map)")
        replaced[f"{mapped}.weight"] = weight
    missing = sorted(set(replaced) - set(tensors))
    if missing:
        raise InputError(f"{source} has no tensors {missing[:3]} for the edited modules: is it the file the edited "
                         "model was read from?")
    writer_types = {}
    for name, weight in replaced.items():
        src = tensors[name]
        target = gguf.GGMLQuantizationType[qtype.upper()] if qtype else src.tensor_type
        if weight.dim() == 1:  # norms stay float32, as llama.cpp's converter writes them
            target = gguf.GGMLQuantizationType.F32
        if target.name not in WRITABLE_TYPES:
            raise InputError(f"{name} is {target.name} in {source}, which the gguf package cannot write: pass "
                             f"qtype= one of {', '.join(WRITABLE_TYPES)}")
        if tuple(weight.shape) != tuple(int(d) for d in reversed(src.shape.tolist())):
            raise InputError(f"{name}: the edited weight is {tuple(weight.shape)}, the source's tensor "
                             f"{tuple(reversed(src.shape.tolist()))}; is {source} the file the model was read from?")
        writer_types[name] = (_quantize(gguf, weight, target), target)
    add_key_value = gguf.GGUFWriter.add_key_value
    takes_sub_type = "sub_type" in inspect.signature(add_key_value).parameters
    with atomic_path(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        extra = {"hf_curvedit.source_sha256": gguf_source(source)["sha256"],
                 "hf_curvedit.edited_tensors": json.dumps(sorted(replaced)), **dict(metadata or {})}
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in extra:
                continue
            value, vtype, sub = _field_value(gguf, field)
            if takes_sub_type:
                writer.add_key_value(field.name, value, vtype, sub_type=sub)
            else:
                writer.add_key_value(field.name, value, vtype)
        for key, value in extra.items():
            writer.add_string(key, value)
        for t in reader.tensors:
            data, dtype = writer_types.get(t.name, (t.data, t.tensor_type))
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(writer_types.get(t.name, (t.data, None))[0])
        writer.close()
    return Path(output)


def gguf_card_info(path: str | Path, source: str | Path) -> dict[str, Any]:
    """What a model card says of a GGUF file `export_gguf` wrote: its name, its source's name and SHA-256, how many
    tensors the edit replaced and their types."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))
    fields = {name: _field_value(gguf, reader.fields[name])[0] for name in
              ("hf_curvedit.source_sha256", "hf_curvedit.edited_tensors") if name in reader.fields}
    edited = json.loads(fields.get("hf_curvedit.edited_tensors", "[]"))
    types = sorted({t.tensor_type.name for t in reader.tensors if t.name in set(edited)})
    return {"file": Path(path).name, "source": Path(source).name, "source_sha256": fields.get(
        "hf_curvedit.source_sha256", ""), "edited_tensors": len(edited), "types": types}


def stage_gguf(model_or_dir: Any, source: str | Path, folder: Path, repo_id: str, qtype: str | None,
               adapter_name: str | None = None) -> dict[str, Any]:
    """Write the edit of ``model_or_dir`` (a `PeftModel`, or an adapter folder, loaded onto the base read from
    ``source``) into ``folder`` as a GGUF file named after the repo; returns its `gguf_card_info`."""
    source = Path(source)
    model = model_or_dir
    if isinstance(model_or_dir, (str, Path)):
        from peft import PeftModel

        from ..gguf import load_gguf_model

        base, _ = load_gguf_model(None, source)
        model = PeftModel.from_pretrained(base, str(model_or_dir))
    elif adapter_name is not None:
        model.set_adapter(adapter_name)
    out = export_gguf(model, source, folder / f"{repo_id.split('/')[-1]}.gguf", qtype=qtype)
    types = gguf_card_info(out, source)["types"]
    if len(types) == 1:  # named as GGUF files usually are: after the quantization of their weights
        out = out.rename(out.with_name(f"{out.stem}.{types[0]}.gguf"))
    return gguf_card_info(out, source)
