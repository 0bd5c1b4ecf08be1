"""cfcd.data.download: resumable downloads against a local HTTP server, atomic extraction."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile

import pytest

from _download_helpers import FileServer, jpeg_bytes, tar_bytes
from cfcd.data.download import (
    ArchiveError,
    DownloadError,
    clash_name,
    download_file,
    extract_archive,
)
from cfcd.errors import CfcdError

PAYLOAD = os.urandom(3 * 65536 + 123)
FAST = dict(backoff=0, progress=False, timeout=10, chunk_size=8192)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_plain(tmp_path):
    with FileServer({"/f.bin": PAYLOAD}) as server:
        result = download_file(server.url + "/f.bin", tmp_path / "f.bin", **FAST)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert result.sha256 == sha(PAYLOAD) and result.size == len(PAYLOAD)
    assert not result.resumed and result.attempts == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no .part / sidecar left


def test_dropped_connection_resumes_on_rerun_byte_identical(tmp_path):
    dest = tmp_path / "f.bin"
    with FileServer() as server:
        server.set("/f.bin", PAYLOAD, drop_after=[100_000])
        with pytest.raises(DownloadError, match="resumes"):
            download_file(server.url + "/f.bin", dest, retries=0, **FAST)
        assert not dest.exists()
        part = tmp_path / "f.bin.part"
        assert part.stat().st_size == 100_000
        result = download_file(server.url + "/f.bin", dest, retries=0, **FAST)
        assert server.requests[-1][1] == "bytes=100000-"
        assert server.requests[-1][2] is not None  # If-Range carries the ETag of the first response
    assert dest.read_bytes() == PAYLOAD
    assert result.resumed and not result.restarted and result.sha256 == sha(PAYLOAD)
    assert not part.exists()


def test_dropped_connection_retried_within_one_call(tmp_path):
    dest = tmp_path / "f.bin"
    with FileServer() as server:
        server.set("/f.bin", PAYLOAD, drop_after=[50_000, 70_000])
        result = download_file(server.url + "/f.bin", dest, retries=1, expected_sha256=sha(PAYLOAD), **FAST)
        ranges = [r for _, r, _ in server.requests]
    assert ranges == [None, "bytes=50000-", "bytes=120000-"]
    assert result.attempts == 3 and result.resumed
    assert dest.read_bytes() == PAYLOAD


def test_server_without_range_restarts_from_zero(tmp_path):
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:40_000])
    with FileServer({"/f.bin": PAYLOAD}, range_support=False) as server:
        result = download_file(server.url + "/f.bin", dest, **FAST)
        assert server.requests[0][1] == "bytes=40000-"  # asked to resume, got 200
    assert result.restarted and not result.resumed
    assert dest.read_bytes() == PAYLOAD  # not the 40000-byte head plus the whole file


def test_changed_remote_file_restarts_instead_of_splicing(tmp_path):
    dest = tmp_path / "f.bin"
    new = bytes(reversed(PAYLOAD))
    with FileServer() as server:
        server.set("/f.bin", PAYLOAD, drop_after=[30_000])
        with pytest.raises(DownloadError):
            download_file(server.url + "/f.bin", dest, retries=0, **FAST)
        server.set("/f.bin", new)  # new ETag: If-Range fails, the server sends the whole file
        result = download_file(server.url + "/f.bin", dest, **FAST)
    assert result.restarted
    assert dest.read_bytes() == new


def test_checksum_mismatch_fails_and_leaves_nothing(tmp_path):
    dest = tmp_path / "f.bin"
    with FileServer({"/f.bin": PAYLOAD}) as server:
        with pytest.raises(DownloadError, match="sha256"):
            download_file(server.url + "/f.bin", dest, expected_sha256="0" * 64, **FAST)
        with pytest.raises(DownloadError, match="announces"):
            download_file(server.url + "/f.bin", dest, expected_size=len(PAYLOAD) + 1, **FAST)
    assert list(tmp_path.iterdir()) == [] or not dest.exists()
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_existing_file_is_checked_not_downloaded(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD)
    with FileServer({"/f.bin": PAYLOAD}) as server:
        result = download_file(server.url + "/f.bin", dest, expected_sha256=sha(PAYLOAD), **FAST)
        assert result.skipped and server.requests == []
        with pytest.raises(DownloadError, match="already exists but does not match"):
            download_file(server.url + "/f.bin", dest, expected_sha256="f" * 64, **FAST)
        assert server.requests == [] and dest.read_bytes() == PAYLOAD  # never deleted by us


def test_http_errors_retry_policy(tmp_path):
    delays: list[float] = []
    with FileServer() as server:
        with pytest.raises(DownloadError, match="404"):
            download_file(server.url + "/missing", tmp_path / "m", retries=3, **FAST)
        assert len(server.requests) == 1  # a 404 is final
        server.set("/busy", PAYLOAD, statuses=[503, 503])
        result = download_file(server.url + "/busy", tmp_path / "b", retries=3, backoff=0.5,
                               sleep=delays.append, progress=False, timeout=10)
    assert delays == [0.5, 1.0]  # exponential backoff, through the injected sleep
    assert result.attempts == 3 and (tmp_path / "b").read_bytes() == PAYLOAD


def test_retries_are_bounded(tmp_path):
    with FileServer() as server:
        server.set("/f.bin", PAYLOAD, drop_after=[0] * 10)
        with pytest.raises(DownloadError, match="after 3 attempts"):
            download_file(server.url + "/f.bin", tmp_path / "f.bin", retries=2, **FAST)
        assert len(server.requests) == 3


def test_range_not_satisfiable_with_complete_part(tmp_path):
    dest = tmp_path / "f.bin"
    with FileServer() as server:
        server.set("/f.bin", PAYLOAD, drop_after=[len(PAYLOAD) - 10])
        with pytest.raises(DownloadError):
            download_file(server.url + "/f.bin", dest, retries=0, **FAST)
        # A .part longer than the file (stale): 416 -> clean restart.
        (tmp_path / "f.bin.part").write_bytes(PAYLOAD + b"junk")
        result = download_file(server.url + "/f.bin", dest, **FAST)
    assert result.restarted and dest.read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------- archives


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_extract_flatten_clashes_and_duplicates(tmp_path):
    a, b, c = jpeg_bytes(1), jpeg_bytes(2), jpeg_bytes(3)
    archive = _write(tmp_path / "x.tgz", tar_bytes({
        "top/one/a.jpg": a,
        "top/two/a.jpg": b,        # same name, different content: renamed
        "top/three/a.jpg": a,      # same name, same content: kept once
        "top/c.jpg": c,
    }, symlinks={"top/link.jpg": "c.jpg"}))
    target = tmp_path / "jpg"
    result = extract_archive(archive, target, flatten=True)
    renamed = clash_name("a.jpg", "x.tgz", "top/two/a.jpg")
    assert sorted(p.name for p in target.iterdir()) == sorted(["a.jpg", "c.jpg", renamed])
    assert (target / "a.jpg").read_bytes() == a and (target / renamed).read_bytes() == b
    assert result.clashes == [{"member": "top/two/a.jpg", "path": renamed, "clashed_with": "a.jpg"}]
    assert [d["member"] for d in result.duplicates] == ["top/three/a.jpg"]
    assert result.skipped == [{"member": "top/link.jpg", "reason": "not a regular file"}]
    assert {f.path: f.sha256 for f in result.files}["c.jpg"] == sha(c)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging removed


def test_extract_merge_is_deterministic_and_idempotent(tmp_path):
    a, b = jpeg_bytes(4), jpeg_bytes(5)
    first = _write(tmp_path / "p1.tgz", tar_bytes({"d/x/a.jpg": a, "d/x/k.jpg": jpeg_bytes(6)}))
    second = _write(tmp_path / "p2.tgz", tar_bytes({"d/y/a.jpg": b, "d/y/m.jpg": jpeg_bytes(7)}))
    target = tmp_path / "jpg"
    extract_archive(first, target, flatten=True)
    res = extract_archive(second, target, flatten=True)
    renamed = clash_name("a.jpg", "p2.tgz", "d/y/a.jpg")
    listing = sorted(p.name for p in target.iterdir())
    assert listing == sorted(["a.jpg", "k.jpg", "m.jpg", renamed])
    assert (target / renamed).read_bytes() == b and len(res.clashes) == 1
    # A rerun (e.g. after a kill during the merge) recognises the files it already placed.
    again = extract_archive(second, target, flatten=True)
    assert sorted(p.name for p in target.iterdir()) == listing
    assert sorted(f.path for f in again.files) == sorted(f.path for f in res.files)
    # Nested (not flattened) extraction keeps the tree.
    tree = extract_archive(first, tmp_path / "tree")
    assert sorted(f.path for f in tree.files) == ["d/x/a.jpg", "d/x/k.jpg"]
    assert (tmp_path / "tree" / "d" / "x" / "a.jpg").read_bytes() == a


def _corruptions(good: bytes, plain: bytes):
    gz_member = gzip.decompress(good)
    crc_broken = bytearray(good)
    crc_broken[-6] ^= 0xFF  # gzip trailer CRC32: only checked at the end of the stream
    # Uncompressed tar cut exactly after the first member's data (a header boundary).
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        first = tar.getmembers()[0]
        boundary = first.offset_data + ((first.size + 511) // 512) * 512
    assert len(gz_member) > 0
    return {
        "truncated.tgz": good[: len(good) // 2],
        "garbage.tgz": os.urandom(4096),
        "empty.tgz": b"",
        "crc.tgz": bytes(crc_broken),
        "cut.tar": plain[:boundary],
    }


def test_corrupt_archives_give_clear_error_and_no_target(tmp_path):
    members = {f"d/img{i}.jpg": jpeg_bytes(10 + i, size=(64, 64)) for i in range(4)}
    good = tar_bytes(members)
    plain = tar_bytes(members, mode="w")
    for name, data in _corruptions(good, plain).items():
        archive = _write(tmp_path / name, data)
        target = tmp_path / f"out-{name}"
        with pytest.raises(ArchiveError) as info:
            extract_archive(archive, target, flatten=True)
        assert isinstance(info.value, CfcdError)
        assert str(archive) in str(info.value), name
        assert not target.exists(), name
    assert not [p for p in tmp_path.iterdir() if ".extract-" in p.name]
    # An existing target is left exactly as it was.
    target = tmp_path / "jpg"
    extract_archive(_write(tmp_path / "good.tgz", good), target, flatten=True)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(ArchiveError):
        extract_archive(tmp_path / "truncated.tgz", target, flatten=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_unsafe_member_names_are_refused(tmp_path):
    for bad in ("../evil.jpg", "/abs/evil.jpg", "d/../../evil.jpg"):
        archive = _write(tmp_path / "bad.tgz", tar_bytes({"ok.jpg": b"x", bad: b"y"}))
        with pytest.raises(ArchiveError, match="unsafe"):
            extract_archive(archive, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.jpg").exists()


def test_not_enough_disk_space_is_reported_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with FileServer({"/f.bin": PAYLOAD}) as server:
        with pytest.raises(DownloadError, match="GiB free"):
            download_file(server.url + "/f.bin", tmp_path / "f.bin", **FAST)
    assert not (tmp_path / "f.bin").exists()
    assert not (tmp_path / "f.bin.part").exists() or (tmp_path / "f.bin.part").stat().st_size == 0
