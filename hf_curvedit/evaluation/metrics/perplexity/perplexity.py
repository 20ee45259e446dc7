"""Perplexity from per-token log-probabilities, as a local `evaluate` module (no model download).

To compute the log-probabilities from a model, use `hf_curvedit.evaluation.perplexity` instead; this
module is the aggregation step exp(total NLL / total tokens), for scores computed elsewhere.
"""

import datasets
import evaluate

from hf_curvedit.evaluation.perplexity import perplexity_from_nll

_DESCRIPTION = """\
Corpus perplexity exp(-sum of log p / number of tokens) over all scored tokens of all documents (not the
mean of per-document perplexities). Pass only real (non-pad) tokens.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): per document, the natural-log probabilities of its scored tokens.
Returns:
    perplexity (`float`), nll_sum (`float`), n_tokens (`int`).
Examples:
    >>> metric = evaluate.load(hf_curvedit.evaluation.metric_path("perplexity"))
    >>> metric.compute(predictions=[[-1.0, -3.0]])["perplexity"]  # exp(2)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions):
        nll = -sum(float(x) for doc in predictions for x in doc)
        n = sum(len(doc) for doc in predictions)
        return {"perplexity": perplexity_from_nll(nll, n), "nll_sum": nll, "n_tokens": n}
