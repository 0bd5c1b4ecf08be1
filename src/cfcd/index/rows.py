"""What a build or an add reads: descriptor rows by plain file reads (:class:`RowReader`), their
ids (checked unique) and provenance (:class:`Source`)."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from cfcd.errors import InputError
from cfcd.index.base import IdTable, _rows_of
from cfcd.store import DESCRIPTORS_FILE, IDS_FILE, DescriptorStore, link_or_copy, open_store
from cfcd.utils.io import atomic_save_npy


def check_unique_ids(ids: Sequence[str], where: str) -> None:
    """Refuse repeated image ids: an index maps each id to one row, and removing one would remove all."""
    # 8 bytes per id (its hash), not a set of 100M strings; only ids whose hash repeats are compared
    h = np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids))
    h.sort()
    clash = set(h[1:][h[1:] == h[:-1]].tolist())
    if not clash:
        return
    seen = Counter(i for i in ids if hash(i) in clash)
    repeated = [i for i, c in seen.items() if c > 1]
    if repeated:
        shown = ", ".join(repr(i) for i in repeated[:5])
        raise InputError(f"{where}: {len(repeated)} duplicate image ids: {shown}{' ...' if len(repeated) > 5 else ''} "
                         "(each image must appear once; remove the repeated rows)")


class RowReader:
    """Rows of a ``.npy`` matrix (or an in-memory array) read with plain file reads, as float32.

    A memory map would make every page read count in the process's resident memory; plain
    reads leave them in the page cache, so building from a 200 GB store needs one block of RAM.
    """

    def __init__(self, source):
        self.array = None
        self.path: Path | None = None
        if isinstance(source, np.ndarray):
            if source.ndim != 2:
                raise InputError(f"expected an N x D matrix, got shape {source.shape}")
            self.array = source
            self.shape, self.dtype, self.offset = tuple(source.shape), source.dtype, 0
            return
        self.path = Path(source)
        try:
            with open(self.path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
                self.offset = handle.tell()
        except FileNotFoundError:
            raise InputError(f"{self.path}: descriptor file not found") from None
        except Exception as exc:
            raise InputError(f"{self.path}: not a readable .npy descriptor matrix: {exc}") from None
        if len(shape) != 2 or fortran or dtype.hasobject or not np.issubdtype(dtype, np.floating):
            raise InputError(f"{self.path}: expected a C-order N x D float matrix, got {shape} {dtype}"
                             f"{' (Fortran order)' if fortran else ''}")
        size = self.path.stat().st_size
        if size < self.offset + shape[0] * shape[1] * dtype.itemsize:
            raise InputError(f"{self.path}: truncated ({size} bytes for {shape[0]} x {shape[1]} {dtype})")
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), dtype
        # held open, as a memory map would be: the rows stay readable after the directory they were
        # opened from is renamed or removed (an index opened from a temporary directory, then committed)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __getstate__(self) -> dict:  # a worker process reopens the file by its path
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.path is not None:
            self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = self.__dict__.pop("_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _pread(self, nbytes: int, offset: int) -> bytearray:
        out = bytearray()
        while len(out) < nbytes:  # pread may return less than asked for large reads
            chunk = os.pread(self._fd, nbytes - len(out), offset + len(out))
            if not chunk:
                raise InputError(f"{self.path}: truncated while reading ({len(out)} of {nbytes} bytes at {offset})")
            out += chunk
        return out

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, int(start)), min(int(stop), self.shape[0])
        if self.array is not None:
            return np.ascontiguousarray(self.array[start:stop], dtype=np.float32)
        d, item = self.shape[1], self.dtype.itemsize
        buf = self._pread((stop - start) * d * item, self.offset + start * d * item)
        return np.frombuffer(buf, dtype=self.dtype).reshape(stop - start, d).astype(np.float32, copy=False)

    def __getitem__(self, rows) -> np.ndarray:
        """``reader[sorted_rows]`` or ``reader[a:b]``: what re-ranking asks of its rows (as a memory map would answer)."""
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(len(self))
            return self.read(start, max(start, stop))
        return self.take(_rows_of(rows, len(self)))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted positions ``rows`` (one read per row: a sample never reads the whole file)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.array is not None:
            return np.ascontiguousarray(self.array[rows], dtype=np.float32)
        d, item = self.shape[1], self.dtype.itemsize
        out = np.empty((len(rows), d), dtype=np.float32)
        for j, r in enumerate(rows.tolist()):
            out[j] = np.frombuffer(os.pread(self._fd, d * item, self.offset + r * d * item), dtype=self.dtype)
        return out


def check_rows(x: np.ndarray, start: int, where: str) -> None:
    finite = np.isfinite(x).all(axis=1)
    nonzero = np.any(x != 0, axis=1)
    bad = np.flatnonzero(~(finite & nonzero))
    if bad.size:
        kind = "NaN or inf" if not finite[bad[0]] else "all zeros"
        rows = ", ".join(str(int(start + b)) for b in bad[:5])
        raise InputError(f"{where}: {bad.size} rows in rows {start}..{start + len(x) - 1} contain {kind} "
                         f"or are zero, first: rows {rows}")


class Source:
    """What a build or an add reads: the rows, their ids file, their provenance."""

    def __init__(self, store, ids: Sequence[str] | None = None):
        self.ids_file: Path | None = None
        self.data_file: Path | None = None
        self.ids = list(ids) if ids is not None else None
        if isinstance(store, np.ndarray):
            self.path, self.meta, self.reader = Path("<array>"), {}, RowReader(store)
        else:
            st = store if isinstance(store, DescriptorStore) else None
            path = Path(store.path if st is not None else store)
            if st is not None and not isinstance(st.descriptors, np.memmap):
                # rows in memory (maybe reordered): use them, not the file behind the path
                self.path, self.meta, self.reader = st.path, dict(st.meta), RowReader(np.asarray(st.descriptors))
                self.ids = list(ids) if ids is not None else (list(st.ids) if st.ids is not None else None)
                if self.ids is not None and len(self.ids) != len(self.reader):
                    raise InputError(f"{self.path}: {len(self.ids)} ids for {len(self.reader)} rows")
                if self.ids is not None:
                    check_unique_ids(self.ids, str(self.path))
                return
            if st is None:
                # structure only (and complete: open_store refuses a running job's store);
                # the values are checked shard by shard while they are read
                st = open_store(path, mmap=True)
            self.path, self.meta = st.path, {k: v for k, v in st.meta.items() if k != "failures"}
            where = st.path.absolute()  # worker processes and hard links do not depend on the cwd
            if st.path.is_dir():
                self.data_file, self.ids_file = where / DESCRIPTORS_FILE, where / IDS_FILE
            else:
                self.data_file = where
            if self.data_file is not None and self.data_file.is_file():
                self.reader = RowReader(self.data_file)
            else:  # a DescriptorStore built in memory
                self.reader = RowReader(np.asarray(st.descriptors))
            if self.ids is None and st.ids is not None and self.ids_file is None:
                self.ids = list(st.ids)
            if st.ids is not None and self.ids is None:
                check_unique_ids(st.ids, str(st.path / IDS_FILE if st.path.is_dir() else st.path))
        if self.ids is not None and len(self.ids) != len(self.reader):
            raise InputError(f"{self.path}: {len(self.ids)} ids for {len(self.reader)} rows")
        if self.ids is not None:
            check_unique_ids(self.ids, str(self.path))
        if len(self.reader) == 0:
            raise InputError(f"{self.path}: the store is empty")

    @property
    def has_ids(self) -> bool:
        return self.ids_file is not None or self.ids is not None

    def id_list(self) -> list[str] | None:
        if self.ids is not None:
            return self.ids
        if self.ids_file is not None:
            return IdTable(self.ids_file)
        return None

    def fingerprint(self) -> dict:
        out = {"path": str(self.path), "shape": list(self.reader.shape), "dtype": self.reader.dtype.name}
        if self.data_file is not None and self.data_file.is_file():
            st = self.data_file.stat()
            out.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return out


def save_rows(src: Source, dst: Path) -> None:
    """The source's full-precision rows at ``dst``: a hard link of its file (no second copy), or the array saved."""
    if src.data_file is not None and src.data_file.is_file():
        link_or_copy(src.data_file, dst)
    else:
        atomic_save_npy(dst, np.ascontiguousarray(src.reader.array))
