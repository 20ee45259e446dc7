"""nDCG@k of one next-token ranking against a reference ranking, as a local `evaluate` module."""

import datasets
import evaluate

from hf_curvedit.errors import InputError
from hf_curvedit.evaluation.coherence import DEFAULT_NDCG_K, ndcg_per_position

_DESCRIPTION = """\
nDCG@k of predicted top-k token rankings (e.g. an edited model's top-10 next tokens) against reference
rankings (the base model's top-10 at the same positions). Relevance is graded by reference rank: the
reference's i-th token (1-based) has relevance k - i + 1, tokens outside the reference top-k have 0.
DCG = sum_i rel(pred_i) / log2(i + 1); nDCG = DCG / IDCG, where IDCG is the DCG of the reference itself.
The score is 1 iff the predicted top-k equals the reference top-k in the same order.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): ranked token ids per position, best first, at least k each.
    references (`list[list[int]]`): reference ranked token ids per position (distinct ids), at least k each.
    k (`int`, defaults to 10): cutoff.
Returns:
    ndcg (`float`): mean over positions; per_position (`list[float]`).
Examples:
    >>> metric = evaluate.load(hf_curvedit.evaluation.metric_path("ndcg"))
    >>> metric.compute(predictions=[[2, 1]], references=[[1, 2]], k=2)["ndcg"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Ndcg(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k: int = DEFAULT_NDCG_K):
        scores = ndcg_per_position(predictions, references, k)
        if scores.numel() == 0:
            raise InputError("no positions to score")
        return {"ndcg": float(scores.mean()), "per_position": scores.tolist()}
