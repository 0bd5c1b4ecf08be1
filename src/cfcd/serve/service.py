"""The search service behind ``cfcd serve``: one index, one model, loaded once, shared read-only.

:class:`SearchService` describes a query exactly as the index's database was described (model,
preprocessing, scales, size cap, crop rule and whitening all come from the source store's meta)
and searches the index with :meth:`cfcd.search.Index.search`, so a search by upload gives the
numbers ``cfcd extract`` + ``cfcd search`` give for the same file.

Thread safety: web requests run in a thread pool. The model forward and the index search each
run under their own lock (FAISS indexes carry per-call parameters such as ``nprobe`` and
``efSearch`` as object state, and the extractor keeps reusable buffers), and at most
``max_waiting`` requests may wait for the model; more get :class:`ServiceBusy` (HTTP 503).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cfcd.errors import CfcdError, InputError

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
DEFAULT_MAX_K = 1000
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
    max_uploads_kept: int = 500  # uploads kept in the cache so shared links keep working


# --------------------------------------------------------------------------- images on disk


class ImageRoot:
    """Maps image ids to files under one root, never outside it.

    Only ids in ``ids`` are served. The file is ``root/<id>`` when the id has an image extension,
    else ``root/<id>.<ext>`` for the first extension that exists (the ``stem`` id rule). Ids
    with ``..``, absolute paths, NUL bytes, and files whose real path (symlinks followed) leaves
    the root give ``None``.
    """

    def __init__(self, root: str | os.PathLike | None, ids: Sequence[str]):
        from cfcd.data.lists import IMAGE_EXTENSIONS

        self.root = None if root is None else Path(root)
        self._real = None if root is None else Path(root).resolve()
        self._ids = set(ids)
        self._exts = IMAGE_EXTENSIONS
        self._cache: dict[str, Path | None] = {}
        self._lock = threading.Lock()

    def add_ids(self, ids: Sequence[str]) -> None:
        self._ids.update(ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids

    def path(self, image_id: str) -> Path | None:
        if self._real is None or image_id not in self._ids:
            return None
        with self._lock:
            if image_id in self._cache:
                return self._cache[image_id]
        found = self._find(image_id)
        with self._lock:
            self._cache[image_id] = found
        return found

    def _find(self, image_id: str) -> Path | None:
        if "\x00" in image_id or "\\" in image_id or image_id.startswith("/"):
            return None
        parts = image_id.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return None
        ext = os.path.splitext(image_id)[1].lower()
        names = [image_id] if ext in self._exts else []
        names += [image_id + e for e in self._exts] + [image_id + e.upper() for e in self._exts]
        for name in names:
            candidate = self.root / name
            try:
                real = candidate.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if real.is_file() and real.is_relative_to(self._real):
                return real
        return None


def default_image_root(meta: dict) -> Path | None:
    """Where the database images were read from, from the store's meta (``extract.list``)."""
    from cfcd.data.lists import revisitop_image_dir

    source = str(((meta or {}).get("extract") or {}).get("list") or "")
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


def options_from_meta(meta: dict, *, device: str = "cpu", runtime: str = "torch"):
    """The :class:`~cfcd.extract.ExtractOptions` a store was extracted with (from its meta)."""
    from cfcd.extract import ExtractOptions
    from cfcd.extract.scales import MultiScale

    settings = (((meta or {}).get("extract") or {}).get("settings") or {}).get("options")
    if not isinstance(settings, dict) or "scales" not in settings:
        raise InputError(
            "the index's source store has no extraction settings in its meta (extract.settings.options); "
            "it was not written by 'cfcd extract', so queries cannot be described the same way"
        )
    scales = dict(settings["scales"])
    scales["scales"] = tuple(float(s) for s in scales["scales"])
    return ExtractOptions(
        scales=MultiScale(**scales),
        max_size=settings.get("max_size"),
        crop_rule=settings.get("crop_rule", "truncate"),
        alpha=settings.get("alpha", "drop"),
        truncated=settings.get("truncated", "warn"),
        max_pixels=settings.get("max_pixels"),
        precision=settings.get("precision", "fp32"),
        dtype=settings.get("dtype", "float32"),
        device=device,
        runtime=runtime,
        batch_size=1,
        workers=0,
        progress=False,
    )


