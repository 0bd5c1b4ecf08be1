"""The positions of the labelled images in each query's ranking, without ever building the ranking.

Scores are computed in chunks; for every query only the labelled images are located, by counting the
scores above theirs (sorted thresholds, binary search), with ties resolved as a stable sort does.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from cfcd.errors import InputError


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
