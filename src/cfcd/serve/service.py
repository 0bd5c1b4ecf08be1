"""The search service behind ``cfcd serve``: one index, one model, loaded once, shared read-only.

:class:`SearchService` describes a query exactly as the index's database was described (model,
preprocessing, scales, size cap, crop rule and whitening all come from the source store's meta)
and searches the index with :meth:`cfcd.index.Index.search`, so a search by upload gives the
numbers ``cfcd extract`` + ``cfcd search`` give for the same file.

Thread safety: web requests run in a thread pool. The model forward and the index search each
run under their own lock (FAISS indexes carry per-call parameters such as ``nprobe`` and
``efSearch`` as object state, and the extractor keeps reusable buffers), and at most
``max_waiting`` requests may wait for the model; more get :class:`ServiceBusy` (HTTP 503), before
an upload's body is read.

The index follows ``cfcd index add`` / ``remove``: every few seconds a request checks the index
directory's generation (:func:`cfcd.index.generation`); on a change the new index is opened fully and
swapped in with one reference. A request works on the :class:`Generation` it started with; the old
one is released when its last request ends (its memory maps with it).

Queries are described at no more than the database's scale: the store's ``max_size`` when it has
one (then exactly as ``cfcd extract`` describes the file), else ``Limits.max_query_size`` on the
long side, decoded at reduced size (JPEG ``draft``) before any full-size array exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from cfcd import __version__
from cfcd.data.images import ImageInfo, ImageLoadError, load_image
from cfcd.data.lists import IMAGE_EXTENSIONS, revisitop_image_dir
from cfcd.errors import CfcdError, InputError
from cfcd.extract import Extractor
from cfcd.extract.describer import describer_for
from cfcd.index import ExactIndex, generation, open_index
from cfcd.serve.thumbs import CacheBudget
from cfcd.store import StoreMeta, check_compatible
from cfcd.utils.io import cache_root, make_temp_file

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
DEFAULT_MAX_K = 1000
DEFAULT_MAX_QUERY_SIZE = 1024  # long side of a query photo when the index was extracted at full size
DEFAULT_CACHE_MAX_BYTES = 512 * 1024 * 1024
GENERATION_CHECK_SECONDS = 2.0
logger = logging.getLogger("cfcd.serve")
UPLOAD_KEY = re.compile(r"^[0-9a-f]{32}$")


class RequestError(CfcdError):
    """A bad request: ``status`` is the HTTP status, the message says what is wrong."""

    def __init__(self, status: int, message: str):
        self.status = int(status)
        super().__init__(message)


class ServiceBusy(RequestError):
    def __init__(self, message: str):
        super().__init__(503, message)


@dataclass
class Limits:
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS
    max_k: int = DEFAULT_MAX_K
    max_waiting: int = 32  # requests waiting for the model before 503
    max_query_size: int = DEFAULT_MAX_QUERY_SIZE  # used when the store's meta has no max_size
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES  # kept uploads and thumbnails together


# --------------------------------------------------------------------------- images on disk


class ImageRoot:
    """Maps image ids to files under one root, never outside it.

    Only ids of the current index generation (``set_ids``) and the extra ids of the benchmark
    (``add_ids``, ``add_paths``) are served. An id given a path (``paths``, ``add_paths``: a
    dataset's own layout, e.g. GLDv2's ``index/a/b/c/<id>.jpg``) is that file; else the file is
    ``root/<id>`` when the id has an image extension, else ``root/<id>.<ext>`` for the first
    extension that exists (the ``stem`` id rule). Ids with ``..``, absolute paths, NUL bytes, and
    files whose real path (symlinks followed) leaves the root give ``None``; so does a file
    deleted since it was found.
    """

    def __init__(self, root: str | os.PathLike | None, ids, paths: Mapping[str, str | os.PathLike] | None = None):
        self.root = None if root is None else Path(root)
        self._real = None if root is None else Path(root).resolve()
        self._ids = ids if hasattr(ids, "__contains__") and not isinstance(ids, (list, tuple)) else set(ids)
        self._extra: set[str] = set()
        self._paths: dict[str, str | os.PathLike] = dict(paths or {})
        self._exts = IMAGE_EXTENSIONS
        self._cache: dict[str, Path | None] = {}
        self._lock = threading.Lock()

    def set_ids(self, ids) -> None:
        """The ids of a new index generation (any container; one reference swapped)."""
        self._ids = ids

    def add_ids(self, ids: Sequence[str]) -> None:
        self._extra.update(ids)

    def add_paths(self, paths: Mapping[str, str | os.PathLike]) -> None:
        """Serve these ids from these files (still only where they lie under the root)."""
        self._paths.update(paths)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids or image_id in self._extra or image_id in self._paths

    def path(self, image_id: str) -> Path | None:
        if self._real is None or image_id not in self:
            return None
        with self._lock:
            cached = self._cache.get(image_id)
        if cached is not None and cached.is_file():
            return cached
        found = self._find(image_id)  # not cached when missing: the file may come with an 'index add'
        with self._lock:
            if found is None:
                self._cache.pop(image_id, None)
            else:
                self._cache[image_id] = found
        return found

    def _find(self, image_id: str) -> Path | None:
        if "\x00" in image_id or "\\" in image_id or image_id.startswith("/"):
            return None
        parts = image_id.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return None
        mapped = self._paths.get(image_id)
        if mapped is not None:
            candidates = [Path(mapped)]
        else:
            ext = os.path.splitext(image_id)[1].lower()
            names = [image_id] if ext in self._exts else []
            names += [image_id + e for e in self._exts] + [image_id + e.upper() for e in self._exts]
            candidates = [self.root / name for name in names]
        for candidate in candidates:
            try:
                real = candidate.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if real.is_file() and real.is_relative_to(self._real):
                return real
        return None


def default_image_root(meta: dict) -> Path | None:
    """Where the database images were read from, from the store's meta (``extract.list``)."""

    source = str(StoreMeta.of(meta).image_list or "")
    if not source:
        return None
    for suffix in (":imlist", ":qimlist"):
        if source.endswith(suffix):
            gnd_path = Path(source[: -len(suffix)])
            return revisitop_image_dir(gnd_path.parent)
    path = Path(source)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent  # a list file: paths relative to its directory unless --root was given
    return None


