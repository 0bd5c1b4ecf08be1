"""Top-k search of descriptors: exact (chunked torch matmul, CPU or GPU) and FAISS indexes.

* :func:`exact_search` - exact inner-product top-k. The database is processed in chunks and a
  running top-k is kept with ``torch.topk``, so a 1M x 512 database (memory-mapped, float16 or
  float32) never needs an N x nq score matrix: peak memory is one ``query_chunk x db_chunk``
  block. ``device="auto"`` uses a GPU when there is one.
* :func:`build_index` / :func:`open_index` - indexes built from a descriptor store and saved
  with its image ids and provenance: ``exact`` (the same chunked search over a copy/hard link of
  the descriptors), ``flat`` (``faiss.IndexFlatIP``), ``ivfpq`` (``faiss.IndexIVFPQ``, inner
  product) and ``hnsw`` (``faiss.IndexHNSWFlat``, inner product).

All scores are inner products (cosine similarity for the L2-normalised descriptors of the
models). Index directory: ``index.faiss`` (``descriptors.npy`` for exact), ``images.txt`` and
``index.json`` (type, params, dim, count, metric, source store meta); see docs/store-format.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cfcd import __version__
from cfcd.errors import CfcdError, InputError
from cfcd.features import check_compatible as _check_compatible
from cfcd.features import (
    DESCRIPTORS_FILE,
    IDS_FILE,
    DescriptorStore,
    is_store,
    load_descriptors,
    open_store,
)
from cfcd.features import link_or_copy as _link_or_copy
from cfcd.features import read_ids as _read_ids
from cfcd.features import utc_timestamp as _now
from cfcd.features import write_ids as _write_ids
from cfcd.utils.io import atomic_write_json, make_temp_file

__all__ = [
    "SearchResult",
    "exact_search",
    "resolve_device",
    "Index",
    "ExactIndex",
    "FaissIndex",
    "INDEX_TYPES",
    "build_index",
    "open_index",
    "recall_at_k",
    "check_compatible",
    "faiss_threads",
]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
_ADD_ROWS = 65536


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


def resolve_device(device: str | None = "auto"):
    """``"auto"`` -> CUDA when available (else MPS, else CPU); anything else is passed to torch."""
    import torch

    if type(device).__name__ == "device":
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available")
    return dev


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


# --------------------------------------------------------------------------- indexes


class Index:
    """A searchable database with image ids and provenance. Use :func:`build_index` / :func:`open_index`."""

    type: str = ""

    def __init__(self, ids: list[str] | None, dim: int, params: dict, source: dict, path: Path | None = None):
        self.ids = ids
        self.dim = int(dim)
        self.params = dict(params)
        self.source = dict(source)
        self.path = path

    def __len__(self) -> int:
        raise NotImplementedError

    def _search(self, q: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def search(self, queries, k: int = 100, *, query_ids: list[str] | None = None, **kwargs) -> SearchResult:
        """Top-k of each query row (queries: N x D array, memmap, or :class:`DescriptorStore`)."""
        if isinstance(queries, DescriptorStore):
            query_ids = queries.ids if query_ids is None else query_ids
            where = str(queries.path)
        else:
            where = "queries"
        q = _as_matrix(queries, where)
        if q.shape[1] != self.dim:
            raise InputError(
                f"{where}: queries are {q.shape[1]}-D but the index{f' {self.path}' if self.path else ''} "
                f"holds {self.dim}-D descriptors (different model or whitening?)"
            )
        if int(k) <= 0:
            raise InputError(f"k must be positive, got {k}")
        scores, idx = self._search(q, min(int(k), len(self)), **kwargs)
        return SearchResult(scores=scores, indices=idx, db_ids=self.ids, query_ids=query_ids)

    def info(self) -> dict:
        return {
            "type": self.type,
            "params": self.params,
            "dim": self.dim,
            "count": len(self),
            "metric": "inner_product",
            "source": self.source,
            "cfcd_version": __version__,
            "created": _now(),
        }

    def save(self, out: str | os.PathLike) -> Path:
        """Write the index directory (index.json last: a directory without it is incomplete)."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (out / INDEX_META).unlink()
        self._save_data(out)
        if self.ids is not None:
            _write_ids(out / IDS_FILE, self.ids)
        else:
            with contextlib.suppress(FileNotFoundError):
                (out / IDS_FILE).unlink()
        atomic_write_json(out / INDEX_META, self.info())
        self.path = out
        return out

    def _save_data(self, out: Path) -> None:
        raise NotImplementedError


