"""The extraction engine: decode in workers, group by size, describe in batches, write a store.

:class:`Extractor` turns an :class:`~cfcd.data.lists.ImageList` into descriptors, batch by batch.
:func:`extract_to_store` runs a whole job into a descriptor store (``cfcd.store``): sharded over
``torch.distributed`` ranks when ``WORLD_SIZE > 1`` (``torchrun``), resumable (ids already in the
store's shards are skipped; a rerun with other settings is refused), one bad image never stops it.

Fast path (``mode="fast"``):
  * DataLoader workers decode (Pillow, :func:`cfcd.data.images.load_image`) and hand over
    ``uint8`` tensors through shared memory;
  * the main process buckets images by exact (height, width) and runs a bucket when it holds
    ``batch_size`` images (or when too many images wait: ``max_pending``), so all scales of a
    batch run as one tensor; with a ``max_size`` cap most revisitop images share 2 shapes;
  * the batch is copied from a reusable pinned buffer with ``non_blocking=True``, resized on the
    device, descriptors stay on the device, and batch k is fetched (one ``.cpu()``) only after
    batch k+1 was launched, so the GPU never waits for the host;
  * CUDA: channels_last, autocast in ``bf16``/``fp16`` when asked, ``cudnn.benchmark`` (revisitop
    sizes repeat; ``cudnn_benchmark=False`` for collections where every image has its own size);
  * a batch that fails in the model (out of memory on a huge image) is retried image by image,
    and an image that still fails is recorded as a failure.
Reference path (``mode="naive"``): the same decoding, then :func:`describe_reference` one image at a
time (batch 1, fp32, cv2 resize): the CFCD ``evaler/infer.py`` procedure.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np

from cfcd.data.images import DEFAULT_MAX_PIXELS, ImageInfo, ImageLoadError, load_image
from cfcd.data.lists import ImageList, read_image_list
from cfcd.errors import CfcdError, InputError
from cfcd.extract.describe import describe_batch, describe_reference, normalisation_tensors
from cfcd.extract.runtimes import decode_workers, onnx_network, resolve_runtime
from cfcd.extract.scales import MultiScale, parse_scales
from cfcd.models.fingerprint import model_fingerprint
from cfcd.runtime import init_distributed, jsonable
from cfcd.runtime import progress as progress_bar
from cfcd.store import (
    DESCRIPTORS_FILE,
    IDS_FILE,
    META_FILE,
    PARTIAL_DIR,
    StoreMeta,
    StoreWriter,
    finalize_store,
    open_store,
)
from cfcd.utils.io import atomic_write_json, exclusive_lock

Precision = Literal["fp32", "bf16", "fp16"]
SETTINGS_FILE = "extract-settings.json"  # inside the store's .partial/ while a job runs


@dataclass
class ExtractOptions:
    """How to extract. Everything that changes the numbers is recorded in the store's meta."""

    scales: MultiScale = field(default_factory=lambda: parse_scales("cfcd"))
    max_size: int | None = None
    crop_rule: Literal["truncate", "round"] = "truncate"
    alpha: Literal["drop", "white"] = "drop"
    truncated: Literal["warn", "fail"] = "warn"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    mode: Literal["fast", "naive"] = "fast"
    device: str = "cpu"
    precision: Precision = "fp32"
    batch_size: int | None = None  # None: 16 on CUDA; 1 on the CPU, where batching large images only costs memory traffic
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    max_pending: int | None = None  # images waiting in size buckets before the fullest runs (default 4 x batch)
    dtype: Literal["float32", "float16"] = "float32"
    shard_size: int = 1024
    flush_seconds: float | None = 30.0  # also write a shard this often: a kill loses at most this much work
    cudnn_benchmark: bool = True
    # None: channels_last on CUDA in the fast path. The Extractor converts the model it is given,
    # so a caller that shares a live model (the trainer's benchmark hook) says what it wants.
    channels_last: bool | None = None
    stop_after: int | None = None  # debug: stop like a kill after this many images were handed to the writer
    progress: bool = True
    # which runtime runs the network (cfcd.extract.runtimes): "auto" is onnxruntime on the CPU and torch
    # on a GPU (the command line's default). "torch" here, because callers that pass a live model
    # (the trainer's benchmark hook, hard-negative mining) must not export it at every call.
    runtime: Literal["auto", "torch", "onnx"] = "torch"
    # onnxruntime's intra-op threads; None: the measured CPU policy (the cores other work leaves idle).
    # A fixed count makes a run's numbers independent of the machine's load (the demo uses 1).
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"unknown precision {self.precision!r} (expected fp32, bf16 or fp16)")
        if self.mode not in ("fast", "naive"):
            raise InputError(f"unknown mode {self.mode!r} (expected 'fast' or 'naive')")
        if self.mode == "naive" and self.precision != "fp32":
            raise InputError("the naive (reference) path runs in fp32 only")
        if self.batch_size is None:
            self.batch_size = 16 if str(self.device).startswith("cuda") else 1
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_size is not None and self.max_size < 1:
            raise InputError(f"--max-size must be >= 1, got {self.max_size}")
        if self.dtype not in ("float32", "float16"):
            raise InputError(f"unknown store dtype {self.dtype!r} (expected float32 or float16)")
        if self.runtime not in ("auto", "torch", "onnx"):
            raise InputError(f"unknown runtime {self.runtime!r} (expected auto, torch or onnx)")

    def settings(self) -> dict:
        """The options that change the descriptors (what a resumed job must share)."""
        return {
            "scales": self.scales.to_meta(),
            "max_size": self.max_size,
            "crop_rule": self.crop_rule,
            "alpha": self.alpha,
            "truncated": self.truncated,
            "max_pixels": self.max_pixels,
            "precision": self.precision,
            "dtype": self.dtype,
        }

    @classmethod
    def from_settings(cls, settings: dict, **overrides) -> "ExtractOptions":
        """The options a store was extracted with, from :meth:`settings` as recorded in its meta
        (``StoreMeta.extract_options``); ``overrides`` set what does not change the numbers (device, runtime,
        batch size, workers, progress)."""
        if not isinstance(settings, dict) or "scales" not in settings:
            raise InputError("no extraction settings (extract.settings.options in the store's meta): the store was "
                             "not written by 'cfcd extract', so images cannot be described the same way")
        recorded = {k: v for k, v in settings.items() if k != "scales"}
        return cls(scales=MultiScale.from_meta(settings["scales"]), **recorded, **overrides)


