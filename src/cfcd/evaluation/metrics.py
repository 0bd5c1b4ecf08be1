"""Per-query retrieval metrics, computed from the ranks of a query's positives.

Every metric takes ``ranks`` (the 0-based ascending positions of the retrieved positives in the
ranking, junk already removed, as revisitop's ``compute_map`` builds them) and ``num_positives``
(how many positives the query has, retrieved or not) and returns one number in [0, 1]; the
evaluation averages it over the queries that have positives. Names:

* ``mAP``: revisitop's trapezoidal AP (Radenović et al., CVPR 2018; ``revisitop:python/evaluate.py``
  ``compute_ap``);
* ``mP@k``: revisitop's precision at ``min(k, rank of the last positive)`` (``compute_map``'s
  ``kappas``);
* ``mAP@k``: the GLDv2 retrieval metric (Weyand et al., CVPR 2020, section 4; the Kaggle
  "Landmark Retrieval" mAP@100): ``sum_{i <= k} P@i rel(i) / min(num_positives, k)``.

A new metric is a small class with ``name``, ``query_name`` and ``__call__``; add its name rule to
:func:`parse_metric`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence

import numpy as np

from cfcd.errors import InputError

__all__ = ["AveragePrecision", "AveragePrecisionAt", "Metric", "PrecisionAt", "compute_ap", "default_metrics",
           "parse_metric", "parse_metrics"]


class Metric(Protocol):
    name: str        # of the mean over queries, e.g. "mP@10"
    query_name: str  # of the per-query value, e.g. "P@10"

    def __call__(self, ranks: np.ndarray, num_positives: int) -> float: ...


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Vectorised revisitop ``compute_ap``: trapezoidal AP of ascending 0-based positive ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    p0 = np.divide(j, r, out=np.ones_like(r), where=r != 0)  # rank 0 -> precision 1
    p1 = (j + 1.0) / (r + 1.0)
    return float(np.sum((p0 + p1) * (1.0 / nres) / 2.0))


@dataclass(frozen=True)
class AveragePrecision:
    """revisitop's AP; ``nres`` is the number of positives, duplicates included, as revisitop."""

    name: str = "mAP"
    query_name: str = "AP"

    def __call__(self, ranks: np.ndarray, num_positives: int) -> float:
        return compute_ap(ranks, num_positives)


@dataclass(frozen=True)
class _AtK:
    """A metric with a cut-off k, named ``m<short>@k`` (mean) and ``<short>@k`` (per query)."""

    k: int
    short: ClassVar[str] = ""

    def __init_subclass__(cls, short: str = "", description: str | None = None, **kwargs):
        """``class X(_AtK, short="P")``: the name's stem and, for the report, what the metric is."""
        super().__init_subclass__(**kwargs)
        cls.short = short
        if description is not None:
            cls.description = description

    @property
    def name(self) -> str:
        return f"m{self.short}@{self.k}"

    @property
    def query_name(self) -> str:
        return f"{self.short}@{self.k}"


@dataclass(frozen=True)
class PrecisionAt(_AtK, short="P"):
    """revisitop's P@k: the precision at ``min(k, rank of the last retrieved positive)``."""

    def __call__(self, ranks: np.ndarray, num_positives: int) -> float:
        if ranks.size == 0:
            return 0.0
        kq = min(int(ranks[-1]) + 1, self.k)
        return np.count_nonzero(ranks + 1 <= kq) / kq


@dataclass(frozen=True)
class AveragePrecisionAt(_AtK, short="AP", description="mAP@k: sum of P@i at the positives among the first k "
                         "results / min(positives, k), averaged over the scored queries (DELF MeanAveragePrecision)"):
    """AP truncated at k, normalised by ``min(num_positives, k)`` (GLDv2 retrieval's mAP@100)."""

    def __call__(self, ranks: np.ndarray, num_positives: int) -> float:
        top = np.asarray(ranks[ranks < self.k], dtype=np.float64)
        if top.size == 0 or num_positives == 0:
            return 0.0
        precision = np.arange(1, top.size + 1) / (top + 1.0)  # P@(rank+1) at each retrieved positive
        return float(precision.sum() / min(num_positives, self.k))


@dataclass(frozen=True)
class PrecisionOfFirst(_AtK, short="Precision", description="mPrecision@k: positives among the first k results / k, "
                       "averaged over the scored queries (DELF MeanPrecisions at k)"):
    """DELF's precision at k: the positives among the first k results over k (``mPrecision@k``)."""

    def __call__(self, ranks: np.ndarray, num_positives: int) -> float:
        return np.count_nonzero(np.asarray(ranks) < self.k) / self.k


def default_metrics(kappas: Sequence[int] = (1, 5, 10)) -> tuple[Metric, ...]:
    """revisitop's report: mAP and mP@k for each k."""
    return (AveragePrecision(), *(PrecisionAt(int(k)) for k in kappas))


_AT = re.compile(r"^(mAP|mP|mPrecision)@(\d+)$")
_AT_KINDS = {"mAP": AveragePrecisionAt, "mP": PrecisionAt, "mPrecision": PrecisionOfFirst}


def parse_metric(name: str | Metric) -> Metric:
    """``"mAP"``, ``"mP@10"``, ``"mAP@100"``, ``"mPrecision@100"`` (or a metric object, returned as is)."""
    if not isinstance(name, str):
        return name
    if name == "mAP":
        return AveragePrecision()
    match = _AT.match(name.strip())
    if match is None or int(match.group(2)) < 1:
        raise InputError(f"unknown metric {name!r}: use mAP, mP@k, mAP@k or mPrecision@k with k >= 1")
    return _AT_KINDS[match.group(1)](int(match.group(2)))


def parse_metrics(names: Sequence[str | Metric]) -> tuple[Metric, ...]:
    metrics = tuple(parse_metric(n) for n in names)
    if not metrics:
        raise InputError("no metric given")
    seen = [m.name for m in metrics]
    if len(set(seen)) != len(seen):
        raise InputError(f"metric listed twice: {seen}")
    return metrics
