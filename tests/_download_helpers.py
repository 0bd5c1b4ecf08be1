"""Test helpers for the downloader: a local HTTP server with fault injection, tiny archives."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 16), quality: int = 90) -> bytes:
    """A small, valid JPEG whose content depends on ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz", symlinks: dict[str, str] | None = None) -> bytes:
    """A tarball (gzip by default) holding ``members`` (path -> content) in insertion order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def gnd_bytes(imlist: list[str], qimlist: list[str]) -> bytes:
    """A revisitop-style gnd pickle (protocol 3, builtin types only), a few positives per query."""
    n = len(imlist)
    gnd = []
    for q in range(len(qimlist)):
        easy, hard, junk = sorted({q % n, (q + 7) % n}), [(q + 3) % n], [(q + 5) % n]
        gnd.append({"bbx": [1.5, 2.0, 20.0, 14.5], "easy": easy, "hard": hard, "junk": junk})
    return pickle.dumps({"imlist": list(imlist), "qimlist": list(qimlist), "gnd": gnd}, protocol=3)


@dataclass
class Served:
    """Per-path behaviour of :class:`FileServer`."""

    data: bytes
    drop_after: list[int] = field(default_factory=list)   # per request: close after N body bytes
    statuses: list[int] = field(default_factory=list)     # per request: answer with this error status first
    corrupt: list[bool] = field(default_factory=list)     # per request: flip a byte of the body
    hold: threading.Event | None = None                   # send half the body, then wait for this event
    requested: threading.Event = field(default_factory=threading.Event)  # set once a GET is (half) sent


class FileServer:
    """An HTTP server on 127.0.0.1 (port 0) serving in-memory files, with optional Range support.

    ``drop_after`` makes the next requests send the full Content-Length but close the
    connection after N body bytes; ``statuses`` makes them fail with an HTTP error. Every
    request is logged as (path, Range header, If-Range header).
    """

    def __init__(self, files: dict[str, bytes] | None = None, *, range_support: bool = True):
        self.files: dict[str, Served] = {p: Served(d) for p, d in (files or {}).items()}
        self.range_support = range_support
        self.requests: list[tuple[str, str | None, str | None]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server._handle(self)

            def do_HEAD(self):
                server._head(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def set(self, path: str, data: bytes, **behaviour) -> Served:
        served = Served(data, **behaviour)
        with self._lock:
            self.files[path] = served
        return served

    def _head(self, handler: BaseHTTPRequestHandler) -> None:
        """HEAD: the status and Content-Length of a GET, no body (HEAD requests are not logged)."""
        served = self.files.get(handler.path.split("?", 1)[0])
        handler.send_response(200 if served is not None else 404)
        handler.send_header("Content-Length", str(len(served.data)) if served is not None else "0")
        handler.send_header("Connection", "close")
        handler.end_headers()

    def paths_requested(self) -> list[str]:
        return [p for p, _, _ in self.requests]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        range_header = handler.headers.get("Range")
        if_range = handler.headers.get("If-Range")
        with self._lock:
            self.requests.append((path, range_header, if_range))
            served = self.files.get(path)
            status = served.statuses.pop(0) if served and served.statuses else None
            drop = served.drop_after.pop(0) if served and served.drop_after else None
            corrupt = served.corrupt.pop(0) if served and served.corrupt else False
        if served is None or status is not None:
            code = status or 404
            handler.send_response(code)
            handler.send_header("Content-Length", "0")
            handler.send_header("Connection", "close")
            handler.end_headers()
            return
        data = served.data
        if corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])  # same length: only a checksum can tell
        etag = '"' + hashlib.sha1(data).hexdigest()[:16] + '"'
        start = 0
        partial = False
        if self.range_support and range_header and range_header.startswith("bytes=") and (
            if_range is None or if_range == etag
        ):
            first, _, last = range_header[len("bytes="):].partition("-")
            start = int(first)
            end = int(last) if last else len(data) - 1
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.send_header("Connection", "close")
                handler.end_headers()
                return
            partial = True
            body = data[start:end + 1]
        else:
            body = data
        handler.send_response(206 if partial else 200)
        if partial:
            handler.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        if self.range_support:
            handler.send_header("Accept-Ranges", "bytes")
            handler.send_header("ETag", etag)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        if drop is not None:
            handler.wfile.write(body[:drop])
            handler.wfile.flush()
            handler.close_connection = True
            # Shut the socket so the client sees the connection end before Content-Length.
            try:
                import socket

                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if served.hold is not None:
            try:
                handler.wfile.write(body[: len(body) // 2])
                handler.wfile.flush()
            except OSError:
                return
            served.requested.set()
            served.hold.wait(timeout=60)
            body = body[len(body) // 2:]
        served.requested.set()
        try:
            handler.wfile.write(body)
        except OSError:  # the client was killed meanwhile
            pass


# --------------------------------------------------------------------------------------
# A miniature GLDv2 mirror in the official layout
# --------------------------------------------------------------------------------------


def gldv2_id(split: str, n: int) -> str:
    """A 16-hex-digit id, as GLDv2's, unique per split and number."""
    return hashlib.sha1(f"{split}-{n}".encode()).hexdigest()[:16]