@dataclass
class Batch:
    """Descriptors of some images of the list, plus what went wrong with others."""

    ids: list[str]
    descriptors: np.ndarray  # len(ids) x D float32
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (id, warning)


@dataclass
class ExtractSummary:
    count: int
    failures: list[dict]
    warnings: list[dict]
    seconds: float
    store: Any = None
    stopped: bool = False
    skipped: int = 0  # already in the store (resume)

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# decoding in DataLoader workers


class DecodeDataset:
    """Decodes the images at ``positions`` of ``image_list``; never raises for a bad image."""

    def __init__(self, image_list: ImageList, positions: list[int], load_kwargs: dict):
        self.image_list = image_list
        self.positions = positions
        self.load_kwargs = load_kwargs

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        import torch

        pos = self.positions[k]
        info = ImageInfo()
        bbx = None if self.image_list.boxes is None else self.image_list.boxes[pos]
        try:
            array = load_image(self.image_list.paths[pos], bbx=bbx, info=info, **self.load_kwargs)
        except ImageLoadError as exc:
            return pos, None, exc.reason, info.warnings
        except Exception as exc:  # noqa: BLE001 - one bad image never kills the job
            return pos, None, f"unexpected {type(exc).__name__}: {exc}", info.warnings
        # A tensor travels from the worker through shared memory, not through a pipe.
        return pos, torch.from_numpy(array), None, info.warnings


def _identity(sample):
    return sample


# --------------------------------------------------------------------------------------------


