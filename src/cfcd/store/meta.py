"""The store's ``meta.json``: written in one place (:func:`write_meta`), read through one typed view
(:class:`StoreMeta`), compared in one place (:func:`check_compatible`). The keys: docs/store-format.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cfcd import __version__
from cfcd.errors import InputError
from cfcd.store.format import META_FILE, STORE_FORMAT, STORE_VERSION, DescriptorStore
from cfcd.utils.io import atomic_write_json, utc_timestamp


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


@dataclass(frozen=True)
class StoreMeta:
    """A store's ``meta.json`` read through names instead of string paths.

    ``raw`` is the whole mapping (the format is open: benchmarks and whitening add keys); the
    properties are the keys other modules rely on, so a layout change happens here only.
    An absent key reads as ``None`` (a plain ``.npy`` matrix has an empty meta).
    """

    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, item: Any) -> "StoreMeta":
        """The meta of a store, a ``(name, meta)`` pair, a mapping or a :class:`StoreMeta`."""
        if isinstance(item, StoreMeta):
            return item
        if isinstance(item, DescriptorStore):
            return cls(item.meta or {})
        if isinstance(item, tuple) and len(item) == 2:
            return cls(dict(item[1] or {}))
        if isinstance(item, Mapping):
            return cls(item)
        if item is None:
            return cls({})
        raise TypeError(f"expected a store, a meta mapping or a (name, meta) pair, got {type(item).__name__}")

    def get(self, dotted: str, default=None):
        """``raw['a']['b']`` for ``'a.b'``, or ``default`` when any level is missing."""
        return meta_get(dict(self.raw), dotted, default)

    # what the model was
    @property
    def model(self) -> str | None:
        return self.raw.get("model")

    @property
    def weights(self) -> str | None:
        return self.raw.get("weights")

    @property
    def weights_sha256(self) -> str | None:
        return self.raw.get("weights_sha256")

    @property
    def state_sha256(self) -> str | None:
        return self.get("extract.settings.model.state_sha256")

    @property
    def preprocess(self) -> dict | None:
        return self.raw.get("preprocess")

    @property
    def whitening(self) -> Any:
        return self.raw.get("whitening")

    # how it was extracted
    @property
    def extract(self) -> dict:
        value = self.raw.get("extract")
        return dict(value) if isinstance(value, Mapping) else {}

    @property
    def settings(self) -> dict:
        """What a resumed or reused extraction must share: ``{"model", "options", "list"}``."""
        return dict(self.extract.get("settings") or {})

    @property
    def extract_options(self) -> dict | None:
        """:meth:`cfcd.extract.ExtractOptions.settings` as recorded (``ExtractOptions.from_settings`` reads it)."""
        options = self.settings.get("options")
        return dict(options) if isinstance(options, Mapping) else None

    @property
    def image_list(self) -> str | None:
        """Where the images were listed from: a directory, a list file, or ``GND:imlist`` / ``GND:qimlist``."""
        return self.extract.get("list") or None

    @property
    def queries(self) -> bool:
        return bool(self.extract.get("queries"))

    @property
    def failures(self) -> list[dict]:
        return list(self.raw.get("failures") or [])


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
        return str(item.path), dict(item.meta or {})
    if isinstance(item, tuple) and len(item) == 2:
        return str(item[0]), dict(StoreMeta.of(item[1]).raw)
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
