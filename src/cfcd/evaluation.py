"""The exact revisitop evaluation (Revisited Oxford/Paris, +1M distractors): mAP and mP@k, Easy/Medium/Hard.

A fast path that never builds the N x nq ranking (only the positions of the labelled images),
and revisitop's code verbatim as the reference. The protocol, the tie policy, the numerics and
the published numbers to check against are in ``docs/evaluation.md``.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from cfcd.errors import InputError
from cfcd.metrics import Metric, PrecisionAt, compute_ap, default_metrics, parse_metrics

__all__ = [
    "SETUPS",
    "CLASSIC_SETUPS",
    "DEFAULT_KAPPAS",
    "TIE_POLICY",
    "reference_compute_ap",
    "reference_compute_map",
    "protocol_setups",
    "setup_gnd",
    "compute_ap",
    "SetupResult",
    "EvaluationResult",
    "labelled_indices",
    "labelled_positions",
    "positions_from_ranking",
    "evaluate",
    "evaluate_scores",
    "evaluate_ranking",
    "evaluate_positions",
    "format_table",
    "evaluate_files",
    "load_mat_descriptors",
]

# setup -> (keys joined into the positives, keys joined into the junk), in revisitop's order
SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
CLASSIC_SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"classic": (("ok",), ("junk",))}
DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)
TIE_POLICY = "equal scores: lower database index first (stable argsort of -score); distractors after the database"


# --------------------------------------------------------------------------- revisitop reference (verbatim)


def reference_compute_ap(ranks, nres):
    """
    Computes average precision for given ranked indexes.

    Arguments
    ---------
    ranks : zerro-based ranks of positive images
    nres  : number of positive images

    Returns
    -------
    ap    : average precision
    """

    # number of images ranked by the system
    nimgranks = len(ranks)

    # accumulate trapezoids in PR-plot
    ap = 0

    recall_step = 1.0 / nres

    for j in np.arange(nimgranks):
        rank = ranks[j]

        if rank == 0:
            precision_0 = 1.0
        else:
            precision_0 = float(j) / rank

        precision_1 = float(j + 1) / (rank + 1)

        ap += (precision_0 + precision_1) * recall_step / 2.0

    return ap


def reference_compute_map(ranks, gnd, kappas=[]):  # noqa: B006 - verbatim signature
    """
    Computes the mAP for a given set of returned results.

         Usage:
           map = compute_map (ranks, gnd)
                 computes mean average precsion (map) only

           map, aps, pr, prs = compute_map (ranks, gnd, kappas)
                 computes mean average precision (map), average precision (aps) for each query
                 computes mean precision at kappas (pr), precision at kappas (prs) for each query

         Notes:
         1) ranks starts from 0, ranks.shape = db_size X #queries
         2) The junk results (e.g., the query itself) should be declared in the gnd stuct array
         3) If there are no positive images for some query, that query is excluded from the evaluation

    revisitop ``python/evaluate.py`` verbatim, except ``np.isin`` for the removed ``np.in1d``.
    """

    map = 0.0
    nq = len(gnd)  # number of queries
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0

    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])

        # no positive images, skip from the average
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue

        try:
            qgndj = np.array(gnd[i]["junk"])
        except:  # noqa: E722 - verbatim
            qgndj = np.empty(0)

        # sorted positions of positive and junk images (0 based)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]

        k = 0
        ij = 0
        if len(junk):
            # decrease positions of positives based on the number of
            # junk images appearing before them
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1

        # compute ap
        ap = reference_compute_ap(pos, len(qgnd))
        map = map + ap
        aps[i] = ap

        # compute precision @ k
        pos += 1  # get it to 1-based
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]

    map = map / (nq - nempty)
    pr = pr / (nq - nempty)

    return map, aps, pr, prs


# --------------------------------------------------------------------------- ground truth -> setups


def _entries(gnd: Any) -> list[Mapping]:
    """The per-query dicts of a :class:`cfcd.data.gnd.GroundTruth` or of a plain list."""
    entries = getattr(gnd, "gnd", gnd)
    if not isinstance(entries, (list, tuple)):
        raise TypeError(f"expected a GroundTruth or a list of per-query dicts, got {type(gnd).__name__}")
    return list(entries)


def protocol_setups(gnd: Any) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """:data:`SETUPS` for revisitop ground truth (easy/hard/junk), :data:`CLASSIC_SETUPS` for ok/junk."""
    entries = _entries(gnd)
    if entries and "easy" in entries[0]:
        return dict(SETUPS)
    if entries and "ok" in entries[0]:
        return dict(CLASSIC_SETUPS)
    raise InputError("ground truth: per-query dicts need 'easy'/'hard'/'junk' (revisited) or 'ok'/'junk' (classic)")


def _join(entry: Mapping, keys: Sequence[str]) -> np.ndarray:
    parts = [np.asarray(entry.get(k, []), dtype=np.int64).reshape(-1) for k in keys]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def setup_gnd(gnd: Any, setup: str) -> list[dict[str, np.ndarray]]:
    """``[{"ok": ..., "junk": ...}]`` per query for one setup, exactly as revisitop's example builds it."""
    setups = {**SETUPS, **CLASSIC_SETUPS}
    if setup not in setups:
        raise ValueError(f"unknown setup {setup!r}; choose from {', '.join(setups)}")
    ok_keys, junk_keys = setups[setup]
    return [{"ok": _join(e, ok_keys), "junk": _join(e, junk_keys)} for e in _entries(gnd)]