class _PinnedBuffers:
    """Reusable pinned host buffers per batch shape, two slots each (batch k fills one slot while
    batch k-1's copy from the other may still be in flight)."""

    def __init__(self, max_shapes: int = 8):
        self.cache: OrderedDict[tuple, list] = OrderedDict()
        self.max_shapes = max_shapes
        self.turn: dict[tuple, int] = {}

    def get(self, shape: tuple):
        import torch

        slots = self.cache.get(shape)
        if slots is None:
            slots = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self.cache[shape] = slots
            if len(self.cache) > self.max_shapes:
                self.cache.popitem(last=False)
        self.cache.move_to_end(shape)
        turn = self.turn.get(shape, 0)
        self.turn[shape] = 1 - turn
        return slots[turn]


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool | None):
    """``torch.backends.cudnn.benchmark = enabled`` for the block, restored after (None: untouched)."""
    import torch

    if enabled is None:
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads for the block, restored after. Beside onnxruntime the normalising and
    resizing run on one thread: torch's OpenMP pool otherwise spins against onnxruntime's threads
    (measured: lite2 at 512, 2 cores, 24.5 -> 27.7 and 14.9 -> 31.3 img/s; benchmarks/README.md)."""
    import torch

    previous = torch.get_num_threads()
    if previous != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if previous != n:
            torch.set_num_threads(previous)


class Extractor:
    """Multi-scale descriptors for image lists with one model.

    ``model`` follows the ``cfcd.models`` contract: ``model(x)`` gives B x D unit vectors,
    ``model.preprocess`` has ``channel_order``, ``mean``, ``std``; ``model.embedding_dim``.
    """

    def __init__(self, model, options: ExtractOptions | None = None, *, log: Callable[[str], None] | None = None):
        import torch

        self.options = options or ExtractOptions()
        opts = self.options
        # The reference path runs its model where asked (the CFCD reference: one GPU, fp32, batch 1);
        # its resizing and normalisation stay on the CPU.
        self.device = torch.device(opts.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but CUDA is not available")
        self.preprocess = model.preprocess
        self.channel_order = getattr(self.preprocess, "channel_order", "RGB")
        self.dim = int(model.embedding_dim)
        self.model = model.eval().to(self.device)
        auto = self.device.type == "cuda" and opts.mode == "fast"
        self.channels_last = auto if opts.channels_last is None else bool(opts.channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # revisitop images are mostly 1024x768 / 768x1024, so shapes repeat: let cuDNN pick the
        # fastest kernels (off for collections of all-different sizes; the reference leaves it off).
        # Set around this extractor's forward passes only, not for the whole process.
        self.cudnn_benchmark = self.device.type == "cuda" and opts.mode == "fast" and opts.cudnn_benchmark
        self.mean, self.std = normalisation_tensors(self.preprocess, self.device)
        self._pinned = _PinnedBuffers() if self.device.type == "cuda" else None
        # the network's forward: the model itself, or its graph in onnxruntime (everything else is shared)
        self.network = self.model
        self.runtime = resolve_runtime(opts.runtime, str(self.device), mode=opts.mode, precision=opts.precision)
        if self.runtime == "onnx":
            network = onnx_network(self.model, log=log, threads=opts.threads)
            if network is None:
                self.runtime = "torch"
            else:
                self.network, self.channels_last = network, False

    # ---- small API ------------------------------------------------------------------------

    def load_kwargs(self) -> dict:
        o = self.options
        return dict(
            channel_order=self.channel_order,
            max_pixels=o.max_pixels,
            crop_rule=o.crop_rule,
            max_size=o.max_size,
            alpha=o.alpha,
            truncated=o.truncated,
        )

    def describe_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        """Descriptors (N x D float32) of decoded images, each H x W x 3 uint8 in the model's
        channel order. Fast mode groups equal sizes into batches."""
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        if self.options.mode == "naive":
            for i, image in enumerate(images):
                out[i] = describe_reference(self.model, image, self.options.scales, self.preprocess)
            return out
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.options.batch_size):
                chunk = indices[start : start + self.options.batch_size]
                batch = torch.from_numpy(np.stack([images[i] for i in chunk]))
                out[chunk] = self._launch(batch).cpu().numpy()
        return out

    # ---- the batched pipeline ---------------------------------------------------------------

    def _launch(self, images):
        """Start one batch on the device; returns the (device) descriptor tensor. ``images``: a
        B x H x W x 3 uint8 tensor or a list of H x W x 3 tensors of one size."""
        import torch

        threads = _torch_threads(1) if self.runtime == "onnx" else contextlib.nullcontext()
        with torch.inference_mode(), threads, _cudnn_benchmark(self.cudnn_benchmark if self.device.type == "cuda" else None):
            if self.device.type == "cuda":
                shape = (len(images), *images[0].shape)
                pinned = self._pinned.get(shape)
                if isinstance(images, torch.Tensor):
                    pinned.copy_(images)
                else:
                    torch.stack(images, out=pinned)  # one host copy, straight into pinned memory
                batch = pinned.to(self.device, non_blocking=True)
            else:
                batch = images if isinstance(images, torch.Tensor) else torch.stack(images)
            return describe_batch(
                self.network,
                batch,
                self.options.scales,
                mean=self.mean,
                std=self.std,
                precision=self.options.precision,
                channels_last=self.channels_last,
            )

    def iter_batches(self, image_list: ImageList, positions: list[int] | None = None) -> Iterator[Batch]:
        """Describe ``image_list`` (or the given positions of it); yields :class:`Batch` objects in
        completion order (not list order: images are grouped by size)."""
        import torch

        opts = self.options
        positions = list(range(len(image_list))) if positions is None else list(positions)
        if not positions:
            return
        dataset = DecodeDataset(image_list, positions, self.load_kwargs())
        workers = max(0, int(opts.workers))
        if self.runtime == "onnx":
            workers = decode_workers(workers)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=(4 if workers else None),
            persistent_workers=False,
        )
        ids = image_list.ids
        failures: list[tuple[str, str]] = []
        warnings: list[tuple[str, str]] = []
        buckets: dict[tuple, list[tuple[int, Any]]] = {}
        pending = 0
        max_pending = opts.max_pending or 4 * opts.batch_size
        in_flight: tuple[list[int], Any] | None = None

        def take_notes() -> tuple[list, list]:
            nonlocal failures, warnings
            f, w = failures, warnings
            failures, warnings = [], []
            return f, w

        def finish(flight) -> Batch:
            flight_pos, result = flight
            f, w = take_notes()
            return Batch([ids[p] for p in flight_pos], result.cpu().numpy().astype(np.float32, copy=False), f, w)

        def run_bucket(shape) -> list[Batch]:
            nonlocal pending, in_flight
            items = buckets.pop(shape)
            pending -= len(items)
            try:
                result = self._launch([t for _, t in items])
            except (RuntimeError, ValueError):  # e.g. out of memory on a huge image: go one by one
                done = [finish(in_flight)] if in_flight is not None else []
                in_flight = None
                return done + self._one_by_one(items, ids, failures, take_notes)
            previous, in_flight = in_flight, ([p for p, _ in items], result)
            return [finish(previous)] if previous is not None else []

        for pos, tensor, error, notes in loader:
            for note in notes:
                warnings.append((ids[pos], note))
            if error is not None:
                failures.append((ids[pos], error))
                continue
            if opts.mode == "naive":
                desc = describe_reference(self.model, tensor.numpy(), opts.scales, self.preprocess)
                f, w = take_notes()
                yield Batch([ids[pos]], desc[None], f, w)
                continue
            shape = tuple(tensor.shape)
            buckets.setdefault(shape, []).append((pos, tensor))
            pending += 1
            if len(buckets[shape]) >= opts.batch_size:
                yield from run_bucket(shape)
            elif pending > max_pending:
                yield from run_bucket(max(buckets, key=lambda s: len(buckets[s])))
        for shape in sorted(buckets, key=lambda s: -len(buckets[s])):
            yield from run_bucket(shape)
        if in_flight is not None:
            yield finish(in_flight)
        elif failures or warnings:
            f, w = take_notes()
            yield Batch([], np.zeros((0, self.dim), np.float32), f, w)

    def _one_by_one(self, items, ids, failures, take_notes) -> list[Batch]:
        """A batch failed in the model: describe its images one at a time; the ones that fail
        again are recorded as failures instead of stopping the job."""
        import torch

        good, rows = [], []
        for pos, tensor in items:
            try:
                rows.append(self._launch([tensor]).cpu())
                good.append(pos)
            except (RuntimeError, ValueError) as exc:
                height, width = tensor.shape[:2]
                failures.append((ids[pos], f"model failed on the {width}x{height} image ({type(exc).__name__}: {str(exc)[:200]})"))
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        f, w = take_notes()
        if good:
            return [Batch([ids[p] for p in good], torch.cat(rows).numpy().astype(np.float32, copy=False), f, w)]
        return [Batch([], np.zeros((0, self.dim), np.float32), f, w)] if (f or w) else []

    def extract(self, image_list: ImageList) -> tuple[np.ndarray, list[tuple[str, str]], list[tuple[str, str]]]:
        """In memory: an N x D array in list order (rows of failed images are NaN), the failures and
        the warnings."""
        index = {image_id: i for i, image_id in enumerate(image_list.ids)}
        out = np.full((len(image_list), self.dim), np.nan, dtype=np.float32)
        failures: list[tuple[str, str]] = []
        warnings: list[tuple[str, str]] = []
        for batch in self.iter_batches(image_list):
            if batch.ids:
                out[[index[i] for i in batch.ids]] = batch.descriptors
            failures += batch.failures
            warnings += batch.warnings
        return out, failures, warnings


# --------------------------------------------------------------------------------------------
# store jobs: resume, ranks, meta


def extraction_rules(options: ExtractOptions, queries: bool) -> dict:
    """Plain-words record of the procedure, for the store's meta and the benchmark JSON."""
    s = options.scales
    resize = {
        "round": "target (round(h*s), round(w*s)) with Python round (half to even)",
        "half_up": "target (int(0.5+h*s), int(0.5+w*s))",
        "scale_factor": "F.interpolate(scale_factor=s): floor(h*s), sampling grid of s",
        "largest": "dirtorch Scale(S, largest=True): longer side S (upscaling allowed), other int(0.5+S*other/longer)",
    }[s.size_rule]
    if s.resample == "pil":
        resize += ", Pillow BILINEAR on the uint8 image, then /255 and mean/std (dirtorch)"
    elif s.antialias:
        resize += ", bilinear, align_corners=False, antialiased (Pillow BILINEAR)"
    else:
        resize += ", bilinear, align_corners=False, no antialias" + (" (cv2 INTER_LINEAR)" if s.size_rule != "scale_factor" else "")
    combination = (
        "per-scale L2, mean, L2"
        if not s.uses_power
        else f"per-scale L2, power mean with p={s.power} ({'dirtorch sympow, |x| clamped at 1e-6' if s.power_rule == 'dirtorch' else 'cirtorch, no clamp'}), L2"
    )
    if s.flip:
        combination += "; every scale also described horizontally flipped (one more view)"
    rules = {
        "resize": resize,
        "combination": combination,
        "max_size": (
            f"longer side capped at {options.max_size} with Image.thumbnail (Lanczos) before the scales"
            if options.max_size
            else "none (original resolution)"
        ),
    }
    if queries:
        rules["query_crop"] = {
            "truncate": "int() of the bbx coordinates, before resizing (CFCD/DOLG reference)",
            "round": "Python round of the bbx coordinates like PIL crop, before resizing (revisitop)",
        }[options.crop_rule]
    return rules


