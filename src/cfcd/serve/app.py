"""The FastAPI app of ``cfcd serve``: a JSON API and the static page that uses it.

:func:`load_state` opens the index and the model (and the benchmark views) once;
:func:`create_app` serves them. Heavy work (decoding, the model, the index) runs in the thread
pool, never on the event loop. Routes are listed in README.md ("Web page and API").

:class:`HostOriginGuard` answers a request for a foreign ``Host`` (DNS rebinding) with 421 and a
state-changing request from a foreign ``Origin`` (another site's page) with 403. An upload takes
its slot in the work queue before its body is read, so an overloaded server refuses it (503,
``Retry-After``) without reading or decoding it.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from cfcd import __version__
from cfcd.data.datasets import DATASETS
from cfcd.data.gnd import load_gnd
from cfcd.data.lists import revisitop_image_dir
from cfcd.errors import CfcdError, InputError
from cfcd.serve.benchmark import Benchmark, comparison
from cfcd.serve.service import Limits, QueryImage, RequestError, SearchService, parse_box
from cfcd.serve.thumbs import SIZES, ThumbnailError, thumbnail_path

STATIC_DIR = Path(__file__).with_name("static")
_MULTIPART_SLACK = 64 * 1024  # multipart headers and the small form fields around the file


@dataclass
class ServeConfig:
    index: Path
    images: Path | None = None
    model: str | None = None
    weights: str | None = None
    whiten: str | None = None
    gnd: Path | None = None
    dataset: str | None = None  # a registered benchmark (cfcd.data.datasets.DATASETS) under ``root``, instead of gnd
    root: Path | None = None
    queries: Path | None = None  # query store of the benchmark (default: described at start-up, cached)
    compare: Path | None = None
    compare_weights: str | None = None
    compare_queries: Path | None = None
    device: str = "cpu"
    runtime: str = "auto"  # what runs the network that describes queries (cfcd.extract.runtimes)
    cache_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"  # the bind address: a Host header naming it is accepted
    allow_hosts: tuple[str, ...] = ()  # more names the server may be reached by (--allow-host)


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_STATE_CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})


def _split_host(value: str) -> tuple[str, int | None]:
    """``"[::1]:8000"`` -> ``("::1", 8000)``; ``"localhost"`` -> ``("localhost", None)``."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""
    return name, (int(port) if port.isdigit() else None)


