"""DELF's GLDv2 retrieval metrics, restated step by step as the reference for cfcd's.

Upstream: tensorflow/models, research/delf/delf/python/datasets/google_landmarks_dataset/metrics.py
(``MeanAveragePrecision`` and ``MeanPrecisions``, both with ``max_predictions=100``) and
dataset_file_io.py (``ReadSolution``: rows ``Ignored`` are left out of the solution), read at commit
e4009b236c08afc812b18060c9976f0a3764ee52 (Apache-2.0). This is a line-by-line restatement of
those loops, not a copy of the file (the tool that fetched it asks that its code stay out of
commits): the same iteration over ``predictions``, the same skipping of repeated ids (which keep
their place ``i``), the same divisor ``min(len(solution[key]), max_predictions)``, the same
mean over ``len(solution)`` and the same ValueError for a prediction outside the solution.
Keep it that plain: it is the yardstick, not an implementation.
"""

import numpy as np


def delf_mean_average_precision(predictions, retrieval_solution, max_predictions=100):
    n_test = len(retrieval_solution.keys())
    total = 0.0
    for key, prediction in predictions.items():
        if key not in retrieval_solution:
            raise ValueError("Test image %s is not part of retrieval_solution" % key)
        ap = 0.0
        used = set()
        expected = min(len(retrieval_solution[key]), max_predictions)
        hits = 0
        for i in range(min(len(prediction), max_predictions)):
            if prediction[i] in used:
                continue
            if prediction[i] in retrieval_solution[key]:
                hits += 1
                ap += hits / (i + 1)
            used.add(prediction[i])
        total += ap / expected
    return total / n_test


def delf_mean_precisions(predictions, retrieval_solution, max_predictions=100):
    n_test = len(retrieval_solution.keys())
    table = np.zeros((n_test, max_predictions))
    row = 0
    for key, prediction in predictions.items():
        if key not in retrieval_solution:
            raise ValueError("Test image %s is not part of retrieval_solution" % key)
        used = set()
        hits = 0
        for i in range(max_predictions):
            if i < len(prediction) and prediction[i] not in used:
                if prediction[i] in retrieval_solution[key]:
                    hits += 1
                used.add(prediction[i])
            table[row, i] = hits / (i + 1)
        row += 1
    return np.mean(table, axis=0)


def delf_read_solution(rows):
    """``(public, private)`` from the solution csv's rows ``(id, images, Usage)`` after the header."""
    public, private = {}, {}
    for test_id, images, usage in rows:
        if usage == "Ignored":
            continue
        ids = images.split(" ")
        if usage == "Public":
            public[test_id] = ids
        elif usage == "Private":
            private[test_id] = ids
        else:
            raise ValueError("Test image %s has unrecognized Usage tag %s" % (test_id, usage))
    return public, private
