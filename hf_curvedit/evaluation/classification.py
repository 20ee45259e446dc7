"""Image-classifier evaluation: memorized noisy labels, accuracy on the true labels, validation accuracy.

The paper's ViT experiment (docs/method.md §8) trains with a fraction of the training labels flipped. A model
that memorized them predicts the *flipped* label on those images; the edit should move it back to the
true one. On a clean set the only number is accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import image_batch_converter, iter_batches, select_image_columns
from ..errors import InputError


@dataclass
class ImageClassificationSet:
    """Images with the labels the model was trained on and, for a noisy-label set, their true labels.

    Args:
        pixel_values: ``(N, C, H, W)`` model inputs.
        labels: ``(N,)`` the labels the model saw in training (noisy ones included).
        true_labels: ``(N,)`` the correct labels. When given, the set is scored as a noisy-label set:
            only the images whose label differs from the true one count, and the report gives the
            memorized-label rate (prediction = training label) and the true-label accuracy.
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor
    true_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.pixel_values = torch.as_tensor(self.pixel_values)
        self.labels = torch.as_tensor(self.labels, dtype=torch.long).reshape(-1)
        if self.pixel_values.dim() != 4:
            raise InputError("pixel_values must be (N, channels, height, width), "
                             f"got shape {tuple(self.pixel_values.shape)}")
        n = self.pixel_values.shape[0]
        if n == 0:
            raise InputError("an ImageClassificationSet needs at least one image")
        if self.labels.numel() != n:
            raise InputError(f"got {n} images but {self.labels.numel()} labels")
        if self.true_labels is not None:
            self.true_labels = torch.as_tensor(self.true_labels, dtype=torch.long).reshape(-1)
            if self.true_labels.numel() != n:
                raise InputError(f"got {n} images but {self.true_labels.numel()} true labels")
            if not bool((self.true_labels != self.labels).any()):
                raise InputError("no image's label differs from its true label, so there is no noisy label to score; "
                                 "drop true_labels to score plain accuracy")

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def is_noisy(self) -> bool:
        return self.true_labels is not None

    @classmethod
    def from_dataset(cls, dataset: Any, image_processor: Any = None, *, image_column: str = "image",
                     label_column: str = "label", true_label_column: str | None = None,
                     num_channels: int | None = 3) -> ImageClassificationSet:
        """From a ``datasets.Dataset`` with images (through ``image_processor``) or ``pixel_values``, a label
        column and optionally a true-label column. The set holds all pixel values in memory: for a large
        split, evaluate a ``dataset.select(...)`` sample. ``num_channels`` should be the model's
        (``model.config.num_channels``): grayscale images are converted to RGB for 3-channel models."""
        if true_label_column is not None and true_label_column not in dataset.column_names:
            raise InputError(f"no true-label column {true_label_column!r}; the columns are {dataset.column_names}")
        data = select_image_columns(dataset, image_column=image_column, label_column=label_column, with_labels=True)
        convert = image_batch_converter(image_processor, image_column=image_column, label_column=label_column,
                                        with_labels=True, num_channels=num_channels)
        # One processor call per chunk bounds the processor's temporary copies.
        chunks = [batch for _, batch in iter_batches(data, 256, to_tensors=convert)]
        if not chunks:
            raise InputError("an ImageClassificationSet needs at least one image")
        true = torch.as_tensor(dataset[true_label_column], dtype=torch.long) if true_label_column else None
        return cls(torch.cat([c["pixel_values"] for c in chunks]), torch.cat([c["labels"] for c in chunks]), true)


@dataclass
class ClassificationMetrics:
    """One model on one image set.

    ``accuracy`` is the rate of predictions equal to ``labels``; on a noisy-label set that is the
    memorized-label rate, computed over the noisy images only, and ``true_label_accuracy`` is the rate
    of predictions equal to their true labels. ``predictions`` are the scored images' argmax classes.
    """

    accuracy: float
    true_label_accuracy: float | None = None
    n: int = 0
    predictions: list[int] = field(default_factory=list)

    @property
    def memorized_label_rate(self) -> float | None:
        return self.accuracy if self.true_label_accuracy is not None else None


@dataclass
class ClassificationComparison:
    base: ClassificationMetrics
    edited: ClassificationMetrics


def classification_scores(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor,
                          true_labels: Sequence[int] | torch.Tensor | None = None) -> ClassificationMetrics:
    """Score predictions. Without ``true_labels``: accuracy against ``labels``. With them: only images whose
    label differs from the true label count; ``accuracy`` is then the memorized-label rate."""
    pred = torch.as_tensor(predictions, dtype=torch.long).reshape(-1)
    lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if pred.numel() != lab.numel():
        raise InputError(f"got {pred.numel()} predictions for {lab.numel()} labels")
    if pred.numel() == 0:
        raise InputError("nothing to score")
    if true_labels is None:
        return ClassificationMetrics(float((pred == lab).double().mean()), None, int(pred.numel()), pred.tolist())
    true = torch.as_tensor(true_labels, dtype=torch.long).reshape(-1)
    if true.numel() != lab.numel():
        raise InputError(f"got {true.numel()} true labels for {lab.numel()} labels")
    noisy = lab != true
    if not bool(noisy.any()):
        raise InputError("no label differs from its true label: there is no noisy label to score")
    p, lab, true = pred[noisy], lab[noisy], true[noisy]
    return ClassificationMetrics(float((p == lab).double().mean()), float((p == true).double().mean()),
                                 int(p.numel()), p.tolist())


@torch.no_grad()
def predict_classes(model: torch.nn.Module, pixel_values: torch.Tensor, *, batch_size: int = 64,
                    show_progress: bool = True, desc: str = "classify") -> torch.Tensor:
    """Argmax class of every image, in batches, on the model's device and dtype."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in tqdm(range(0, len(pixel_values), batch_size), desc=desc, disable=not show_progress, leave=False):
            x = pixel_values[s:s + batch_size].to(device=param.device, dtype=param.dtype)
            out.append(model(pixel_values=x).logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate_classification(model: torch.nn.Module, data: ImageClassificationSet, *, batch_size: int = 64,
                            show_progress: bool = True, desc: str = "classify") -> ClassificationMetrics:
    """Predict every image of ``data`` and score it (see [`classification_scores`])."""
    pred = predict_classes(model, data.pixel_values, batch_size=batch_size, show_progress=show_progress, desc=desc)
    return classification_scores(pred, data.labels, data.true_labels)
