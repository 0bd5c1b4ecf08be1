"""The revisitop protocol's entry points: descriptors, scores, rankings or positions in, metrics out."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cfcd.errors import InputError
from cfcd.evaluation.metrics import Metric, PrecisionAt, default_metrics, parse_metrics
from cfcd.evaluation.ranking import (
    _as_2d_float,
    _auto_chunk_rows,
    _Block,
    _default_threads,
    _positions,
    _positive_ranks,
    labelled_positions,
    positions_from_ranking,
)
from cfcd.evaluation.results import EvaluationResult, SetupResult
from cfcd.evaluation.setups import DEFAULT_KAPPAS, _entries, _join, labelled_indices, protocol_setups


def _chosen_setups(gnd: Any, setups: Mapping[str, tuple] | Sequence[str] | None) -> dict[str, tuple]:
    if isinstance(setups, Mapping):  # a dataset's own setups (GLDv2): its ground truth has other keys
        return dict(setups)
    all_setups = protocol_setups(gnd)
    if setups is None:
        return all_setups
    unknown = [s for s in setups if s not in all_setups]
    if unknown:
        raise ValueError(f"unknown setup(s) {unknown} for this ground truth; choose from {list(all_setups)}")
    return {s: all_setups[s] for s in setups}


def _chosen_metrics(metrics: Sequence[str | Metric] | None, kappas: Sequence[int]) -> tuple[Metric, ...]:
    if metrics is not None:
        return parse_metrics(metrics)
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be >= 1, got {kappas}")
    return default_metrics(kappas)


def evaluate_positions(
    labelled: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    gnd: Any,
    *,
    setups: Mapping[str, tuple] | Sequence[str] | None = None,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    metrics: Sequence[str | Metric] | None = None,
    num_database: int | None = None,
    num_distractors: int = 0,
    query_ids: Sequence[str] | None = None,
) -> EvaluationResult:
    """Metrics from the 0-based ranking positions of the labelled images of each query.

    ``labelled[i]`` are sorted unique database indices (:func:`labelled_indices`) and
    ``positions[i]`` their positions in query i's full ranking (-1: not in a truncated ranking;
    such positives count as not retrieved). Junk is removed by shifting, as in revisitop.
    ``metrics``: names or objects of :mod:`cfcd.evaluation.metrics` (default: mAP and mP@k for ``kappas``).
    """
    entries = _entries(gnd)
    chosen = _chosen_setups(gnd, setups)
    chosen_metrics = _chosen_metrics(metrics, kappas)
    nq = len(entries)
    results = {}
    for name, (ok_keys, junk_keys) in chosen.items():
        table = np.full((nq, len(chosen_metrics)), np.nan)
        npos = np.zeros(nq, dtype=np.int64)
        for i, entry in enumerate(entries):
            ok = _join(entry, ok_keys)
            npos[i] = ok.size
            if ok.size == 0:
                continue  # no positive images: skipped from the average, as in revisitop
            ranks = _positive_ranks(labelled[i], positions[i], ok, _join(entry, junk_keys))
            table[i] = [metric(ranks, ok.size) for metric in chosen_metrics]  # ok.size: duplicates included
        evaluated = int(np.count_nonzero(npos))
        # revisitop divides by zero without evaluated queries; report NaN instead
        means = np.nansum(table, axis=0) / evaluated if evaluated else np.full(len(chosen_metrics), np.nan)
        results[name] = SetupResult(
            name, chosen_metrics, {m.name: float(v) for m, v in zip(chosen_metrics, means)},
            {m.name: table[:, j].copy() for j, m in enumerate(chosen_metrics)}, evaluated, npos,
        )
    n_db = num_database if num_database is not None else (len(getattr(gnd, "imlist", [])) or 0)
    ids = list(query_ids) if query_ids is not None else (list(getattr(gnd, "qimlist", [])) or None)
    kappas_out = tuple(m.k for m in chosen_metrics if isinstance(m, PrecisionAt))
    return EvaluationResult(results, kappas_out, nq, int(n_db), int(num_distractors), ids)


def _gnd_size(gnd: Any, n_rows: int) -> int:
    imlist = getattr(gnd, "imlist", None)
    return len(imlist) if imlist is not None else n_rows


def evaluate(
    queries: np.ndarray,
    database: np.ndarray,
    gnd: Any,
    *,
    distractors: Sequence[np.ndarray] | np.ndarray | None = None,
    setups: Sequence[str] | None = None,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    metrics: Sequence[str | Metric] | None = None,
    sources: Sequence[str] | None = None,
    chunk_rows: int | None = None,
    num_threads: int | None = None,
    check: bool = True,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> EvaluationResult:
    """Evaluate descriptors with the revisitop protocol (fast path; see ``docs/evaluation.md``).

    ``queries`` (nq x D) follow the ground truth's ``qimlist``, ``database`` (N x D) its
    ``imlist``; ``distractors`` (one matrix or a list, e.g. R1M shards) are appended to the
    database as negatives. ``gnd`` is a :class:`cfcd.data.gnd.GroundTruth` or a list of
    per-query dicts. ``transform`` is applied chunk by chunk to the database and distractor rows
    (streamed whitening; pass the queries already transformed). Returns an
    :class:`EvaluationResult` (timings in seconds: ``scores``, ``ranking``, ``metrics``).
    """
    entries = _entries(gnd)
    queries = _as_2d_float(queries, "queries")
    database = _as_2d_float(database, "database")
    if queries.shape[0] != len(entries):
        raise InputError(f"queries: {queries.shape[0]} rows but the ground truth has {len(entries)} queries")
    n_db = _gnd_size(gnd, database.shape[0])
    if database.shape[0] != n_db:
        raise InputError(f"database: {database.shape[0]} rows but the ground truth lists {n_db} database images")
    lab = labelled_indices(gnd, _chosen_setups(gnd, setups))  # the setups' keys (GLDv2: public, private)
    timings: dict[str, float] = {}
    pos = labelled_positions(
        queries, database, lab, distractors=distractors, sources=sources,
        chunk_rows=chunk_rows, num_threads=num_threads, check=check, timings=timings, transform=transform,
    )
    n_dis = 0
    if distractors is not None:
        mats = [distractors] if isinstance(distractors, np.ndarray) else list(distractors)
        n_dis = sum(int(m.shape[0]) for m in mats)
    return _timed_metrics(lab, pos, gnd, timings, setups=setups, kappas=kappas, metrics=metrics,
                          num_database=n_db, num_distractors=n_dis)


def _timed_metrics(lab, pos, gnd, timings: dict[str, float], **kwargs) -> EvaluationResult:
    """:func:`evaluate_positions`, with its wall and CPU time added to ``timings``."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = evaluate_positions(lab, pos, gnd, **kwargs)
    timings["metrics"] = time.perf_counter() - t0
    timings["metrics_cpu"] = time.process_time() - c0
    result.timings = timings
    return result