# --------------------------------------------------------------------------- model and options


@dataclass
class QueryImage:
    """What a search is run with: a collection image (``image_id``) or an upload (``upload``)."""

    image_id: str | None = None
    upload: str | None = None
    box: tuple[float, float, float, float] | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"kind": "id" if self.image_id is not None else "upload"}
        if self.image_id is not None:
            out["id"] = self.image_id
        else:
            out["upload"] = self.upload
        out["box"] = None if self.box is None else [float(v) for v in self.box]
        return out


def _generation(index_dir) -> str | None:
    """The index directory's generation token; None when there is none to follow."""

    if index_dir is None:
        return None
    try:
        return generation(index_dir)
    except InputError:  # removed under the server: keep serving what is open
        return None


def _keeps_exact_rows(faiss_index) -> bool:
    """Whether a FAISS index stores the rows themselves (flat codes, HNSW over flat storage)."""
    import faiss

    index = faiss.downcast_index(faiss_index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return isinstance(index, faiss.IndexFlat)


@dataclass
class Generation:
    """One opened generation of the index and its live ids (removed rows left out)."""

    index: Any
    key: str | None
    row_of: dict[str, int]
    live_ids: list[str]

    @classmethod
    def of(cls, index, key: str | None) -> "Generation":
        ids = index.ids or []
        removed = getattr(index, "removed", None)
        dead = set(removed.tolist()) if removed is not None and len(removed) else set()
        row_of: dict[str, int] = {}
        live: list[str] = []
        for row, image_id in enumerate(ids):
            if row not in dead:
                row_of[image_id] = row
                live.append(image_id)
        return cls(index, key, row_of, live)


class _Admission:
    """A slot among ``max_waiting`` for work that needs the model; the thread that holds it is marked
    so the nested guards of the same request do not take a second one."""

    def __init__(self, service: "SearchService", mark_thread: bool):
        self.service = service
        self.mark_thread = mark_thread
        self.previous = False

    def __enter__(self):
        s = self.service
        with s._count_lock:
            if s._waiting >= s.limits.max_waiting:
                raise ServiceBusy(f"server busy: {s._waiting} searches are already waiting; retry shortly")
            s._waiting += 1
        if self.mark_thread:
            self.previous = getattr(s._local, "admitted", False)
            s._local.admitted = True
        return self

    def __exit__(self, *exc):
        s = self.service
        if self.mark_thread:
            s._local.admitted = self.previous
        with s._count_lock:
            s._waiting -= 1
        return False


@dataclass
class SearchService:
    """The index, its model and extractor, the image root and the cache (see the module docstring)."""

    index: Any
    model: Any
    extractor: Any
    meta: dict
    images: ImageRoot
    cache_dir: Path
    limits: Limits = field(default_factory=Limits)
    whitening: Any = None
    weights: str | None = None
    name: str = ""
    index_dir: Path | None = None  # followed for new generations (None: never reloaded)
    check_seconds: float = GENERATION_CHECK_SECONDS

    def __post_init__(self) -> None:
        key = _generation(self.index_dir)
        self._gen = Generation.of(self.index, key)
        self.images.set_ids(self._gen.row_of)
        self._model_lock = threading.Lock()
        self._search_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._local = threading.local()
        self._waiting = 0
        self._next_check = time.monotonic() + self.check_seconds
        self._refused: str | None = None
        for sub in ("uploads", "thumbs"):
            (self.cache_dir / sub).mkdir(parents=True, exist_ok=True)
        self.budget = CacheBudget([self.cache_dir / "uploads", self.cache_dir / "thumbs"], self.limits.cache_max_bytes)

    @property
    def row_of(self) -> dict[str, int]:
        return self._gen.row_of

    # ---- opening

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike,
        *,
        images: str | os.PathLike | None = None,
        model_name: str | None = None,
        weights: str | None = None,
        whiten: str | None = None,
        device: str = "cpu",
        runtime: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        limits: Limits | None = None,
        extra_ids: Sequence[str] = (),
    ) -> "SearchService":
        index = open_index(index_dir)
        if index.ids is None:
            raise InputError(f"{index_dir}: the index has no image ids (built from a plain .npy); build it from a store")
        meta = dict((index.source or {}).get("meta") or {})
        where = f"the index {index_dir}"
        # the model, options and whitening the database was described with, checked against the meta
        described = describer_for(meta, model_name=model_name, weights=weights, whiten=whiten, device=device,
                                  runtime=runtime, where=where)
        model, weights, whitening, options = described.model, described.weights, described.whitening, described.options
        dim = described.dim
        if dim != index.dim:
            raise InputError(f"{where} holds {index.dim}-D descriptors but the model gives {dim}-D ones")
        root = Path(images) if images is not None else default_image_root(meta)
        if root is not None and not root.is_dir():
            raise InputError(f"--images {root}: not a directory")
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(index_dir)
        cache.mkdir(parents=True, exist_ok=True)
        image_root = ImageRoot(root, set())
        image_root.add_ids(extra_ids)
        return cls(
            index=index,
            model=model,
            extractor=Extractor(model, options),
            meta=meta,
            images=image_root,
            cache_dir=cache,
            limits=limits or Limits(),
            whitening=whitening,
            weights=weights,
            name=Path(index_dir).name,
            index_dir=Path(index_dir),
        )

    # ---- following the index directory

    def current(self) -> Generation:
        """The generation a request works on (take it once, at the start). At most every
        ``check_seconds`` this also looks for a new one, opened in the background."""
        if self.index_dir is not None and time.monotonic() >= self._next_check and self._reload_lock.acquire(False):
            try:
                self._next_check = time.monotonic() + self.check_seconds
                key = _generation(self.index_dir)
                if key is not None and key != self._gen.key and key != self._refused:
                    threading.Thread(target=self._reload, args=(key,), name="cfcd-index-reload", daemon=True).start()
                    return self._gen  # the thread releases the lock when the swap is done
            except BaseException:
                self._reload_lock.release()
                raise
            self._reload_lock.release()
        return self._gen

    def _reload(self, key: str) -> None:
        try:
            self.reload(key)
        except Exception as exc:  # noqa: BLE001 - the old generation keeps serving; retried on the next check
            logger.warning("%s: the new index generation could not be opened (%s); still serving the previous one",
                           self.index_dir, exc)
        finally:
            self._reload_lock.release()

    def reload(self, key: str | None = None) -> Generation:
        """Open the index directory's current generation fully, then swap it in (one reference)."""

        index = open_index(self.index_dir)
        key = getattr(index, "generation", None) or key or _generation(self.index_dir)
        why = "no image ids" if index.ids is None else f"dim {index.dim}" if index.dim != self._gen.index.dim else None
        if why is None:
            try:  # the one provenance check: model, weights, preprocessing, scales, size cap, whitening
                check_compatible((f"the index {self.index_dir} as served", self.meta),
                                 (f"its new generation {key}", (index.source or {}).get("meta") or {}))
            except InputError as exc:
                why = str(exc)
        if why is not None:
            self._refused = key
            logger.warning("%s: the new index generation is not searchable with this model (%s); "
                           "still serving the previous one: restart cfcd serve", self.index_dir, why)
            return self._gen
        gen = Generation.of(index, key)
        self.images.set_ids(gen.row_of)
        self._gen = gen
        self.index = index  # the old index is freed once the requests that hold it end
        logger.info("%s: now serving generation %s (%d images)", self.index_dir, key, len(gen.live_ids))
        return gen

    # ---- what the service is

    def descriptor_settings(self) -> dict:
        o = self.extractor.options
        return {
            "model": self.meta.get("model"),
            "weights_sha256": self.meta.get("weights_sha256"),
            "scales": o.scales.to_meta(),
            "max_size": o.max_size,
            "max_query_size": self.query_size_cap(),
            "crop_rule": o.crop_rule,
            "precision": o.precision,
            "whitening": self.meta.get("whitening"),
            "dim": int(self._gen.index.dim),
        }

    def health(self) -> dict:
        index = self.current().index
        return {
            "status": "ok",
            "version": __version__,
            "model": self.meta.get("model"),
            "index_type": index.type,
            "count": len(index),
            "dim": int(index.dim),
            "images": self.images.root is not None,
            "device": str(self.extractor.device),
            "runtime": self.extractor.runtime,
            "descriptor": self.descriptor_settings(),
        }

    # ---- descriptors

    def admit(self, *, mark_thread: bool = True) -> _Admission:
        """A slot for work that needs the model, or :class:`ServiceBusy` (503) when all are taken."""
        return _Admission(self, mark_thread)

    def _busy_guard(self):
        if getattr(self._local, "admitted", False):
            return contextlib.nullcontext()
        return self.admit()

    def describe_array(self, array: np.ndarray) -> np.ndarray:
        """1 x D descriptor of a decoded image (model channel order), whitened like the index."""
        with self._busy_guard(), self._model_lock:
            desc = self.extractor.describe_arrays([array])
        if self.whitening is not None:
            desc = self.whitening.transform(desc)
        return np.ascontiguousarray(desc, dtype=np.float32)

    def query_size_cap(self) -> int:
        """The long side a query is described at, at most: the store's ``max_size`` or ``max_query_size``."""
        max_size = self.extractor.options.max_size
        return int(max_size) if max_size is not None else int(self.limits.max_query_size)

    def decode_query(self, path: Path, box=None, *, upload: bool = False) -> tuple[np.ndarray, dict | None]:
        """The query image as the model gets it, and ``{"from": [w, h], "to": [w, h]}`` when it
        was downscaled (``None`` otherwise). Never more than :meth:`query_size_cap` on the long side."""

        kwargs = self.extractor.load_kwargs()
        if upload:
            cap = self.limits.max_upload_pixels
            kwargs["max_pixels"] = cap if kwargs.get("max_pixels") is None else min(cap, kwargs["max_pixels"])
            kwargs["truncated"] = "fail"  # a cut-off upload is a failed transfer, not a photo
        side = self.query_size_cap()
        if kwargs.get("max_size") is None:
            # the store has no size cap: describe at most `side`, decoding big JPEGs at reduced size
            kwargs.update(max_size=side, draft=True)
        try:
            info = ImageInfo()
            array = load_image(path, bbx=box, info=info, **kwargs)  # within the store's cap: as `cfcd extract`
            w, h = info.original_size
            if max(w, h) <= side:
                return array, None
            s = side / max(w, h)
            return array, {"from": [w, h], "to": [max(1, round(w * s)), max(1, round(h * s))]}
        except ImageLoadError as exc:
            reason = exc.reason
            if "over the cap" in reason or "decompression bomb" in reason:
                raise RequestError(413, f"image refused: {reason} (limit: {kwargs['max_pixels']} decoded pixels)") from None
            what = "uploaded file" if upload else "image"
            raise RequestError(400, f"{what}: {reason}") from None

    def stored_descriptor(self, row: int, index=None) -> np.ndarray | None:
        """The database row as indexed (no re-extraction), when the index keeps it exactly."""

        index = self._gen.index if index is None else index
        if isinstance(index, ExactIndex):
            return np.asarray(index.descriptors[row : row + 1], dtype=np.float32)
        if getattr(index, "vectors", None) is not None:
            return np.asarray(index.vectors[row : row + 1], dtype=np.float32)
        if hasattr(index, "index") and _keeps_exact_rows(index.index):
            with self._search_lock:
                return np.asarray(index.index.reconstruct(int(row)), dtype=np.float32)[None]
        return None

    # ---- uploads

    def _check_upload(self, data: bytes) -> str:
        if not data:
            raise RequestError(400, "uploaded file is empty (0 bytes)")
        if len(data) > self.limits.max_upload_bytes:
            raise RequestError(413, f"upload of {len(data)} bytes is over the limit of {self.limits.max_upload_bytes} bytes")
        return hashlib.sha256(data).hexdigest()[:32]

    def search_upload(self, data: bytes, k: int = 100, box=None, *, admitted: bool = False) -> dict:
        """Search with an uploaded photo. It is kept in the cache under its content hash (so a
        shared link can rerun it) only when it was searched: a refused file is never kept.
        ``admitted``: the caller holds a slot (:meth:`admit`) taken before the body was read."""
        k = self.check_k(k)
        key = self._check_upload(data)
        target = self.upload_path(key)
        previous = getattr(self._local, "admitted", False)
        self._local.admitted = previous or admitted
        try:
            if target.is_file():
                return self.search(QueryImage(upload=key, box=box), k)
            with _staged(target, data) as staged:
                result = self.search(QueryImage(upload=key, box=box), k, upload_file=staged)
        finally:
            self._local.admitted = previous
        self.budget.added(target)
        return result

    def save_upload(self, data: bytes) -> str:
        """Keep an upload in the cache without searching it (it is decoded first: refused files are not kept)."""
        key = self._check_upload(data)
        target = self.upload_path(key)
        if target.is_file():
            self.budget.touch(target)
            return key
        with _staged(target, data) as staged:
            self.decode_query(staged, upload=True)
        self.budget.added(target)
        return key

    def upload_path(self, key: str) -> Path:
        if not UPLOAD_KEY.match(key or ""):
            raise RequestError(404, f"no upload {key!r}")
        return self.cache_dir / "uploads" / f"{key}.img"

    # ---- search

    def check_k(self, k: int) -> int:
        if not 1 <= int(k) <= self.limits.max_k:
            raise RequestError(400, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return int(k)

    def query_descriptor(self, query: QueryImage, gen: Generation | None = None, *,
                         upload_file: Path | None = None) -> tuple[np.ndarray, str, dict | None]:
        """The 1 x D query descriptor, where it came from: ``"stored"`` (the indexed row of a
        collection image searched whole) or ``"extracted"`` (described now), and the downscale."""
        gen = self._gen if gen is None else gen
        if query.upload is not None:
            path = upload_file or self.upload_path(query.upload)
            if not path.is_file():
                raise RequestError(404, f"upload {query.upload} is not in the cache any more; upload the photo again")
            if upload_file is None:
                self.budget.touch(path)
            with self._busy_guard():
                array, downscaled = self.decode_query(path, query.box, upload=True)
                return self.describe_array(array), "extracted", downscaled
        row = gen.row_of.get(query.image_id)
        if row is None and query.image_id not in self.images:
            raise RequestError(404, f"no image {query.image_id!r} in the index")
        if query.box is None and row is not None:
            stored = self.stored_descriptor(row, gen.index)
            if stored is not None:
                return stored, "stored", None
        path = self.images.path(query.image_id)
        if path is None:
            raise RequestError(404, f"image {query.image_id!r} has no file under the image root (pass --images ROOT)")
        with self._busy_guard():
            array, downscaled = self.decode_query(path, query.box)
            return self.describe_array(array), "extracted", downscaled

    def search(self, query: QueryImage, k: int = 100, *, upload_file: Path | None = None) -> dict:
        k = self.check_k(k)
        gen = self.current()
        t0 = time.perf_counter()
        desc, source, downscaled = self.query_descriptor(query, gen, upload_file=upload_file)
        t1 = time.perf_counter()
        with self._search_lock:
            result = gen.index.search(desc, k)
        t2 = time.perf_counter()
        ids = gen.index.ids
        results = []
        for rank, (j, s) in enumerate(zip(result.indices[0].tolist(), result.scores[0].tolist()), 1):
            if j < 0:
                break
            results.append({"id": ids[j], "score": float(s), "rank": rank})
        return {
            "query": {**query.to_json(), "descriptor_source": source, "downscaled": downscaled},
            "k": k,
            "count": len(gen.index),
            "results": results,
            "descriptor": self.descriptor_settings(),
            "timings_ms": {"describe": round(1000 * (t1 - t0), 2), "search": round(1000 * (t2 - t1), 2)},
        }

    def list_images(self, offset: int = 0, limit: int = 60, contains: str = "") -> dict:
        ids = self.current().live_ids
        if contains:
            needle = contains.lower()
            ids = [i for i in ids if needle in i.lower()]
        offset = max(0, int(offset))
        limit = max(1, min(int(limit), 500))
        return {"total": len(ids), "offset": offset, "ids": list(ids[offset : offset + limit])}


@contextlib.contextmanager
def _staged(target: Path, data: bytes) -> Iterator[Path]:
    """``data`` in a temporary file beside ``target``, renamed onto it only when the block succeeds:
    an upload that is refused (not an image, too large) is never kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(target.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def default_cache_dir(index_dir: str | os.PathLike) -> Path:
    """``<cfcd cache>/serve/<name>-<hash of the index path>`` (``cfcd.utils.io.cache_root``; never inside the index)."""
    real = str(Path(index_dir).resolve())
    return cache_root() / "serve" / f"{Path(real).name}-{hashlib.sha1(real.encode()).hexdigest()[:10]}"


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` in original-image pixels -> a tuple (``None`` for empty)."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise RequestError(400, f"box must be four numbers x1,y1,x2,y2; got {text!r}") from None
    if len(values) != 4 or not all(np.isfinite(values)):
        raise RequestError(400, f"box must be four finite numbers x1,y1,x2,y2; got {text!r}")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1 or x2 <= 0 or y2 <= 0:
        raise RequestError(400, f"box {text!r} is empty (need x1 < x2 and y1 < y2)")
    return values