def labelled_indices(gnd: Any, setups: Mapping[str, tuple] | None = None) -> list[np.ndarray]:
    """Per query, the sorted unique database indices that any setup labels (positive or junk)."""
    setups = protocol_setups(gnd) if setups is None else setups
    keys = sorted({k for ok, junk in setups.values() for k in (*ok, *junk)})
    return [np.unique(_join(e, keys)) for e in _entries(gnd)]


# --------------------------------------------------------------------------- metrics from positions


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


def _chosen_setups(gnd: Any, setups: Mapping[str, tuple] | Sequence[str] | None) -> dict[str, tuple]:
    all_setups = protocol_setups(gnd)
    if setups is None:
        return all_setups
    if isinstance(setups, Mapping):
        return dict(setups)
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
    ``metrics``: names or objects of :mod:`cfcd.metrics` (default: mAP and mP@k for ``kappas``).
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


def _positive_ranks(lab: np.ndarray, where: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Ascending 0-based ranks of the retrieved positives, each lowered by the junk ranked before it."""
    pos = where[np.searchsorted(lab, np.unique(ok))]
    pos = np.sort(pos[pos >= 0])
    if junk.size and pos.size:
        jpos = where[np.searchsorted(lab, np.unique(junk))]
        jpos = np.sort(jpos[jpos >= 0])
        pos = pos - np.searchsorted(jpos, pos, side="left")  # junk strictly before each positive
    return pos


# --------------------------------------------------------------------------- positions: the fast path


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class _Block:
    """A row range of the virtual database (database, then distractors)."""

    rows: int
    offset: int
    source: str
    chunk: Callable[[int, int], np.ndarray]  # (start, stop) -> nq x (stop - start) float32 scores, C order
    data: np.ndarray | None = None  # descriptors, for naming bad rows


def _chunks(blocks: Sequence[_Block], chunk_rows: int) -> Iterator[tuple[_Block, int, int]]:
    for block in blocks:
        for start in range(0, block.rows, chunk_rows):
            yield block, start, min(block.rows, start + chunk_rows)


def _nonfinite_error(block: _Block, start: int, scores: np.ndarray) -> InputError:
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=0))
    rows = ", ".join(str(start + int(r)) for r in bad[:5])
    return InputError(f"{block.source}: descriptor row(s) {rows} contain NaN or inf (or overflow the scores)")


def _check_zero_rows(block: _Block, start: int, scores: np.ndarray) -> None:
    """An all-zero descriptor scores exactly 0 for every query: look only where query 0 scores 0."""
    cand = np.flatnonzero(scores[0] == 0)
    if not cand.size:
        return
    cand = cand[~np.any(scores[:, cand] != 0, axis=0)]
    if cand.size and block.data is not None:
        rows = start + cand
        bad = rows[~np.any(np.asarray(block.data[rows], dtype=np.float32) != 0, axis=1)]
        if bad.size:
            raise InputError(
                f"{block.source}: descriptor row(s) {', '.join(str(int(r)) for r in bad[:5])} are all zero "
                f"({bad.size} in this chunk)"
            )


def _resolve_ties(row: np.ndarray, offset: int, lab: np.ndarray, t: np.ndarray, tied: np.ndarray, before: np.ndarray):
    """Add, for each tied labelled item, the equal-scoring items of this chunk with a lower index."""
    values = np.unique(t[tied])
    hit = np.flatnonzero(np.isin(row, values))
    vals, gidx = row[hit], hit.astype(np.int64) + offset
    order = np.lexsort((gidx, vals))
    vals, gidx = vals[order], gidx[order]
    for m in np.flatnonzero(tied):
        lo = np.searchsorted(vals, t[m], side="left")
        hi = np.searchsorted(vals, t[m], side="right")
        before[m] += np.searchsorted(gidx[lo:hi], lab[m], side="left")


def _positions(
    blocks: Sequence[_Block],
    labelled: Sequence[np.ndarray],
    *,
    nq: int,
    chunk_rows: int,
    num_threads: int,
    check: bool,
    cache_bytes: int = 512 << 20,
    timings: dict[str, float] | None = None,
    dtype: type = np.float32,
) -> list[np.ndarray]:
    """Positions (0-based, :data:`TIE_POLICY`) of the labelled items of each query in its full ranking."""
    timings = timings if timings is not None else {}
    for key in ("scores", "ranking", "scores_cpu", "ranking_cpu"):  # wall and process CPU seconds
        timings.setdefault(key, 0.0)
    total = sum(b.rows for b in blocks)
    lab = [np.asarray(x, dtype=np.int64) for x in labelled]
    for i, x in enumerate(lab):
        if x.size and (x[0] < 0 or x[-1] >= total):
            raise InputError(f"ground truth: query {i} labels index {int(x[-1])}, beyond the {total} database rows")
    tvals = [np.zeros(x.size, dtype=dtype) for x in lab]  # same dtype as the scores: exact compares
    greater = [np.zeros(x.size, dtype=np.int64) for x in lab]
    before = [np.zeros(x.size, dtype=np.int64) for x in lab]
    all_lab = np.unique(np.concatenate(lab)) if lab else np.zeros(0, dtype=np.int64)

    def has_labelled(lo: int, hi: int) -> bool:
        k = np.searchsorted(all_lab, lo)
        return bool(k < all_lab.size and all_lab[k] < hi)

    def compute(block: _Block, start: int, stop: int) -> np.ndarray:
        t0, c0 = time.perf_counter(), time.process_time()
        scores = block.chunk(start, stop)
        if check:
            _check_zero_rows(block, start, scores)
        timings["scores"] += time.perf_counter() - t0
        timings["scores_cpu"] += time.process_time() - c0
        return scores

    # pass 1: the scores of the labelled items, from the same chunk products the counting uses
    cached: dict[tuple[int, int], np.ndarray] = {}
    cache_left = cache_bytes
    for block, start, stop in _chunks(blocks, chunk_rows):
        lo, hi = block.offset + start, block.offset + stop
        if not has_labelled(lo, hi):
            continue
        scores = compute(block, start, stop)
        for i in range(nq):
            a, b = np.searchsorted(lab[i], (lo, hi))
            if b > a:
                tvals[i][a:b] = scores[i, lab[i][a:b] - lo]
        # kept for pass 2; beyond the budget (huge databases) a chunk is recomputed by the same
        # BLAS call (same shapes, same threads), which gives the same bits
        if scores.nbytes <= cache_left:
            cached[(block.offset, start)] = scores
            cache_left -= scores.nbytes

    # pass 2: count, per query, the items scoring higher than each labelled score (+ ties)
    local = threading.local()

    def count(block: _Block, start: int, scores: np.ndarray, lo: int, hi: int, q0: int, q1: int) -> None:
        # sort a copy (the unsorted rows serve tie resolution) in a per-thread buffer that is reused,
        # so that no fresh pages are faulted in per chunk; numpy's SIMD sort releases the GIL
        need = (q1 - q0) * scores.shape[1]
        buf = getattr(local, "buf", None)
        if buf is None or buf.size < need or buf.dtype != scores.dtype:
            buf = local.buf = np.empty(need, dtype=scores.dtype)
        ordered = buf[:need].reshape(q1 - q0, scores.shape[1])
        np.copyto(ordered, scores[q0:q1])
        ordered.sort(axis=1)
        # NaN sorts last and -inf/inf to the ends: checking both ends covers every score
        if check and not (np.isfinite(ordered[:, 0]).all() and np.isfinite(ordered[:, -1]).all()):
            raise _nonfinite_error(block, start, scores)
        width = hi - lo
        for i in range(q0, q1):
            if not lab[i].size:
                continue
            row, t = ordered[i - q0], tvals[i]
            right = np.searchsorted(row, t, side="right")
            greater[i] += width - right
            equal = right - np.searchsorted(row, t, side="left")
            equal -= (lab[i] >= lo) & (lab[i] < hi)  # an item equals itself
            tied = equal > 0
            if tied.any():
                _resolve_ties(scores[i], lo, lab[i], t, tied, before[i])

    pool = ThreadPoolExecutor(num_threads) if num_threads > 1 and nq > 1 else None
    try:
        for block, start, stop in _chunks(blocks, chunk_rows):
            lo, hi = block.offset + start, block.offset + stop
            scores = cached.pop((block.offset, start), None)
            if scores is None:
                scores = compute(block, start, stop)
            t0, c0 = time.perf_counter(), time.process_time()
            if pool is None:
                count(block, start, scores, lo, hi, 0, nq)
            else:
                bounds = np.linspace(0, nq, min(num_threads, nq) + 1).astype(int)
                futures = [pool.submit(count, block, start, scores, lo, hi, a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
                for f in futures:
                    f.result()
            timings["ranking"] += time.perf_counter() - t0
            timings["ranking_cpu"] += time.process_time() - c0
    finally:
        if pool is not None:
            pool.shutdown()
    return [g + b for g, b in zip(greater, before)]


def _as_2d_float(x: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{name}: expected an N x D matrix, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{name}: expected floating-point descriptors, got dtype {x.dtype}")
    return x


def _descriptor_block(
    data: np.ndarray, queries: np.ndarray, offset: int, source: str, transform: Callable | None = None
) -> _Block:
    def chunk(start: int, stop: int) -> np.ndarray:
        rows = np.asarray(data[start:stop], dtype=np.float32)  # float16 / memmap -> float32 in memory
        if transform is not None:
            rows = np.asarray(transform(rows), dtype=np.float32)
        # the reference's X @ Q.T, per chunk and already transposed (nq x rows, C order):
        # one float32 GEMM with the transposed operand, no copy
        return queries @ rows.T

    return _Block(int(data.shape[0]), offset, source, chunk, data)


def _auto_chunk_rows(nq: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        return int(chunk_rows)
    # three nq x rows float32 buffers (scores, sorted copy, BLAS output) within ~192 MB
    return int(min(131072, max(4096, (192 << 20) // (12 * max(nq, 1)))))


def labelled_positions(
    queries: np.ndarray,
    database: np.ndarray,
    labelled: Sequence[np.ndarray],
    *,
    distractors: Sequence[np.ndarray] | np.ndarray | None = None,
    sources: Sequence[str] | None = None,
    chunk_rows: int | None = None,
    num_threads: int | None = None,
    check: bool = True,
    timings: dict[str, float] | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Ranking positions of ``labelled[i]`` for query i over ``database`` followed by ``distractors``.

    Scores are ``queries @ rows.T`` in float32 chunks of ``chunk_rows``; ``database`` and each
    distractor matrix may be ``np.memmap`` (read chunk by chunk). ``transform`` (e.g. a
    whitening) is applied to each chunk of database/distractor rows (not to ``queries``: pass
    them transformed). With ``check``, a chunk holding a NaN/inf or all-zero descriptor raises
    :class:`~cfcd.errors.InputError` naming its source (``sources``: one name per matrix,
    database first) and row. Positions follow :data:`TIE_POLICY`.
    """
    queries = _as_2d_float(queries, "queries")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if check:
        if not np.isfinite(q).all():
            raise InputError("queries: descriptors contain NaN or inf")
        zero = np.flatnonzero(~np.any(q != 0, axis=1))
        if zero.size:
            raise InputError(f"queries: descriptor row(s) {', '.join(str(int(r)) for r in zero[:5])} are all zero")
    mats = [_as_2d_float(database, "database")]
    if distractors is not None:
        mats += [distractors] if isinstance(distractors, np.ndarray) else list(distractors)
    names = list(sources) if sources is not None else ["database"] + [f"distractors[{i}]" for i in range(len(mats) - 1)]
    blocks, offset = [], 0
    for mat, name in zip(mats, names):
        mat = _as_2d_float(mat, name)
        if transform is None and mat.shape[1] != q.shape[1]:
            raise InputError(f"{name}: descriptors are {mat.shape[1]}-D but the queries are {q.shape[1]}-D")
        blocks.append(_descriptor_block(mat, q, offset, name, transform))
        offset += mat.shape[0]
    return _positions(
        blocks,
        labelled,
        nq=q.shape[0],
        chunk_rows=_auto_chunk_rows(q.shape[0], chunk_rows),
        num_threads=num_threads or _default_threads(),
        check=check,
        timings=timings,
    )


def positions_from_ranking(ranks: np.ndarray, labelled: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Positions of the labelled items in a ranking ``ranks`` (K x nq, revisitop layout, K <= N).

    A truncated ranking (K < N, e.g. a top-k search result) gives -1 for the items it misses.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(labelled):
        raise InputError(f"ranks: expected a K x {len(labelled)} matrix (one column per query), got {ranks.shape}")
    out = []
    for i, lab in enumerate(labelled):
        col = ranks[:, i].astype(np.int64)
        size = int(max(col.max(initial=-1), lab.max(initial=-1))) + 1
        where = np.full(size, -1, dtype=np.int64)
        where[col[::-1]] = np.arange(col.size - 1, -1, -1)  # first occurrence wins
        out.append(where[lab])
    return out


# --------------------------------------------------------------------------- public entry points


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
    lab = labelled_indices(gnd)
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
    lab = labelled_indices(gnd)
    timings: dict[str, float] = {}
    pos = _positions(
        [block], lab, nq=len(entries), chunk_rows=_auto_chunk_rows(len(entries), chunk_rows),
        num_threads=num_threads or _default_threads(), check=False, timings=timings, dtype=dtype,
    )
    return _timed_metrics(lab, pos, gnd, timings, setups=setups, kappas=kappas, metrics=metrics,
                          num_database=n_db, num_distractors=scores.shape[0] - n_db)


def evaluate_ranking(
    ranks: np.ndarray,
    gnd: Any,
    *,
    setups: Sequence[str] | None = None,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    metrics: Sequence[str | Metric] | None = None,
    num_database: int | None = None,
    num_distractors: int = 0,
) -> EvaluationResult:
    """Evaluate a ranking ``ranks`` (K x nq database indices, best first; revisitop's layout).

    Equal to :func:`reference_compute_map` for a full ranking. A truncated ranking (top-k) is
    accepted: positives it misses count as not retrieved (revisitop would raise if a query
    retrieved none of its positives; here its AP and P@k are 0).
    """
    lab = labelled_indices(gnd)
    pos = positions_from_ranking(ranks, lab)
    n_db = num_database if num_database is not None else _gnd_size(gnd, np.asarray(ranks).shape[0])
    return evaluate_positions(
        lab, pos, gnd, setups=setups, kappas=kappas, metrics=metrics, num_database=n_db,
        num_distractors=num_distractors,
    )


# --------------------------------------------------------------------------- printing


def _around(x: float | np.ndarray):
    return np.around(np.asarray(x) * 100, decimals=2)


def format_table(result: EvaluationResult, dataset: str = "") -> str:
    """A readable table plus revisitop's own two ``>>`` lines (``np.around(x*100, 2)``)."""
    names = list(result.setups)
    metrics = result.setups[names[0]].metrics if names else ()
    head = [f"{'setup':<8}"] + [f"{m.name:>8}" for m in metrics]
    lines = ["".join(head)]
    for name in names:
        s = result.setups[name]
        cells = [f"{name:<8}"] + [_cell(s.values[m.name]) for m in metrics]
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


def _cell(x: float) -> str:
    return format_percent(x)


# --------------------------------------------------------------------------- files: what `cfcd evaluate` runs


def _store_summary(store: Any, role: str) -> dict[str, Any]:
    """Provenance of one descriptor input for the report (its meta, minus the long lists)."""
    meta = dict(getattr(store, "meta", {}) or {})
    path = Path(store.path)
    out: dict[str, Any] = {"path": str(path.resolve()), "kind": "store" if path.is_dir() else path.suffix.lstrip(".").lower() or "npy",
                           "rows": int(store.descriptors.shape[0]), "dim": int(store.descriptors.shape[1]),
                           "dtype": store.descriptors.dtype.name}
    if "failures" in meta:
        out["failures"] = len(meta.pop("failures") or [])
    extract = meta.get("extract")
    if isinstance(extract, dict):
        extract = dict(extract)
        if "warnings" in extract:
            extract["warnings"] = len(extract["warnings"] or [])
        meta["extract"] = extract
    out["meta"] = meta
    return out


def _extraction_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Scales, query cropping and the model, from a store's meta (cfcd extract layout or flat keys)."""
    extract = meta.get("extract") if isinstance(meta.get("extract"), Mapping) else {}
    out = {}
    for key, names in (
        ("model", ("model",)),
        ("weights_sha256", ("weights_sha256",)),
        ("scales", ("scales",)),
        ("query_crop", ("query_crop", "crop_rule", "crop")),
        ("max_size", ("max_size",)),
        ("precision", ("precision",)),
        ("whitening", ("whitening",)),
    ):
        for name in names:
            value = extract.get(name, meta.get(name))
            if value is not None:
                out[key] = value
                break
    return out


def load_mat_descriptors(
    path: str | os.PathLike,
    *,
    role: str,
    expected_rows: int | None = None,
    expected_dim: int | None = None,
    variable: str | None = None,
):
    """Descriptors from a MATLAB ``.mat`` file, as a :class:`cfcd.features.DescriptorStore` (no ids).

    revisitop's example features (``<ds>_resnet_rsfm120k_gem.mat``) hold ``Q`` (D x nq) and ``X``
    (D x n), the MATLAB/cirtorch column layout: 2-D matrices are read as D x N and transposed.
    CFCD's R1M shards (``savemat(..., {'X': [(1, D) arrays]})``) load as N x 1 x D and are squeezed.
    ``variable`` defaults to ``Q`` for queries (else ``X``). Needs scipy.
    """
    from cfcd.features import DescriptorStore

    path = Path(path)
    where = f"{path} ({role})"
    if not path.is_file():
        raise InputError(f"{where}: file not found")
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is in the dev extra
        raise InputError(f"{where}: reading .mat files needs scipy (pip install scipy)") from None
    variable = variable or ("Q" if role == "queries" else "X")
    try:
        mat = loadmat(str(path), variable_names=[variable])
    except Exception as exc:  # truncated, not a .mat, MATLAB v7.3 (HDF5)...
        raise InputError(f"{where}: not a readable MATLAB .mat file: {type(exc).__name__}: {exc}") from None
    if variable not in mat:
        raise InputError(f"{where}: no variable {variable!r} in this .mat file")
    x = np.asarray(mat[variable])
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0, :]  # CFCD R1M shard: N x 1 x D
    elif x.ndim == 2:
        x = x.T  # MATLAB / cirtorch layout: one descriptor per column
    else:
        raise InputError(f"{where}: {variable!r} has shape {x.shape}; expected D x N (or N x 1 x D)")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{where}: {variable!r} must be floating point, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] == 0:
        raise InputError(f"{where}: contains no descriptors (0 columns)")
    if expected_dim is not None and x.shape[1] != expected_dim:
        raise InputError(f"{where}: descriptors are {x.shape[1]}-D but {expected_dim}-D are expected")
    if expected_rows is not None and x.shape[0] != expected_rows:
        raise InputError(f"{where}: {x.shape[0]} descriptors (columns of {variable!r}) but {expected_rows} "
                         "images are expected")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise InputError(f"{where}: {bad.size} descriptors contain NaN or inf, first: {bad[:5].tolist()}")
    zero = np.flatnonzero(~np.any(x != 0, axis=1))
    if zero.size:
        raise InputError(f"{where}: {zero.size} descriptors are all zero, first: {zero[:5].tolist()}")
    return DescriptorStore(path=path, descriptors=x, ids=None, meta={"source": f".mat variable {variable!r}"})