def load_model_for(meta: dict, *, model_name: str | None, weights: str | None, where: str):
    """Create the model of a store's meta, or check that the given one is that model.

    Refuses (:class:`InputError`) when the name, the weights' sha256 or the state-dict hash
    recorded at extraction differ from the model given.
    """
    from cfcd.cli.extract import create_model
    from cfcd.extract import model_fingerprint

    recorded_name = meta.get("model")
    name = model_name or recorded_name
    if not name:
        raise InputError(f"{where}: the meta names no model; pass --model NAME (and --weights W)")
    if model_name and recorded_name and model_name != recorded_name:
        raise InputError(
            f"--model {model_name} does not match {where}: its descriptors were extracted with "
            f"{recorded_name!r}. Serve it with --model {recorded_name} (or omit --model)"
        )
    if weights is None and meta.get("weights"):  # the recorded weights, unless others are given
        weights = meta["weights"]
        if not os.path.exists(weights):
            raise InputError(
                f"{where}: was extracted with weights {weights}, which is not there any more; "
                f"pass --model {name} --weights PATH"
            )
    model = create_model(name, weights)
    fingerprint = model_fingerprint(model, weights)
    recorded = ((meta.get("extract") or {}).get("settings") or {}).get("model") or {}
    checks = [
        ("weights_sha256", meta.get("weights_sha256"), fingerprint["weights_sha256"]),
        ("state_sha256", recorded.get("state_sha256"), fingerprint["state_sha256"]),
        ("preprocess", meta.get("preprocess"), fingerprint["preprocess"]),
    ]
    for key, want, got in checks:
        if want is not None and got is not None and want != got:
            raise InputError(
                f"the model {name}{f' with weights {weights}' if weights else ''} does not match {where}: "
                f"{key} is {str(got)[:16]}... but the index was extracted with {str(want)[:16]}... "
                "(other weights?); a query would land in another embedding space"
            )
    if meta.get("weights_sha256") and fingerprint["weights_sha256"] is None and recorded.get("state_sha256") is None:
        raise InputError(f"{where}: was extracted with weights (sha256 {meta['weights_sha256'][:16]}...); pass --weights")
    return model, weights


def load_whitening_for(meta: dict, whiten: str | None, where: str):
    """The whitening a whitened store was made with (``--whiten FILE``), checked against its meta."""
    recorded = meta.get("whitening")
    if recorded is None:
        if whiten is not None:
            raise InputError(f"--whiten {whiten}: {where} holds unwhitened descriptors; drop --whiten")
        return None
    if whiten is None:
        raise InputError(
            f"{where}: holds whitened descriptors ({recorded.get('kind')}, {recorded.get('dim')}-D); pass "
            "--whiten FILE with the whitening that made them, so queries are whitened the same way"
        )
    from cfcd.postprocess import load_whitening

    w = load_whitening(whiten)
    got = w.describe()
    if any(recorded.get(k) != v for k, v in got.items() if k in recorded):
        raise InputError(f"--whiten {whiten}: {got} is not the whitening of {where} ({recorded})")
    return w


