"""Memorized-label rate and true-label accuracy of a classifier trained on noisy labels, as a local `evaluate`
module."""

import datasets
import evaluate

from hf_curvedit.evaluation.classification import classification_scores

_DESCRIPTION = """\
For a classifier trained with some labels flipped: over the images whose training label differs from the true
label, the memorized-label rate is the fraction predicted as the (wrong) training label, and the true-label
accuracy the fraction predicted as the true label. Without true labels the module returns plain accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class per image.
    references (`list[int]`): the labels the model was trained on (noisy ones included).
    true_labels (`list[int]`, optional): the correct labels; images where they equal `references` are not scored.
Returns:
    memorized_label_rate (`float`) and true_label_accuracy (`float`) with true labels, else accuracy (`float`);
    n (`int`): number of images scored.
Examples:
    >>> metric = evaluate.load(hf_curvedit.evaluation.metric_path("label_memorization"))
    >>> metric.compute(predictions=[1, 2, 3], references=[1, 0, 3], true_labels=[0, 0, 2])
    {'memorized_label_rate': 1.0, 'true_label_accuracy': 0.0, 'n': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LabelMemorization(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, true_labels=None):
        m = classification_scores(predictions, references, true_labels)
        if true_labels is None:
            return {"accuracy": m.accuracy, "n": m.n}
        return {"memorized_label_rate": m.accuracy, "true_label_accuracy": m.true_label_accuracy, "n": m.n}
