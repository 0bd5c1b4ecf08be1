"""The descriptor store: the on-disk contract between extraction, evaluation, indexing and search.

A store is a directory (full specification in ``docs/store-format.md``)::

    STORE/
      descriptors.npy     N x D float32 or float16, C order, memory-mappable (np.load(mmap_mode="r"))
      images.txt          N image ids, one per line, row-aligned with descriptors.npy
      meta.json           written LAST: a directory without meta.json is an incomplete store
      .partial/           only while a job runs (removed by finalize_store)
        writer.json       dim and dtype of the job, checked by every writer (resume, other ranks)
        <part>/shard-00000.npy, shard-00000.txt, ...   one part per rank ("main", "rank0", ...)
        <part>/failures.jsonl                          {"id": ..., "reason": ...} per line

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

Reading: :func:`open_store` (no checks beyond the structure, memory-mapped) and
:func:`load_descriptors` (validated: finite, non-zero rows, dimension, matched by id).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cfcd import __version__
from cfcd.errors import CfcdError, InputError
from cfcd.utils.io import atomic_save_npy, atomic_write_json, atomic_write_text, make_temp_file, utc_timestamp

__all__ = [
    "STORE_FORMAT",
    "STORE_VERSION",
    "DescriptorStore",
    "StoreWriter",
    "open_store",
    "load_descriptors",
    "finalize_store",
    "write_store",
    "merge_stores",
    "is_store",
    "store_summary",
    "iter_blocks",
    "transform_store",
    "link_or_copy",
    "load_npy",
    "read_ids",
    "write_ids",
    "write_meta",
    "utc_timestamp",
]

logger = logging.getLogger(__name__)

STORE_FORMAT = "cfcd-descriptor-store"
STORE_VERSION = 1
DESCRIPTORS_FILE = "descriptors.npy"
IDS_FILE = "images.txt"
META_FILE = "meta.json"
PARTIAL_DIR = ".partial"
WRITER_FILE = "writer.json"
FAILURES_FILE = "failures.jsonl"
FAILED_FILE = "FAILED.json"  # in .partial: the job ended with every image failed
DEFAULT_FLUSH_SECONDS = 30.0  # a kill loses at most this much work, whatever the shard size
BASE_PART = "_base"  # a finalised store's rows, hard-linked in when new shards are merged into it
SUPPORTED_DTYPES = ("float32", "float16")
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.(npy|txt)$")
_PART_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_BLOCK_BYTES = 64 << 20  # float32 bytes per block when streaming through a memory map


def _block_rows(dim: int) -> int:
    """Rows per streaming block: ~64 MB of float32 whatever D (8192 rows at 2048-D)."""
    return max(1024, _BLOCK_BYTES // (4 * max(1, int(dim))))


@dataclass
class DescriptorStore:
    """Descriptors with their image ids and provenance.

    ``descriptors`` is N x D (a read-only ``np.memmap`` when opened from disk with ``mmap=True``),
    ``ids`` the N image ids (``None`` for a plain ``.npy`` matrix) and ``meta`` the store's
    ``meta.json`` (empty for a plain matrix).
    """

    path: Path
    descriptors: np.ndarray
    ids: list[str] | None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    def index_of(self) -> dict[str, int]:
        """Map id -> row (ids are unique in a valid store)."""
        if self.ids is None:
            raise CfcdError(f"{self.path}: a plain .npy matrix has no image ids")
        return {image_id: row for row, image_id in enumerate(self.ids)}


# --------------------------------------------------------------------------- small helpers


def write_meta(directory: Path, meta: dict, *, count: int, dim: int, dtype: str) -> dict:
    """Write ``directory/meta.json``: ``meta`` (``failures`` defaulting to none) under the store's
    header (format, version, count, dim, dtype, cfcd_version, created). Written atomically and
    last by every writer, so a reader never takes a half-written store for a complete one."""
    out = dict(meta)
    out.setdefault("failures", [])
    out.update(format=STORE_FORMAT, version=STORE_VERSION, count=int(count), dim=int(dim), dtype=str(dtype),
               cfcd_version=__version__, created=utc_timestamp())
    atomic_write_json(directory / META_FILE, out)
    return out


def _few(items: Sequence, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _duplicates(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    return dups


def _check_ids(ids: Sequence[str], where: str) -> list[str]:
    out = []
    for image_id in ids:
        if not isinstance(image_id, str):
            raise InputError(f"{where}: image id {image_id!r} is not a string")
        if not image_id or "\n" in image_id or "\r" in image_id:
            raise InputError(f"{where}: image id {image_id!r} is empty or contains a line break")
        out.append(image_id)
    return out


def write_ids(path: Path, ids: Sequence[str]) -> None:
    atomic_write_text(path, "".join(f"{i}\n" for i in ids))


def read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: image id list is not valid UTF-8 ({exc})") from None
    return text.split("\n")[:-1] if text.endswith("\n") else (text.split("\n") if text else [])


def load_npy(path: Path, mmap: bool) -> np.ndarray:
    """np.load with every failure turned into a CfcdError that names the file."""
    if not path.is_file():
        raise InputError(f"{path}: descriptor file not found")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:  # truncated header, wrong magic, pickled object array, short data...
        raise InputError(f"{path}: not a readable .npy descriptor matrix (truncated or corrupt?): {exc}") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path}: expected one .npy matrix, found {type(array).__name__}")
    return array


def _normalise_dtype(dtype: str | np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        raise InputError(f"descriptor dtype must be one of {SUPPORTED_DTYPES}, got {name!r}")
    return name


def _bad_rows(descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of non-finite rows and of (finite) zero-norm rows, streamed in blocks."""
    nonfinite, zero = [], []
    step = _block_rows(descriptors.shape[1])
    for start in range(0, descriptors.shape[0], step):
        block = np.asarray(descriptors[start : start + step], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        nonfinite.append(np.flatnonzero(~finite) + start)
        with np.errstate(over="ignore", invalid="ignore"):
            norm_zero = ~np.any(block != 0, axis=1) & finite
        zero.append(np.flatnonzero(norm_zero) + start)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(nonfinite), cat(zero)


# --------------------------------------------------------------------------- reading


def is_store(path: str | os.PathLike) -> bool:
    """True for a complete store directory (meta.json present)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


def open_store(path: str | os.PathLike, mmap: bool = True) -> DescriptorStore:
    """Open a store directory, or a plain ``.npy`` matrix (``ids=None``), without validating values.

    ``path`` may also be the ``descriptors.npy`` inside a store directory. Structural problems
    (missing files, incomplete store, row counts that disagree, not 2-D) raise :class:`CfcdError`.
    """
    path = Path(path)
    if path.is_file() and path.name == DESCRIPTORS_FILE and (path.parent / IDS_FILE).exists():
        path = path.parent
    if path.is_dir():
        meta_path = path / META_FILE
        if not meta_path.is_file():
            if (path / PARTIAL_DIR).is_dir():
                raise InputError(
                    f"{path}: incomplete descriptor store (no {META_FILE}; it has {PARTIAL_DIR}/ shards): "
                    "the extraction job is still running or was killed; rerun it to resume"
                )
            if (path / DESCRIPTORS_FILE).exists():
                raise InputError(
                    f"{path}: incomplete descriptor store (no {META_FILE}): the job writing it is still "
                    "running or was killed; rerun it to resume"
                )
            raise InputError(f"{path}: not a descriptor store (no {META_FILE} and no {DESCRIPTORS_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{meta_path}: not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise InputError(f"{meta_path}: expected a JSON object")
        descriptors = load_npy(path / DESCRIPTORS_FILE, mmap)
        ids_path = path / IDS_FILE
        if not ids_path.is_file():
            raise InputError(f"{ids_path}: image id list not found")
        ids = read_ids(ids_path)
        if descriptors.ndim != 2:
            raise InputError(f"{path / DESCRIPTORS_FILE}: expected an N x D matrix, got shape {descriptors.shape}")
        if len(ids) != descriptors.shape[0]:
            raise InputError(
                f"{path}: {IDS_FILE} has {len(ids)} ids but {DESCRIPTORS_FILE} has {descriptors.shape[0]} rows"
            )
        return DescriptorStore(path=path, descriptors=descriptors, ids=ids, meta=meta)
    if path.is_file():
        descriptors = load_npy(path, mmap)
        if descriptors.ndim != 2:
            raise InputError(f"{path}: expected an N x D matrix, got shape {descriptors.shape}")
        return DescriptorStore(path=path, descriptors=descriptors, ids=None, meta={})
    raise InputError(f"{path}: descriptor store or .npy file not found")


def load_descriptors(
    path: str | os.PathLike,
    *,
    expected_ids: Sequence[str] | None = None,
    expected_dim: int | None = None,
    role: str = "descriptors",
    dtype=np.float32,
    check_finite: bool = True,
) -> DescriptorStore:
    """Open and validate descriptors for a consumer (evaluation, index, search).

    Checks, each failing with one :class:`CfcdError` that names the file and the ``role``:
    readable 2-D matrix, at least one row, dimension ``expected_dim``, finite values and
    non-zero-norm rows (``check_finite``), and the ids. A store is matched **by id** against
    ``expected_ids`` (rows are reordered to that order; missing and unexpected ids are named);
    a plain ``.npy`` must have exactly ``len(expected_ids)`` rows, taken in that order.

    The result is cast to ``dtype`` (``None`` keeps the stored dtype). When no cast or reordering
    is needed, the memory map is kept, so nothing is read into memory but the validation blocks.
    """
    store = open_store(path, mmap=True)
    where = f"{store.path} ({role})"
    x = store.descriptors
    if x.ndim != 2:
        raise InputError(f"{where}: expected an N x D matrix, got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"{where}: contains no descriptors (0 rows)")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{where}: descriptors must be floating point, got dtype {x.dtype}")
    if expected_dim is not None and x.shape[1] != int(expected_dim):
        raise InputError(f"{where}: descriptors are {x.shape[1]}-D but {int(expected_dim)}-D are expected")
    ids = store.ids
    if ids is not None and len(set(ids)) != len(ids):
        raise InputError(f"{where}: {IDS_FILE} has duplicate ids: {_few(_duplicates(ids))}")

    def name_rows(rows: np.ndarray) -> str:
        rows = rows[:5]
        if ids is None:
            return "rows " + ", ".join(str(int(r)) for r in rows)
        return ", ".join(f"row {int(r)} ({ids[int(r)]!r})" for r in rows)

    if check_finite:
        nonfinite, zero = _bad_rows(x)
        if nonfinite.size:
            raise InputError(
                f"{where}: {nonfinite.size} of {x.shape[0]} rows contain NaN or inf, first: {name_rows(nonfinite)}"
            )
        if zero.size:
            raise InputError(f"{where}: {zero.size} of {x.shape[0]} rows are all zero, first: {name_rows(zero)}")

    if expected_ids is not None:
        expected_ids = list(expected_ids)
        if ids is None:
            if x.shape[0] != len(expected_ids):
                raise InputError(
                    f"{where}: plain .npy matrix has {x.shape[0]} rows but {len(expected_ids)} images are expected "
                    "(a plain matrix must be row-aligned with the image list; use a store to match by id)"
                )
            ids = expected_ids
        else:
            if len(set(expected_ids)) != len(expected_ids):
                raise InputError(f"{role}: the expected image list has duplicate ids: {_few(_duplicates(expected_ids))}")
            if ids != expected_ids:
                row_of = {image_id: row for row, image_id in enumerate(ids)}
                missing = [i for i in expected_ids if i not in row_of]
                expected_set = set(expected_ids)
                extra = [i for i in ids if i not in expected_set]
                if missing or extra:
                    parts = []
                    if missing:
                        parts.append(f"{len(missing)} expected ids are missing: {_few(missing)}")
                    if extra:
                        parts.append(f"{len(extra)} ids are not expected: {_few(extra)}")
                    raise InputError(f"{where}: image ids do not match the expected list; " + "; ".join(parts))
                order = np.fromiter((row_of[i] for i in expected_ids), dtype=np.int64, count=len(expected_ids))
                x = np.asarray(x[order])  # fancy indexing: an in-memory copy in the expected order
                ids = expected_ids
    if dtype is not None and x.dtype != np.dtype(dtype):
        x = np.asarray(x, dtype=dtype)
    return DescriptorStore(path=store.path, descriptors=x, ids=ids, meta=store.meta)


# --------------------------------------------------------------------------- writing


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
        atomic_save_npy(stem.with_suffix(".npy"), np.ascontiguousarray(shard))
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


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _descriptor_memmap(directory: Path, dtype, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """A memory-mapped ``descriptors.npy`` written under a temporary name in ``directory``;
    flushed, fsynced and renamed into place when the block exits without an error."""
    fd, tmp_name = make_temp_file(directory, prefix=f".{DESCRIPTORS_FILE}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield mm
        mm.flush()
        del mm
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, directory / DESCRIPTORS_FILE)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
    order = _check_ids(list(order), f"{path} (finalize order)")
    if len(set(order)) != len(order):
        raise InputError(f"{path}: the image order given to finalize has duplicate ids: {_few(_duplicates(order))}")
    order_set = set(order)
    failed = {f["id"] for f in failures}
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


def write_store(
    path: str | os.PathLike,
    ids: Sequence[str],
    descriptors: np.ndarray,
    meta: dict | None = None,
) -> DescriptorStore:
    """Write a complete store in one go (small stores, tests, post-processed descriptors).

    ``descriptors`` must be N x D float32 or float16 (other floats are cast to float32) with
    unique ``ids``. An existing store at ``path`` is replaced; ``meta.json`` is removed first
    and written last, so a reader never sees a mix of old and new files as complete.
    """
    path = Path(path)
    ids = _check_ids(list(ids), str(path))
    x = np.asarray(descriptors)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise InputError(f"{path}: expected {len(ids)} x D descriptors for {len(ids)} ids, got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"{path}: refusing to write an empty store")
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: duplicate image ids: {_few(_duplicates(ids))}")
    if x.dtype.name not in SUPPORTED_DTYPES:
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{path}: descriptors must be floating point, got {x.dtype}")
        x = x.astype(np.float32)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (path / META_FILE).unlink()
    atomic_save_npy(path / DESCRIPTORS_FILE, np.ascontiguousarray(x))
    write_ids(path / IDS_FILE, ids)
    write_meta(path, dict(meta or {}), count=x.shape[0], dim=x.shape[1], dtype=x.dtype.name)
    return open_store(path)


def transform_store(
    source: DescriptorStore,
    out: str | os.PathLike,
    fn,
    *,
    out_dim: int,
    dtype: str | None = None,
    meta: dict | None = None,
) -> DescriptorStore:
    """Write ``fn(rows)`` of every block of ``source`` into a new store (e.g. a whitened copy).

    Streams block by block into a memory-mapped ``descriptors.npy`` under a temporary name, so a
    1M x 2048 store is transformed with one block in memory; ids are kept, ``meta`` replaces the
    meta (the format keys are recomputed). ``fn`` maps an n x D float32 block to n x ``out_dim``.
    """
    out = Path(out)
    if source.ids is None:
        raise InputError(f"{source.path}: a plain .npy matrix has no ids; write a store first")
    if out.resolve() == Path(source.path).resolve():
        raise InputError(f"{out}: the output must differ from the input store")
    dtype = _normalise_dtype(dtype or source.descriptors.dtype.name)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / META_FILE).unlink()
    with _descriptor_memmap(out, dtype, (len(source), int(out_dim))) as mm:
        for start, block in iter_blocks(source.descriptors, _block_rows(max(source.dim, int(out_dim)))):
            y = np.asarray(fn(block))
            if y.shape != (block.shape[0], int(out_dim)):
                raise CfcdError(f"transform returned shape {y.shape}, expected {(block.shape[0], int(out_dim))}")
            mm[start : start + block.shape[0]] = y
    write_ids(out / IDS_FILE, source.ids)
    write_meta(out, dict(meta or {}), count=len(source), dim=out_dim, dtype=dtype)
    return open_store(out)


# Provenance keys that must agree for descriptors to be comparable (combining them otherwise is
# a silent accuracy bug: the rows would live in different embedding spaces).
PROVENANCE_KEYS = ("model", "weights_sha256", "extract.settings.model.state_sha256", "preprocess", "scales",
                   "extract.scales", "extract.settings.options.max_size", "whitening")


_ABSENT = object()


def meta_get(meta: dict, dotted: str, default=None):
    """``meta['a']['b']`` for ``'a.b'``, or ``default`` when any level is missing."""
    value = meta
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return value


def _provenance_of(item) -> tuple[str, dict]:
    if isinstance(item, DescriptorStore):
        return str(item.path), item.meta or {}
    if isinstance(item, tuple) and len(item) == 2:
        return str(item[0]), dict(item[1] or {})
    raise TypeError(f"expected a DescriptorStore or a (name, meta) pair, got {type(item).__name__}")


def check_compatible(a, b) -> None:
    """Raise :class:`InputError` unless ``a`` and ``b`` hold descriptors of one embedding space.

    ``a`` and ``b`` are stores or ``(name, meta)`` pairs. Every command that combines two stores
    (evaluate, benchmark, search, merge, whiten --apply, index add) calls this one function, so the
    refusal reads the same everywhere. Keys missing on either side (a plain ``.npy`` has no meta)
    are not compared; whitened against unwhitened is refused when both have a meta.
    """
    name_a, meta_a = _provenance_of(a)
    name_b, meta_b = _provenance_of(b)
    state = "extract.settings.model.state_sha256"
    same_state = meta_get(meta_a, state) is not None and meta_get(meta_a, state) == meta_get(meta_b, state)
    for key in PROVENANCE_KEYS:
        if key == "weights_sha256" and same_state:
            continue  # the same tensors, whatever file they were read from
        va, vb = meta_get(meta_a, key, _ABSENT), meta_get(meta_b, key, _ABSENT)
        if key == "whitening" and meta_a and meta_b:
            va, vb = (va or "none"), (vb or "none")  # absent and None both mean unwhitened
        # a key missing on one side is not compared; a recorded None (e.g. no --max-size) is a value
        if va is not _ABSENT and vb is not _ABSENT and va != vb:
            raise InputError(
                f"{name_b}: meta {key!r} = {vb!r} differs from {name_a} ({va!r}); descriptors from different "
                "models or settings live in different embedding spaces and cannot be compared or searched "
                "together (extract both with the same model, weights, preprocessing and whitening)"
            )


def merge_stores(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> DescriptorStore:
    """Concatenate stores (e.g. a database and the R1M distractors) into a new store ``out``.

    All stores must have the same dimension and agree on the provenance keys present in both
    metas (model, weights_sha256, preprocess, scales, extract.scales, whitening); ids must be unique across
    them. The output dtype is the common dtype (float32 if they differ). Rows are streamed
    through a memory map; ``meta["merged_from"]`` lists the sources.
    """
    if len(paths) < 1:
        raise InputError("merge needs at least one store")
    out = Path(out)
    stores = [open_store(p) for p in paths]
    for s in stores:
        if s.ids is None:
            raise InputError(f"{s.path}: a plain .npy matrix has no ids and cannot be merged; write a store first")
        if out.resolve() == s.path.resolve():
            raise InputError(f"{out}: the output must be a new directory, not one of the inputs")
    dim = stores[0].dim
    for s in stores[1:]:
        if s.dim != dim:
            raise InputError(f"{s.path}: {s.dim}-D descriptors cannot be merged with {dim}-D ones from {stores[0].path}")
        check_compatible(stores[0], s)
    seen: dict[str, Path] = {}
    dups: list[str] = []
    for s in stores:
        for i in s.ids:
            if i in seen:
                dups.append(f"{i} ({seen[i].name} and {s.path.name})")
            else:
                seen[i] = s.path
    if dups:
        raise InputError(f"{out}: {len(dups)} ids occur in more than one input store: {_few(dups, 3)}")
    dtypes = {s.descriptors.dtype.name for s in stores}
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    total = sum(len(s) for s in stores)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / META_FILE).unlink()
    with _descriptor_memmap(out, dtype, (total, dim)) as mm:
        offset = 0
        for s in stores:
            step = _block_rows(dim)
            for start in range(0, len(s), step):
                block = np.asarray(s.descriptors[start : start + step], dtype=dtype)
                mm[offset + start : offset + start + block.shape[0]] = block
            offset += len(s)
    all_ids = [i for s in stores for i in s.ids]
    write_ids(out / IDS_FILE, all_ids)
    meta = {k: v for k, v in stores[0].meta.items() if k not in ("failures", "merged_from", "duplicates_resolved")}
    meta["failures"] = [f for s in stores for f in s.meta.get("failures", [])]
    meta["merged_from"] = [{"path": str(s.path), "count": len(s), "created": s.meta.get("created")} for s in stores]
    write_meta(out, meta, count=total, dim=dim, dtype=dtype)
    return open_store(out)


def store_summary(path: str | os.PathLike) -> dict:
    """A short description of a store (complete or running) for ``cfcd store info``."""
    path = Path(path)
    info: dict = {"path": str(path)}
    partial = path / PARTIAL_DIR
    if is_store(path) or path.is_file():
        store = open_store(path)
        info.update(
            complete=True,
            count=len(store),
            dim=store.dim,
            dtype=store.descriptors.dtype.name,
            bytes=int(store.descriptors.nbytes),
            meta={k: v for k, v in store.meta.items() if k != "failures"},
            failures=len(store.meta.get("failures", [])),
            first_ids=(store.ids or [])[:3],
        )
    elif partial.is_dir():
        shards = _scan_shards(partial)
        parts = sorted({s.part for s in shards})
        failed = None
        if (partial / FAILED_FILE).is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                failed = json.loads((partial / FAILED_FILE).read_text(encoding="utf-8"))
        info.update(
            complete=False,
            failed=failed is not None,
            first_failures=(failed or {}).get("first", [])[:3],
            shards=len(shards),
            parts=parts,
            rows_written=sum(s.rows for s in shards),
            failures=len(_read_failures(partial)),
        )
    else:
        open_store(path)  # raises the right error
    if partial.is_dir() and info.get("complete"):
        info["pending_shards"] = len(_scan_shards(partial))
    return info


def iter_blocks(descriptors: np.ndarray, block: int | None = None, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows)`` blocks of a (memory-mapped) matrix as contiguous ``dtype`` arrays."""
    block = block or _block_rows(descriptors.shape[1])
    for start in range(0, descriptors.shape[0], block):
        yield start, np.ascontiguousarray(descriptors[start : start + block], dtype=dtype)


# The helpers' former private names, kept while other branches still import them.
_link_or_copy, _load_npy, _now, _read_ids, _write_ids = link_or_copy, load_npy, utc_timestamp, read_ids, write_ids
