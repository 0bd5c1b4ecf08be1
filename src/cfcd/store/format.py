"""The descriptor store's on-disk format: file names, reading and validation (``docs/store-format.md``).

:func:`open_store` checks only the structure and memory-maps; :func:`load_descriptors` validates
(finite, non-zero rows, dimension, matched by id).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cfcd.errors import CfcdError, InputError
from cfcd.utils.io import atomic_write_text, make_temp_file

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
        # open_memmap leaves a sparse file: on a full disk a write into the map would kill the process
        # with SIGBUS; reserving the blocks first turns that into an OSError (ENOSPC) here
        with open(tmp, "rb+") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
            except AttributeError:  # pragma: no cover - no posix_fallocate on this platform
                pass
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


def iter_blocks(descriptors: np.ndarray, block: int | None = None, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows)`` blocks of a (memory-mapped) matrix as contiguous ``dtype`` arrays."""
    block = block or _block_rows(descriptors.shape[1])
    for start in range(0, descriptors.shape[0], block):
        yield start, np.ascontiguousarray(descriptors[start : start + block], dtype=dtype)
