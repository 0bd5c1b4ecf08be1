"""Top-k search of descriptors: exact (chunked torch matmul, CPU or GPU) and FAISS indexes.

* :func:`exact_search` - exact inner-product top-k. The database is processed in chunks and a
  running top-k is kept with ``torch.topk``, so a 1M x 512 database (memory-mapped, float16 or
  float32) never needs an N x nq score matrix: peak memory is one ``query_chunk x db_chunk``
  block. ``device="auto"`` uses a GPU when there is one.
* :func:`build_index` / :func:`open_index` - indexes built from a descriptor store and saved
  with its image ids and provenance: ``exact`` (the same chunked search over a copy/hard link of
  the descriptors), ``flat`` (``faiss.IndexFlatIP``), ``ivfpq`` (``faiss.IndexIVFPQ``, inner
  product) and ``hnsw`` (``faiss.IndexHNSWFlat``, inner product); ``auto`` / ``faiss`` (a budgeted
  choice or any index-factory string, IVF built shard by shard with on-disk lists, growing with
  ``cfcd index add``/``remove``) are built by :mod:`cfcd.ondisk` and opened here too, on-disk lists
  memory-mapped (docs/index-format.md).

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
from cfcd.runtime import resolve_device
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
    "IdTable",
    "RowSegments",
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


class IdTable(Sequence):
    """The image ids of an index, read from its id file on demand.

    Only the end offset of each line is held in memory (8 bytes per id instead of a Python string
    of ~60 bytes), and the file is memory-mapped, so a 100M-image index does not need 6 GB of RAM
    for its ids. Behaves like a read-only list of str.
    """

    def __init__(self, path: str | os.PathLike):
        import mmap

        self.path = Path(path)
        ends, pos = [], 0
        try:
            with open(self.path, "rb") as handle:
                while chunk := handle.read(64 << 20):
                    ends.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos)
                    pos += len(chunk)
        except FileNotFoundError:
            raise InputError(f"{self.path}: image id list not found") from None
        self._ends = np.concatenate(ends).astype(np.int64) if ends else np.zeros(0, dtype=np.int64)
        if pos and (len(self._ends) == 0 or self._ends[-1] != pos - 1):
            raise InputError(f"{self.path}: image id list does not end with a line break (truncated?)")
        self._mm = None
        if pos:
            with open(self.path, "rb") as handle:
                self._mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return int(self._ends.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"id {i} out of range for {len(self)} ids")
        start = int(self._ends[i - 1]) + 1 if i else 0
        try:
            return self._mm[start : int(self._ends[i])].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: line {i + 1} is not valid UTF-8 ({exc})") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable-looking sequence semantics, like list

    def __repr__(self) -> str:
        return f"IdTable({str(self.path)!r}, {len(self)} ids)"


class RowSegments:
    """Several memory-mapped N_i x D matrices seen as one (the rows of an index that grew by ``add``).

    Supports what exact re-ranking needs: ``shape``, ``dtype`` and ``rows[sorted_int_array]``.
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise CfcdError("RowSegments needs at least one matrix")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.dtype = self.parts[0].dtype
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.shape[0], self.shape[1]), dtype=np.float32)
        seg = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(seg):
            sel = seg == s
            out[sel] = self.parts[s][rows[sel] - self.starts[s]]
        return out




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
                            "itself (cfcd.ondisk); it cannot be copied with save()")
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
    if type in ("auto", "faiss"):
        # budgeted choice / any factory string, sharded and on disk: cfcd.ondisk
        if out is None:
            raise InputError(f"a {type!r} index is built into a directory: pass out=")
        from cfcd import ondisk

        if type == "faiss" and not params.get("factory"):
            raise InputError("type 'faiss' needs factory= (a FAISS index-factory string)")
        return ondisk.build(store, out, ids=ids, progress=progress, **params)
    if type not in INDEX_TYPES:
        raise InputError(f"unknown index type {type!r}; choose from {', '.join(INDEX_TYPES)}, auto, faiss")
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
    # index directories written by cfcd.ondisk name their files (one generation per add/remove)
    files = info.get("files") or {}
    ids_path = path / files.get("ids", IDS_FILE)
    if type_ == "faiss":
        ids = IdTable(ids_path) if ids_path.is_file() else None
    else:
        ids = _read_ids(ids_path) if ids_path.is_file() else None
    if type_ == "exact":
        from cfcd.features import load_npy as _load_npy

        data = _load_npy(path / DESCRIPTORS_FILE, mmap)
        if data.ndim != 2:
            raise InputError(f"{path / DESCRIPTORS_FILE}: expected an N x D matrix, got shape {data.shape}")
        index: Index = ExactIndex(data, ids, info.get("params", {}), info.get("source", {}), path, path / DESCRIPTORS_FILE)
    elif type_ in ("flat", "ivfpq", "hnsw", "faiss"):
        import faiss

        from cfcd.features import load_npy as _load_npy

        params = info.get("params", {})
        index_path = path / files.get("index", INDEX_FILE)
        if not index_path.is_file():
            raise InputError(f"{index_path}: index file not found")
        if params.get("ondisk"):
            ivfdata = path / files.get("ivfdata", "")
            if not files.get("ivfdata") or not ivfdata.is_file():
                raise InputError(f"{path}: the on-disk inverted lists {files.get('ivfdata')!r} are missing")
            # the lists stay in their file, memory-mapped by FAISS (IO_FLAG_MMAP must not be added: it
            # does not combine with on-disk lists); the process holds the centroids and codebooks only
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR
        else:
            flags = faiss.IO_FLAG_MMAP if (mmap and type_ != "hnsw" and params.get("kind") != "hnsw") else 0
        try:
            raw = faiss.read_index(str(index_path), flags)
        except Exception as exc:
            raise InputError(f"{index_path}: cannot read the FAISS index (corrupt?): {exc}") from None
        vectors = None
        names = files.get("vectors")
        if names is None:
            names = [DESCRIPTORS_FILE] if (path / DESCRIPTORS_FILE).is_file() else []
        if names:
            if params.get("ondisk"):
                from cfcd.ondisk import RowReader

                # plain reads, not a memory map: every page a map touches stays in the process's
                # resident memory, and re-ranking touches most of a large store over many queries
                parts = [RowReader(path / name) for name in names]
            else:
                parts = [_load_npy(path / name, True) for name in names]
            vectors = parts[0] if len(parts) == 1 else RowSegments(parts)
        removed = None
        if files.get("removed"):
            removed = _load_npy(path / files["removed"], False)
        index = FaissIndex(raw, type_, ids, params, info.get("source", {}), path,
                           vectors=vectors, data_file=(path / names[0]) if len(names) == 1 else None,
                           removed=removed)
        if vectors is not None and tuple(vectors.shape) != (index.n_labels, index.dim):
            raise InputError(f"{path}: re-ranking rows {', '.join(names)} have shape {tuple(vectors.shape)}, which "
                             f"does not match the index ({index.n_labels} x {index.dim})")
    else:
        raise InputError(f"{meta_path}: unknown index type {type_!r}")
    n_rows = index.n_labels if isinstance(index, FaissIndex) else len(index)
    if ids is not None and len(ids) != n_rows:
        raise InputError(f"{path}: {ids_path.name} has {len(ids)} ids but the index holds {n_rows} vectors")
    if int(info.get("dim", index.dim)) != index.dim:
        raise InputError(f"{meta_path}: says dim {info.get('dim')} but the index is {index.dim}-D")
    return index


def check_compatible(index: Index, queries: DescriptorStore) -> None:
    """Raise when the query store and the index's source store live in different embedding spaces."""
    src = index.source.get("meta", {}) if index.source else {}
    _check_compatible((f"index {index.path}" if index.path else "the index", src), queries)
