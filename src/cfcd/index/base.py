"""The index contract: :class:`Index` (ids, provenance, removed labels, ``search``), the exact index,
and the id table and row segments that every index type shares. File names: docs/index-format.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cfcd.errors import CfcdError, InputError
from cfcd.index.exact import SearchResult, _as_matrix, exact_search
from cfcd.runtime import resolve_device
from cfcd.store import DescriptorStore

logger = logging.getLogger(__name__)

INDEX_META = "index.json"
BUILD_DIR = ".build"
_ADD_ROWS = 65536


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


def _rows_of(rows, n: int) -> np.ndarray:
    """A slice or an index array as int64 row numbers."""
    if isinstance(rows, slice):
        return np.arange(*rows.indices(n), dtype=np.int64)
    return np.asarray(rows, dtype=np.int64)


class RowSegments:
    """Several N_i x D matrices seen as one (the rows of an index that grew by ``add``).

    Supports what exact re-ranking needs: ``shape``, ``dtype`` and ``rows[sorted_int_array]``
    (or a slice).
    """

    def __init__(self, parts: Sequence):
        if not parts:
            raise CfcdError("RowSegments needs at least one matrix")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.dtype = self.parts[0].dtype
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        rows = _rows_of(rows, len(self))
        out = np.empty((rows.shape[0], self.shape[1]), dtype=np.float32)
        seg = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(seg):
            sel = seg == s
            out[sel] = self.parts[s][rows[sel] - self.starts[s]]
        return out


class Index:
    """A searchable database with image ids, provenance and removed labels.

    Use :func:`cfcd.index.build_index` / :func:`cfcd.index.open_index`. ``generation`` is the
    token of the committed ``index.json`` it was opened from (see :func:`cfcd.index.generation`).
    """

    type: str = ""

    def __init__(self, ids: Sequence[str] | None, dim: int, params: dict, source: dict, path: Path | None = None,
                 removed: np.ndarray | None = None):
        self.ids = ids
        self.dim = int(dim)
        self.params = dict(params)
        self.source = dict(source)
        self.path = path
        self.generation: str | None = None
        # labels removed with 'cfcd index remove': kept in the data, filtered at search time
        self.removed = (np.unique(np.asarray(removed, dtype=np.int64)) if removed is not None
                        else np.zeros(0, np.int64))

    @property
    def n_labels(self) -> int:
        """Rows ever added (live and removed): the length of the id list."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n_labels - int(self.removed.shape[0])

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
        if len(self) == 0:
            raise InputError(f"{self.path or 'the index'}: every image was removed; nothing to search")
        scores, idx = self._search(q, min(int(k), len(self)), **kwargs)
        return SearchResult(scores=scores, indices=idx, db_ids=self.ids, query_ids=query_ids)


class ExactIndex(Index):
    """Exact search over the (memory-mapped) descriptors with :func:`exact_search`."""

    type = "exact"

    def __init__(self, parts: Sequence[np.ndarray], ids, params, source, path=None, removed=None):
        parts = list(parts)
        super().__init__(ids, parts[0].shape[1], params, source, path, removed)
        self.parts = parts
        self.descriptors = parts[0] if len(parts) == 1 else RowSegments(parts)
        self._device_cache: dict = {}

    @property
    def n_labels(self) -> int:
        return int(self.descriptors.shape[0])

    def _part_on(self, i: int, dev):
        """Part ``i`` of the rows to search: cached on an accelerator when it fits in half its free
        memory (uploaded once in the stored dtype, float16 stays half), else the memory map (chunked)."""
        import torch

        part = self.parts[i]
        if dev.type != "cuda" or not self.params.get("cache_on_device", True):
            return part
        cached = self._device_cache.get(i)
        if cached is not None and cached.device == dev:
            return cached
        free, _ = torch.cuda.mem_get_info(dev)
        if part.nbytes > free // 2:
            return part
        cache = torch.empty(part.shape, dtype=getattr(torch, part.dtype.name), device=dev)
        for start in range(0, len(part), _ADD_ROWS):
            block = np.array(part[start : start + _ADD_ROWS])
            cache[start : start + len(block)] = torch.from_numpy(block).to(dev)
        self._device_cache[i] = cache
        return cache

    def _search(self, q, k, *, device: str | None = None, db_chunk: int | None = None, progress: bool = False, **_):
        dev = resolve_device(device or self.params.get("device", "auto"))
        # removed rows are dropped from each part's top-(k + removed): the k best live rows remain
        want = k + int(self.removed.shape[0])
        scores, idx = [], []
        start = 0
        for i, part in enumerate(self.parts):
            res = exact_search(q, self._part_on(i, dev), min(want, len(part)), device=dev,
                               db_chunk=db_chunk or self.params.get("db_chunk"), progress=progress)
            scores.append(res.scores)
            idx.append(res.indices + start)
            start += len(part)
        s, i = np.concatenate(scores, axis=1), np.concatenate(idx, axis=1)
        if self.removed.shape[0]:
            s = np.where(np.isin(i, self.removed), -np.inf, s)
        if len(self.parts) > 1 or self.removed.shape[0]:
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            s, i = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
        return s.astype(np.float32, copy=False), i