class ExactIndex(Index):
    """Exact search over the (memory-mapped) descriptors with :func:`exact_search`."""

    type = "exact"

    def __init__(self, descriptors: np.ndarray, ids, params, source, path=None, data_file: Path | None = None):
        super().__init__(ids, descriptors.shape[1], params, source, path)
        self.descriptors = descriptors
        self._data_file = data_file
        self._device_cache = None

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    def _database_on(self, dev):
        """The rows to search: cached on an accelerator when they fit in half its free memory
        (uploaded once in the stored dtype, float16 stays half), else the memory map (chunked)."""
        import torch

        if dev.type != "cuda" or not self.params.get("cache_on_device", True):
            return self.descriptors
        if self._device_cache is not None and self._device_cache.device == dev:
            return self._device_cache
        free, _ = torch.cuda.mem_get_info(dev)
        if self.descriptors.nbytes > free // 2:
            return self.descriptors
        cache = torch.empty(self.descriptors.shape, dtype=getattr(torch, self.descriptors.dtype.name), device=dev)
        for start in range(0, len(self), _ADD_ROWS):
            block = np.array(self.descriptors[start : start + _ADD_ROWS])
            cache[start : start + len(block)] = torch.from_numpy(block).to(dev)
        self._device_cache = cache
        return cache

    def _search(self, q, k, *, device: str | None = None, db_chunk: int | None = None, progress: bool = False, **_):
        dev = resolve_device(device or self.params.get("device", "auto"))
        res = exact_search(
            q,
            self._database_on(dev),
            k,
            device=dev,
            db_chunk=db_chunk or self.params.get("db_chunk"),
            progress=progress,
        )
        return res.scores, res.indices

    def _save_data(self, out: Path) -> None:
        target = out / DESCRIPTORS_FILE
        if self._data_file is not None and self._data_file.is_file():
            if self._data_file.resolve() != target.resolve():
                _link_or_copy(self._data_file, target)  # a hard link: no second copy on disk
        else:
            from cfcd.utils.io import atomic_save_npy

            atomic_save_npy(target, np.ascontiguousarray(self.descriptors))
        self._data_file = target


class FaissIndex(Index):
    """A FAISS index (flat, ivfpq or hnsw; inner product)."""

    def __init__(self, index, type: str, ids, params, source, path=None, vectors=None, data_file=None):
        super().__init__(ids, index.d, params, source, path)
        self.index = index
        self.type = type
        # full-precision rows (memory-mapped) for re-ranking approximate candidates exactly
        self.vectors = vectors
        self._data_file = data_file
        self._apply_search_params()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _apply_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        import faiss

        if self.type == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe or self.params.get("nprobe", 16))
        elif self.type == "hnsw":
            self.index.hnsw.efSearch = int(ef_search or self.params.get("ef_search", 128))

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
        if self.type == "hnsw" and ef_search is None and kc > int(self.params.get("ef_search", 128)):
            ef_search = kc  # efSearch below k silently returns fewer good results
        self._apply_search_params(nprobe, ef_search)
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        idx = np.empty((q.shape[0], k), dtype=np.int64)
        try:
            for s in range(0, q.shape[0], batch):
                block = np.ascontiguousarray(q[s : s + batch], dtype=np.float32)
                d, i = self.index.search(block, kc)
                if rerank:
                    d, i = self._rerank(block, i, k)
                scores[s : s + len(block)] = d
                idx[s : s + len(block)] = i
        finally:
            self._apply_search_params()
        scores[idx < 0] = -np.inf
        return scores, idx

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int, sub: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of the candidates (read from the memory-mapped rows), best k kept.

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


def build_index(
    store: str | os.PathLike | DescriptorStore | np.ndarray,
    type: str = "flat",
    *,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    ids: Sequence[str] | None = None,
    **params,
) -> Index:
    """Build an index of ``type`` (exact, flat, ivfpq, hnsw) from a store (path or loaded) or array.

    Parameters (``params``): ivfpq ``nlist`` (default ~4 sqrt(N), reduced with a warning when
    there are fewer than 39 vectors per list), ``m`` (sub-quantizers, must divide D; default D/8),
    ``nbits`` (8), ``nprobe`` (16), ``train_size`` (training subsample; default
    max(64 nlist, 65536) capped at N: the usual subsample), ``seed``; hnsw ``hnsw_m`` (32), ``ef_construction`` (200),
    ``ef_search`` (128); exact ``device`` ("auto"), ``db_chunk``; approximate types ``rerank``
    (0: off; R: take R candidates and re-rank them with the exact inner product read from the
    memory-mapped store rows, hard-linked into the index directory); FAISS ``threads`` (default: one
    thread below 50k vectors, FAISS's default above). The descriptors are validated
    (finite, non-zero rows) first. With ``out`` the index is saved there.
    """
    if type not in INDEX_TYPES:
        raise InputError(f"unknown index type {type!r}; choose from {', '.join(INDEX_TYPES)}")
    data_file = None
    if isinstance(store, np.ndarray):
        st = DescriptorStore(path=Path("<array>"), descriptors=store, ids=list(ids) if ids is not None else None)
        if st.descriptors.ndim != 2:
            raise InputError(f"expected an N x D matrix, got shape {st.descriptors.shape}")
    else:
        if isinstance(store, DescriptorStore):
            st = store
        else:
            st = load_descriptors(store, role="database", dtype=None)
        if (st.path / DESCRIPTORS_FILE).is_file():
            data_file = st.path / DESCRIPTORS_FILE
        elif st.path.is_file() and st.path.suffix == ".npy":
            data_file = st.path
    x = st.descriptors
    if x.shape[0] == 0:
        raise InputError(f"{st.path}: the store is empty")
    source = {"path": str(st.path), "meta": {k: v for k, v in st.meta.items() if k != "failures"}}
    params = {k: v for k, v in params.items() if v is not None}
    if type == "exact":
        index: Index = ExactIndex(
            x,
            st.ids,
            {"device": params.get("device", "auto"), "db_chunk": params.get("db_chunk")},
            source,
            data_file=data_file,
        )
    else:
        threads = params.pop("threads", None) or (1 if x.shape[0] < _SMALL_BUILD else None)
        rerank = int(params.pop("rerank", 0) or 0)
        with faiss_threads(threads):
            faiss_index, resolved = INDEX_TYPES[type](x, params, progress)
        if rerank:
            resolved["rerank"] = rerank
        index = FaissIndex(faiss_index, type, st.ids, resolved, source, vectors=x if rerank else None,
                           data_file=data_file)
    if out is not None:
        index.save(out)
    return index