def _short(value) -> str:
    """A setting in a few characters: a scale recipe by its preset name, a model by its name, a hash cut."""
    if isinstance(value, dict):
        if "scales" in value and "combine" in value:  # MultiScale.to_meta()
            name = value.get("name")
            return name if name and name != "custom" else " ".join(f"{float(v):.4g}" for v in value["scales"])
        if "name" in value:
            return str(value["name"])
        return "{" + ", ".join(sorted(value)) + "}"
    if isinstance(value, str) and len(value) > 40:
        return value[:12] + "..." if all(c in "0123456789abcdef" for c in value) else "..." + value[-37:]
    return repr(value) if isinstance(value, str) else str(value)


def settings_difference(previous: dict, settings: dict) -> list[str]:
    """``name: old -> new`` for each setting that differs (nested settings by their last key)."""
    out: list[str] = []

    def walk(a, b, name):
        if a == b:
            return
        scales = isinstance(a, dict) and isinstance(b, dict) and "combine" in a and "combine" in b
        if isinstance(a, dict) and isinstance(b, dict) and not scales:
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), key)
            return
        out.append(f"{name}: {_short(a)} -> {_short(b)}")

    walk(previous, settings, "settings")
    return out


def _check_settings(out: Path, settings: dict, *, rank: int) -> None:
    """Refuse to resume a partial store written with other settings."""


    path = out / ".partial" / SETTINGS_FILE
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CfcdError(f"{path}: unreadable settings of the partial store ({exc}); remove {out} to start again") from None
        if previous != settings:
            diff = settings_difference(previous, settings)
            details = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise CfcdError(
                f"{out}: a partial store from a run with different settings is here ({details}). "
                f"Rerun with the same arguments to resume, or use another --out (or --overwrite)"
            )
    elif rank == 0:
        atomic_write_json(path, settings)


