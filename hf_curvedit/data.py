"""Input data: loading text datasets, tokenizing, packing into fixed-length blocks, batching."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset

from .errors import InputError, InputKeyError

DatasetLike = Dataset | IterableDataset
DataSource = Dataset | IterableDataset | DatasetDict | IterableDatasetDict | str | Path | Sequence[str | Path]

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".py": "text",
             ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
             # a folder of images, one sub-folder per class, is an `imagefolder` dataset with a `label` column
             ".png": "imagefolder", ".jpg": "imagefolder", ".jpeg": "imagefolder", ".bmp": "imagefolder",
             ".gif": "imagefolder", ".webp": "imagefolder"}


def load_text_dataset(
    source: DataSource,
    *,
    split: str = "train",
    streaming: bool = False,
) -> DatasetLike:
    """Turn ``source`` into a ``datasets`` dataset.

    ``source`` may be a ``Dataset``/``IterableDataset`` (returned as is), a ``DatasetDict`` (``split``
    is taken), a local file, a folder of files, a list of files, or a dataset name on the Hub.
    Plain-text files (``.txt``, ``.md``, ``.rst``, ``.py``) are read one document per file; a folder of
    images (one sub-folder per class) becomes an ``imagefolder`` dataset with ``image`` and ``label``.
    """
    if isinstance(source, (Dataset, IterableDataset)):
        return source
    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        if split not in source:
            raise InputKeyError(f"split {split!r} not in the dataset; available splits: {list(source)}")
        return source[split]
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
    elif isinstance(source, (str, Path)) and Path(source).exists():
        p = Path(source)
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _BUILDERS) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"no data files ({', '.join(sorted(_BUILDERS))}) under {p}")
        if p.is_dir() and {_BUILDERS[f.suffix] for f in files} == {"imagefolder"}:
            return load_dataset("imagefolder", data_dir=str(p), split="train", streaming=streaming)
    elif isinstance(source, (str, Path)) and (str(source).startswith((".", "/"))
                                              or Path(str(source)).suffix in _BUILDERS):
        raise FileNotFoundError(f"data path {source} does not exist")
    else:
        return load_dataset(str(source), split=split, streaming=streaming)

    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"data files not found: {missing}")
    kinds = {_BUILDERS.get(f.suffix, "text") for f in files}
    if len(kinds) > 1:
        raise InputError(f"mixed data file types {sorted(kinds)}; pass files of one kind (text, json, csv or parquet)")
    builder = kinds.pop()
    for f in files:
        if f.stat().st_size == 0 or (builder in ("text", "json") and not f.read_bytes()[:1 << 16].strip()):
            raise InputError(f"{f} is empty: give a file with at least one document ({_EXPECTED[builder]})")
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming,
                            **kwargs)
    except Exception as err:  # noqa: BLE001 - datasets wraps every parse failure in DatasetGenerationError
        problem = _diagnose(files, builder)
        if problem is None:
            raise
        raise InputError(problem) from err


# What each kind of local data file must hold (for error messages).
_EXPECTED = {"text": "plain UTF-8 text, one document per file", "json": "one JSON object per line with a text field",
             "csv": "a header row and a text column", "parquet": "a Parquet table with a text column",
             "imagefolder": "images in one sub-folder per class"}


def _diagnose(files: list[Path], builder: str) -> str | None:
    """Why ``datasets`` could not read local data files, naming the file and the line: undecodable bytes or invalid
    JSON (``None`` when nothing is found, so that the original error is shown)."""
    import json

    for f in files:
        if builder in ("text", "json", "csv"):
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                return (f"{f} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}): it is "
                        f"binary or in another encoding; give {_EXPECTED[builder]}")
            if builder == "json" and f.suffix == ".jsonl":
                for n, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except ValueError as err:
                            return f"{f}, line {n}: not valid JSON ({err}); give {_EXPECTED[builder]}"
                        if not isinstance(obj, dict):
                            kind = type(obj).__name__
                            return f"{f}, line {n}: a JSON {kind}, not an object; give {_EXPECTED[builder]}"
            elif builder == "json":
                try:
                    json.loads(text)
                except ValueError as err:
                    return f"{f} is not valid JSON ({err}); give {_EXPECTED[builder]}"
    return None


def _column_names(ds: DatasetLike) -> list[str] | None:
    names = ds.column_names
    return list(names) if names is not None else None


def pack_into_blocks(
    dataset: DatasetLike,
    tokenizer: Any | None,
    seq_len: int,
    *,
    text_column: str = "text",
    packing: bool = True,
    map_batch_size: int = 1000,
) -> DatasetLike:
    """Tokenize ``dataset`` and cut it into blocks of ``seq_len`` tokens.

    With ``packing`` the documents are concatenated (separated by the tokenizer's EOS) and every
    block is full; the tail that does not fill a block is dropped. Without it each document is
    truncated to ``seq_len`` and right-padded, with an ``attention_mask`` marking the real tokens.
    A dataset that already has an ``input_ids`` column is used without a tokenizer.
    """
    columns = _column_names(dataset)
    has_ids = columns is not None and "input_ids" in columns
    if not has_ids:
        if columns is not None and text_column not in columns:
            raise InputKeyError(
                f"the dataset has no {text_column!r} column (columns: {columns}). Set text_column to the "
                "column holding raw text, or provide an 'input_ids' column."
            )
        if tokenizer is None:
            raise InputError("a tokenizer is needed to turn text into tokens; pass tokenizer=...")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else (eos if eos is not None else 0)

    def _ids(batch: dict[str, list]) -> list[list[int]]:
        if "input_ids" in batch:
            return [list(x) for x in batch["input_ids"]]
        texts = batch[text_column]
        if any(not isinstance(t, str) for t in texts):
            raise TypeError(f"column {text_column!r} must hold strings")
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _pack(batch: dict[str, list]) -> dict[str, list]:
        flat: list[int] = []
        for ids in _ids(batch):
            flat.extend(ids)
            if eos is not None and not has_ids:
                flat.append(eos)
        n = len(flat) // seq_len
        blocks = [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)]
        return {"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in range(n)]}

    def _pad(batch: dict[str, list]) -> dict[str, list]:
        out_ids, out_mask = [], []
        for ids in _ids(batch):
            ids = ids[:seq_len]
            if len(ids) < 2:
                continue  # no next-token target at all
            out_ids.append(ids + [pad] * (seq_len - len(ids)))
            out_mask.append([1] * len(ids) + [0] * (seq_len - len(ids)))
        return {"input_ids": out_ids, "attention_mask": out_mask}

    return dataset.map(_pack if packing else _pad, batched=True, batch_size=map_batch_size, remove_columns=columns)


def count_batches(blocks: DatasetLike, batch_size: int, max_blocks: int | None) -> int | None:
    """Number of batches the data yields, or None when a streaming dataset does not know its length."""
    n: int | None
    if isinstance(blocks, Dataset):
        n = len(blocks)
    else:
        n = None
    if max_blocks is not None:
        n = max_blocks if n is None else min(n, max_blocks)
    return None if n is None else math.ceil(n / batch_size)


def iter_batches(
    blocks: DatasetLike,
    batch_size: int,
    *,
    start_batch: int = 0,
    max_blocks: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    to_tensors: Callable[[dict[str, list]], dict[str, torch.Tensor]] | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(global_batch_index, batch)`` for the batches of this process.

    Batch ``b`` holds blocks ``[b·batch_size, (b+1)·batch_size)``; process ``rank`` takes the
    batches with ``b % world_size == rank``. Batches before ``start_batch`` are never read from a
    map-style dataset (rows are indexed directly); a streaming dataset skips them without decoding
    into tensors. ``to_tensors`` turns a batch of rows (column -> list) into tensors; the default
    reads ``input_ids`` and ``attention_mask``.
    """
    to_tensors = to_tensors or _to_tensors
    if isinstance(blocks, Dataset):
        n = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
        total = math.ceil(n / batch_size)
        for b in range(start_batch, total):
            if b % world_size != rank:
                continue
            rows = blocks[b * batch_size:min((b + 1) * batch_size, n)]
            yield b, to_tensors(rows)
        return

    stream = blocks
    if max_blocks is not None:
        stream = stream.take(max_blocks)
    if start_batch:
        stream = stream.skip(start_batch * batch_size)
    b = start_batch
    buf: list[dict[str, Any]] = []
    for row in stream:
        buf.append(row)
        if len(buf) == batch_size:
            if b % world_size == rank:
                yield b, to_tensors({k: [r[k] for r in buf] for k in buf[0]})
            b += 1
            buf = []
    if buf and b % world_size == rank:
        yield b, to_tensors({k: [r[k] for r in buf] for k in buf[0]})


def _to_tensors(rows: dict[str, list]) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.tensor(rows["input_ids"], dtype=torch.long)}
    if "attention_mask" in rows:
        out["attention_mask"] = torch.tensor(rows["attention_mask"], dtype=torch.long)
    else:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


