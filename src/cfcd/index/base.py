"""The index contract: :class:`Index` (ids, provenance, ``search``), the exact index, and the
id table and row segments that every index type shares.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cfcd import __version__
from cfcd.errors import CfcdError, InputError
from cfcd.runtime import resolve_device
from cfcd.store import DESCRIPTORS_FILE, IDS_FILE, DescriptorStore
from cfcd.store import link_or_copy as _link_or_copy
from cfcd.store import write_ids as _write_ids
from cfcd.utils.io import atomic_write_json
from cfcd.utils.io import utc_timestamp as _now

logger = logging.getLogger(__name__)
from cfcd.index.exact import SearchResult, _as_matrix, exact_search

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
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