def extract_to_store(
    model,
    image_list: ImageList,
    out: str | os.PathLike,
    options: ExtractOptions | None = None,
    *,
    weights: str | os.PathLike | None = None,
    queries: bool = False,
    extra_meta: dict | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    label: str | None = None,
) -> ExtractSummary:
    """Describe every image of ``image_list`` (an :class:`ImageList`, or a folder or list file path) into
    the descriptor store ``out``; ``label`` names the job in the progress bar (default: the store's name).

    Resumable: images already in the store's shards are skipped, so a killed job rerun with the
    same arguments ends with the same store as an uninterrupted run. Under ``torchrun`` each
    rank takes every ``WORLD_SIZE``-th image and writes its own part; rank 0 merges the parts in
    list order after a barrier. Images that cannot be decoded are recorded in the store's meta
    (``failures``) with their reason; truncated-but-decoded JPEGs in ``extract.warnings``.
    """

    options = options or ExtractOptions()
    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out)
    if isinstance(image_list, (str, os.PathLike)):  # a folder or a list file, as on the command line

        image_list = read_image_list(image_list)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory (the output is a store directory)")
    fingerprint = model_fingerprint(model, weights)
    settings = {
        "model": fingerprint,
        "options": options.settings(),
        "list": {"source": image_list.source, "count": len(image_list), "queries": queries},
    }
    settings = jsonable(settings)
    # ranks that finish early wait at the final barrier: allow a long job
    ctx = init_distributed(options.device, timeout=datetime.timedelta(hours=72))
    try:
        finished = _reuse_complete_store(out, settings, overwrite, log)
        if finished is not None:
            return finished
        with _store_lock(out, "lock" if ctx.world_size == 1 else f"lock.rank{ctx.rank:03d}"):
            return _extract_locked(model, image_list, out, options, ctx, settings=settings, fingerprint=fingerprint,
                                   queries=queries, extra_meta=extra_meta, overwrite=overwrite, log=log, label=label)
    finally:
        ctx.close()


