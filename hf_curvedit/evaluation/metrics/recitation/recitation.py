"""Recitation metric (Strict / Loose / AvgLev on token ids) as a local `evaluate` module."""

import datasets
import evaluate

from hf_curvedit.evaluation.recitation import DEFAULT_LOOSE_THRESHOLD, recitation_scores

_DESCRIPTION = """\
Token-level recitation metrics of greedy continuations against gold suffixes (Merullo et al. 2025,
"From Memorization to Reasoning in the Spectrum of Loss Curvature"). With d the Levenshtein distance
between the token ids of a prediction and its reference of length L: Strict = mean 1[d = 0],
Loose = mean 1[1 - d/L >= loose_threshold], AvgLev = mean d/L.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): greedy continuations (token ids), normally of length L each.
    references (`list[list[int]]`): gold suffixes (token ids), non-empty.
    loose_threshold (`float`, defaults to 0.75): threshold of the Loose metric.
Returns:
    strict (`float`), loose (`float`), avg_lev (`float`), distances (`list[int]`): per-example d.
Examples:
    >>> metric = evaluate.load(hf_curvedit.evaluation.metric_path("recitation"))
    >>> metric.compute(predictions=[[1, 2, 3, 4]], references=[[1, 2, 3, 5]])
    {'strict': 0.0, 'loose': 1.0, 'avg_lev': 0.25, 'distances': [1]}
"""

_CITATION = """\
@article{merullo2025memorization,
  title={From Memorization to Reasoning in the Spectrum of Loss Curvature},
  author={Merullo, Jack and Vatsavaya, Srihita and Bushnaq, Lucius and Lewis, Owen},
  journal={arXiv preprint arXiv:2510.24256},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Recitation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, loose_threshold: float = DEFAULT_LOOSE_THRESHOLD):
        result = recitation_scores(predictions, references, loose_threshold)
        return {
            "strict": result.strict,
            "loose": result.loose,
            "avg_lev": result.avg_lev,
            "distances": [e.distance for e in result.examples],
        }
