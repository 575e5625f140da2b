"""Rouge-L as an `evaluate` metric module that ships with the package, so `evaluate.load` needs no network.

`evaluate.load("rouge")` fetches its script from the Hub; this module is loaded by path instead
(`rkd_trl.evaluation.metrics.rouge_l` does it) and scores with `rouge_score`, the library the Hub metric wraps.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "Rouge-L F-measure (longest common subsequence) of each prediction against its best reference."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of lists of strings (several valid references per prediction; the best one counts).
    use_aggregator: return the mean F-measure (True) or one score per prediction (False).
Returns:
    rougeL: F-measure in [0, 1].
"""


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, 'ROUGE: A Package for Automatic Evaluation of Summaries', 2004.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, use_aggregator=True):
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
        if use_aggregator:
            return {"rougeL": sum(scores) / len(scores) if scores else 0.0}
        return {"rougeL": scores}
