"""Top-k accuracy as a local `evaluate` metric (loaded by path, so it works offline).

Predictions are each example's classes ranked by score (at least k of them); an example counts as correct when its
reference is among the first k.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of examples whose true class is among the k highest-scored predicted classes."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): for each example, classes ranked from the highest score down.
    references (`list[int]`): the true class of each example.
    k (`int`, defaults to 1): how many of the ranked classes count.
Returns:
    `{"top_k_accuracy": float}` in [0, 1].
"""


class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k: int = 1) -> dict:
        if any(len(ranked) < k for ranked in predictions):
            raise ValueError(f"top-{k} accuracy needs at least {k} ranked classes per example.")
        hits = sum(reference in ranked[:k] for ranked, reference in zip(predictions, references, strict=True))
        return {"top_k_accuracy": hits / max(1, len(references))}