# ----------------------------------------------------------------------------------------- images
def select_image_columns(
    dataset: DatasetLike,
    *,
    image_column: str = "image",
    label_column: str = "label",
    with_labels: bool = False,
) -> DatasetLike:
    """Keep only the columns an image classifier needs (so other columns are never decoded).

    Uses ``pixel_values`` when the data already has it, else ``image_column``; adds ``label_column``
    when ``with_labels``. Raises a ``ValueError`` naming the available columns when one is missing.
    """
    cols = _column_names(dataset)
    if cols is None:  # a streaming dataset without known features: find out at the first row
        return dataset
    image_col = "pixel_values" if "pixel_values" in cols else image_column
    if image_col not in cols:
        raise _no_image_column(image_column, cols)
    keep = [image_col]
    if with_labels:
        if label_column not in cols:
            raise _no_label_column(label_column, cols)
        keep.append(label_column)
    return dataset.select_columns(keep)


# Streaming data without known features is checked at its first batch instead, with the same messages.
def _no_image_column(image_column: str, cols: list[str]) -> ValueError:
    return ValueError(f"the image data has no {image_column!r} (or 'pixel_values') column; its columns are {cols}. "
                      "Pass image_column=... naming the column that holds the images.")


def _no_label_column(label_column: str, cols: list[str]) -> ValueError:
    return ValueError(f"label_mode='empirical' reads labels from {label_column!r}, which the data does not have "
                      f"(columns: {cols}). Pass label_column=..., or use label_mode='sampled'.")


