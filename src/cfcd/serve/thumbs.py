"""Thumbnails made on demand and cached on disk (JPEG, long side ``size``), and the cache's budget.

The cache key is the source file's real path, size and modification time, the thumbnail size and
the crop box, so an edited photo gets a new thumbnail. Files are written atomically (temporary
name, then ``os.replace``), so concurrent requests for one thumbnail never see half a file.

:class:`CacheBudget` bounds the bytes of the thumbnails and kept uploads together: a hit sets the
file's modification time (the access time is not kept by ``relatime`` mounts), and when a write
takes the total over the budget the least recently used files go until 90% of it is left.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Sequence

from cfcd.data.images import crop_box
from cfcd.errors import CfcdError
from cfcd.utils.io import atomic_open


class CacheBudget:
    """At most ``max_bytes`` of files under ``dirs`` (least recently used removed first)."""

    def __init__(self, dirs: Sequence[Path], max_bytes: int):
        self.dirs = [Path(d) for d in dirs]
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.total = sum(size for _, _, size in self._files())
        if self.total > self.max_bytes:
            self._evict()

    def _files(self):
        for d in self.dirs:
            for root, _, names in os.walk(d):
                for name in names:
                    if name.startswith("."):  # a temporary file being written
                        continue
                    path = os.path.join(root, name)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    yield st.st_mtime_ns, path, st.st_size

    def touch(self, path: Path) -> None:
        """A cache hit: the file is now the most recently used."""
        try:
            os.utime(path)
        except OSError:
            pass

    def added(self, path: Path) -> None:
        """A new file in the cache: count it and evict when over the budget."""
        try:
            size = os.stat(path).st_size
        except OSError:
            return
        with self._lock:
            self.total += size
            over = self.total > self.max_bytes
        if over:
            self._evict()

    def _evict(self) -> None:
        with self._lock:
            files = sorted(self._files())
            total = sum(size for _, _, size in files)
            keep = int(0.9 * self.max_bytes)
            for _, path, size in files:
                if total <= keep:
                    break
                try:
                    os.unlink(path)
                except OSError:
                    continue
                total -= size
            self.total = total

DEFAULT_SIZE = 256
SIZES = (128, 256, 512)  # a fixed set keeps the cache bounded: one file per image and size
MAX_SOURCE_PIXELS = 200_000_000


class ThumbnailError(Exception):
    """The source image cannot be turned into a thumbnail (the message says why)."""


def thumbnail_path(
    source: Path,
    cache_dir: Path,
    size: int = DEFAULT_SIZE,
    box: Sequence[float] | None = None,
    crop_rule: str = "round",
    budget: CacheBudget | None = None,
) -> Path:
    """The cached thumbnail of ``source`` (cropped to ``box`` first), made when missing."""
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size}|{None if box is None else list(box)}|{crop_rule}"
    digest = hashlib.sha1(key.encode()).hexdigest()
    target = cache_dir / "thumbs" / str(size) / digest[:2] / f"{digest}.jpg"
    if target.is_file():
        if budget is not None:
            budget.touch(target)
        return target
    image = _render(source, size, box, crop_rule)
    with atomic_open(target, "wb") as handle:
        image.save(handle, format="JPEG", quality=85, optimize=True)
    if budget is not None:
        budget.added(target)
    return target


def _render(source: Path, size: int, box, crop_rule: str):
    from PIL import Image, ImageOps


    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(source) as img:
                if img.size[0] * img.size[1] > MAX_SOURCE_PIXELS:
                    raise ThumbnailError(f"{img.size[0]}x{img.size[1]} image is too large for a thumbnail")
                if box is None:  # a box is in full-resolution pixels: no reduced JPEG decode then
                    img.draft("RGB", (size * 2, size * 2))
                img = ImageOps.exif_transpose(img)
                img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ThumbnailError(f"cannot decode the image ({type(exc).__name__}: {exc})") from None
    if box is not None:
        try:
            img = img.crop(crop_box(box, img.size[0], img.size[1], crop_rule))
        except CfcdError as exc:
            raise ThumbnailError(str(exc)) from None
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    return img
