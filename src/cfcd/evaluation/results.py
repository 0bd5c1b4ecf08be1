"""Evaluation results: per-setup metrics and per-query values, and their printed table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cfcd.evaluation.metrics import Metric, PrecisionAt


@dataclass
class SetupResult:
    """One setup (easy/medium/hard/classic). Fractions in [0, 1]; NaN where a query is skipped.

    ``values`` holds the mean of every metric (``"mAP"``, ``"mP@10"``, ``"mAP@100"``...),
    ``per_query`` its per-query values (NaN for a query without positives).
    """

    name: str
    metrics: tuple[Metric, ...]
    values: dict[str, float]
    per_query: dict[str, np.ndarray]
    num_evaluated: int  # queries with at least one positive
    num_positives: np.ndarray  # (nq,) len(ok) per query

    def _precisions(self) -> list[Metric]:
        return [m for m in self.metrics if isinstance(m, PrecisionAt)]

    @property
    def mAP(self) -> float:
        return self.values["mAP"]

    @property
    def aps(self) -> np.ndarray:
        """(nq,) per-query AP, NaN for a query without positives."""
        return self.per_query["mAP"]

    @property
    def mP(self) -> np.ndarray:
        """(len(kappas),) mean precision at each kappa."""
        return np.array([self.values[m.name] for m in self._precisions()])

    @property
    def prs(self) -> np.ndarray:
        """(nq, len(kappas)) per-query precision at each kappa."""
        columns = [self.per_query[m.name] for m in self._precisions()]
        return np.stack(columns, axis=1) if columns else np.zeros((len(self.num_positives), 0))


@dataclass
class EvaluationResult:
    """The result of one evaluation: per-setup metrics, per-query values and timings."""

    setups: dict[str, SetupResult]
    kappas: tuple[int, ...]  # the k of the mP@k metrics
    num_queries: int
    num_database: int
    num_distractors: int = 0
    query_ids: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def metrics(self, percent: bool = True) -> dict[str, dict[str, float | None]]:
        """``{"easy": {"mAP": .., "mP@1": .., ...}, ...}`` (percent by default, None for NaN)."""
        scale = 100.0 if percent else 1.0
        return {name: {k: _num(v * scale) for k, v in s.values.items()} for name, s in self.setups.items()}

    def per_query(self, percent: bool = True) -> dict[str, dict[str, Any]]:
        """``{query id: {setup: {"AP": .., "P@1": .., ..., "positives": n}}}``; AP None when skipped."""
        scale = 100.0 if percent else 1.0
        ids = self.query_ids or [str(i) for i in range(self.num_queries)]
        out: dict[str, dict[str, Any]] = {}
        for q, qid in enumerate(ids):
            row: dict[str, Any] = {}
            for name, s in self.setups.items():
                entry: dict[str, Any] = {m.query_name: _num(s.per_query[m.name][q] * scale) for m in s.metrics}
                entry["positives"] = int(s.num_positives[q])
                row[name] = entry
            out[qid] = row
        return out

    def to_dict(self, protocol: dict | None = None) -> dict[str, Any]:
        """The JSON report: per-setup metrics, ``per_query`` and ``protocol`` (all in percent)."""
        out: dict[str, Any] = dict(self.metrics(percent=True))
        out["per_query"] = self.per_query(percent=True)
        out["protocol"] = dict(protocol or {})
        return out

    def table(self, dataset: str = "") -> str:
        return format_table(self, dataset)


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


# --------------------------------------------------------------------------- printing


def _around(x: float | np.ndarray):
    return np.around(np.asarray(x) * 100, decimals=2)


def format_table(result: EvaluationResult, dataset: str = "") -> str:
    """A readable table plus revisitop's own two ``>>`` lines (``np.around(x*100, 2)``)."""
    names = list(result.setups)
    metrics = result.setups[names[0]].metrics if names else ()
    widths = [max(8, len(m.name) + 1) for m in metrics]  # mPrecision@100 is longer than 8
    head = [f"{'setup':<8}"] + [f"{m.name:>{w}}" for m, w in zip(metrics, widths)]
    lines = ["".join(head)]
    for name in names:
        s = result.setups[name]
        cells = [f"{name:<8}"] + [format_percent(s.values[m.name], w) for m, w in zip(metrics, widths)]
        skipped = result.num_queries - s.num_evaluated
        lines.append("".join(cells) + (f"   ({skipped} quer{'y' if skipped == 1 else 'ies'} without positives)" if skipped else ""))
    label = dataset or "dataset"
    extra = f" +{result.num_distractors} distractors" if result.num_distractors else ""
    title = f"{label}: {result.num_queries} queries, {result.num_database} database images{extra}"
    short = {"easy": "E", "medium": "M", "hard": "H"}
    revisitop = []
    if any(m.name == "mAP" for m in metrics):
        maps = ", ".join(f"{short.get(n, n)}: {_around(result.setups[n].mAP)}" for n in names)
        revisitop.append(f">> {label}: mAP {maps}")
    if result.kappas:
        mps = ", ".join(f"{short.get(n, n)}: {_around(result.setups[n].mP)}" for n in names)
        revisitop.append(f">> {label}: mP@k{list(result.kappas)} {mps}")
    return "\n".join([title, *lines, "", *revisitop])


MISSING = "n/a"  # the one placeholder for a value that cannot be computed (e.g. no query has positives)


def format_percent(x: float | None, width: int = 8) -> str:
    """A fraction as a percentage with 2 decimals, or :data:`MISSING`, right-aligned in ``width``."""
    if x is None or math.isnan(x):
        return f"{MISSING:>{width}}"
    return f"{x * 100:>{width}.2f}"


# --------------------------------------------------------------------------- files: what `cfcd evaluate` runs
