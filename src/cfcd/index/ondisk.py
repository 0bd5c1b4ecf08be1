"""Indexes past one machine's memory: a budgeted choice, shard-by-shard builds, on-disk lists, growth.

* :func:`choose_index` - the FAISS index (Flat, HNSW, IVF-Flat, IVF-SQ8, IVF-PQ, OPQ+IVF-PQ) and its
  parameters for N x D descriptors under a memory budget and a latency target.
* :func:`build` - builds a ``"faiss"`` index from an index-factory string (chosen or given). IVF
  indexes are built **shard by shard**: the coarse quantizer and the codebooks are trained once on
  a sample, each row range of the store (its shards) is added to a copy of the trained index in a
  worker process and written to ``.build/shard-NNNNN.faiss``, and the shards are merged into
  one IVF index whose inverted lists live in ``index-gG.ivfdata`` (FAISS
  ``OnDiskInvertedLists``, memory-mapped at search time) or, with ``ondisk=False``, in memory.
  Building holds one shard of codes (plus one block of descriptors) per worker; searching holds
  the centroids and codebooks. A killed build restarts at the first shard that is not written.
  The search parameter (nprobe / efSearch) is tuned on held-out rows against exact search and the
  measured recall@10/@100 and latency go into ``index.json``.
* :func:`add` / :func:`remove` - a collection that grows (new rows are encoded with the stored
  trained index and merged in) and shrinks (removed rows are filtered at search time with a FAISS
  ``IDSelector``; rebuild to reclaim their space). Every change writes a new *generation* of
  files and then ``index.json``, so a kill leaves the previous, complete index.

Descriptors are read with plain file reads (``RowReader``), never memory-mapped, so the page
cache, not the process, holds them. Layout: docs/index-format.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cfcd import __version__
from cfcd.errors import InputError
from cfcd.store import DESCRIPTORS_FILE, IDS_FILE, DescriptorStore, check_compatible, open_store
from cfcd.store import link_or_copy as _link_or_copy
from cfcd.utils.io import atomic_open, atomic_save_npy, atomic_write_json, make_temp_file
from cfcd.utils.io import utc_timestamp as _now

__all__ = [
    "parse_size",
    "choose_index",
    "estimate_index_bytes",
    "RowReader",
    "build",
    "add",
    "remove",
    "tune",
]

logger = logging.getLogger(__name__)

INDEX_META = "index.json"
BUILD_DIR = ".build"
TRAINED_FILE = "trained.faiss"
_BLOCK_ROWS = 65536
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- sizes and the choice


def parse_size(text) -> int:
    """``"4GB"``, ``"512M"``, ``"1.5GiB"`` or a number of bytes -> bytes (powers of 1024)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InputError(f"cannot read the size {text!r} (examples: 4GB, 512MB, 1.5GiB)")
    unit = (m.group(2) or "b").lower()[:1]
    scale = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(m.group(1)) * scale)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TB"


def _pow2(x: float) -> int:
    return int(2 ** round(math.log2(max(1.0, x))))


def _nlist_for(n: int) -> int:
    # the FAISS guideline (~4 sqrt(N) lists), a power of two, and >= 39 training points per list
    return max(1, min(_pow2(4 * math.sqrt(n)), _pow2(n / 39.0) if n >= 39 else 1, 1 << 16))


def estimate_index_bytes(kind: str, n: int, d: int, *, nlist: int = 0, m: int = 0, hnsw_m: int = 32) -> int:
    """Bytes of an index of ``n`` x ``d`` (lists, codes, ids, centroids, codebooks, graph links)."""
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        return int(n * (d * 4 + hnsw_m * 2 * 4 * 1.1 + 16))
    centroids = nlist * d * 4 + (nlist * 32 * 2 * 4 if nlist >= 4096 else 0)
    code = {"ivf-flat": d * 4, "ivf-sq8": d, "ivf-pq": m, "opq-ivf-pq": m}[kind]
    extra = d * d * 4 if kind == "opq-ivf-pq" else (256 * d * 4 if kind in ("ivf-pq",) else 2 * d * 4)
    return int(n * (code + 8) + centroids + extra + (64 << 10))


