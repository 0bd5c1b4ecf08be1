"""Writing a store while a job runs: atomic shards in ``.partial/``, resumable, finalised in one pass.

Guarantees:

* every file is written to a temporary name and renamed (``cfcd.utils.io``); a shard's ``.npy``
  is renamed first and its ``.txt`` last, and a shard counts only when both exist and their row
  counts agree, so a shard that was being written when the job was killed is never visible;
* :meth:`StoreWriter.done_ids` sees the shards of every part (and the rows of an already
  finalised store), so a resumed job - even a torchrun job with another number of ranks - skips
  what is done;
* :func:`finalize_store` copies shard by shard into a memory-mapped ``descriptors.npy`` under a
  temporary name, so a 1M x 2048 store never has to fit in memory (let alone twice);
* duplicate ids across shards: the LAST one wins, in a fixed order (a previously finalised store
  first, then parts sorted by name, then shards by number); the count is logged and recorded in
  ``meta["duplicates_resolved"]``. Duplicates in ``order`` or between merged stores are errors.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cfcd.errors import CfcdError, InputError
from cfcd.store.format import _PART_RE, _SHARD_RE, BASE_PART, DEFAULT_FLUSH_SECONDS, DESCRIPTORS_FILE, FAILED_FILE
from cfcd.store.format import FAILURES_FILE, IDS_FILE, META_FILE, PARTIAL_DIR, WRITER_FILE
from cfcd.store.format import DescriptorStore, is_store, link_or_copy, open_store, read_ids, write_ids
from cfcd.store.format import _block_rows, _check_ids, _descriptor_memmap, _duplicates, _few, _fsync_dir
from cfcd.store.format import _normalise_dtype
from cfcd.store.meta import write_meta
from cfcd.utils.io import atomic_open, atomic_write_json, utc_timestamp

logger = logging.getLogger(__name__)

# out of space: ENOSPC; EDQUOT (quota); EFBIG (a file-size limit, RLIMIT_FSIZE, reads the same to a user)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def disk_full_error(path: str | os.PathLike, needed_bytes: int = 0) -> CfcdError:
    """The message of a store write that ran out of space: which store, how much to free, that a rerun resumes."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = 0
    more = max(1, -(-(int(needed_bytes) - free) // 1_000_000))
    return CfcdError(f"disk full while writing {path}: free {more} MB (or more) and rerun to resume; "
                     "what was written is kept, nothing half-written is left")


@contextlib.contextmanager
def _disk_full_is_an_error(path: Path, needed_bytes: int = 0):
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, needed_bytes) from None
        raise


@dataclass
class _Shard:
    part: str
    number: int
    npy: Path
    txt: Path
    rows: int


def _scan_shards(partial: Path) -> list[_Shard]:
    """Every complete shard under ``.partial``, in merge order (base, parts by name, shards by number)."""
    shards: list[_Shard] = []
    if not partial.is_dir():
        return shards
    parts = sorted((p for p in partial.iterdir() if p.is_dir()), key=lambda p: (p.name != BASE_PART, p.name))
    for part_dir in parts:
        numbers = sorted(
            {int(m.group(1)) for f in part_dir.iterdir() if (m := _SHARD_RE.match(f.name)) and m.group(2) == "txt"}
        )
        for number in numbers:
            npy = part_dir / f"shard-{number:05d}.npy"
            txt = part_dir / f"shard-{number:05d}.txt"
            if not npy.is_file():
                continue  # .txt without .npy cannot come from our writer; ignore it
            try:
                rows = np.load(npy, mmap_mode="r", allow_pickle=False).shape[0]
                n_ids = len(read_ids(txt))
            except Exception as exc:
                logger.warning("ignoring unreadable shard %s: %s", npy, exc)
                continue
            if rows != n_ids:
                logger.warning("ignoring shard %s: %d rows but %d ids (interrupted write)", npy, rows, n_ids)
                continue
            shards.append(_Shard(part_dir.name, number, npy, txt, rows))
    return shards


def _read_failures(partial: Path) -> list[dict]:
    failures: list[dict] = []
    if not partial.is_dir():
        return failures
    for part_dir in sorted(p for p in partial.iterdir() if p.is_dir()):
        path = part_dir / FAILURES_FILE
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and "id" in record:
                failures.append({"id": str(record["id"]), "reason": str(record.get("reason", ""))})
    return failures


class StoreWriter:
    """Resumable, sharded writer of one part (one rank) of a descriptor store.

    >>> writer = StoreWriter("out/db", dim=512, part=f"rank{rank}")
    >>> todo = [i for i in my_ids if i not in writer.done_ids()]
    >>> for ids, x in batches(todo):
    ...     writer.append(ids, x)          # buffered; a full shard is written atomically
    >>> writer.flush()
    >>> # once every rank is done (rank 0, after a barrier):
    >>> finalize_store("out/db", order=all_ids, meta={...})

    Rows that are not finite (or overflow float16) or are all zero are not stored: they are
    recorded as failures, so one bad image never breaks the store. Ids that failed are not
    "done" and are retried by a resumed job.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dim: int,
        dtype: str = "float32",
        part: str = "main",
        shard_size: int = 1024,
        flush_seconds: float | None = DEFAULT_FLUSH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.flush_seconds = None if flush_seconds is None else float(flush_seconds)
        self._clock = clock
        self.dim = int(dim)
        self.dtype = _normalise_dtype(dtype)
        if not _PART_RE.match(part) or part == BASE_PART:
            raise InputError(f"{self.path}: invalid part name {part!r} (letters, digits, '_', '-', '.')")
        if self.dim <= 0 or shard_size <= 0:
            raise InputError(f"{self.path}: dim and shard_size must be positive")
        self.part = part
        self.shard_size = int(shard_size)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a directory")
        self.partial = self.path / PARTIAL_DIR
        self.part_dir = self.partial / part
        self.part_dir.mkdir(parents=True, exist_ok=True)
        self._check_config()
        self._buffer_ids: list[str] = []
        self._buffer_rows: list[np.ndarray] = []
        self._buffered = 0
        self._next = self._next_shard_number()
        self._last_write = clock()
        with contextlib.suppress(FileNotFoundError):
            (self.partial / FAILED_FILE).unlink()  # a new attempt: no longer failed

    def _check_config(self) -> None:
        if is_store(self.path):
            existing = open_store(self.path)
            if existing.dim != self.dim or existing.descriptors.dtype.name != self.dtype:
                raise InputError(
                    f"{self.path}: existing store holds {existing.dim}-D {existing.descriptors.dtype.name} "
                    f"descriptors, this job writes {self.dim}-D {self.dtype}; use another output directory"
                )
        config_path = self.partial / WRITER_FILE
        config = {"dim": self.dim, "dtype": self.dtype}
        if config_path.is_file():
            try:
                found = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                found = None
            if found is not None and found != config:
                raise InputError(
                    f"{self.path}: an unfinished job here writes {found.get('dim')}-D {found.get('dtype')} "
                    f"descriptors, this one {self.dim}-D {self.dtype}; resume it with the same settings "
                    f"or delete {self.partial}"
                )
        if not config_path.is_file():
            atomic_write_json(config_path, config)

    def _next_shard_number(self) -> int:
        numbers = [int(m.group(1)) for f in self.part_dir.iterdir() if (m := _SHARD_RE.match(f.name))]
        return max(numbers, default=-1) + 1

    def done_ids(self) -> set[str]:
        """Ids already written by earlier runs, in every part, plus those of a finalised store here."""
        done: set[str] = set()
        if is_store(self.path):
            done.update(read_ids(self.path / IDS_FILE))
        for shard in _scan_shards(self.partial):
            done.update(read_ids(shard.txt))
        done.update(self._buffer_ids)
        return done

    def append(self, ids: Sequence[str], descriptors: np.ndarray) -> None:
        """Buffer rows; every ``shard_size`` buffered rows are written as one atomic shard."""
        ids = _check_ids(list(ids), str(self.path))
        x = np.asarray(descriptors)
        if x.ndim == 1 and len(ids) == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[0] != len(ids) or x.shape[1] != self.dim:
            raise InputError(
                f"{self.path}: append expects {len(ids)} x {self.dim} descriptors for {len(ids)} ids, got shape {x.shape}"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            x = x.astype(self.dtype, copy=True)  # float16 overflow becomes inf and is caught below
            finite = np.isfinite(x).all(axis=1)
            nonzero = np.any(x != 0, axis=1)
        keep = finite & nonzero
        if not keep.all():
            for row in np.flatnonzero(~keep):
                reason = "descriptor is not finite (NaN/inf" + (", float16 overflow)" if self.dtype == "float16" else ")")
                self.add_failure(ids[row], reason if not finite[row] else "descriptor is all zero")
            ids = [i for i, k in zip(ids, keep) if k]
            x = x[keep]
        if not ids:
            return
        self._buffer_ids.extend(ids)
        self._buffer_rows.append(x)
        self._buffered += len(ids)
        while self._buffered >= self.shard_size:
            self._write_shard(self.shard_size)
        # slow jobs (a CPU, huge images) also write by time, so a kill never loses more than
        # flush_seconds of work
        if self._buffered and self.flush_seconds is not None and self._clock() - self._last_write >= self.flush_seconds:
            self.flush()

    def add_failure(self, image_id: str, reason: str) -> None:
        """Record that ``image_id`` could not be processed (appended and flushed at once)."""
        record = json.dumps({"id": str(image_id), "reason": str(reason)}, ensure_ascii=False)
        with open(self.part_dir / FAILURES_FILE, "a", encoding="utf-8") as handle:
            handle.write(record + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def flush(self) -> None:
        """Write every buffered row (as one shard)."""
        if self._buffered:
            self._write_shard(self._buffered)

    def _write_shard(self, n: int) -> None:
        rows = np.concatenate(self._buffer_rows, axis=0) if len(self._buffer_rows) > 1 else self._buffer_rows[0]
        ids, rest_ids = self._buffer_ids[:n], self._buffer_ids[n:]
        shard, rest = rows[:n], rows[n:]
        stem = self.part_dir / f"shard-{self._next:05d}"
        # serialised in memory first: np.save on a file reports a short write on a full disk as a bare
        # "N requested and M written", a plain write() as ENOSPC
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(shard), allow_pickle=False)
        with _disk_full_is_an_error(self.path, 2 * buffer.tell()):
            with atomic_open(stem.with_suffix(".npy"), "wb") as handle:
                handle.write(buffer.getbuffer())
            write_ids(stem.with_suffix(".txt"), ids)  # the .txt last: it makes the shard visible
        self._next += 1
        self._last_write = self._clock()
        self._buffer_ids = rest_ids
        self._buffer_rows = [rest] if len(rest_ids) else []
        self._buffered = len(rest_ids)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()


def finalize_store(
    path: str | os.PathLike,
    *,
    order: Sequence[str] | None = None,
    meta: dict | None = None,
) -> DescriptorStore:
    """Merge every part's shards into ``descriptors.npy`` / ``images.txt`` / ``meta.json``.

    ``order`` fixes the row order (usually the full image list). Its ids must be unique; an id in
    ``order`` that is in no shard and did not fail raises :class:`CfcdError` (a few are named), and
    so does a shard id absent from ``order``. Ids that failed extraction (and were not written by a
    later run) are left out and listed in ``meta["failures"]``. Without ``order`` the rows keep
    the shard order (parts by name, shards by number).

    When the directory already holds a finalised store, its rows are merged with the new shards
    (they come first, so a re-extracted id in a new shard wins). ``meta`` is merged over the old
    meta. The descriptors are streamed shard by shard into a memory map under a temporary name
    and renamed; ``meta.json`` is written last and ``.partial`` removed after it.
    """
    path = Path(path)
    partial = path / PARTIAL_DIR
    old_meta: dict = {}
    if is_store(path):
        existing = open_store(path)
        old_meta = dict(existing.meta)
        if not _scan_shards(partial) and (order is None or list(order) == existing.ids):
            return _update_meta_only(path, old_meta, meta, count=len(existing))
        _keep_finalised_rows_as_base(path, partial, old_meta)
    elif (partial / "base_meta.json").is_file():
        old_meta = json.loads((partial / "base_meta.json").read_text(encoding="utf-8"))

    if not path.is_dir():
        raise InputError(f"{path}: no such store directory")
    shards = _scan_shards(partial)
    source, shard_ids, duplicates = _row_sources(shards)
    if duplicates:
        logger.warning("%s: %d duplicate ids across shards; the last written row of each was kept", path, duplicates)
    failures = _unresolved_failures(old_meta, partial, source)
    final_ids, failures = _final_ids(path, order, source, failures)
    dim, dtype = _shard_shape(path, shards, partial)
    if not final_ids:
        _fail_without_rows(path, partial, failures)
    size = len(final_ids) * dim * np.dtype(dtype).itemsize
    with _disk_full_is_an_error(path, size):
        _copy_rows(path, shards, shard_ids, source, final_ids, dim, dtype)
        write_ids(path / IDS_FILE, final_ids)

        new_meta = {**old_meta, **(meta or {}), "failures": failures}
        if duplicates:
            new_meta["duplicates_resolved"] = int(new_meta.get("duplicates_resolved", 0)) + duplicates
        write_meta(path, new_meta, count=len(final_ids), dim=dim, dtype=dtype)
    _fsync_dir(path)
    shutil.rmtree(partial, ignore_errors=True)
    if failures:
        logger.warning("%s: %d images failed and are not in the store (listed in meta.json)", path, len(failures))
    return open_store(path)


def _fail_without_rows(path: Path, partial: Path, failures: list[dict]) -> None:
    """Every image failed (or the list was empty): mark the job failed and say why."""
    reasons = _few([f["id"] + ": " + f["reason"] for f in failures], 3)
    if failures:
        atomic_write_json(partial / FAILED_FILE, {"failures": len(failures), "first": failures[:10],
                                                  "time": utc_timestamp()})
    raise InputError(
        f"{path}: FAILED, no descriptor was written: every one of the {len(failures)} image(s) failed "
        f"(first: {reasons}). The store is marked failed ('cfcd store info' shows it); a rerun retries "
        "every image, so fix the inputs (paths, --root, file formats) first"
        if failures else f"{path}: no descriptor was written and nothing failed: the image list is empty"
    )


def _update_meta_only(path: Path, old_meta: dict, meta: dict | None, *, count: int) -> DescriptorStore:
    """A finalised store and no new shard: only ``meta`` changes (and ``.partial`` goes)."""
    if meta:
        atomic_write_json(path / META_FILE, {**old_meta, **meta, "count": old_meta.get("count", count)})
    partial = path / PARTIAL_DIR
    if partial.exists():
        shutil.rmtree(partial)
    return open_store(path)


def _keep_finalised_rows_as_base(path: Path, partial: Path, old_meta: dict) -> None:
    """Keep the finalised rows as the first "shard" before anything destructive happens: a kill
    from here on leaves a store without meta.json that is finalised again from shards."""
    base = partial / BASE_PART
    link_or_copy(path / DESCRIPTORS_FILE, base / "shard-00000.npy")
    link_or_copy(path / IDS_FILE, base / "shard-00000.txt")
    atomic_write_json(partial / "base_meta.json", old_meta)
    _fsync_dir(base)
    (path / META_FILE).unlink()
    _fsync_dir(path)


def _row_sources(shards: list[_Shard]) -> tuple[dict[str, tuple[int, int]], list[list[str]], int]:
    """Where each id's row comes from, ``{id: (shard, row)}`` (the last occurrence wins), every
    shard's ids, and how many ids occurred more than once."""
    source: dict[str, tuple[int, int]] = {}
    duplicates = 0
    shard_ids: list[list[str]] = []
    for s, shard in enumerate(shards):
        ids = read_ids(shard.txt)
        shard_ids.append(ids)
        for row, image_id in enumerate(ids):
            if image_id in source:
                duplicates += 1
            source[image_id] = (s, row)
    return source, shard_ids, duplicates


def _unresolved_failures(old_meta: dict, partial: Path, source: dict) -> list[dict]:
    """Failed ids that no shard wrote after all; a newer record of an id wins."""
    # failures of a previously finalised store first, so that newer records of an id win
    failures_all = [f for f in old_meta.get("failures", []) if isinstance(f, dict) and "id" in f]
    failures_all += _read_failures(partial)
    failed_reason: dict[str, str] = {}
    for record in failures_all:
        failed_reason[record["id"]] = record["reason"]
    return [{"id": i, "reason": r} for i, r in failed_reason.items() if i not in source]


def _final_ids(path: Path, order: Sequence[str] | None, source: dict, failures: list[dict]) -> tuple[list[str], list[dict]]:
    """The store's rows in ``order`` (checked against the shards and failures), else shard order."""
    if order is None:
        return list(source), failures  # dict keeps first-insertion order; values are the last occurrence
    order = list(order)
    failed = {f["id"] for f in failures}
    # an id that failed is never written to images.txt, so it may be one a store cannot hold (a line break)
    _check_ids([i for i in order if i not in failed], f"{path} (finalize order)")
    if len(set(order)) != len(order):
        raise InputError(f"{path}: the image order given to finalize has duplicate ids: {_few(_duplicates(order))}")
    order_set = set(order)
    missing = [i for i in order if i not in source and i not in failed]
    if missing:
        raise InputError(
            f"{path}: {len(missing)} ids of the image list have no descriptor and no recorded failure "
            f"(job not finished? rerun it to resume): {_few(missing)}"
        )
    extra = [i for i in source if i not in order_set]
    if extra:
        raise InputError(
            f"{path}: {len(extra)} ids in the shards are not in the image list: {_few(extra)} "
            "(did the image list change since the job started? use another output directory)"
        )
    return [i for i in order if i in source], [f for f in failures if f["id"] in order_set]


def _shard_shape(path: Path, shards: list[_Shard], partial: Path) -> tuple[int, str]:
    """``(dim, dtype)`` of the shards, or of the writer's record when there is none."""
    if shards:
        first = np.load(shards[0].npy, mmap_mode="r", allow_pickle=False)
        return int(first.shape[1]), first.dtype.name
    if (partial / WRITER_FILE).is_file():
        writer_cfg = json.loads((partial / WRITER_FILE).read_text(encoding="utf-8"))
        if writer_cfg:
            return int(writer_cfg["dim"]), str(writer_cfg["dtype"])
    raise InputError(f"{path}: nothing to finalize (no shards in {partial} and no existing store)")


def _copy_rows(path: Path, shards: list[_Shard], shard_ids: list[list[str]], source: dict,
               final_ids: list[str], dim: int, dtype: str) -> None:
    """Stream the kept rows into a memory-mapped ``descriptors.npy``, one shard at a time."""
    row_of = {image_id: r for r, image_id in enumerate(final_ids)}
    with _descriptor_memmap(path, dtype, (len(final_ids), dim)) as out:
        for s, shard in enumerate(shards):
            data = np.load(shard.npy, mmap_mode="r", allow_pickle=False)
            if data.ndim != 2 or data.shape[1] != dim:
                raise InputError(f"{shard.npy}: shard has shape {data.shape}, the store is {dim}-D")
            src_rows, dst_rows = [], []
            for row, image_id in enumerate(shard_ids[s]):
                if source.get(image_id) == (s, row) and image_id in row_of:
                    src_rows.append(row)
                    dst_rows.append(row_of[image_id])
            if not src_rows:
                continue
            src = np.asarray(src_rows, dtype=np.int64)
            dst = np.asarray(dst_rows, dtype=np.int64)
            step = _block_rows(dim)
            for start in range(0, len(src), step):
                out[dst[start : start + step]] = np.asarray(data[src[start : start + step]], dtype=dtype)