def evaluate_files(
    *,
    gnd: Any,
    queries: str | os.PathLike,
    database: str | os.PathLike,
    distractors: Sequence[str | os.PathLike] | str | os.PathLike = (),
    whiten: str | os.PathLike | Any | None = None,  # or a cfcd.postprocess.Whitening
    qe: tuple[int, float] | None = None,
    dba: tuple[int, float] | None = None,
    setups: Sequence[str] | None = None,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    metrics: Sequence[str | Metric] | None = None,
    chunk_rows: int | None = None,
    num_threads: int | None = None,
) -> tuple[EvaluationResult, dict[str, Any]]:
    """Load, validate and evaluate descriptor files; returns the result and its ``protocol`` block.

    ``gnd`` is a :class:`cfcd.data.gnd.GroundTruth`. ``queries``/``database`` are descriptor
    stores (matched to ``qimlist``/``imlist`` by id), plain ``.npy`` matrices in that order, or
    MATLAB ``.mat`` files (:func:`load_mat_descriptors`: revisitop's example features);
    ``distractors`` are stores or matrices of the same dimension, streamed from their memory
    maps. Order of post-processing (dirtorch): whitening, then DBA, then alpha-QE (on the
    augmented database; both over the database *and* the distractors). Every bad input raises
    :class:`~cfcd.errors.InputError` naming the file.
    """
    t_load = time.perf_counter()
    qstore, xstore, dstores = _load_inputs(gnd, queries, database, distractors)
    q, x, dmats, names, transform, post = _postprocess(qstore, xstore, dstores, whiten, dba, qe)
    load_seconds = time.perf_counter() - t_load

    result = evaluate(
        q, x, gnd, distractors=dmats or None, setups=setups, kappas=kappas, metrics=metrics, sources=names,
        chunk_rows=chunk_rows, num_threads=num_threads, check=True, transform=transform,
    )
    result.timings["load"] = load_seconds
    return result, _protocol(gnd, result, setups, qstore, xstore, dstores, post)