def choose_index(n: int, d: int, *, max_memory, max_query_ms: float = 10.0) -> dict:
    """The index for ``n`` x ``d`` descriptors under ``max_memory`` bytes and ``max_query_ms``.

    The same reasoning as autofaiss's, done with FAISS alone (see the README for why):

    1. **Flat** (exact) when the float32 rows fit and brute force is estimated under the latency
       target (about 5e6 multiply-adds per millisecond on one core).
    2. **HNSW32** up to 1M rows when the rows and the graph fit (built in memory, not sharded).
    3. **IVF** with ~4 sqrt(N) lists (an HNSW coarse quantizer from 4096 lists, so that adding
       does not cost N x nlist dot products), and the largest codes whose index takes at most
       a third of the budget (the merge maps the shards and writes the merged lists: twice the
       index; the search maps the lists it visits): Flat, SQ8, then PQ with D/4 ... 8 bytes, with
       an OPQ rotation once a sub-quantizer spans 16 dimensions or more.
    """
    budget = parse_size(max_memory)
    n, d = int(n), int(d)
    if n <= 0 or d <= 0:
        raise InputError(f"cannot choose an index for {n} x {d} descriptors")
    flat = estimate_index_bytes("flat", n, d)
    flat_ms = n * d / 5e6
    if flat <= budget and (flat_ms <= max_query_ms or n < 2048):
        return {"kind": "flat", "factory": "Flat", "bytes": flat,
                "reason": f"the float32 rows fit ({_fmt_bytes(flat)}) and brute force takes ~{flat_ms:.2g} ms"}
    hnsw = estimate_index_bytes("hnsw", n, d)
    if n <= 1_000_000 and hnsw <= budget:
        return {"kind": "hnsw", "factory": "HNSW32,Flat", "bytes": hnsw,
                "reason": f"rows and graph fit ({_fmt_bytes(hnsw)}); brute force would take ~{flat_ms:.2g} ms"}
    nlist = _nlist_for(n)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 4096 else f"IVF{nlist}"
    candidates = [("ivf-flat", f"{coarse},Flat", 0), ("ivf-sq8", f"{coarse},SQ8", 0)]
    for m in sorted({d // 4, d // 8, d // 16, d // 32, 8}, reverse=True):
        if m >= 8 and d % m == 0 and m <= d:
            kind = "opq-ivf-pq" if d // m >= 16 else "ivf-pq"
            factory = f"OPQ{m},{coarse},PQ{m}" if kind == "opq-ivf-pq" else f"{coarse},PQ{m}"
            candidates.append((kind, factory, m))
    for kind, factory, m in candidates:
        size = estimate_index_bytes(kind, n, d, nlist=nlist, m=m)
        if 3 * size <= budget:
            return {"kind": kind, "factory": factory, "nlist": nlist, "m": m or None, "bytes": size,
                    "reason": f"{kind} index of {_fmt_bytes(size)} is at most a third of the budget of "
                              f"{_fmt_bytes(budget)}"}
    smallest = estimate_index_bytes(candidates[-1][0], n, d, nlist=nlist, m=candidates[-1][2])
    raise InputError(
        f"no index of {n} x {d} descriptors fits in {_fmt_bytes(budget)}: the smallest ({candidates[-1][1]}) "
        f"takes {_fmt_bytes(smallest)} and needs three times that; raise --max-memory or pass --factory"
    )


def _kind_of(factory: str) -> str:
    f = factory.replace(" ", "")
    if "IVF" in f:
        if "OPQ" in f:
            return "opq-ivf-pq"
        if re.search(r",PQ\d", f):
            return "ivf-pq"
        if "SQ" in f:
            return "ivf-sq8" if "SQ8" in f else "ivf-sq"
        return "ivf-flat" if f.endswith(",Flat") else "ivf"
    if f.startswith("HNSW"):
        return "hnsw"
    return "flat" if f == "Flat" else "other"


# --------------------------------------------------------------------------- reading rows


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
        """``reader[sorted_rows]``: what re-ranking asks of its rows (as a memory map would answer)."""
        return self.take(rows)

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


def _check_rows(x: np.ndarray, start: int, where: str) -> None:
    finite = np.isfinite(x).all(axis=1)
    nonzero = np.any(x != 0, axis=1)
    bad = np.flatnonzero(~(finite & nonzero))
    if bad.size:
        kind = "NaN or inf" if not finite[bad[0]] else "all zeros"
        rows = ", ".join(str(int(start + b)) for b in bad[:5])
        raise InputError(f"{where}: {bad.size} rows in rows {start}..{start + len(x) - 1} contain {kind} "
                         f"or are zero, first: rows {rows}")


class _Source:
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
                return
            if st is None:
                # structure only (and complete: open_store refuses a running job's store);
                # the values are checked shard by shard while they are read
                st = open_store(path, mmap=True)
            self.path, self.meta = st.path, {k: v for k, v in st.meta.items() if k != "failures"}
            if st.path.is_dir():
                self.data_file, self.ids_file = st.path / DESCRIPTORS_FILE, st.path / IDS_FILE
            else:
                self.data_file = st.path
            if self.data_file is not None and self.data_file.is_file():
                self.reader = RowReader(self.data_file)
            else:  # a DescriptorStore built in memory
                self.reader = RowReader(np.asarray(st.descriptors))
            if self.ids is None and st.ids is not None and self.ids_file is None:
                self.ids = list(st.ids)
        if self.ids is not None and len(self.ids) != len(self.reader):
            raise InputError(f"{self.path}: {len(self.ids)} ids for {len(self.reader)} rows")
        if len(self.reader) == 0:
            raise InputError(f"{self.path}: the store is empty")

    @property
    def has_ids(self) -> bool:
        return self.ids_file is not None or self.ids is not None

    def id_list(self) -> list[str] | None:
        if self.ids is not None:
            return self.ids
        if self.ids_file is not None:
            from cfcd.index import IdTable

            return IdTable(self.ids_file)
        return None

    def fingerprint(self) -> dict:
        out = {"path": str(self.path), "shape": list(self.reader.shape), "dtype": self.reader.dtype.name}
        if self.data_file is not None and self.data_file.is_file():
            st = self.data_file.stat()
            out.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return out


# --------------------------------------------------------------------------- shard workers


def _write_faiss(index, path: Path) -> None:
    import faiss

    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _add_rows(index, reader: RowReader, start: int, stop: int, label0: int, where: str, ivf: bool) -> None:
    for s in range(start, stop, _BLOCK_ROWS):
        e = min(s + _BLOCK_ROWS, stop)
        block = reader.read(s, e)
        _check_rows(block, s, where)
        if ivf:
            index.add_with_ids(block, np.arange(label0 + s - start, label0 + e - start, dtype=np.int64))
        else:
            index.add(block)


def _encode_shard(job: dict) -> str:
    """Worker: add rows ``[start, stop)`` to a copy of the trained index, labels from ``label0``."""
    import faiss

    if job.get("threads"):
        faiss.omp_set_num_threads(int(job["threads"]))
    index = faiss.read_index(job["trained"])
    reader = RowReader(job["data"]) if isinstance(job["data"], str) else job["data"]
    _add_rows(index, reader, job["start"], job["stop"], job["label0"], job["where"], ivf=True)
    _write_faiss(index, Path(job["out"]))
    return job["out"]


def _run_jobs(jobs: list[dict], workers: int, on_shard: Callable | None, progress: bool) -> None:
    bar = None
    if progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="index shards", unit="shard")
    try:
        if workers <= 0 or any(not isinstance(j["data"], str) for j in jobs):
            done = map(_encode_shard, jobs)
            for job, _ in zip(jobs, done):
                if bar:
                    bar.update(1)
                if on_shard:
                    on_shard(job["shard"])
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no forked FAISS/OpenMP state
        with ctx.Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool:
            by_out = {j["out"]: j for j in jobs}
            for out in pool.imap_unordered(_encode_shard, jobs):
                if bar:
                    bar.update(1)
                if on_shard:
                    on_shard(by_out[out]["shard"])
    finally:
        if bar:
            bar.close()


def _merge_lists(trained_path: Path, sources: list, ivfdata: Path | None):
    """Merge the inverted lists of ``sources`` (index files or indexes) into a copy of the trained
    index: on disk (``OnDiskInvertedLists`` in ``ivfdata``) or in memory."""
    import faiss

    index = faiss.read_index(str(trained_path))
    ivf = faiss.extract_index_ivf(index)
    opened, lists = [], []
    if ivfdata is not None:
        # the sources are only read: memory-mapped shard files, or an opened (on-disk) index
        for src in sources:
            sub = faiss.read_index(str(src), faiss.IO_FLAG_MMAP) if isinstance(src, (str, Path)) else src
            opened.append(sub)
            lists.append(faiss.extract_index_ivf(sub).invlists)
        with contextlib.suppress(FileNotFoundError):
            ivfdata.unlink()
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
        vec = faiss.InvertedListsPtrVector()
        for il in lists:
            vec.push_back(il)
        ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), False, False)
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()
    else:
        # merge_from empties its source: read each file fully, one at a time
        for src in sources:
            sub = faiss.read_index(str(src))
            ivf.merge_from(faiss.extract_index_ivf(sub), 0)
            del sub
        ntotal = ivf.ntotal
    index.ntotal = ivf.ntotal = int(ntotal)
    del opened
    return index