class HostOriginGuard:
    """Pure ASGI middleware: 421 for a ``Host`` not in ``allowed``; 403 for a POST/PUT/DELETE/PATCH
    whose ``Origin`` is not the host it was sent to. Requests without ``Origin`` (curl, scripts)
    pass: browsers send it on every cross-site request that could change state."""

    def __init__(self, app, allowed: set[str]):
        self.app = app
        self.allowed = {_split_host(h)[0] for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if host is not None:
            name, port = _split_host(host)
            if name not in self.allowed:
                return await _send_json(send, 421, f"this server does not answer for host {name!r} (start it with "
                                                   f"--allow-host {name} to allow that name)")
        origin = headers.get("origin")
        if origin is not None and scope["method"] in _STATE_CHANGING and not _same_origin(origin, host, scope):
            return await _send_json(send, 403, f"cross-origin {scope['method']} refused: the page at {origin} is not "
                                               "this server's page")
        await self.app(scope, receive, send)


def _same_origin(origin: str, host: str | None, scope) -> bool:
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null" (sandboxed frames, file: pages) and anything odd
    default = 443 if parts.scheme == "https" else 80
    if host is None:
        server = scope.get("server") or ("", None)
        name, port = str(server[0]).lower(), server[1]
    else:
        name, port = _split_host(host)
    here = 443 if scope.get("scheme") == "https" else 80
    return (parts.hostname.lower(), origin_port or default) == (name, port or here)


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


@dataclass
class ServeState:
    service: SearchService
    benchmark: Any = None  # cfcd.serve.benchmark.Benchmark
    other: SearchService | None = None
    other_benchmark: Any = None


def load_state(config: ServeConfig, log=None) -> ServeState:
    """Open everything ``config`` names; raises :class:`InputError` with a clear message."""
    log = log or (lambda message: None)
    gnd = dataset = None
    images = config.images
    if config.dataset is not None:
        if config.gnd is not None:
            raise InputError("--gnd and --dataset both name the benchmark: pass one of them")
        if config.root is None:
            raise InputError(f"--dataset {config.dataset} needs --root DIR (where 'cfcd data download' put it)")
        dataset = DATASETS.get(config.dataset)
        gnd = dataset.ground_truth(config.root)
        if images is None:
            images = dataset.dir(config.root)  # the benchmark's images are served from their own paths under it
    elif config.gnd is not None:
        gnd = load_gnd(config.gnd)
        if images is None:
            images = revisitop_image_dir(Path(config.gnd).parent, gnd.dataset)
    log(f"loading the index {config.index} and its model")
    service = SearchService.open(
        config.index, images=images, model_name=config.model, weights=config.weights, whiten=config.whiten,
        device=config.device, runtime=config.runtime, cache_dir=config.cache_dir, limits=config.limits,
    )
    state = ServeState(service=service)
    if config.compare is not None:
        if gnd is None:
            raise InputError("--compare compares two indexes on a benchmark: it needs --gnd FILE or --dataset NAME")
        log(f"loading the baseline index {config.compare} and its model")
        state.other = SearchService.open(
            config.compare, images=service.images.root, weights=config.compare_weights, device=config.device,
            runtime=config.runtime,
            cache_dir=(service.cache_dir / "compare"), limits=config.limits,
        )
    if gnd is not None:
        log(f"evaluating {service.name} on {gnd.dataset} ({len(gnd.qimlist)} queries)")
        root = config.root if dataset is not None else None
        state.benchmark = Benchmark.build(service, gnd, queries=config.queries, image_root=root, dataset=dataset,
                                          log=log)
        if state.other is not None:
            log(f"evaluating the baseline {state.other.name} on {gnd.dataset}")
            state.other_benchmark = Benchmark.build(state.other, gnd, queries=config.compare_queries, image_root=root,
                                                    dataset=dataset, log=log)
            if state.other.name == service.name:
                state.other.name = state.other_benchmark.name = f"{service.name} (2)"
    return state


def _error(status: int, message: str):
    return JSONResponse({"detail": message}, status_code=status)


def create_app(config: ServeConfig | None = None, *, state: ServeState | None = None):
    """The app. With ``state`` (already loaded) the lifespan only attaches it; else it loads
    ``config`` at start-up."""
    if state is None and config is None:
        raise ValueError("create_app needs a config or a loaded state")

    @asynccontextmanager
    async def lifespan(app):
        app.state.cfcd = state if state is not None else await run_in_threadpool(load_state, config)
        yield


    # no /api/docs: FastAPI's Swagger UI loads its scripts from a CDN, which the page's content
    # policy (script-src 'self') and offline use both block; the schema is /api/openapi.json
    app = FastAPI(title="cfcd serve", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/api/openapi.json")
    bind = config.host if config is not None else "127.0.0.1"
    extra = tuple(config.allow_hosts) if config is not None else ()
    app.add_middleware(HostOriginGuard, allowed={*LOCAL_HOSTS, bind, *extra})

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        response = _error(exc.status, str(exc))
        if exc.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(CfcdError)
    async def _cfcd_error(request, exc: CfcdError):
        return _error(400, str(exc))

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.headers.get("content-type", "").startswith("text/html"):
            # everything the page loads comes from this server (it runs offline)
            response.headers["Content-Security-Policy"] = (
                "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                "connect-src 'self'; frame-ancestors 'none'")
        return response

    def st(request: Request) -> ServeState:
        return request.app.state.cfcd

    def svc(request: Request) -> SearchService:
        return st(request).service

    # ---- page

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---- API

    @app.get("/api/health")
    def health(request: Request):
        s = st(request)
        out = s.service.health()
        out["benchmark"] = None if s.benchmark is None else {"dataset": s.benchmark.gnd.dataset,
                                                              "queries": len(s.benchmark.gnd.qimlist)}
        out["compare"] = None if s.other is None else {"name": s.other.name, "model": s.other.meta.get("model"),
                                                       "index_type": s.other.index.type}
        out["name"] = s.service.name
        out["limits"] = {"max_upload_bytes": s.service.limits.max_upload_bytes,
                         "max_upload_pixels": s.service.limits.max_upload_pixels, "max_k": s.service.limits.max_k,
                         "max_query_size": s.service.query_size_cap()}
        return out

    @app.get("/api/search")
    def search_get(request: Request, id: str | None = None, upload: str | None = None, k: int = 100,
                   box: str | None = None, side: str = "a"):
        service = _side_service(st(request), side)
        if (id is None) == (upload is None):
            raise RequestError(400, "give exactly one of id=IMAGE_ID and upload=KEY (or POST an image)")
        return service.search(QueryImage(image_id=id, upload=upload, box=parse_box(box)), k)

    @app.post("/api/search")
    async def search_post(request: Request):
        s = st(request)
        service = _side_service(s, request.query_params.get("side", "a"))
        # the queue slot comes first: an overloaded server answers 503 without reading the body
        with service.admit(mark_thread=False):
            data, fields = await _read_upload(request, service.limits.max_upload_bytes)
            k = _int(fields.get("k", request.query_params.get("k", "100")), "k")
            box = parse_box(fields.get("box", request.query_params.get("box")))
            return await run_in_threadpool(service.search_upload, data, k, box, admitted=True)

    @app.get("/api/images")
    def images(request: Request, offset: int = 0, limit: int = 60, q: str = ""):
        return svc(request).list_images(offset, limit, q)

    @app.get("/api/images/{image_id:path}")
    def image(request: Request, image_id: str):
        path = _image_path(svc(request), image_id)
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/api/thumbs/{image_id:path}")
    def thumb(request: Request, image_id: str, size: int = 256):
        service = svc(request)
        return _thumb_response(service, _image_path(service, image_id), size, None)

    @app.get("/api/uploads/{key}")
    def upload_original(request: Request, key: str):
        service = svc(request)
        path = service.upload_path(key)
        try:
            content = path.read_bytes()
        except OSError:
            raise RequestError(404, f"no upload {key!r}") from None
        service.budget.touch(path)
        return Response(content, media_type=_sniff(content), headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/uploads/{key}/thumb")
    def upload_thumb(request: Request, key: str, size: int = 256, box: str | None = None):
        service = svc(request)
        path = service.upload_path(key)
        if not path.is_file():
            raise RequestError(404, f"no upload {key!r}")
        return _thumb_response(service, path, size, parse_box(box))

    @app.get("/api/benchmark")
    def benchmark(request: Request, side: str = "a"):
        return _side_benchmark(st(request), side).summary()

    @app.get("/api/benchmark/{query}")
    def benchmark_query(request: Request, query: str, setup: str | None = None, k: int = 100, side: str = "a"):
        if not 1 <= k <= 10000:
            raise RequestError(400, f"k must be between 1 and 10000, got {k}")
        return _side_benchmark(st(request), side).detail(query, setup=setup, k=k)

    @app.get("/api/benchmark/{query}/thumb")
    def benchmark_query_thumb(request: Request, query: str, size: int = 256):
        s = st(request)
        bench = _side_benchmark(s, "a")
        qi = bench.query_index(query)
        path = _image_path(s.service, query)
        return _thumb_response(s.service, path, size, bench.gnd.bbx(qi))

    @app.get("/api/compare")
    def compare(request: Request):
        s = st(request)
        if s.other_benchmark is None:
            raise RequestError(404, "no comparison: start the server with --compare BASELINE_INDEX_DIR and --gnd FILE "
                                   "(or --dataset NAME --root DIR)")
        return comparison(s.benchmark, s.other_benchmark)

    @app.get("/api/{rest:path}", include_in_schema=False)
    def api_not_found(rest: str):
        raise RequestError(404, f"no API route /api/{rest}")

    return app


# --------------------------------------------------------------------------- helpers


def _side_service(state: ServeState, side: str) -> SearchService:
    if side == "a":
        return state.service
    if side == "b" and state.other is not None:
        return state.other
    raise RequestError(400 if side != "b" else 404, f"unknown side {side!r}" if side != "b" else "no second index (--compare)")


def _side_benchmark(state: ServeState, side: str):
    bench = state.benchmark if side == "a" else (state.other_benchmark if side == "b" else None)
    if bench is None:
        if side not in ("a", "b"):
            raise RequestError(400, f"unknown side {side!r}")
        raise RequestError(404, "no benchmark: start the server with --gnd FILE (a revisitop ground truth) or "
                                "--dataset NAME --root DIR")
    return bench


def _image_path(service: SearchService, image_id: str) -> Path:
    service.current()  # an id removed from the index is not served
    path = service.images.path(image_id)
    if path is None:
        raise RequestError(404, f"no image {image_id!r}")
    return path


def _thumb_response(service: SearchService, path: Path, size: int, box):
    if size not in SIZES:
        raise RequestError(400, f"thumbnail size must be one of {', '.join(map(str, SIZES))}, got {size}")
    try:
        thumb = thumbnail_path(path, service.cache_dir, size, box, service.extractor.options.crop_rule,
                               budget=service.budget)
        content = thumb.read_bytes()  # in memory: the cache may evict the file before a streamed answer ends
    except ThumbnailError as exc:
        raise RequestError(422, f"{path.name}: {exc}") from None
    except FileNotFoundError:
        raise RequestError(404, f"{path.name}: the image file is gone") from None
    return Response(content, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


def _int(text, name: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise RequestError(400, f"{name} must be an integer, got {text!r}") from None


def _sniff(content: bytes) -> str:
    head = content[:16]
    for magic, media in ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"),
                         (b"RIFF", "image/webp"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"),
                         (b"MM\x00*", "image/tiff")):
        if head.startswith(magic):
            return media
    return "application/octet-stream"


async def _read_upload(request, limit: int) -> tuple[bytes, dict[str, str]]:
    """The uploaded image (multipart field ``image``/``file``, or a raw ``image/*`` body) and the
    other form fields, read with a byte cap: 413 as soon as the body is over it. Nothing is
    spooled to disk."""
    ctype = request.headers.get("content-type", "")
    cap = limit + (_MULTIPART_SLACK if ctype.startswith("multipart/") else 0)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise RequestError(413, f"upload of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise RequestError(413, f"upload is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not ctype.startswith("multipart/form-data"):
        if ctype.split(";")[0].strip() in ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff",
                                           "image/gif", "application/octet-stream"):
            return body, {}
        raise RequestError(400, "POST /api/search takes multipart/form-data with an 'image' file field "
                                "(or a raw image body with an image/* content type)")
    message = await asyncio.get_running_loop().run_in_executor(None, _parse_multipart, ctype, body)
    data, fields = None, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name in ("image", "file") and data is None:
            data = payload
        elif name:
            fields[name] = payload.decode("utf-8", "replace")
    if data is None:
        raise RequestError(400, "no image in the upload: send the photo as the multipart field 'image'")
    if len(data) > limit:
        raise RequestError(413, f"upload of {len(data)} bytes is over the limit of {limit} bytes")
    return data, fields


def _parse_multipart(ctype: str, body: bytes):
    head = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise RequestError(400, "malformed multipart body")
    return message