def _load_inputs(gnd, queries, database, distractors):
    """The query, database and distractor stores, checked against the ground truth and each other."""
    from cfcd.features import check_compatible, load_descriptors, open_store

    def load(path, ids, dim, role):
        if Path(path).suffix.lower() == ".mat":
            return load_mat_descriptors(path, role=role, expected_rows=len(ids), expected_dim=dim)
        return load_descriptors(path, expected_ids=ids, expected_dim=dim, role=role)

    if isinstance(distractors, (str, os.PathLike)):
        distractors = [distractors]
    qstore = load(queries, gnd.qimlist, None, "queries")
    dim = qstore.descriptors.shape[1]
    xstore = load(database, gnd.imlist, dim, "database")
    dstores = []
    for path in distractors:
        if Path(path).suffix.lower() == ".mat":
            store = load_mat_descriptors(path, role="distractors", expected_dim=dim)
        else:
            store = open_store(path, mmap=True)
        where = f"{store.path} (distractors)"
        x = store.descriptors
        if x.shape[0] == 0:
            raise InputError(f"{where}: contains no descriptors (0 rows)")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{where}: descriptors must be floating point, got dtype {x.dtype}")
        if x.shape[1] != dim:
            raise InputError(f"{where}: descriptors are {x.shape[1]}-D but the queries are {dim}-D")
        dstores.append(store)
    for other in (qstore, *dstores):  # one embedding space, or a clear refusal (not a silent mAP)
        check_compatible(xstore, other)
    return qstore, xstore, dstores


