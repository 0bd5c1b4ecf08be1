"""The GLDv2 retrieval metrics as DELF computes them: mAP@100 and the mean precision at 100.

DELF (tensorflow/models, ``research/delf/delf/python/datasets/google_landmarks_dataset/metrics.py``)
scores the Kaggle "Landmark Retrieval" predictions of each scored test image:

* ``MeanAveragePrecision(predictions, solution, max_predictions=100)``: per query, the sum of P@i
  at each correct prediction among the first 100 (a repeated id is skipped but keeps its place),
  divided by ``min(len(solution[query]), 100)``; the mean over every query of the solution, so a
  query without predictions counts 0;
* ``MeanPrecisions``: per query and rank i <= 100, the correct predictions among the first i over
  i; its value at 100 is ``mPrecision@100`` here (``mP@k`` in cfcd is revisitop's precision at
  ``min(k, rank of the last positive)``, a different number).

:func:`score_predictions` computes both from prediction lists (a submission file);
:func:`gldv2_metrics` are the same numbers as per-query metrics of :mod:`cfcd.evaluation.metrics`,
for the descriptor evaluation (an exact ranking has no repeated ids, and the mean over a setup's
queries equals DELF's mean over the solution). ``tests/test_gldv2_metric.py`` checks both
against a line-by-line restatement of DELF's functions.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from cfcd.errors import InputError
from cfcd.evaluation.metrics import AveragePrecisionAt, PrecisionOfFirst

__all__ = ["PrecisionOfFirst", "gldv2_metrics", "score_predictions"]


def gldv2_metrics(k: int = 100) -> tuple[AveragePrecisionAt, PrecisionOfFirst]:
    """``mAP@k`` and ``mPrecision@k``: what ``cfcd evaluate|benchmark --dataset gldv2_retrieval`` report."""
    return AveragePrecisionAt(k), PrecisionOfFirst(k)


def score_predictions(predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]],
                      k: int = 100) -> dict[str, float]:
    """``{"mAP@k": .., "mPrecision@k": ..}`` (fractions) of ranked index ids per query, as DELF.

    ``solution`` maps each scored query to its index ids (leave out the ignored queries and those
    whose solution is ``None``); a query of ``predictions`` that is not in it is an error, as in DELF.
    """

    if not solution:
        raise InputError("the solution has no scored query")
    empty = [query for query, images in solution.items() if not images]
    if empty:
        raise InputError(f"query {empty[0]!r} has no index image in the solution (leave such queries out, as "
                         "DELF's ReadSolution does with 'None')")
    total_ap = total_precision = 0.0
    for query, predicted in predictions.items():
        if query not in solution:
            raise InputError(f"query {query!r} of the predictions is not in the solution")
        relevant = set(solution[query])
        seen: set[str] = set()
        correct, ap = 0, 0.0
        for i, image in enumerate(list(predicted)[:k]):
            if image in seen:
                continue  # a repeated id counts once but keeps its place in the list
            seen.add(image)
            if image in relevant:
                correct += 1
                ap += correct / (i + 1)
        total_ap += ap / min(len(solution[query]), k)
        total_precision += correct / k
    n = len(solution)
    return {f"mAP@{k}": total_ap / n, f"mPrecision@{k}": total_precision / n}
