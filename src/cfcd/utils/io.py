"""Atomic writes and file hashing.

Every file that a long job produces is written to a temporary name in the same
directory, flushed to disk and renamed over its final name, so a killed job never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from cfcd.errors import CfcdError


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_file(directory: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` with the mode an ordinary ``open()`` would give (0666 & ~umask).

    mkstemp creates files 0600; once renamed into place they would be unreadable to the rest of a lab
    that shares stores and weights.
    """
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError:
        pass
    return fd, name


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """The user's cfcd cache: ``explicit``, ``$CFCD_CACHE``, ``$XDG_CACHE_HOME/cfcd`` or ``~/.cache/cfcd``."""
    if explicit:
        return Path(explicit)
    if os.environ.get("CFCD_CACHE"):
        return Path(os.environ["CFCD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cfcd"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_timestamp() -> str:
    """The current UTC time as ISO 8601 to the second (``2026-01-02T03:04:05Z``), for metadata."""
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if missing) for the block; another process that
    holds it makes this raise :class:`CfcdError` with the message ``busy`` at once, never wait.
    The lock goes with the process (a ``kill -9`` releases it). No-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock, the user must not run two at once
        yield
        return
    try:
        handle = open(path, "a")
    except OSError as exc:
        raise CfcdError(f"{path}: cannot create the lock file ({exc.strerror or exc})") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CfcdError(busy) from None
        yield