def _postprocess(qstore, xstore, dstores, whiten, dba, qe):
    """Whitening, then DBA, then alpha-QE, in dirtorch's order; returns the matrices to score,
    their source names, the whitening still to apply chunk by chunk, and the ``post`` record."""
    from cfcd.utils.io import sha256_file

    q = np.asarray(qstore.descriptors, dtype=np.float32)
    x = np.asarray(xstore.descriptors, dtype=np.float32)
    dmats: list[np.ndarray] = [s.descriptors for s in dstores]
    names = [f"{xstore.path} (database)"] + [f"{s.path} (distractors)" for s in dstores]
    transform = None
    post: dict[str, Any] = {"whitening": None, "database_augmentation": None, "query_expansion": None}
    if whiten is not None:
        from cfcd.postprocess import load_whitening

        w = load_whitening(whiten)  # a path, or a Whitening (cfcd.postprocess.resolve_whitening)
        desc = w.describe() if hasattr(w, "describe") else {}
        post["whitening"] = {"path": str(w.info.get("file", whiten) if not isinstance(whiten, (str, os.PathLike)) else whiten), **desc}
        if isinstance(whiten, (str, os.PathLike)) and Path(whiten).is_file():
            post["whitening"].setdefault("sha256", sha256_file(whiten))
        q = w.transform(q)
        transform = w.transform  # database and distractors: whitened chunk by chunk while scoring
    dba = dba if dba and int(dba[0]) > 0 else None  # k = 0 is a no-op, as in dirtorch
    qe = qe if qe and int(qe[0]) > 0 else None
    if dba or qe:
        from cfcd.postprocess import alpha_query_expansion, database_augmentation

        parts = [np.asarray(transform(m) if transform else m, dtype=np.float32) for m in [x, *dmats]]
        x = parts[0]
        full = np.concatenate(parts) if len(parts) > 1 else x
        transform = None
        if dba:
            full = database_augmentation(full, int(dba[0]), float(dba[1]))
            post["database_augmentation"] = {"method": "alpha-DBA (dirtorch)", "k": int(dba[0]), "alpha": float(dba[1])}
        if qe:
            q = alpha_query_expansion(q, full, int(qe[0]), float(qe[1]))
            post["query_expansion"] = {"method": "alpha-QE (dirtorch)", "k": int(qe[0]), "alpha": float(qe[1])}
        x = full[: x.shape[0]]
        dmats = [full[x.shape[0]:]] if full.shape[0] > x.shape[0] else []
        names = names[:1] + ([f"{len(dstores)} distractor file(s) after post-processing"] if dmats else [])
    return q, x, dmats, names, transform, post


