"""FAISS indexes in memory: flat, IVF-PQ and HNSW (inner product), with removal and re-ranking."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from cfcd.errors import CfcdError, InputError
from cfcd.store import DESCRIPTORS_FILE
from cfcd.store import link_or_copy as _link_or_copy
from cfcd.utils.io import make_temp_file

logger = logging.getLogger(__name__)
from cfcd.index.base import _ADD_ROWS, INDEX_FILE, Index


class FaissIndex(Index):
    """A FAISS index (flat, ivfpq or hnsw; inner product)."""

    def __init__(self, index, type: str, ids, params, source, path=None, vectors=None, data_file=None,
                 removed: np.ndarray | None = None):
        super().__init__(ids, index.d, params, source, path)
        self.index = index
        self.type = type
        # full-precision rows (memory-mapped) for re-ranking approximate candidates exactly
        self.vectors = vectors
        self._data_file = data_file
        # labels removed with 'cfcd index remove': kept in the lists, filtered at search time
        self.removed = np.unique(np.asarray(removed, dtype=np.int64)) if removed is not None else np.zeros(0, np.int64)
        self._apply_search_params()

    def __len__(self) -> int:
        return int(self.index.ntotal) - int(self.removed.shape[0])

    @property
    def n_labels(self) -> int:
        """Rows ever added (live and removed): the length of the id list."""
        return int(self.index.ntotal)

    def _settings(self, nprobe: int | None = None, ef_search: int | None = None) -> dict:
        """The effective search-time parameters: {"nprobe": ...} for IVF, {"efSearch": ...} for HNSW."""
        import faiss

        if self.type == "faiss":
            base = dict(self.params.get("search") or {})
        else:
            base = {"nprobe": self.params.get("nprobe", 16)} if self.type == "ivfpq" else {}
            if self.type == "hnsw":
                base["efSearch"] = self.params.get("ef_search", 128)
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

    def _save_data(self, out: Path) -> None:
        import faiss

        if self.removed.shape[0] or self.params.get("ondisk"):
            raise CfcdError(f"{self.path}: an on-disk index or one with removed rows is saved by 'cfcd index' "
                            "itself (cfcd.index.ondisk); it cannot be copied with save()")
        fd, tmp = make_temp_file(out, prefix=f".{INDEX_FILE}.")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, out / INDEX_FILE)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        target = out / DESCRIPTORS_FILE
        if self.params.get("rerank") and self.vectors is not None:
            if self._data_file is not None and self._data_file.is_file():
                if self._data_file.resolve() != target.resolve():
                    _link_or_copy(self._data_file, target)  # hard link: no second copy on disk
            else:
                from cfcd.utils.io import atomic_save_npy

                atomic_save_npy(target, np.ascontiguousarray(self.vectors))
            self._data_file = target
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()


# --------------------------------------------------------------------------- building


def _faiss_add(index, x: np.ndarray, progress: bool) -> None:
    starts = range(0, x.shape[0], _ADD_ROWS)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="index add", unit="block")
    for s in starts:
        index.add(np.ascontiguousarray(x[s : s + _ADD_ROWS], dtype=np.float32))


def _training_sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    n = x.shape[0]
    if size >= n:
        return np.ascontiguousarray(x, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return np.ascontiguousarray(x[rows], dtype=np.float32)


def _build_flat(x, params, progress):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    _faiss_add(index, x, progress)
    return index, {}


def _build_ivfpq(x, params, progress):
    import faiss

    n, d = x.shape
    m = int(params.get("m") or _default_pq_m(d))
    nbits = int(params.get("nbits", 8))
    if d % m:
        raise InputError(f"IVF-PQ: the dimension {d} must be divisible by the number of sub-quantizers m={m}")
    n_codes = 1 << nbits
    if n < n_codes:
        raise InputError(
            f"IVF-PQ with nbits={nbits} needs at least {n_codes} training vectors but the store has {n}; "
            "use --type flat (exact and fast at this size) or a smaller --nbits"
        )
    nlist = int(params.get("nlist") or _default_nlist(n))
    max_nlist = max(1, n // 39)  # FAISS wants >= 39 training points per centroid
    if nlist > max_nlist:
        warnings.warn(
            f"IVF-PQ: nlist={nlist} is too large for {n} vectors (FAISS needs ~39 per list); using nlist={max_nlist}",
            stacklevel=3,
        )
        nlist = max_nlist
    train_size = int(params.get("train_size") or min(n, max(64 * nlist, 65536)))
    train_size = min(max(train_size, nlist * 39, n_codes), n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    sample = _training_sample(x, train_size, int(params.get("seed", 0)))
    index.cp.seed = int(params.get("seed", 0))
    index.pq.cp.seed = int(params.get("seed", 0)) if hasattr(index.pq, "cp") else 0
    index.train(sample)
    del sample
    _faiss_add(index, x, progress)
    nprobe = int(params.get("nprobe") or min(16, nlist))
    return index, {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nprobe, nlist), "train_size": train_size}


def _build_hnsw(x, params, progress):
    import faiss

    hnsw_m = int(params.get("hnsw_m", 32))
    index = faiss.IndexHNSWFlat(x.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(params.get("ef_construction", 200))
    _faiss_add(index, x, progress)
    return index, {
        "hnsw_m": hnsw_m,
        "ef_construction": int(index.hnsw.efConstruction),
        "ef_search": int(params.get("ef_search", 128)),
    }


def _default_nlist(n: int) -> int:
    # the FAISS guideline: ~4 sqrt(N) lists, rounded to a power of two, at least 1
    return int(max(1, 2 ** round(np.log2(max(1.0, 4 * np.sqrt(n))))))


def _default_pq_m(d: int) -> int:
    # 8-bit codes of 8 dimensions each (64 bytes for 512-D), and a divisor of d
    for m in (d // 8, d // 4, d // 16, d // 2, d):
        if m >= 1 and d % m == 0 and m <= 128:
            return m
    return 1


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
_SMALL_BUILD = 50_000

# name -> builder(x, params, progress) -> (faiss index, resolved params)
INDEX_TYPES: dict[str, Callable | None] = {
    "exact": None,
    "flat": _build_flat,
    "ivfpq": _build_ivfpq,
    "hnsw": _build_hnsw,
}
