"""Resumable HTTP downloads and atomic archive extraction.

Written on :mod:`urllib` from the standard library on purpose: it adds no dependency, and
everything a resumable download needs is a plain HTTP header --

- ``Range: bytes=N-`` continues a ``<file>.part`` after an interruption;
- ``If-Range: <ETag or Last-Modified of the first response>`` makes a server whose file
  changed meanwhile answer with the whole new file (200) instead of a tail that would be
  spliced onto the old head;
- ``Content-Range`` / ``Content-Length`` give the size to check the result against.

:func:`download_file` protocol
    Bytes go to ``<dest>.part``; a sidecar ``<dest>.part.json`` keeps the validator and the
    total size announced by the server. ``<dest>`` itself only appears (``os.replace``) once
    the download is complete and its size and sha256 match what is expected, so a file at
    ``<dest>`` is always whole. On an answer ``206`` whose ``Content-Range`` starts at the
    length of the ``.part``, bytes are appended; on ``200`` (server ignored ``Range``, or
    ``If-Range`` failed) the ``.part`` is truncated and the download restarts from zero; on
    ``416`` the ``.part`` is either already complete (checked) or stale (restarted). Network
    errors (dropped connection, timeout, 5xx, 429) are retried ``retries`` times with an
    exponential backoff of ``backoff * 2**k`` seconds; the count starts again (at one) whenever an
    attempt made progress, and the total number of attempts is bounded too. 4xx errors are
    not retried.

:func:`extract_archive` protocol
    A tarball is extracted member by member into a fresh staging directory beside the
    target (``.<target>.extract-XXXX``), hashing every file as it is written. Only regular
    files are extracted (links, devices and fifos are skipped and reported); absolute names
    and ``..`` components are refused. If the target does not exist, the staging directory
    is renamed onto it (atomic); otherwise its files are merged into the target. A corrupt
    archive raises :class:`ArchiveError` naming the archive; the staging directory is
    removed and the target is left exactly as it was.

    Name clashes (``flatten=True`` moves every file to the top level, like the original
    ``find ... -exec mv``; two archives can also hold the same path) are resolved without
    asking: an identical file (same sha256) is kept once, a different one is stored as
    ``<stem>~<8 hex of sha1(tag/member path)><ext>``. The new name depends only on the archive
    tag and the member path, so a rerun after an interruption produces the same names and
    recognises the files it already moved.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlsplit

from cfcd import __version__
from cfcd.errors import CfcdError
from cfcd.utils.io import atomic_write_json, sha256_file

__all__ = [
    "DownloadError",
    "ArchiveError",
    "DownloadResult",
    "ExtractedFile",
    "ExtractResult",
    "download_file",
    "extract_archive",
    "md5_file",
    "remote_size",
    "retry_reason",
    "clash_name",
]

USER_AGENT = f"cfcd/{__version__} (+https://github.com/; python-urllib)"
CHUNK_SIZE = 1 << 20
# Hard bound on attempts, whatever the progress: a server that drops every connection
# after a few bytes cannot keep a download looping for ever.
MAX_TOTAL_ATTEMPTS = 1000
# Transient HTTP statuses worth retrying; other 4xx/5xx are final.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})



MIRROR_ENV = "CFCD_DATA_MIRROR"


def resolve_url(url: str, base_url: str | None = None) -> str:
    """The URL to fetch: ``url`` itself, or its path on the mirror ``base_url`` (or $CFCD_DATA_MIRROR)."""
    base = base_url if base_url is not None else os.environ.get(MIRROR_ENV) or None
    if not base:
        return url
    parts = urlsplit(url)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return base.rstrip("/") + tail


class DownloadError(CfcdError):
    """A download failed for good (after the retries) or its result does not match the expected size/sha256."""


class ArchiveError(CfcdError):
    """An archive could not be read (truncated, not a tarball, unsafe member names)."""


@dataclass
class DownloadResult:
    """What :func:`download_file` fetched: the final path, its size and sha256."""

    path: Path
    size: int
    sha256: str
    url: str
    resumed: bool = False          # some bytes came from an earlier interrupted attempt/run
    restarted: bool = False        # the server ignored Range (or the file changed): restarted from zero
    attempts: int = 1
    skipped: bool = False          # dest already existed and matched the expectations


class _TransientError(Exception):
    """Internal: an attempt failed in a way worth retrying."""


def _announced_total(response, offset: int) -> int | None:
    """Total size of the remote file from Content-Range (206) or Content-Length (200)."""
    if (response.status or 200) == 206:
        content_range = response.headers.get("Content-Range", "")
        # "bytes START-END/TOTAL" (TOTAL may be "*")
        with contextlib.suppress(ValueError, IndexError):
            total = content_range.split("/", 1)[1].strip()
            if total != "*":
                return int(total)
        length = response.headers.get("Content-Length")
        return offset + int(length) if length and length.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _range_start(response) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    with contextlib.suppress(ValueError, IndexError):
        unit, spec = content_range.split(" ", 1)
        if unit.strip() == "bytes":
            return int(spec.split("-", 1)[0])
    return None


def _read_sidecar(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _hash_prefix(path: Path, size: int) -> "hashlib._Hash":
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = size
        while remaining > 0:
            block = handle.read(min(CHUNK_SIZE, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest


def _check_expected(path: Path, size: int, sha: str, *, expected_size: int | None,
                    expected_sha256: str | None, url: str) -> None:
    if expected_size is not None and size != expected_size:
        raise DownloadError(
            f"{path}: downloaded {size} bytes from {url} but {expected_size} were expected"
        )
    if expected_sha256 is not None and sha.lower() != expected_sha256.lower():
        raise DownloadError(
            f"{path}: sha256 {sha} of the file downloaded from {url} differs from the expected "
            f"{expected_sha256.lower()} (corrupt transfer or a changed file on the server; "
            "pass --manifest with the right value if the server's file is known to be good)"
        )


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
    desc: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] | None = None,
) -> DownloadResult:
    """Download ``url`` to ``dest``, resuming an earlier ``<dest>.part``.

    Args:
        url: http(s) (or file) URL.
        dest: final path; it is only created once the file is complete and checked.
        expected_size / expected_sha256: known values (a manifest); ``None`` = unknown. The
            size announced by the server is always checked as well.
        retries: retries per run of failures without progress (0 = a single attempt).
        backoff: base of the exponential backoff in seconds (0 = retry at once; tests).
        timeout: socket timeout of one read, in seconds.
        progress: show a tqdm bar in bytes.
        sleep: the function used to wait between retries.
        log: told one line per retry, with the reason (offline, refused, timeout...).

    Returns:
        a :class:`DownloadResult`. If ``dest`` already exists it is not downloaded again; it
        is hashed and checked against the expected values (``skipped=True``).

    Raises:
        DownloadError: the download failed after the retries, the server refused it (4xx),
            or the result does not match the expected or announced size/sha256.
    """
    dest = Path(dest)
    if dest.exists():
        return _already_downloaded(dest, url, expected_size=expected_size, expected_sha256=expected_sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    transfer = _Transfer(url, dest, expected_size, expected_sha256, timeout=timeout, chunk_size=chunk_size,
                         progress=progress, desc=desc or dest.name)
    attempts = 0
    failures = 0
    restarts_after_mismatch = 0
    last_error: BaseException | None = None
    while True:
        if attempts >= MAX_TOTAL_ATTEMPTS:
            raise DownloadError(f"{url}: gave up after {attempts} attempts (last error: {last_error})")
        attempts += 1
        offset = transfer.part.stat().st_size if transfer.part.exists() else 0
        transfer.progressed = False
        try:
            try:
                response = transfer.open(offset)
            except _Restart:
                continue
            if response is None:  # the .part holds the whole file already
                size, sha = transfer.part.stat().st_size, sha256_file(transfer.part)
                _check_expected(transfer.part, size, sha, expected_size=expected_size,
                                expected_sha256=expected_sha256, url=url)
                return transfer.commit(size, sha, attempts, resumed=True)
            size, sha = transfer.receive(response, offset)
            try:
                _check_expected(transfer.part, size, sha, expected_size=expected_size,
                                expected_sha256=expected_sha256, url=url)
            except DownloadError:
                # A resumed file may have a stale head: one clean restart before giving up.
                if transfer.resumed and restarts_after_mismatch == 0:
                    restarts_after_mismatch += 1
                    transfer.start_over()
                    transfer.resumed = False
                    continue
                transfer.discard()
                raise
            return transfer.commit(size, sha, attempts)
        except (_TransientError, urllib.error.URLError, http.client.HTTPException,
                ConnectionError, TimeoutError) as exc:
            last_error = exc
            failures = 1 if transfer.progressed else failures + 1
            if failures > retries:
                part = transfer.part
                raise DownloadError(
                    f"{url}: download failed after {attempts} attempts: {retry_reason(exc)}; "
                    f"the {part.stat().st_size if part.exists() else 0} bytes already received are kept "
                    f"in {part} and the next run resumes from there"
                ) from exc
            delay = backoff * (2 ** max(failures - 1, 0))
            if log is not None:  # never retry silently: an offline machine would look hung
                log(f"{url}: {retry_reason(exc)}; retry {failures}/{retries} in {delay:g} s")
            if delay > 0:
                sleep(delay)


def retry_reason(exc: BaseException) -> str:
    """A short reason for a failed attempt, naming the likely cause when the machine is offline."""
    import socket

    if isinstance(exc, _TransientError):
        return str(exc)
    reason = exc.reason if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError) else exc
    if isinstance(reason, socket.gaierror):
        return f"DNS lookup failed ({reason.strerror or reason}): offline, or a wrong host name"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused: the server is down or the address is wrong"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "no answer within the timeout"
    if isinstance(reason, OSError) and reason.errno is not None:
        return f"network error ({reason.strerror or reason})"
    return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def remote_size(url: str, *, timeout: float = 60.0) -> int | None:
    """The Content-Length a HEAD request announces for ``url`` (None when the server does not say).

    Raises :class:`DownloadError` when the server answers with an error or cannot be reached.
    """
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT,
                                                                   "Accept-Encoding": "identity"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DownloadError(f"{url}: {retry_reason(exc)}") from None
    return int(length) if length and length.isdigit() else None


def md5_file(path: str | os.PathLike, chunk: int = CHUNK_SIZE) -> str:
    """The md5 of a file (GLDv2 publishes md5 sums of its tars)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _already_downloaded(dest: Path, url: str, *, expected_size: int | None,
                        expected_sha256: str | None) -> DownloadResult:
    """An existing ``dest`` is not downloaded again, only checked against the expected values."""
    size = dest.stat().st_size
    sha = sha256_file(dest)
    try:
        _check_expected(dest, size, sha, expected_size=expected_size, expected_sha256=expected_sha256, url=url)
    except DownloadError as exc:
        raise DownloadError(f"{dest} already exists but does not match the expected file ({exc}); "
                            "delete it to download it again") from None
    return DownloadResult(dest, size, sha, url, skipped=True, attempts=0)