# --------------------------------------------------------------------------- generations


def _read_info(path: Path) -> dict | None:
    meta = path / INDEX_META
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{meta}: not valid JSON: {exc}") from None


def _referenced(info: dict | None) -> set[str]:
    if not info:
        return set()
    files = info.get("files") or {}
    names = {files.get("index"), files.get("ivfdata"), files.get("ids"), files.get("removed"), files.get("trained")}
    names.update(files.get("vectors") or [])
    return {n for n in names if n}


def _commit(out: Path, info: dict, old: dict | None) -> None:
    """Write ``index.json`` (the switch to the new generation), then drop the old generation's files."""
    atomic_write_json(out / INDEX_META, info)
    keep = _referenced(info)
    for name in _referenced(old) - keep:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    # what a killed build, add or remove left behind: the half-written temp files of a merge and the
    # symlink folders that tuning opened the uncommitted index from (their names are never referenced)
    for leftover in out.iterdir():
        if leftover.name.startswith(".open-") and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.startswith(".") and leftover.name.endswith(".tmp") and leftover.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    # legacy names of an index rebuilt in place
    if old and not old.get("files"):
        for name in ("index.faiss", DESCRIPTORS_FILE, IDS_FILE):
            if name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()


def _write_id_file(path: Path, parts: list) -> None:
    """Concatenate id files (Paths, copied in blocks) and id lists into one id file, atomically."""
    with atomic_open(path, "wb") as handle:
        for part in parts:
            if isinstance(part, Path):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, handle, 16 << 20)
            else:
                handle.write("".join(f"{i}\n" for i in part).encode("utf-8"))