def _extract_locked(model, image_list, out: Path, options, ctx, *, settings, fingerprint, queries, extra_meta,
                    overwrite, log, label) -> ExtractSummary:
    """The job once this process holds the store's lock: prepare, describe, write, finalise."""
    _prepare_partial(out, settings, overwrite, ctx)

    part = f"rank{ctx.rank:03d}" if ctx.world_size > 1 else "main"
    if options.device.startswith("cuda") and ctx.world_size > 1 and ":" not in options.device:
        options = replace(options, device=f"cuda:{ctx.local_rank}")
    extractor = Extractor(model, options, log=log)
    writer = StoreWriter(out, dim=extractor.dim, dtype=options.dtype, part=part, shard_size=options.shard_size,
                         flush_seconds=options.flush_seconds)
    done = writer.done_ids()
    mine = [i for i in range(len(image_list)) if i % ctx.world_size == ctx.rank]
    todo = [i for i in mine if image_list.ids[i] not in done]
    skipped = len(mine) - len(todo)
    for i in [i for i in todo if "\n" in image_list.ids[i] or "\r" in image_list.ids[i]]:
        writer.add_failure(image_list.ids[i], "the file name holds a line break, which a store cannot hold "
                                              "(images.txt has one id a line): rename the file")
    todo = [i for i in todo if "\n" not in image_list.ids[i] and "\r" not in image_list.ids[i]]
    if skipped:
        log(f"{out}: resuming, {skipped} image(s) of this rank already done, {len(todo)} to go")

    start = time.perf_counter()
    count, stopped = _write_batches(extractor, writer, image_list, todo, options,
                                    warnings_path=out / PARTIAL_DIR / f"extract-warnings-{part}.jsonl",
                                    show_progress=options.progress and ctx.rank == 0,
                                    desc=f"extract {label or out.name}", log=log if ctx.rank == 0 else None)
    seconds = time.perf_counter() - start
    if stopped:
        log(f"{out}: stopped after {count} image(s) (--stop-after); rerun without it to resume")
        return ExtractSummary(count, [], [], seconds, None, stopped=True, skipped=skipped)

    ctx.barrier()
    store = None
    summary_failures: list[dict] = []
    warnings_all: list[dict] = []
    if ctx.rank == 0:
        warnings_all = _read_warnings(out / PARTIAL_DIR)
        meta = _store_meta(fingerprint, settings, options, queries, extractor, ctx.world_size, image_list,
                           warnings_all)
        if extra_meta:
            meta.update(jsonable(extra_meta))
        store = finalize_store(out, order=list(image_list.ids), meta=meta)
        summary_failures = list(store.meta.get("failures", []))
    ctx.barrier()
    return ExtractSummary(count, summary_failures, warnings_all, seconds, store, skipped=skipped)


