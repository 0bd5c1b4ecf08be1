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


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """A small, valid JPEG whose content depends on ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
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
        if served is None or status is not None:
            code = status or 404
            handler.send_response(code)
            handler.send_header("Content-Length", "0")
            handler.send_header("Connection", "close")
            handler.end_headers()
            return
        data = served.data
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
        handler.wfile.write(body)