# --------------------------------------------------------------------------- build


def build(
    store,
    out: str | os.PathLike,
    *,
    factory: str | None = None,
    max_memory="4GB",
    max_query_ms: float = 10.0,
    ondisk: bool = True,
    shard_rows: int | None = None,
    workers: int = 1,
    threads: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
    tune_queries: int = 1000,
    target_recall: float = 0.95,
    rerank: int = 0,
    ids: Sequence[str] | None = None,
    progress: bool = False,
    on_shard: Callable[[int], None] | None = None,
):
    """Build a FAISS index of ``store`` into the directory ``out`` and return it opened.

    ``factory`` (a FAISS index-factory string, e.g. ``"OPQ32,IVF4096_HNSW32,PQ32"``) or, when
    None, :func:`choose_index` under ``max_memory``/``max_query_ms``. IVF factories are built
    shard by shard (``shard_rows`` rows each, default from the budget; ``workers`` processes,
    0 = in this process) and merged on disk (``ondisk``) or in memory. ``tune_queries`` held-out
    rows (not in the training sample) tune nprobe/efSearch against exact search: the smallest
    setting with recall@10 >= ``target_recall`` whose latency stays under ``max_query_ms``
    (0 queries: no tuning). ``rerank`` > 0 hard-links the store's rows for exact re-ranking of
    that many candidates. ``on_shard(i)`` is called after each shard is written. Resumable: run
    it again with the same arguments after a kill.
    """
    import faiss

    from cfcd.index import faiss_threads, open_index

    out = Path(out)
    src = _source(store, ids)
    n, d = src.reader.shape
    budget = parse_size(max_memory)
    choice, probe = _choose_or_parse(factory, n, d, budget, max_query_ms)
    factory = choice["factory"]
    is_ivf = faiss.try_extract_index_ivf(probe) is not None
    ondisk = bool(ondisk and is_ivf)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    old = _read_info(out)
    generation = int(old.get("generation", 0)) + 1 if old else 0

    nq = min(int(tune_queries or 0), max(0, n // 10))
    rng = np.random.default_rng(seed)
    held_out = np.sort(rng.choice(n, size=nq, replace=False)) if nq else np.zeros(0, np.int64)
    shard_rows = _shard_rows(probe, n, d, budget, workers, shard_rows) if is_ivf else n
    ranges = [(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)]
    plan = {
        "factory": factory, "source": src.fingerprint(), "shard_rows": shard_rows, "seed": int(seed),
        "train_size": train_size, "held_out": int(nq), "generation": generation, "ondisk": ondisk,
    }
    work = _resume_or_start(out, plan)

    small = n < 50_000
    t_start = time.perf_counter()
    timings: dict = {}
    with faiss_threads(threads or (1 if small else None)):
        trained = work / TRAINED_FILE
        if not trained.is_file():
            t0 = time.perf_counter()
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index = _train(index, src.reader, held_out, train_size, seed, factory, budget)
            _write_faiss(index, trained)
            timings["train_s"] = round(time.perf_counter() - t0, 2)
        files = {"index": f"index-g{generation}.faiss", "ids": f"images-g{generation}.txt" if src.has_ids else None}
        target = out / files["index"]
        if is_ivf:
            t0 = time.perf_counter()
            shard_files = [work / f"shard-{i:05d}.faiss" for i in range(len(ranges))]
            data = str(src.reader.path) if src.reader.path is not None else src.reader
            per = max(1, (os.cpu_count() or 1) // max(1, workers)) if workers > 1 else threads
            jobs = [
                {"trained": str(trained), "data": data, "start": a, "stop": b, "label0": a, "out": str(f),
                 "shard": i, "threads": per, "where": str(src.path)}
                for i, ((a, b), f) in enumerate(zip(ranges, shard_files))
                if not f.is_file()
            ]
            if len(jobs) < len(ranges):
                logger.info("%s: resuming, %d of %d shards already written", out, len(ranges) - len(jobs), len(ranges))
            _run_jobs(jobs, workers, on_shard, progress)
            timings["add_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            if ondisk:
                files["ivfdata"] = f"index-g{generation}.ivfdata"
                merged = _merge_lists(trained, shard_files, out / files["ivfdata"])
            else:
                merged = _merge_lists(trained, shard_files, None)
            _write_faiss(merged, target)
            del merged
            timings["merge_s"] = round(time.perf_counter() - t0, 2)
            files["trained"] = f"trained-g{generation}.faiss"
            _link_or_copy(trained, out / files["trained"])
        else:
            t0 = time.perf_counter()
            index = faiss.read_index(str(trained))
            _add_rows(index, src.reader, 0, n, 0, str(src.path), ivf=False)
            _write_faiss(index, target)
            del index
            timings["add_s"] = round(time.perf_counter() - t0, 2)
    if src.ids_file is not None:
        _link_or_copy(src.ids_file, out / files["ids"])
    elif src.ids is not None:
        _write_id_file(out / files["ids"], [src.ids])
    if rerank:
        if src.data_file is None or not src.data_file.is_file():
            raise InputError("re-ranking needs the store on disk (its rows are hard-linked into the index)")
        files["vectors"] = [f"descriptors-g{generation}.npy"]
        _link_or_copy(src.data_file, out / files["vectors"][0])
    files = {k: v for k, v in files.items() if v}
    params = {"factory": factory, "kind": choice["kind"], "ondisk": ondisk, "shard_rows": shard_rows,
              "search": {}, "max_memory": budget, "max_query_ms": max_query_ms}
    if is_ivf:
        params["nlist"] = int(faiss.extract_index_ivf(probe).nlist)
        params["search"] = {"nprobe": min(16, params["nlist"])}
    elif choice["kind"] == "hnsw":
        params["search"] = {"efSearch": 128}
    if rerank:
        params["rerank"] = int(rerank)
    info = {
        "type": "faiss", "params": params, "dim": d, "count": n, "metric": "inner_product",
        "source": {"path": str(src.path), "meta": src.meta}, "files": files, "generation": generation,
        "choice": choice, "build": {"shards": len(ranges), "workers": workers, **timings},
        "history": [{"op": "build", "rows": n, "created": _now()}],
        "cfcd_version": __version__, "created": _now(),
    }
    # a provisional index.json for tuning would expose a half-done directory: tune first
    tmp_meta = work / INDEX_META
    atomic_write_json(tmp_meta, info)
    index = _open_in(out, info)
    if nq:
        t0 = time.perf_counter()
        with faiss_threads(threads or (1 if small else None)):
            info["tuning"] = tune(index, src.reader, held_out, target_recall=target_recall, max_query_ms=max_query_ms)
        info["params"]["search"] = info["tuning"]["chosen"]["search"]
        info["build"]["tune_s"] = round(time.perf_counter() - t0, 2)
    info["build"]["total_s"] = round(time.perf_counter() - t_start, 2)
    _commit(out, info, old)
    shutil.rmtree(work, ignore_errors=True)
    return open_index(out)


def _choose_or_parse(factory: str | None, n: int, d: int, budget: int, max_query_ms: float):
    """(choice, an untrained probe index): the given factory string checked, or choose_index's pick."""
    import faiss

    if factory:
        choice = {"kind": _kind_of(factory), "factory": factory, "reason": "given with --factory"}
    else:
        choice = choose_index(n, d, max_memory=budget, max_query_ms=max_query_ms)
    try:
        probe = faiss.index_factory(d, choice["factory"], faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:
        raise InputError(f"invalid FAISS index-factory string {choice['factory']!r}: {exc}") from None
    return choice, probe


def _shard_rows(probe, n: int, d: int, budget: int, workers: int, shard_rows: int | None) -> int:
    """Rows per shard: given, or what one worker's share of the budget holds as codes."""
    import faiss

    if shard_rows is None:
        code = max(1, int(faiss.extract_index_ivf(probe).code_size))
        # per worker: the shard's codes and ids, one float32 block, twice for the writer's copy
        per_worker = max(64 << 20, budget // (2 * max(1, workers)) - 2 * _BLOCK_ROWS * d * 4)
        shard_rows = int(max(10_000, per_worker // (2 * (code + 8))))
    return max(1, min(int(shard_rows), n))


def _resume_or_start(out: Path, plan: dict) -> Path:
    """The build's work folder: kept when its plan matches (a resumed build), else started over."""
    work = out / BUILD_DIR
    plan_path = work / "plan.json"
    if plan_path.is_file():
        try:
            found = json.loads(plan_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            found = None
        if found != plan:
            logger.warning("%s: an unfinished build with other settings was found; starting over", out)
            shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    if not plan_path.is_file():
        atomic_write_json(plan_path, plan)
    return work


def _source(store, ids):
    return _Source(store, ids)


def _open_in(out: Path, info: dict):
    """Open the index described by ``info`` (not yet committed as index.json)."""
    from cfcd.index import open_index

    with tempfile.TemporaryDirectory(dir=out, prefix=".open-") as tmp:
        for name in _referenced(info):
            if (out / name).exists():
                os.symlink(out / name, Path(tmp) / name)
        atomic_write_json(Path(tmp) / INDEX_META, info)
        index = open_index(tmp)
    index.path = out
    return index


def _train(index, reader: RowReader, held_out: np.ndarray, train_size: int | None, seed: int, factory: str,
           budget: int | None = None):
    import faiss

    n, d = reader.shape
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 1
    if train_size:
        want = int(train_size)
    else:
        want = min(n, max(64 * nlist, 65536))
        if budget:
            # the float32 sample and FAISS's working copies take ~3x its size: a quarter of the budget
            want = min(want, max(budget // (4 * 4 * d), 8 * nlist, 9984))
        want = max(want, min(39 * nlist, budget // (4 * 4 * d) if budget else 39 * nlist), 9984 if "PQ" in factory else 0)
    want = min(n - len(held_out), want)
    rng = np.random.default_rng(seed + 1)
    pool = np.setdiff1d(np.arange(n, dtype=np.int64), held_out, assume_unique=True) if len(held_out) else None
    if pool is None:
        rows = np.sort(rng.choice(n, size=want, replace=False)) if want < n else np.arange(n)
    else:
        rows = np.sort(rng.choice(pool, size=min(want, len(pool)), replace=False))
    sample = reader.take(rows) if want < n else reader.read(0, n)
    bad = np.flatnonzero(~(np.isfinite(sample).all(axis=1) & np.any(sample != 0, axis=1)))
    if bad.size:
        where = reader.path or "descriptors"
        raise InputError(f"{where}: rows that are NaN, inf or all zero, first: rows "
                         + ", ".join(str(int(rows[b] if want < n else b)) for b in bad[:5]))
    if ivf is not None:
        ivf.cp.seed = seed
        if ivf.nlist > len(sample):
            raise InputError(f"{factory}: {ivf.nlist} lists need at least {ivf.nlist} training rows (FAISS "
                             f"advises {39 * ivf.nlist}), the store has {len(sample)}; use fewer lists or Flat")
    _no_polysemous(index)
    if ivf is not None and ivf.nlist >= _TWO_LEVEL_FROM:
        _train_two_level(index, sample, seed)
    else:
        index.train(sample)
    return index


def _no_polysemous(index) -> None:
    """The index factory turns on polysemous training for PQ codes: a code re-ordering for Hamming
    filtering (``polysemous_ht``), which cfcd never searches with, and which takes minutes for
    128 sub-quantizers. Off."""
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


# Flat k-means costs train x nlist x D per iteration (hours for 8192 lists on two cores); from this
# many lists the coarse centroids come from FAISS's two-level clustering (sqrt(nlist) clusters,
# each split in proportion to its size: ~2 sqrt(nlist) distances per point), the rest as usual.
_TWO_LEVEL_FROM = 2048


def _two_level_centroids(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """``nlist`` k-means centroids by two-level clustering, as FAISS's
    ``contrib.clustering.two_level_clustering`` (sqrt(nlist) clusters, each split in proportion to
    its size), except that a small first-level cluster gets at least one and at most as many
    centroids as it has points (FAISS's version fails on a cluster allotted none)."""
    import faiss

    n, d = x.shape
    nc1 = max(1, int(np.sqrt(nlist)))
    km = faiss.Kmeans(d, nc1, niter=20, max_points_per_centroid=2000, seed=seed)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=nc1)
    alloc = np.minimum(np.floor(sizes * nlist / n).astype(np.int64), sizes)
    alloc[(alloc == 0) & (sizes > 0)] = 1
    while alloc.sum() > nlist:  # the minimum of one per cluster may overshoot: take from the largest
        alloc[int(np.argmax(alloc))] -= 1
    while alloc.sum() < nlist:  # the rest to the clusters with the most points per centroid
        ratio = np.where(alloc < sizes, sizes / (alloc + 1.0), -1.0)
        alloc[int(np.argmax(ratio))] += 1
    out = []
    for c in np.flatnonzero(alloc):
        sub = np.ascontiguousarray(x[assign == c])
        if alloc[c] >= len(sub):
            out.append(sub)
            continue
        km2 = faiss.Kmeans(d, int(alloc[c]), niter=20, seed=seed + int(c))
        km2.train(sub)
        out.append(km2.centroids)
    return np.ascontiguousarray(np.vstack(out), dtype=np.float32)


def _train_two_level(index, sample: np.ndarray, seed: int) -> None:
    import faiss

    inner = faiss.downcast_index(index)
    x = sample
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = inner.chain.at(i)
            vt.train(x)
            x = vt.apply(x)
        inner = faiss.downcast_index(inner.index)
    ivf = faiss.extract_index_ivf(inner)
    centroids = _two_level_centroids(np.ascontiguousarray(x, dtype=np.float32), int(ivf.nlist), seed)
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(centroids)
    ivf.train(x)  # the quantizer is full: this trains the codes (PQ/SQ) only
    index.is_trained = True


# --------------------------------------------------------------------------- tuning


def _exact_topk(queries: np.ndarray, reader: RowReader, k: int, block_rows: int = 32768) -> np.ndarray:
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
    truth = _drop_self(_exact_topk(q, reader, k + 1), rows, k)
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


# --------------------------------------------------------------------------- add / remove


def _load(index_dir: Path):
    from cfcd.index import open_index

    info = _read_info(index_dir)
    if info is None:
        raise InputError(f"{index_dir}: not an index directory (no {INDEX_META}; incomplete build?)")
    return info, open_index(index_dir)


def add(index_dir: str | os.PathLike, store, *, force: bool = False, workers: int = 0, ids: Sequence[str] | None = None,
        progress: bool = False):
    """Append the rows of ``store`` to the index in ``index_dir`` (same model: checked with
    :func:`cfcd.store.check_compatible` unless ``force``) and return the reopened index.

    Image ids must be new (ids removed earlier may come back). IVF indexes encode the rows with
    the stored trained index (shard by shard) and merge the old and new lists into a new
    generation of files; other FAISS indexes are read, extended and rewritten.
    """
    import faiss

    from cfcd.index import ExactIndex, open_index

    index_dir = Path(index_dir)
    info, index = _load(index_dir)
    if isinstance(index, ExactIndex):
        raise InputError(f"{index_dir}: an exact index is its store; add rows to the store (cfcd store merge) "
                         "and search it directly, or build a FAISS index")
    src = _source(store, ids)
    n_new, d = src.reader.shape
    if d != index.dim:
        raise InputError(f"{src.path}: {d}-D descriptors cannot be added to the {index.dim}-D index {index_dir}")
    if not force:
        check_compatible((f"index {index_dir}", index.source.get("meta", {})), (str(src.path), src.meta))
    if (index.ids is None) != (not src.has_ids):
        raise InputError(f"{src.path}: " + ("the index has image ids but these rows have none (a plain .npy); "
                                            "write a store" if index.ids is not None else
                                            "the index was built from a plain .npy (row numbers as ids); "
                                            "add a plain .npy too, or rebuild from a store"))
    new_ids = src.id_list()
    if index.ids is not None:
        removed = set(index.removed.tolist())
        live = {i for j, i in enumerate(index.ids) if j not in removed}
        clash = [i for i in new_ids if i in live]
        if clash:
            shown = ", ".join(repr(c) for c in clash[:5])
            raise InputError(f"{src.path}: {len(clash)} image ids are already in the index {index_dir}: {shown}"
                             f"{' ...' if len(clash) > 5 else ''} (remove them first to replace them)")
        if len(set(new_ids)) != len(new_ids):
            raise InputError(f"{src.path}: duplicate image ids")
    files = dict(info.get("files") or {"index": "index.faiss", "ids": IDS_FILE})
    generation = int(info.get("generation", 0)) + 1
    label0 = index.n_labels
    new_index_name = f"index-g{generation}.faiss"
    params = info.get("params", {})
    if faiss.try_extract_index_ivf(index.index) is not None:
        work = index_dir / BUILD_DIR / f"add-g{generation}"
        work.mkdir(parents=True, exist_ok=True)
        trained = index_dir / files["trained"] if files.get("trained") else work / TRAINED_FILE
        if not trained.is_file():
            if params.get("ondisk"):
                raise InputError(f"{trained}: the trained index is missing; rebuild the index")
            # an in-memory IVF index without its trained copy (built by build_index): empty it
            empty = faiss.read_index(str(index_dir / files["index"]))
            empty.reset()
            trained = work / TRAINED_FILE
            _write_faiss(empty, trained)
            del empty
        shard_rows = int(params.get("shard_rows") or n_new)
        shard_files, jobs = [], []
        data = str(src.reader.path) if src.reader.path is not None else src.reader
        for i, a in enumerate(range(0, n_new, shard_rows)):
            f = work / f"shard-{i:05d}.faiss"
            shard_files.append(f)
            if not f.is_file():
                jobs.append({"trained": str(trained), "data": data, "start": a, "stop": min(a + shard_rows, n_new),
                             "label0": label0 + a, "out": str(f), "shard": i, "threads": None, "where": str(src.path)})
        _run_jobs(jobs, workers, None, progress)
        if params.get("ondisk"):
            files["ivfdata"] = f"index-g{generation}.ivfdata"
            merged = _merge_lists(trained, [index.index] + shard_files, index_dir / files["ivfdata"])
        else:
            merged = _merge_lists(trained, [index_dir / files["index"]] + shard_files, None)
        _write_faiss(merged, index_dir / new_index_name)
        del merged
    else:
        grown = faiss.read_index(str(index_dir / files.get("index", "index.faiss")))
        _add_rows(grown, src.reader, 0, n_new, label0, str(src.path), ivf=False)
        _write_faiss(grown, index_dir / new_index_name)
        del grown
    files["index"] = new_index_name
    if index.ids is not None:
        files["ids"] = f"images-g{generation}.txt"
        old_ids = index_dir / (info.get("files") or {}).get("ids", IDS_FILE)
        _write_id_file(index_dir / files["ids"], [old_ids, src.ids_file if src.ids_file is not None else new_ids])
    if params.get("rerank") or (info.get("files") or {}).get("vectors") or (index_dir / DESCRIPTORS_FILE).is_file():
        if src.data_file is None or not src.data_file.is_file():
            raise InputError("this index re-ranks with the exact rows: add a store on disk, not an array")
        vectors = list(files.get("vectors") or [DESCRIPTORS_FILE])
        name = f"descriptors-g{generation}.npy"
        _link_or_copy(src.data_file, index_dir / name)
        files["vectors"] = vectors + [name]
    new_info = dict(info)
    new_info.update(files=files, generation=generation, count=len(index) + n_new, created=_now(),
                    cfcd_version=__version__)
    new_info["history"] = list(info.get("history", [])) + [
        {"op": "add", "rows": int(n_new), "from": str(src.path), "created": _now()}]
    if info.get("tuning"):
        new_info["tuning"] = {**info["tuning"], "note": "measured before later adds/removes"}
    del index
    _commit(index_dir, new_info, info)
    shutil.rmtree(index_dir / BUILD_DIR, ignore_errors=True)
    return open_index(index_dir)


def remove(index_dir: str | os.PathLike, ids: Sequence[str], *, missing_ok: bool = False):
    """Remove the images ``ids`` from the index in ``index_dir`` (they never come back in results).

    The rows stay in the lists and are skipped at search time (FAISS ``IDSelector``); the space is
    reclaimed by building the index again. Unknown ids are an error unless ``missing_ok``.
    """
    from cfcd.index import ExactIndex, open_index

    index_dir = Path(index_dir)
    info, index = _load(index_dir)
    if isinstance(index, ExactIndex):
        raise InputError(f"{index_dir}: an exact index is its store; remove the rows from the store instead")
    if index.ids is None:
        try:
            rows = np.asarray([int(i) for i in ids], dtype=np.int64)
        except ValueError:
            raise InputError(f"{index_dir}: the index has no image ids (built from a .npy): give row numbers") from None
        unknown = [str(r) for r in rows.tolist() if not 0 <= r < index.n_labels]
    else:
        wanted = set(ids)
        found = {}
        for j, image_id in enumerate(index.ids):
            if image_id in wanted:
                found.setdefault(image_id, []).append(j)
        unknown = [i for i in ids if i not in found]
        rows = np.asarray([j for js in found.values() for j in js], dtype=np.int64)
    already = set(index.removed.tolist())
    if unknown and not missing_ok:
        shown = ", ".join(repr(u) for u in unknown[:5])
        raise InputError(f"{index_dir}: {len(unknown)} ids are not in the index: {shown}{' ...' if len(unknown) > 5 else ''}")
    merged = np.union1d(index.removed, rows)
    newly = int(len(merged) - len(already))
    files = dict(info.get("files") or {"index": "index.faiss", "ids": IDS_FILE})
    if (index_dir / DESCRIPTORS_FILE).is_file() and "vectors" not in files and info.get("type") != "exact":
        files["vectors"] = [DESCRIPTORS_FILE]
    generation = int(info.get("generation", 0)) + 1
    files["removed"] = f"removed-g{generation}.npy"
    atomic_save_npy(index_dir / files["removed"], merged.astype(np.int64))
    new_info = dict(info)
    new_info.update(files=files, generation=generation, count=int(index.n_labels - len(merged)), created=_now())
    new_info["history"] = list(info.get("history", [])) + [{"op": "remove", "rows": newly, "created": _now()}]
    del index
    _commit(index_dir, new_info, info)
    return open_index(index_dir)


def read_id_file(path: str | os.PathLike) -> list[str]:
    """Ids to remove: one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: id list not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 ({exc})") from None
    out = [line.rstrip("\r") for line in lines if line.strip()]
    if not out:
        raise InputError(f"{path}: no ids")
    return out