def _store_lock(out: Path, name: str):
    """Hold ``out/.partial/<name>`` while this job writes ``out``: a second job into the same store is
    refused at once instead of doing all the work again."""
    partial = out / PARTIAL_DIR
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        raise InputError(f"{out}: cannot create the store directory (a file is in the way)") from None
    return exclusive_lock(partial / name, f"{out}: another extraction is writing this store right now (it holds "
                                          f"{partial / name}); wait for it to finish, or write to another --out")


def _reuse_complete_store(out: Path, settings: dict, overwrite: bool, log) -> ExtractSummary | None:
    """The summary of a finished store made with ``settings``; refuse one made otherwise unless overwriting."""

    if overwrite or not (out / META_FILE).exists():
        return None
    store = open_store(out)  # a corrupt meta.json is an InputError naming the file, not a traceback
    meta = StoreMeta.of(store)
    if meta.settings == settings:
        log(f"{out}: complete store with the same settings already exists ({len(store.descriptors)} rows)")
        return ExtractSummary(0, meta.failures, [], 0.0, store, skipped=len(store.descriptors))
    raise CfcdError(
        f"{out}: a complete descriptor store with different settings is already here; "
        "use another --out or --overwrite"
    )


def _prepare_partial(out: Path, settings: dict, overwrite: bool, ctx) -> None:
    """Rank 0 clears what ``overwrite`` replaces and records the settings; every rank checks them."""
    import shutil


    if overwrite and ctx.rank == 0:
        for name in (DESCRIPTORS_FILE, IDS_FILE, META_FILE):
            target = out / name
            if target.exists():
                target.unlink()
        for target in (out / PARTIAL_DIR).iterdir():  # all but the lock files, which this job holds
            if target.is_dir():
                shutil.rmtree(target)
            elif not target.name.startswith("lock"):
                target.unlink()
    ctx.barrier()
    if ctx.rank == 0:
        (out / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
        _check_settings(out, settings, rank=0)
    ctx.barrier()
    if ctx.rank != 0:
        _check_settings(out, settings, rank=ctx.rank)


LONG_JOB_SECONDS = 600  # a job estimated longer than this gets one line saying how to shorten it


def long_job_note(done: int, seconds: float, remaining: int, options: ExtractOptions) -> str | None:
    """One line when ``remaining`` images at the rate so far take over 10 minutes, naming what shortens it."""
    if done <= 0 or remaining <= 0 or seconds <= 0:
        return None
    estimate = seconds / done * remaining
    if estimate <= LONG_JOB_SECONDS:
        return None
    if options.max_size is None:
        hint = "--max-size 1024 (cap the longer side) shortens it several times over"
    elif len(options.scales.scales) > 1:
        hint = "fewer scales (--scales single) shorten it"
    else:
        hint = "a GPU (--device cuda) shortens it"
    when = f"{estimate / 3600:.1f} h" if estimate >= 5400 else f"{estimate / 60:.0f} min"
    return (f"about {when} more for {remaining} image(s) at {seconds / done:.1f} s/image on "
            f"{str(options.device)}; {hint}")


def _write_batches(extractor, writer, image_list, todo, options, *, warnings_path: Path, show_progress: bool,
                   desc: str, log=None) -> tuple[int, bool]:
    """Describe ``todo`` into ``writer``; returns (rows written, stopped by ``stop_after``)."""
    count = 0
    stopped = False
    progress = progress_bar(len(todo), enabled=show_progress, desc=desc)
    start, handled, noted = time.perf_counter(), 0, log is None
    try:
        for batch in extractor.iter_batches(image_list, todo):
            for image_id, reason in batch.failures:
                writer.add_failure(image_id, reason)
            if batch.warnings:
                with open(warnings_path, "a", encoding="utf-8") as handle:
                    for image_id, note in batch.warnings:
                        handle.write(json.dumps({"id": image_id, "warning": note}) + "\n")
            if batch.ids:
                writer.append(batch.ids, batch.descriptors)  # writes a shard every shard_size rows
                count += len(batch.ids)
            progress.update(len(batch.ids) + len(batch.failures))
            handled += len(batch.ids) + len(batch.failures)
            if not noted and count >= min(3, len(todo)):  # the first images, the model warmed up
                noted = True
                note = long_job_note(count, time.perf_counter() - start, len(todo) - handled, options)
                if note:
                    log(f"{desc.split(' ', 1)[-1]}: {note}")
            if options.stop_after is not None and count >= options.stop_after:
                stopped = True  # like a kill: the unflushed buffer is lost
                break
    finally:
        progress.close()
    if not stopped:
        writer.flush()
    return count, stopped


def _store_meta(fingerprint: dict, settings: dict, options, queries: bool, extractor, world_size: int,
                image_list, warnings_all: list[dict]) -> dict:
    """The store's provenance: model, weights, preprocessing and how the extraction ran."""
    return {
        "model": fingerprint["config"].get("name") if isinstance(fingerprint["config"], dict) else None,
        "weights": fingerprint["weights"],
        "weights_sha256": fingerprint["weights_sha256"],
        "preprocess": fingerprint["preprocess"],
        "extract": {
            "settings": settings,
            "scales": options.scales.to_meta(),
            **extraction_rules(options, queries),
            "queries": queries,
            "crop_rule": options.crop_rule if queries else None,
            "precision": options.precision,
            "mode": options.mode,
            "device": str(extractor.device.type),
            "runtime": extractor.runtime,
            "world_size": world_size,
            "list": image_list.source,
            "warnings": warnings_all,
        },
    }


def _read_warnings(partial: Path) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for path in sorted(partial.glob("extract-warnings-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            seen[(entry.get("id"), entry.get("warning"))] = entry
    return list(seen.values())


