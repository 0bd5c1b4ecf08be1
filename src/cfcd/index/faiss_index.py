"""A FAISS index opened from its directory (any index-factory string, inner product): search with
removed labels filtered out and optional exact re-ranking of the candidates."""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from cfcd.errors import InputError
from cfcd.index.base import Index

logger = logging.getLogger(__name__)


class FaissIndex(Index):
    """A FAISS index (flat, ivfpq or hnsw; inner product)."""

    def __init__(self, index, type: str, ids, params, source, path=None, vectors=None, removed=None):
        super().__init__(ids, index.d, params, source, path, removed)
        self.index = index
        self.type = type
        # full-precision rows (read on demand) for re-ranking approximate candidates exactly
        self.vectors = vectors
        self._apply_search_params()

    @property
    def n_labels(self) -> int:
        return int(self.index.ntotal)

    def _settings(self, nprobe: int | None = None, ef_search: int | None = None) -> dict:
        """The effective search-time parameters: {"nprobe": ...} for IVF, {"efSearch": ...} for HNSW."""
        import faiss

        base = dict(self.params.get("search") or {})
        out = {}
        if faiss.try_extract_index_ivf(self.index) is not None:
            out["nprobe"] = int(nprobe or base.get("nprobe", 16))
        elif isinstance(faiss.downcast_index(self.index), faiss.IndexHNSW):
            out["efSearch"] = int(ef_search or base.get("efSearch", 128))
        return out

    def _apply_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> dict:
        import faiss

        settings = self._settings(nprobe, ef_search)
        if "nprobe" in settings:
            ivf = faiss.extract_index_ivf(self.index)
            settings["nprobe"] = min(settings["nprobe"], int(ivf.nlist))
            ivf.nprobe = settings["nprobe"]
        if "efSearch" in settings:
            faiss.downcast_index(self.index).hnsw.efSearch = settings["efSearch"]
        return settings

    def _search_parameters(self, settings: dict, keep: list):
        """FAISS SearchParameters that skip the removed labels (None when nothing was removed)."""
        import faiss

        if not self.removed.shape[0]:
            return None
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.removed))
        keep.append(sel)
        inner = faiss.downcast_index(self.index)
        wrap = isinstance(inner, faiss.IndexPreTransform)
        if wrap:
            inner = faiss.downcast_index(inner.index)
        if "nprobe" in settings:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=settings["nprobe"])
        elif "efSearch" in settings:
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=settings["efSearch"])
        else:
            params = faiss.SearchParameters(sel=sel)
        if wrap:
            keep.append(params)
            params = faiss.SearchParametersPreTransform(index_params=params)
        keep.append(params)
        return params

    def _search(
        self,
        q,
        k,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
        batch: int = 1024,
        **_,
    ):
        rerank = int(self.params.get("rerank", 0) if rerank is None else rerank)
        if rerank and self.vectors is None:
            raise InputError(
                f"{self.path or 'index'}: re-ranking needs the full-precision descriptors; "
                "build the index with --rerank from a store"
            )
        kc = min(max(k, rerank), len(self)) if rerank else k
        current = self._settings()
        if "efSearch" in current and ef_search is None and kc > current["efSearch"]:
            ef_search = kc  # efSearch below k silently returns fewer good results
        settings = self._apply_search_params(nprobe, ef_search)
        keep: list = []
        params = self._search_parameters(settings, keep)
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        idx = np.empty((q.shape[0], k), dtype=np.int64)
        try:
            for s in range(0, q.shape[0], batch):
                block = np.ascontiguousarray(q[s : s + batch], dtype=np.float32)
                d, i = self.index.search(block, kc, params=params) if params is not None else self.index.search(block, kc)
                if rerank:
                    d, i = self._rerank(block, i, k)
                scores[s : s + len(block)] = d
                idx[s : s + len(block)] = i
        finally:
            self._apply_search_params()
        scores[idx < 0] = -np.inf
        return scores, idx

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int, sub: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of the candidates (read from the stored rows), best k kept.

        Rows are gathered for ``sub`` queries at a time, so the working set is
        ``sub x candidates x D`` floats (64 MB for 32 x 1000 x 512), whatever the batch size.
        """
        valid = cand >= 0
        exact = np.full(cand.shape, -np.inf, dtype=np.float32)
        for s in range(0, cand.shape[0], sub):
            c = np.where(valid[s : s + sub], cand[s : s + sub], 0)
            uniq, inverse = np.unique(c.ravel(), return_inverse=True)  # sorted reads: kinder to a memmap
            rows = np.asarray(self.vectors[uniq], dtype=np.float32)
            exact[s : s + sub] = np.einsum("qd,qkd->qk", q[s : s + sub], rows[inverse].reshape(c.shape[0], c.shape[1], -1))
        exact[~valid] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, axis=1), np.where(
            np.take_along_axis(valid, order, axis=1), np.take_along_axis(cand, order, axis=1), -1
        )


@contextlib.contextmanager
def faiss_threads(n: int | None):
    """Temporarily set FAISS's OpenMP thread count (None: leave it)."""
    import faiss

    if not n:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


# Below this many vectors FAISS's OpenMP start-up and barriers cost more than they save, and on
# a busy machine its spinning threads make a small build several times slower: use one thread.
SMALL_BUILD = 50_000