def evaluate_scores(
    scores: np.ndarray,
    gnd: Any,
    *,
    setups: Sequence[str] | None = None,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    metrics: Sequence[str | Metric] | None = None,
    num_database: int | None = None,
    chunk_rows: int | None = None,
    num_threads: int | None = None,
) -> EvaluationResult:
    """Evaluate a given N x nq score matrix (revisitop's ``sim = X @ Q.T`` layout; higher is better).

    Exactly equal to ``reference_compute_map(np.argsort(-scores, axis=0, kind="stable"), ...)``.
    Rows beyond the ground truth's database (``num_database``) are distractors.
    """
    scores = np.asarray(scores)
    entries = _entries(gnd)
    if scores.ndim != 2 or scores.shape[1] != len(entries):
        raise InputError(f"scores: expected an N x {len(entries)} matrix, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise InputError("scores: contain NaN or inf")
    n_db = num_database if num_database is not None else _gnd_size(gnd, scores.shape[0])

    dtype = np.float64 if scores.dtype == np.float64 else np.float32

    def chunk(start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(scores[start:stop].T, dtype=dtype)

    block = _Block(int(scores.shape[0]), 0, "scores", chunk)
    lab = labelled_indices(gnd, _chosen_setups(gnd, setups))  # the setups' keys (GLDv2: public, private)
    timings: dict[str, float] = {}
    pos = _positions(
        [block], lab, nq=len(entries), chunk_rows=_auto_chunk_rows(len(entries), chunk_rows),
        num_threads=num_threads or _default_threads(), check=False, timings=timings, dtype=dtype,
    )
    return _timed_metrics(lab, pos, gnd, timings, setups=setups, kappas=kappas, metrics=metrics,
                          num_database=n_db, num_distractors=scores.shape[0] - n_db)


def evaluate_ranking(ranks: np.ndarray, gnd: Any, *, num_database: int | None = None, **protocol) -> EvaluationResult:
    """Evaluate a ranking ``ranks`` (K x nq database indices, best first; revisitop's layout).

    Equal to :func:`reference_compute_map` for a full ranking. A truncated ranking (top-k) is
    accepted: positives it misses count as not retrieved (revisitop would raise if a query
    retrieved none of its positives; here its AP and P@k are 0). ``protocol``: ``setups``,
    ``kappas``, ``metrics``, ``num_distractors``, as :func:`evaluate_positions` takes them.
    """
    lab = labelled_indices(gnd)
    pos = positions_from_ranking(ranks, lab)
    n_db = num_database if num_database is not None else _gnd_size(gnd, np.asarray(ranks).shape[0])
    return evaluate_positions(lab, pos, gnd, num_database=n_db, **protocol)
