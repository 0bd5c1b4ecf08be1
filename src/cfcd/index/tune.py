"""Tuning nprobe / efSearch on held-out rows against exact search (recall@10/@100 and latency)."""

from __future__ import annotations

import logging
import time

import numpy as np

from cfcd.index.generations import kill_point
from cfcd.index.rows import RowReader
from cfcd.utils.io import utc_timestamp as _now

logger = logging.getLogger(__name__)


def exact_topk(queries: np.ndarray, reader: RowReader, k: int, block_rows: int = 32768) -> np.ndarray:
    """Exact inner-product top-k rows of ``queries`` over every row (block reads, no memory map).

    NumPy only (a BLAS product and ``argpartition`` per block): the build process never imports
    torch, whose import alone costs ~300 MB of resident memory.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for s in range(0, len(reader), block_rows):
        block = reader.read(s, s + block_rows)
        scores = q @ block.T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cs = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        ci = np.concatenate([best_i, part + s], axis=1)
        order = np.argsort(-cs, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cs, order, axis=1), np.take_along_axis(ci, order, axis=1)
    return best_i


def _drop_self(idx: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for j, (found, r) in enumerate(zip(idx, rows)):
        keep = found[found != r][:k]
        out[j, : len(keep)] = keep
    return out


def _recall(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    hits = sum(len(np.intersect1d(a[:k][a[:k] >= 0], e[:k][e[:k] >= 0])) for a, e in zip(approx, exact))
    denom = sum(int((e[:k] >= 0).sum()) for e in exact)
    return hits / max(1, denom)


def tune(index, reader: RowReader, rows: np.ndarray, *, target_recall: float = 0.95, max_query_ms: float = 10.0,
         latency_queries: int = 200) -> dict:
    """Measure recall@10/@100 (against exact search) and latency of ``index`` on the held-out
    ``rows`` for increasing nprobe (IVF) or efSearch (HNSW); pick the smallest setting that reaches
    ``target_recall`` at 10 within ``max_query_ms`` (else the most accurate one within it).

    The held-out rows are not in the training sample; each query's own row is dropped from both
    the exact and the approximate lists (it is in the collection), so the neighbours are others.
    Latency: one query at a time, on ``latency_queries`` of them.
    """
    import faiss

    rows = np.asarray(rows, dtype=np.int64)
    q = reader.take(rows)
    k = min(100, len(index) - 1)
    truth = _drop_self(exact_topk(q, reader, k + 1), rows, k)
    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None:
        name, values = "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v <= ivf.nlist]
        if ivf.nlist not in values and ivf.nlist <= 1024:
            values.append(int(ivf.nlist))
    elif isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
        name, values = "efSearch", [v for v in (16, 32, 64, 128, 256, 512) if v >= k] or [k]
    else:
        name, values = None, [None]
    curve = []
    nl = min(latency_queries, len(q))
    for v in values:
        kw = {} if name is None else ({"nprobe": v} if name == "nprobe" else {"ef_search": v})
        res = index.search(q, k + 1, rerank=0 if not index.params.get("rerank") else None, **kw)
        got = _drop_self(res.indices, rows, k)
        t0 = time.perf_counter()
        for i in range(nl):
            index.search(q[i : i + 1], k + 1, **kw)
        ms = 1000 * (time.perf_counter() - t0) / max(1, nl)
        point = {"search": {} if name is None else {name: int(v)}, "recall@10": round(_recall(got, truth, 10), 4),
                 f"recall@{k}" if k != 100 else "recall@100": round(_recall(got, truth, k), 4),
                 "ms_per_query": round(ms, 3)}
        curve.append(point)
        kill_point("tune")
        if point["recall@10"] >= target_recall or ms > max_query_ms:
            break
    within = [p for p in curve if p["ms_per_query"] <= max_query_ms] or curve[:1]
    good = [p for p in within if p["recall@10"] >= target_recall]
    chosen = good[0] if good else max(within, key=lambda p: p["recall@10"])
    if not good:
        logger.warning("recall@10 %.3f < target %.3f within %.1f ms/query; raise --max-query-ms or the budget",
                       chosen["recall@10"], target_recall, max_query_ms)
    return {"queries": int(len(rows)), "latency_queries": int(nl), "k": int(k), "target_recall@10": target_recall,
            "max_query_ms": max_query_ms, "threads": int(faiss.omp_get_max_threads()), "curve": curve,
            "chosen": chosen, "measured": _now()}