def _protocol(gnd, result, setups, qstore, xstore, dstores, post) -> dict[str, Any]:
    """What was evaluated and how: ground truth, inputs, post-processing, metric and timings."""
    from cfcd import __version__

    qfields = _extraction_fields(qstore.meta)
    xfields = _extraction_fields(xstore.meta)
    if post["whitening"] is None and qfields.get("whitening") is not None:
        # descriptors whitened beforehand (`cfcd whiten --apply`): say so, from the stores' meta
        post["whitening"] = {"applied_before": True, "queries": qfields.get("whitening"),
                             "database": xfields.get("whitening")}
    setups = _chosen_setups(gnd, setups)
    protocol = {
        "dataset": gnd.dataset,
        "gnd": str(gnd.path),
        "gnd_sha256": gnd.sha256,
        "gnd_official": bool(getattr(gnd, "official", False)),
        "num_queries": result.num_queries,
        "num_database": result.num_database,
        "num_distractors": result.num_distractors,
        "setups": {n: {"positives": "+".join(ok), "junk": "+".join(junk)} for n, (ok, junk) in setups.items()},
        "kappas": list(result.kappas),
        "metrics": [m.name for m in next(iter(result.setups.values())).metrics] if result.setups else [],
        "metric": "revisitop compute_map: trapezoidal AP, junk removed from the ranking, queries without positives skipped; values in percent",
        "similarity": "float32 inner product (cosine for L2-normalised descriptors)",
        "tie_policy": TIE_POLICY,
        "query_crop": qfields.get("query_crop"),
        "scales": {"queries": qfields.get("scales"), "database": xfields.get("scales")},
        "model": {"queries": qfields.get("model"), "database": xfields.get("model")},
        **post,
        "inputs": {
            "queries": _store_summary(qstore, "queries"),
            "database": _store_summary(xstore, "database"),
            "distractors": [_store_summary(s, "distractors") for s in dstores],
        },
        "cfcd_version": __version__,
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
    }
    return protocol
