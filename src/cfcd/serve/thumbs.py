"""Thumbnails made on demand and cached on disk (JPEG, long side ``size``).

The cache key is the source file's real path, size and modification time, the thumbnail size and
the crop box, so an edited photo gets a new thumbnail. Files are written atomically (temporary
name, then ``os.replace``), so concurrent requests for one thumbnail never see half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

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
) -> Path:
    """The cached thumbnail of ``source`` (cropped to ``box`` first), made when missing."""
    stat = source.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size}|{None if box is None else list(box)}|{crop_rule}"
    digest = hashlib.sha1(key.encode()).hexdigest()
    target = cache_dir / "thumbs" / str(size) / digest[:2] / f"{digest}.jpg"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    image = _render(source, size, box, crop_rule)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".thumb-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="JPEG", quality=85, optimize=True)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def _render(source: Path, size: int, box, crop_rule: str):
    from PIL import Image, ImageOps

    from cfcd.data.images import crop_box
    from cfcd.errors import CfcdError

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