class _Restart(Exception):
    """The ``.part`` was stale and is gone: the next attempt starts from zero."""


class _Transfer:
    """One file's download across attempts: ``<dest>.part``, its sidecar ``<dest>.part.json`` (the
    server's validators, so a resume only appends to the same file) and what happened so far."""

    def __init__(self, url: str, dest: Path, expected_size: int | None, expected_sha256: str | None, *,
                 timeout: float, chunk_size: int, progress: bool, desc: str) -> None:
        self.url, self.dest = url, dest
        self.expected_size, self.expected_sha256 = expected_size, expected_sha256
        self.timeout, self.chunk_size, self.progress, self.desc = timeout, chunk_size, progress, desc
        self.part = dest.with_name(dest.name + ".part")
        self.sidecar = dest.with_name(dest.name + ".part.json")
        self.state = _read_sidecar(self.sidecar) if self.part.exists() else {}
        if not self.part.exists():
            with contextlib.suppress(FileNotFoundError):
                self.sidecar.unlink()
        self.resumed = self.restarted = False
        self.progressed = False  # the current attempt received bytes

    def start_over(self) -> None:
        self.part.unlink()
        self.state = {}
        self.restarted = True

    def discard(self) -> None:
        self.part.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.sidecar.unlink()

    def open(self, offset: int):
        """The response for the bytes from ``offset`` on; None when the ``.part`` is already whole
        (HTTP 416 at its end). Raises :class:`_Restart` after dropping a stale ``.part``."""
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
            validator = self.state.get("etag") or self.state.get("last_modified")
            if validator:
                headers["If-Range"] = validator
        request = urllib.request.Request(self.url, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset > 0:
                exc.close()
                total = self.state.get("total")
                if total is not None and offset == total:
                    return None
                self.start_over()  # stale or over-long .part
                raise _Restart from None
            if exc.code in RETRY_STATUSES:
                raise _TransientError(f"HTTP {exc.code} {exc.reason}") from exc
            raise DownloadError(f"{self.url}: HTTP {exc.code} {exc.reason}") from exc

    def receive(self, response, offset: int) -> tuple[int, str]:
        """Append (resume) or write the body into the ``.part``: ``(size, sha256)`` of the whole file."""
        with response:
            status = response.status or 200  # file:// responses carry no status
            if status == 206 and offset > 0 and _range_start(response) == offset:
                mode = "ab"
                digest = _hash_prefix(self.part, offset)
                self.resumed = True
            elif status in (200, 206):
                if offset > 0:
                    self.restarted = True  # Range ignored, or the file changed (If-Range)
                offset = 0
                mode = "wb"
                digest = hashlib.sha256()
            else:
                raise DownloadError(f"{self.url}: unexpected HTTP status {status}")
            total = _announced_total(response, offset)
            self._record_server_state(response, total, fresh=mode == "wb")
            if self.expected_size is not None and total is not None and total != self.expected_size:
                raise DownloadError(
                    f"{self.url}: the server announces {total} bytes but {self.expected_size} are expected"
                )
            if total is not None:
                _check_free_space(self.part.parent, total - offset, self.url)
            written = self._copy_body(response, mode, digest, offset, total)
            if total is not None and written < total:
                raise _TransientError(f"connection closed after {written} of {total} bytes")
            if total is not None and written > total:
                raise DownloadError(f"{self.url}: received {written} bytes, more than the announced {total}")
        return written, digest.hexdigest()

    def _record_server_state(self, response, total: int | None, *, fresh: bool) -> None:
        new_state = {
            "url": self.url,
            "total": total,
            "etag": response.headers.get("ETag"),
            "last_modified": response.headers.get("Last-Modified"),
        }
        if fresh or new_state != self.state:
            self.state = new_state
            atomic_write_json(self.sidecar, self.state)

    def _copy_body(self, response, mode: str, digest, offset: int, total: int | None) -> int:
        written = offset
        bar = _progress_bar(self.progress, total, offset, self.desc)
        try:
            with open(self.part, mode) as handle:
                while True:
                    block = response.read(self.chunk_size)
                    if not block:
                        break
                    handle.write(block)
                    digest.update(block)
                    written += len(block)
                    self.progressed = True
                    bar.update(len(block))
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            bar.close()
        return written

    def commit(self, size: int, sha: str, attempts: int, *, resumed: bool | None = None) -> DownloadResult:
        """The checked ``.part`` becomes ``dest``."""
        os.replace(self.part, self.dest)
        with contextlib.suppress(FileNotFoundError):
            self.sidecar.unlink()
        return DownloadResult(self.dest, size, sha, self.url, resumed=self.resumed if resumed is None else resumed,
                              restarted=self.restarted, attempts=attempts)


def _check_free_space(directory: Path, needed: int, url: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise DownloadError(
            f"{url}: {needed / 2**30:.2f} GiB still to download but only {free / 2**30:.2f} GiB free in "
            f"{directory}; free some space (the bytes already received are kept) and rerun"
        )


def _progress_bar(enabled: bool, total: int | None, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------


@dataclass
class ExtractedFile:
    """One file written by :func:`extract_archive` (``path`` is relative to the target)."""

    path: str
    size: int
    sha256: str
    member: str


@dataclass
class ExtractResult:
    target: Path
    files: list[ExtractedFile] = field(default_factory=list)
    clashes: list[dict] = field(default_factory=list)      # {"member", "path" (renamed to), "clashed_with"}
    duplicates: list[dict] = field(default_factory=list)   # identical files kept once
    skipped: list[dict] = field(default_factory=list)      # non-regular members: {"member", "reason"}


def clash_name(name: str, tag: str, member: str) -> str:
    """Deterministic new name for a file whose name is taken by a different file."""
    path = PurePosixPath(name)
    token = hashlib.sha1(f"{tag}/{member}".encode("utf-8")).hexdigest()[:8]
    return str(path.with_name(f"{path.stem}~{token}{path.suffix}"))


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that turns a bad header after the first member into an error.

    ``tarfile`` silently ends the iteration on a truncated or invalid header that is not
    the first one, so an archive cut at a member boundary would look complete. Only a zero
    block (the end-of-archive marker) may end it.
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as exc:
            raise tarfile.ReadError(f"bad or truncated header at byte {tarfile_.offset}: {exc}") from None


def _is_storage_error(exc: BaseException) -> bool:
    """An OSError of the disk we write to (ENOSPC, EACCES...), not of the archive's content."""
    return isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and exc.errno is not None


def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    parts = [p for p in path.parts if p not in ("", ".")]
    if path.is_absolute() or any(p == ".." for p in parts) or not parts:
        raise ArchiveError(f"{archive}: refusing unsafe member name {name!r} (absolute or with '..')")
    return PurePosixPath(*parts)


def _same_file(path: Path, size: int, sha: str) -> bool:
    return path.stat().st_size == size and sha256_file(path) == sha


def extract_archive(
    archive: str | os.PathLike,
    target: str | os.PathLike,
    *,
    flatten: bool = False,
    tag: str | None = None,
    progress: bool = False,
) -> ExtractResult:
    """Extract a (compressed) tarball into ``target`` atomically; see the module docstring.

    Args:
        archive: a ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2`` or ``.tar.xz`` file.
        target: the directory to fill. Created by an atomic rename if it does not exist;
            otherwise the archive's files are merged into it.
        flatten: put every file at the top level of ``target`` (the member's basename).
        tag: the name used in clash renames (default: the archive's file name).
        progress: show a tqdm bar counting files.

    Raises:
        ArchiveError: the archive is unreadable or truncated, or names a file outside the
            target. Nothing in ``target`` is changed then.
    """
    archive = Path(archive)
    target = Path(target)
    tag = tag or archive.name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    result = ExtractResult(target=target)
    try:
        _extract_to_staging(archive, staging, flatten=flatten, tag=tag, result=result, progress=progress)
        if not target.exists():
            os.rename(staging, target)
            return result
        _merge_into(staging, target, tag=tag, result=result)
        return result
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _extract_to_staging(archive: Path, staging: Path, *, flatten: bool, tag: str,
                        result: ExtractResult, progress: bool) -> None:
    from tqdm.auto import tqdm

    errors = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, OSError)
    try:
        tar = tarfile.open(archive, mode="r:*", tarinfo=_StrictTarInfo)
    except FileNotFoundError as exc:
        raise ArchiveError(f"{archive}: archive not found") from exc
    except errors as exc:
        if _is_storage_error(exc):
            raise
        reason = f"{type(exc).__name__}: {exc}"
        if "could not be opened successfully" in str(exc):
            reason = "neither a tar file nor a gzip, bzip2 or xz compressed one"
        raise ArchiveError(f"{archive}: not a readable tar archive ({reason})") from exc
    bar = tqdm(unit=" files", desc=f"extract {archive.name}", disable=not progress, leave=False)
    try:
        with tar:
            members = iter(tar)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    break
                except errors as exc:
                    if _is_storage_error(exc):
                        raise
                    raise ArchiveError(
                        f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc})"
                    ) from exc
                if member.isdir():
                    continue
                if not member.isfile():
                    result.skipped.append({"member": member.name, "reason": "not a regular file"})
                    continue
                rel = _safe_member_path(member.name, archive)
                if flatten:
                    rel = PurePosixPath(rel.name)
                out = staging / rel
                name = str(rel)
                try:
                    source = tar.extractfile(member)
                    digest = hashlib.sha256()
                    tmp = out.with_name(out.name + ".extracting")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with source, open(tmp, "wb") as handle:
                        for block in iter(lambda: source.read(CHUNK_SIZE), b""):
                            handle.write(block)
                            digest.update(block)
                except errors as exc:
                    if _is_storage_error(exc):
                        raise
                    raise ArchiveError(
                        f"{archive}: corrupt or truncated archive at member {member.name!r} "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
                sha = digest.hexdigest()
                size = tmp.stat().st_size
                if size != member.size:
                    raise ArchiveError(f"{archive}: member {member.name!r} is truncated "
                                       f"({size} of {member.size} bytes)")
                if out.exists():  # same basename twice in one archive (flatten) or a duplicate entry
                    if _same_file(out, size, sha):
                        tmp.unlink()
                        result.duplicates.append({"member": member.name, "path": name})
                        continue
                    new = clash_name(name, tag, member.name)
                    result.clashes.append({"member": member.name, "path": new, "clashed_with": name})
                    name = new
                    out = staging / new
                os.replace(tmp, out)
                with contextlib.suppress(OSError):
                    os.utime(out, (member.mtime, member.mtime))
                result.files.append(ExtractedFile(name, size, sha, member.name))
                bar.update(1)
            # Read to the end of the compressed stream: the gzip/bz2/xz trailer (CRC, length)
            # is only checked there, and tarfile stops reading at the end-of-archive block.
            try:
                while tar.fileobj.read(CHUNK_SIZE):
                    pass
            except errors as exc:
                if _is_storage_error(exc):
                    raise
                raise ArchiveError(
                    f"{archive}: corrupt or truncated archive after the last member "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
    finally:
        bar.close()


def _merge_into(staging: Path, target: Path, *, tag: str, result: ExtractResult) -> None:
    """Move the staged files into an existing target, resolving clashes deterministically."""
    kept: list[ExtractedFile] = []
    for item in result.files:
        src = staging / item.path
        dst = target / item.path
        if dst.exists():
            if _same_file(dst, item.size, item.sha256):
                # Already there: a rerun after an interrupted merge, or a true duplicate.
                kept.append(item)
                continue
            new = clash_name(item.path, tag, item.member)
            dst = target / new
            if dst.exists() and _same_file(dst, item.size, item.sha256):
                kept.append(ExtractedFile(new, item.size, item.sha256, item.member))
                continue
            result.clashes.append({"member": item.member, "path": new, "clashed_with": item.path})
            item = ExtractedFile(new, item.size, item.sha256, item.member)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        kept.append(item)
    result.files = kept


