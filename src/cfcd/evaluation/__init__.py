"""The exact revisitop evaluation (Revisited Oxford/Paris, +1M distractors): mAP and mP@k, Easy/Medium/Hard.

A fast path that never builds the N x nq ranking (only the positions of the labelled images), and
revisitop's code verbatim as the reference. The protocol, the tie policy, the numerics and the
published numbers to check against are in ``docs/evaluation.md``.

* :mod:`~cfcd.evaluation.setups` - ground truth to Easy/Medium/Hard positives and junk;
* :mod:`~cfcd.evaluation.metrics` - pluggable metrics (mAP, mP@k, mAP@k);
* :mod:`cfcd.evaluation.gldv2` - GLDv2 retrieval: DELF's mAP@100 and mPrecision@100 (imported explicitly);
* :mod:`~cfcd.evaluation.ranking` - positions of the labelled images, chunked;
* :mod:`~cfcd.evaluation.scoring` - :func:`evaluate` and friends;
* :mod:`~cfcd.evaluation.results` - results and their table;
* :mod:`~cfcd.evaluation.reference` - revisitop's ``compute_map``, verbatim;
* :mod:`~cfcd.evaluation.files` - :func:`evaluate_files`: stores in, a report out;
* :mod:`cfcd.evaluation.benchmark` - the benchmark workflow (extracts; imported explicitly, it needs torch).
"""

from cfcd.evaluation.files import evaluate_dataset, evaluate_files, load_mat_descriptors
from cfcd.evaluation.metrics import compute_ap
from cfcd.evaluation.ranking import labelled_positions, positions_from_ranking
from cfcd.evaluation.reference import reference_compute_ap, reference_compute_map
from cfcd.evaluation.results import MISSING, EvaluationResult, SetupResult, format_percent, format_table
from cfcd.evaluation.scoring import evaluate, evaluate_positions, evaluate_ranking, evaluate_scores
from cfcd.evaluation.setups import (
    CLASSIC_SETUPS,
    DEFAULT_KAPPAS,
    SETUPS,
    TIE_POLICY,
    labelled_indices,
    protocol_setups,
    setup_gnd,
)

__all__ = [
    "SETUPS", "CLASSIC_SETUPS", "DEFAULT_KAPPAS", "TIE_POLICY", "MISSING", "reference_compute_ap",
    "reference_compute_map", "protocol_setups", "setup_gnd", "compute_ap", "SetupResult", "EvaluationResult",
    "labelled_indices", "labelled_positions", "positions_from_ranking", "evaluate", "evaluate_scores",
    "evaluate_ranking", "evaluate_positions", "format_table", "format_percent", "evaluate_files", "evaluate_dataset",
    "load_mat_descriptors",
]
