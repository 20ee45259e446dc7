"""Loads the items of the local skill tasks from the JSONL files next to this module (no network).

lm-evaluation-harness calls ``load_items`` through each task's ``custom_dataset`` entry, with the task's
``dataset_kwargs`` and ``metadata`` as keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load_items(items: str, **_: Any) -> datasets.DatasetDict:
    """The task's ``test`` split from ``items``, a JSONL path relative to this folder."""
    path = HERE / items
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the skill items are written by scripts/train_default_model.py")
    return datasets.load_dataset("json", data_files={"test": str(path)})
