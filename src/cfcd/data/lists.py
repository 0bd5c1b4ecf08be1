"""Image lists: which files to describe, under which ids, with which query boxes.

Three sources give the same :class:`ImageList`:

* a text file, one path per line, relative to ``root`` (absolute paths ignore it); blank lines
  and lines starting with ``#`` are skipped; a GLDv2-style ``path label`` line keeps the path;
* a directory, scanned recursively for :data:`IMAGE_EXTENSIONS` (case-insensitive), sorted by
  relative path so every run and every rank sees the same order;
* a revisitop ground truth (``gnd_<ds>.pkl``): ``imlist`` for the database or ``qimlist`` with
  the query boxes; ids are the gnd names and files are ``ROOT/<name>.jpg`` (``ROOT/jpg/<name>.jpg``
  when ``ROOT`` is the dataset directory).

Ids default to the relative path without its extension (``id_rule="stem"``); ``"path"`` keeps
the extension. Duplicate ids are an error: a store is addressed by id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from cfcd.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff")

IdRule = Literal["stem", "path"]


@dataclass
class ImageList:
    """Ordered images to extract: ``ids[i]`` is stored for ``paths[i]`` (cropped to ``boxes[i]``)."""

    ids: list[str]
    paths: list[Path]
    boxes: list[tuple[float, float, float, float]] | None = None
    source: str = ""  # what the list was read from, for the store's meta

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> "ImageList":
        return ImageList(
            ids=[self.ids[i] for i in indices],
            paths=[self.paths[i] for i in indices],
            boxes=None if self.boxes is None else [self.boxes[i] for i in indices],
            source=self.source,
        )


def _make_id(relative: str, id_rule: IdRule) -> str:
    relative = relative.replace(os.sep, "/")
    if id_rule == "path":
        return relative
    if id_rule == "stem":
        stem, ext = os.path.splitext(relative)
        return stem if ext.lower() in IMAGE_EXTENSIONS else relative
    raise InputError(f"unknown id rule {id_rule!r} (expected 'stem' or 'path')")


def _check_unique(ids: list[str], source: str) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupes = [i for i in ids if i in seen or seen.add(i)]
        raise InputError(
            f"{source}: {len(dupes)} duplicate image id(s), e.g. {dupes[:3]}; "
            "ids must be unique (use --id-rule path to keep extensions)"
        )


def scan_directory(directory: str | os.PathLike, *, id_rule: IdRule = "stem") -> ImageList:
    """Every image file under ``directory`` (recursive, symlinks followed), sorted by relative path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    relative: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip .partial and the like
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                relative.append(os.path.relpath(os.path.join(dirpath, name), directory).replace(os.sep, "/"))
    relative.sort()
    if not relative:
        raise InputError(f"{directory}: no image files found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return _image_list(relative, directory, id_rule, str(directory))


def _image_list(relative: list[str], base: Path, id_rule: IdRule, source: str) -> ImageList:
    ids = [_make_id(r, id_rule) for r in relative]
    _check_unique(ids, source)
    return ImageList(ids=ids, paths=[base / r for r in relative], source=source)


def read_list_file(
    list_file: str | os.PathLike, *, root: str | os.PathLike | None = None, id_rule: IdRule = "stem"
) -> ImageList:
    """A text list of image paths, relative to ``root`` (default: the list file's directory)."""
    list_file = Path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise InputError(f"{list_file}: image list not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{list_file}: not a UTF-8 text list of image paths ({exc.reason})") from None
    base = Path(root) if root is not None else list_file.parent
    relative: list[str] = []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        # "path label" (GLDv2 training lists): keep the path. Paths with spaces need no label.
        parts = entry.rsplit(" ", 1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            entry = parts[0].strip()
        relative.append(entry)
    if not relative:
        raise InputError(f"{list_file}: the image list is empty")
    return _image_list(relative, base, id_rule, str(list_file))


def read_image_list(
    images: str | os.PathLike, *, root: str | os.PathLike | None = None, id_rule: IdRule = "stem"
) -> ImageList:
    """``images`` is a directory (scanned) or a text list (paths relative to ``root``)."""
    images = Path(images)
    if images.is_dir():
        if root is not None and Path(root).resolve() != images.resolve():
            raise InputError(f"{images}: --root is only used with a list file, not with a directory")
        return scan_directory(images, id_rule=id_rule)
    if not images.exists():
        raise InputError(f"{images}: no such image list or directory")
    return read_list_file(images, root=root, id_rule=id_rule)


def revisitop_image_dir(root: str | os.PathLike, dataset: str | None = None) -> Path:
    """Where the revisitop jpgs are: ``ROOT/jpg``, ``ROOT/<ds>/jpg``, or ``ROOT`` itself."""
    root = Path(root)
    candidates = [root / "jpg"]
    if dataset:
        candidates.insert(0, root / dataset / "jpg")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return root


def gnd_image_list(
    gnd, *, root: str | os.PathLike, queries: bool = False, ext: str = ".jpg"
) -> ImageList:
    """The database (``imlist``) or the queries (``qimlist`` + boxes) of a revisitop ground truth.

    ``gnd`` is a :class:`cfcd.data.gnd.GroundTruth` (anything with ``imlist``, ``qimlist``, ``gnd``
    and ``dataset``). Ids are the gnd names, in gnd order.
    """
    directory = revisitop_image_dir(root, getattr(gnd, "dataset", None))
    names = list(gnd.qimlist if queries else gnd.imlist)
    paths = [directory / (n if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS else n + ext) for n in names]
    boxes = None
    if queries:
        boxes = []
        for name, entry in zip(names, gnd.gnd):
            bbx = entry.get("bbx") if isinstance(entry, dict) else None
            if bbx is None or len(bbx) != 4:
                raise InputError(f"{getattr(gnd, 'path', 'gnd')}: query {name!r} has no 4-number 'bbx'")
            boxes.append(tuple(float(v) for v in bbx))
    source = f"{getattr(gnd, 'path', 'gnd')}:{'qimlist' if queries else 'imlist'}"
    return ImageList(ids=names, paths=paths, boxes=boxes, source=source)