def image_batch_converter(
    image_processor: Any | None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    with_labels: bool = False,
    num_channels: int | None = 3,
) -> Callable[[dict[str, list]], dict[str, torch.Tensor]]:
    """A function that turns a batch of image rows into ``{"pixel_values", ["labels"]}`` tensors.

    Images (PIL or arrays) go through ``image_processor`` (e.g. ``AutoImageProcessor.from_pretrained``);
    PIL images are converted to RGB first when the model takes 3 channels, so grayscale data works.
    A ``pixel_values`` column is used as is.
    """

    def convert(rows: dict[str, list]) -> dict[str, torch.Tensor]:
        if "pixel_values" in rows:
            pv = rows["pixel_values"]
            pixel_values = (torch.stack([torch.as_tensor(x) for x in pv]) if isinstance(pv, list)
                            else torch.as_tensor(pv))
        else:
            if image_column not in rows:
                raise _no_image_column(image_column, sorted(rows))
            if image_processor is None:
                raise InputError("the data holds images, not pixel_values: pass image_processor= (for example "
                                 "AutoImageProcessor.from_pretrained(<model folder or id>)) to turn them into "
                                 "model inputs")
            images = rows[image_column]
            if num_channels == 3:
                images = [im.convert("RGB") if hasattr(im, "convert") and getattr(im, "mode", "RGB") != "RGB" else im
                          for im in images]
            pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = {"pixel_values": pixel_values.float() if not pixel_values.is_floating_point() else pixel_values}
        if with_labels:
            if label_column not in rows:
                raise _no_label_column(label_column, sorted(rows))
            out["labels"] = torch.as_tensor(rows[label_column], dtype=torch.long)
        return out

    return convert