def gldv2_member(image_id: str) -> str:
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


@dataclass
class GLDv2Mirror:
    """``files`` (URL path -> bytes) of a tiny GLDv2 mirror and what its tars hold."""

    files: dict[str, bytes]
    tars: dict[str, dict[str, bytes]]   # "train/images_003.tar" -> {member: bytes}
    solution: list[tuple[str, str, str]]  # (id, images, Usage) rows of the retrieval solution


def _csv(header: str, rows: list[str]) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def gldv2_mirror(*, train_tars: int = 11, per_train_tar: int = 3, index_tars: int = 2, per_index_tar: int = 8,
                 test_images: int = 8, size: tuple[int, int] = (40, 32)) -> GLDv2Mirror:
    """Tars of tiny JPEGs (``a/b/c/<id>.jpg``), their md5 files and the csvs, at the official paths.

    Retrieval: test image q looks like index image 2q (a recompressed copy); it is Public for even
    q, Private for odd q, and its solution is index images 2q and 2q+1; the last test image is
    Ignored with the solution None, as the unscored test images of the real file.
    """
    files: dict[str, bytes] = {}
    tars: dict[str, dict[str, bytes]] = {}

    def add_tar(split: str, i: int, members: dict[str, bytes]) -> None:
        name = f"images_{i:03d}.tar"
        data = tar_bytes(members, mode="w")
        files[f"/{split}/{name}"] = data
        files[f"/md5sum/{split}/md5.{name}.txt".replace(".tar.txt", ".txt")] = (
            f"{hashlib.md5(data).hexdigest()}  {name}\n".encode())
        tars[f"{split}/{name}"] = members

    train_rows, clean = [], {}
    for t in range(train_tars):
        members = {}
        for k in range(per_train_tar):
            n = t * per_train_tar + k
            image_id = gldv2_id("train", n)
            members[gldv2_member(image_id)] = jpeg_bytes(1000 + n, size)
            train_rows.append(f"{image_id},http://example.org/{image_id}.jpg,{n % 5}")
            clean.setdefault(n % 5, []).append(image_id)
        add_tar("train", t, members)
    files["/metadata/train.csv"] = _csv("id,url,landmark_id", train_rows)
    files["/metadata/train_clean.csv"] = _csv("landmark_id,images", [f"{k},{' '.join(v)}" for k, v in clean.items()])
    files["/metadata/train_label_to_category.csv"] = _csv(
        "landmark_id,category", [f"{k},http://commons.wikimedia.org/wiki/Category:L{k}" for k in clean])

    index_ids = [gldv2_id("index", n) for n in range(index_tars * per_index_tar)]
    for t in range(index_tars):
        add_tar("index", t, {gldv2_member(index_ids[n]): jpeg_bytes(2000 + n, size)
                             for n in range(t * per_index_tar, (t + 1) * per_index_tar)})
    test_ids = [gldv2_id("test", n) for n in range(test_images)]
    add_tar("test", 0, {gldv2_member(test_ids[q]): jpeg_bytes(2000 + (2 * q) % len(index_ids), size, quality=60)
                        for q in range(test_images)})
    files["/metadata/index.csv"] = _csv("id", index_ids)
    files["/metadata/test.csv"] = _csv("id", test_ids)
    solution = []
    for q in range(test_images - 1):
        positives = [index_ids[(2 * q) % len(index_ids)], index_ids[(2 * q + 1) % len(index_ids)]]
        solution.append((test_ids[q], " ".join(positives), "Public" if q % 2 == 0 else "Private"))
    solution.append((test_ids[-1], "None", "Ignored"))
    files["/ground_truth/retrieval_solution_v2.1.csv"] = _csv("id,images,Usage", [",".join(r) for r in solution])
    return GLDv2Mirror(files, tars, solution)