def open_index(path: str | os.PathLike, *, mmap: bool = True) -> Index:
    """Reopen an index directory written by :func:`build_index` (or a store, searched exactly)."""
    path = Path(path)
    meta_path = path / INDEX_META
    if not meta_path.is_file():
        if is_store(path) or (path.is_file() and path.suffix == ".npy"):
            st = open_store(path, mmap=mmap)
            return ExactIndex(
                st.descriptors,
                st.ids,
                {"device": "auto", "db_chunk": None},
                {"path": str(st.path), "meta": {k: v for k, v in st.meta.items() if k != "failures"}},
                path=path,
                data_file=(st.path / DESCRIPTORS_FILE) if st.path.is_dir() else st.path,
            )
        if path.is_dir():
            raise InputError(f"{path}: not an index directory (no {INDEX_META}; incomplete build?)")
        raise InputError(f"{path}: index directory not found")
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{meta_path}: not valid JSON: {exc}") from None
    type_ = info.get("type")
    ids = _read_ids(path / IDS_FILE) if (path / IDS_FILE).is_file() else None
    if type_ == "exact":
        from cfcd.features import load_npy as _load_npy

        data = _load_npy(path / DESCRIPTORS_FILE, mmap)
        if data.ndim != 2:
            raise InputError(f"{path / DESCRIPTORS_FILE}: expected an N x D matrix, got shape {data.shape}")
        index: Index = ExactIndex(data, ids, info.get("params", {}), info.get("source", {}), path, path / DESCRIPTORS_FILE)
    elif type_ in ("flat", "ivfpq", "hnsw"):
        import faiss

        if not (path / INDEX_FILE).is_file():
            raise InputError(f"{path / INDEX_FILE}: index file not found")
        try:
            flags = faiss.IO_FLAG_MMAP if (mmap and type_ != "hnsw") else 0
            raw = faiss.read_index(str(path / INDEX_FILE), flags)
        except Exception as exc:
            raise InputError(f"{path / INDEX_FILE}: cannot read the FAISS index (corrupt?): {exc}") from None
        vectors = None
        if (path / DESCRIPTORS_FILE).is_file():
            from cfcd.features import load_npy as _load_npy

            vectors = _load_npy(path / DESCRIPTORS_FILE, True)
        index = FaissIndex(raw, type_, ids, info.get("params", {}), info.get("source", {}), path,
                           vectors=vectors, data_file=(path / DESCRIPTORS_FILE) if vectors is not None else None)
        if vectors is not None and vectors.shape != (len(index), index.dim):
            raise InputError(f"{path / DESCRIPTORS_FILE}: shape {vectors.shape} does not match the index "
                             f"({len(index)} x {index.dim})")
    else:
        raise InputError(f"{meta_path}: unknown index type {type_!r}")
    if ids is not None and len(ids) != len(index):
        raise InputError(f"{path}: {IDS_FILE} has {len(ids)} ids but the index holds {len(index)} vectors")
    if int(info.get("dim", index.dim)) != index.dim:
        raise InputError(f"{meta_path}: says dim {info.get('dim')} but the index is {index.dim}-D")
    return index


def check_compatible(index: Index, queries: DescriptorStore) -> None:
    """Raise when the query store and the index's source store live in different embedding spaces."""
    src = index.source.get("meta", {}) if index.source else {}
    _check_compatible((f"index {index.path}" if index.path else "the index", src), queries)
