"""Exact inner-product top-k: chunked torch matmul on the CPU or a GPU, never an N x nq score matrix.

The database is processed in chunks and a running top-k is kept with ``torch.topk``, so a 1M x 512
database (memory-mapped, float16 or float32) needs one ``query_chunk x db_chunk`` block at a time.
``device="auto"`` uses a GPU when there is one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cfcd.errors import CfcdError, InputError
from cfcd.runtime import resolve_device
from cfcd.store import DescriptorStore

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Top-k results: ``scores`` and ``indices`` are nq x k, best first.

    ``indices`` are database rows (-1 where an approximate index found fewer than k results,
    with score -inf); ``ids`` maps them to image ids when the database has ids.
    """

    scores: np.ndarray
    indices: np.ndarray
    db_ids: list[str] | None = None
    query_ids: list[str] | None = None

    @property
    def ids(self) -> list[list[str | None]]:
        if self.db_ids is None:
            raise CfcdError("this search result has no database ids (plain .npy database)")
        return [[self.db_ids[j] if j >= 0 else None for j in row] for row in self.indices.tolist()]

    def to_json(self, k: int | None = None) -> dict:
        """A JSON-ready dict: one entry per query with its ranked ``{"id", "row", "score"}`` results."""
        k = self.indices.shape[1] if k is None else k
        queries = []
        for qi in range(self.indices.shape[0]):
            results = []
            for j, s in zip(self.indices[qi, :k].tolist(), self.scores[qi, :k].tolist()):
                if j < 0:
                    continue
                entry = {"row": int(j), "score": float(s)}
                if self.db_ids is not None:
                    entry = {"id": self.db_ids[j], **entry}
                results.append(entry)
            qid = self.query_ids[qi] if self.query_ids is not None else qi
            queries.append({"query": qid, "results": results})
        return {"k": int(k), "queries": queries}


def _tensor(x, dev):
    """float32 rows as a torch tensor on ``dev`` (read-only memmap blocks are copied once)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device=dev, dtype=torch.float32)
    a = np.ascontiguousarray(x, dtype=np.float32)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a).to(dev)


def _as_matrix(x, role: str) -> np.ndarray:
    if isinstance(x, DescriptorStore):
        x = x.descriptors
    if type(x).__module__.startswith("torch"):
        return x  # a tensor (e.g. a database cached on the GPU): sliced and used as is
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise InputError(f"{role}: expected an N x D matrix, got shape {x.shape}")
    return x


def exact_search(
    queries,
    database,
    k: int = 100,
    *,
    device: str | None = "auto",
    db_chunk: int | None = None,
    query_chunk: int = 1024,
    exclude_self: bool = False,
    progress: bool = False,
) -> SearchResult:
    """Exact inner-product top-k of every query row in ``database`` (N x D, memmap welcome).

    Database rows are read ``db_chunk`` at a time (default: 128 MB of float32, i.e. 65536 rows
    at 512-D) and cast to float32 on the device; queries go ``query_chunk`` at a time. A running
    top-k is merged with ``torch.topk``, so memory is ``O(query_chunk * db_chunk + nq * k)``
    regardless of N. ``database`` may also be a torch tensor (e.g. cached on the GPU by
    :class:`ExactIndex`). ``k`` is clamped to N.
    ``exclude_self`` drops the diagonal (query i == database row i), for database-side queries.
    Scores are float32; equal scores may come in any order.
    """
    import torch

    q = _as_matrix(queries, "queries")
    x = _as_matrix(database, "database")
    if q.shape[1] != x.shape[1]:
        raise InputError(f"queries are {q.shape[1]}-D but the database is {x.shape[1]}-D")
    n, nq = x.shape[0], q.shape[0]
    if n == 0:
        raise InputError("the database is empty")
    k_eff = min(int(k), n - (1 if exclude_self else 0))
    if k_eff <= 0:
        raise InputError(f"k must be positive (got k={k} for a database of {n})")
    dev = resolve_device(device)
    db_chunk = max(1, int(db_chunk or max(1024, (128 << 20) // (4 * x.shape[1]))))
    query_chunk = max(1, int(query_chunk))
    out_scores = np.empty((nq, k_eff), dtype=np.float32)
    out_idx = np.empty((nq, k_eff), dtype=np.int64)
    q_all = _tensor(q, dev)
    iterator = range(0, n, db_chunk)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="search", unit="chunk", total=(n + db_chunk - 1) // db_chunk)
    best_s = torch.full((nq, k_eff), -float("inf"), device=dev)
    best_i = torch.full((nq, k_eff), -1, dtype=torch.long, device=dev)
    with torch.inference_mode():
        for start in iterator:
            block = _tensor(x[start : start + db_chunk], dev)
            m = block.shape[0]
            kk = min(k_eff, m)
            for qs in range(0, nq, query_chunk):
                qe = min(qs + query_chunk, nq)
                scores = q_all[qs:qe] @ block.T
                if exclude_self:
                    rows = torch.arange(qs, qe, device=dev)
                    inside = (rows >= start) & (rows < start + m)
                    if bool(inside.any()):
                        scores[inside.nonzero().squeeze(1), rows[inside] - start] = -float("inf")
                s, i = torch.topk(scores, kk, dim=1)
                cat_s = torch.cat([best_s[qs:qe], s], dim=1)
                cat_i = torch.cat([best_i[qs:qe], i + start], dim=1)
                top_s, pos = torch.topk(cat_s, k_eff, dim=1)
                best_s[qs:qe] = top_s
                best_i[qs:qe] = torch.gather(cat_i, 1, pos)
    out_scores[:] = best_s.cpu().numpy()
    out_idx[:] = best_i.cpu().numpy()
    return SearchResult(scores=out_scores, indices=out_idx)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int | None = None) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (both nq x >=k index arrays)."""
    k = exact.shape[1] if k is None else k
    hits = 0
    for a, e in zip(approx[:, :k], exact[:, :k]):
        hits += len(np.intersect1d(a[a >= 0], e))
    return hits / float(exact.shape[0] * k)