# --------------------------------------------------------------------------- the service


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

    def __post_init__(self) -> None:
        self.row_of = {image_id: row for row, image_id in enumerate(self.index.ids or [])}
        self._model_lock = threading.Lock()
        self._search_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._waiting = 0
        (self.cache_dir / "uploads").mkdir(parents=True, exist_ok=True)

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
        runtime: str = "torch",
        cache_dir: str | os.PathLike | None = None,
        limits: Limits | None = None,
        extra_ids: Sequence[str] = (),
    ) -> "SearchService":
        from cfcd.extract import Extractor
        from cfcd.search import open_index

        index = open_index(index_dir)
        if index.ids is None:
            raise InputError(f"{index_dir}: the index has no image ids (built from a plain .npy); build it from a store")
        meta = dict((index.source or {}).get("meta") or {})
        where = f"the index {index_dir}"
        model, weights = load_model_for(meta, model_name=model_name, weights=weights, where=where)
        whitening = load_whitening_for(meta, whiten, where)
        options = options_from_meta(meta, device=device, runtime=runtime)
        dim = int(model.embedding_dim) if whitening is None else int(whitening.dim)
        if dim != index.dim:
            raise InputError(f"{where} holds {index.dim}-D descriptors but the model gives {dim}-D ones")
        root = Path(images) if images is not None else default_image_root(meta)
        if root is not None and not root.is_dir():
            raise InputError(f"--images {root}: not a directory")
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(index_dir)
        cache.mkdir(parents=True, exist_ok=True)
        return cls(
            index=index,
            model=model,
            extractor=Extractor(model, options),
            meta=meta,
            images=ImageRoot(root, list(index.ids) + list(extra_ids)),
            cache_dir=cache,
            limits=limits or Limits(),
            whitening=whitening,
            weights=weights,
            name=Path(index_dir).name,
        )

    # ---- what the service is

    def descriptor_settings(self) -> dict:
        o = self.extractor.options
        return {
            "model": self.meta.get("model"),
            "weights_sha256": self.meta.get("weights_sha256"),
            "scales": o.scales.to_meta(),
            "max_size": o.max_size,
            "crop_rule": o.crop_rule,
            "precision": o.precision,
            "whitening": self.meta.get("whitening"),
            "dim": int(self.index.dim),
        }

    def health(self) -> dict:
        from cfcd import __version__

        return {
            "status": "ok",
            "version": __version__,
            "model": self.meta.get("model"),
            "index_type": self.index.type,
            "count": len(self.index),
            "dim": int(self.index.dim),
            "images": self.images.root is not None,
            "device": str(self.extractor.device),
            "runtime": self.extractor.runtime,
            "descriptor": self.descriptor_settings(),
        }

    # ---- descriptors

    def _busy_guard(self):
        service = self

        class _Guard:
            def __enter__(self_inner):
                with service._count_lock:
                    if service._waiting >= service.limits.max_waiting:
                        raise ServiceBusy(f"server busy: {service._waiting} searches are already waiting; retry shortly")
                    service._waiting += 1

            def __exit__(self_inner, *exc):
                with service._count_lock:
                    service._waiting -= 1
                return False

        return _Guard()

    def describe_array(self, array: np.ndarray) -> np.ndarray:
        """1 x D descriptor of a decoded image (model channel order), whitened like the index."""
        with self._busy_guard(), self._model_lock:
            desc = self.extractor.describe_arrays([array])
        if self.whitening is not None:
            desc = self.whitening.transform(desc)
        return np.ascontiguousarray(desc, dtype=np.float32)

    def decode_file(self, path: Path, box=None, *, upload: bool = False) -> np.ndarray:
        from cfcd.data.images import ImageLoadError, load_image

        kwargs = self.extractor.load_kwargs()
        if upload:
            cap = self.limits.max_upload_pixels
            kwargs["max_pixels"] = cap if kwargs.get("max_pixels") is None else min(cap, kwargs["max_pixels"])
            kwargs["truncated"] = "fail"  # a cut-off upload is a failed transfer, not a photo
        try:
            return load_image(path, bbx=box, **kwargs)
        except ImageLoadError as exc:
            reason = exc.reason
            if "over the cap" in reason or "decompression bomb" in reason:
                raise RequestError(413, f"image refused: {reason} (limit: {kwargs['max_pixels']} decoded pixels)") from None
            what = "uploaded file" if upload else "image"
            raise RequestError(400, f"{what}: {reason}") from None

    def stored_descriptor(self, row: int) -> np.ndarray | None:
        """The database row as indexed (no re-extraction), when the index keeps it exactly."""
        from cfcd.search import ExactIndex

        index = self.index
        if isinstance(index, ExactIndex):
            return np.asarray(index.descriptors[row : row + 1], dtype=np.float32)
        if getattr(index, "vectors", None) is not None:
            return np.asarray(index.vectors[row : row + 1], dtype=np.float32)
        if index.type in ("flat", "hnsw"):
            with self._search_lock:
                return np.asarray(index.index.reconstruct(int(row)), dtype=np.float32)[None]
        return None

    # ---- uploads

    def save_upload(self, data: bytes) -> str:
        """Keep an upload in the cache under its content hash (so a shared link can rerun it)."""
        if not data:
            raise RequestError(400, "uploaded file is empty (0 bytes)")
        if len(data) > self.limits.max_upload_bytes:
            raise RequestError(413, f"upload of {len(data)} bytes is over the limit of {self.limits.max_upload_bytes} bytes")
        key = hashlib.sha256(data).hexdigest()[:32]
        target = self.upload_path(key)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, target)
            except BaseException:
                with _suppress():
                    os.unlink(tmp)
                raise
            self._prune_uploads()
        else:
            os.utime(target)
        return key

    def upload_path(self, key: str) -> Path:
        if not UPLOAD_KEY.match(key or ""):
            raise RequestError(404, f"no upload {key!r}")
        return self.cache_dir / "uploads" / f"{key}.img"

    def _prune_uploads(self) -> None:
        files = sorted((self.cache_dir / "uploads").glob("*.img"), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - self.limits.max_uploads_kept)]:
            with _suppress():
                old.unlink()

    # ---- search

    def check_k(self, k: int) -> int:
        if not 1 <= int(k) <= self.limits.max_k:
            raise RequestError(400, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return int(k)

    def query_descriptor(self, query: QueryImage) -> tuple[np.ndarray, str]:
        """The 1 x D query descriptor and where it came from: ``"stored"`` (the indexed row of a
        collection image searched whole) or ``"extracted"`` (described now)."""
        if query.upload is not None:
            path = self.upload_path(query.upload)
            if not path.is_file():
                raise RequestError(404, f"upload {query.upload} is not in the cache any more; upload the photo again")
            return self.describe_array(self.decode_file(path, query.box, upload=True)), "extracted"
        if query.image_id not in self.images:
            raise RequestError(404, f"no image {query.image_id!r} in the index")
        row = self.row_of.get(query.image_id)
        if query.box is None and row is not None:
            stored = self.stored_descriptor(row)
            if stored is not None:
                return stored, "stored"
        path = self.images.path(query.image_id)
        if path is None:
            raise RequestError(404, f"image {query.image_id!r} has no file under the image root (pass --images ROOT)")
        return self.describe_array(self.decode_file(path, query.box)), "extracted"

    def search(self, query: QueryImage, k: int = 100) -> dict:
        k = self.check_k(k)
        t0 = time.perf_counter()
        desc, source = self.query_descriptor(query)
        t1 = time.perf_counter()
        with self._search_lock:
            result = self.index.search(desc, k)
        t2 = time.perf_counter()
        results = []
        for rank, (j, s) in enumerate(zip(result.indices[0].tolist(), result.scores[0].tolist()), 1):
            if j < 0:
                break
            results.append({"id": self.index.ids[j], "score": float(s), "rank": rank})
        return {
            "query": {**query.to_json(), "descriptor_source": source},
            "k": k,
            "count": len(self.index),
            "results": results,
            "descriptor": self.descriptor_settings(),
            "timings_ms": {"describe": round(1000 * (t1 - t0), 2), "search": round(1000 * (t2 - t1), 2)},
        }

    def list_images(self, offset: int = 0, limit: int = 60, contains: str = "") -> dict:
        ids = self.index.ids
        if contains:
            needle = contains.lower()
            ids = [i for i in ids if needle in i.lower()]
        offset = max(0, int(offset))
        limit = max(1, min(int(limit), 500))
        return {"total": len(ids), "offset": offset, "ids": list(ids[offset : offset + limit])}


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, OSError)


def default_cache_dir(index_dir: str | os.PathLike) -> Path:
    """``$XDG_CACHE_HOME/cfcd/serve/<name>-<hash of the index path>`` (never inside the index)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    real = str(Path(index_dir).resolve())
    return base / "cfcd" / "serve" / f"{Path(real).name}-{hashlib.sha1(real.encode()).hexdigest()[:10]}"


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
