"""Search your own photos: ``cfcd demo --images DIR --query PHOTO``.

The folder is indexed once into a persistent cache and then kept up to date incrementally: a
rerun describes only the files that are new or changed (size or modification time), drops the
removed ones and rebuilds the FAISS index, so the second query takes seconds.

Cache location: ``--cache DIR`` if given, else ``$CFCD_CACHE``, else ``$XDG_CACHE_HOME/cfcd``,
else ``~/.cache/cfcd``; inside it ``photos/<folder-hash>-<model>/`` holds

* ``catalog.json``: every file's size, mtime, and where its descriptor is (or why it failed);
* ``parts/NNNN/``: descriptor stores, one per update (the store format of ``cfcd extract``);
* ``index/``: a ``cfcd index build`` flat index over the current files (``cfcd search`` works on it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cfcd.models
from cfcd.data.images import ImageLoadError, load_image
from cfcd.data.lists import ImageList, scan_directory
from cfcd.errors import InputError
from cfcd.extract import ExtractOptions, Extractor, extract_to_store, parse_scales
from cfcd.index import build_index, open_index
from cfcd.store import open_store
from cfcd.utils.io import atomic_write_json, cache_root

DEFAULT_MODEL = "gem_efficientnet_lite0"
CATALOG = "catalog.json"


def library_dir(images: Path, model_name: str, cache: str | os.PathLike | None = None) -> Path:
    key = hashlib.sha256(str(images.resolve()).encode()).hexdigest()[:16]
    return cache_root(cache) / "photos" / f"{key}-{model_name}"


@dataclass
class UpdateSummary:
    added: int    # new files described (and now in the index)
    changed: int  # changed files described again
    removed: int  # files gone from the folder (or now unreadable) and out of the index
    failed: int   # new or changed files that could not be read: skipped, not in the index
    total: int    # photos in the index
    seconds: float


class PhotoLibrary:
    """A folder of photos, its descriptors and its index, kept in sync incrementally."""

    def __init__(self, images: str | os.PathLike, *, model_name: str = DEFAULT_MODEL, scales="cfcd",
                 max_size: int | None = 1024, cache: str | os.PathLike | None = None, progress: bool = True,
                 runtime: str = "auto"):
        self.images = Path(images)
        if not self.images.is_dir():
            raise InputError(f"{self.images}: not a directory of photos")
        self.model_name = model_name
        self.options = ExtractOptions(scales=parse_scales(scales), max_size=max_size, progress=progress,
                                      workers=min(2, os.cpu_count() or 1), runtime=runtime)
        self.dir = library_dir(self.images, model_name, cache)
        self._model = None
        self.catalog = self._read_catalog()

    # -- state ------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return {"model": self.model_name, "options": self.options.settings(), "folder": str(self.images.resolve())}

    def _read_catalog(self) -> dict:
        path = self.dir / CATALOG
        fresh = {"settings": self.settings, "files": {}, "next_part": 0}
        if not path.is_file():
            return fresh
        try:
            catalog = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            catalog = None
        if not catalog or json.loads(json.dumps(self.settings)) != catalog.get("settings"):
            # other model or extraction settings: this cache cannot be reused, start it again
            shutil.rmtree(self.dir, ignore_errors=True)
            return fresh
        return catalog

    @property
    def model(self):
        if self._model is None:
            self._model = cfcd.models.create(self.model_name)
        return self._model

    # -- update -----------------------------------------------------------------------------
    def update(self, say=print):
        """Describe new or changed files, drop removed ones, rebuild the index; returns the index."""

        t0 = time.perf_counter()
        listing = scan_directory(self.images, id_rule="path")
        files = self.catalog["files"]
        current = {}
        for rel, path in zip(listing.ids, listing.paths):
            st = path.stat()
            current[rel] = (st.st_size, st.st_mtime_ns)
        removed = [rel for rel in files if rel not in current]
        todo = [rel for rel, sig in current.items()
                if rel not in files or (files[rel]["size"], files[rel]["mtime_ns"]) != sig]
        was_indexed = {rel for rel, entry in files.items() if "part" in entry}
        for rel in removed:
            del files[rel]
        failed: set[str] = set()
        if todo:
            say(f"describing {len(todo)} new or changed photo(s) of {len(current)} in {self.images}")
            part = f"{int(self.catalog['next_part']):04d}"
            subset = ImageList(ids=todo, paths=[self.images / rel for rel in todo], source=str(self.images))
            summary = extract_to_store(self.model, subset, self.dir / "parts" / part, self.options,
                                       log=lambda message: say(message), label=self.images.name or str(self.images))
            store = summary.store
            rows = {rid: i for i, rid in enumerate(store.ids)}
            reasons = {f.get("id"): f.get("reason") for f in summary.failures}
            for rel in todo:
                entry = {"size": current[rel][0], "mtime_ns": current[rel][1]}
                if rel in rows:
                    entry.update(part=part, row=rows[rel])
                else:
                    entry["failed"] = reasons.get(rel, "not described")
                    failed.add(rel)
                    say(f"warning: {self.images / rel}: skipped ({entry['failed']})")
                files[rel] = entry
            self.catalog["next_part"] = int(self.catalog["next_part"]) + 1
        self._drop_unused_parts()
        atomic_write_json(self.dir / CATALOG, self.catalog)
        index = self._build_index() if (todo or removed or not (self.dir / "index" / "index.json").is_file()) \
            else self.open_index()
        described = [rel for rel in todo if rel not in failed]
        changed = sum(rel in was_indexed for rel in described)
        # a file that was in the index and is unreadable now has left it: it counts as removed
        gone = len([rel for rel in removed if rel in was_indexed]) + len([rel for rel in failed if rel in was_indexed])
        self.last_update = UpdateSummary(len(described) - changed, changed, gone, len(failed), len(index),
                                         time.perf_counter() - t0)
        return index

    def _drop_unused_parts(self) -> None:
        used = {e["part"] for e in self.catalog["files"].values() if "part" in e}
        parts = self.dir / "parts"
        if parts.is_dir():
            for child in parts.iterdir():
                if child.name not in used:
                    shutil.rmtree(child, ignore_errors=True)

    def descriptors(self) -> tuple[list[str], np.ndarray]:
        ids, chunks = [], []
        by_part: dict[str, list[tuple[str, int]]] = {}
        for rel, entry in sorted(self.catalog["files"].items()):
            if "part" in entry:
                by_part.setdefault(entry["part"], []).append((rel, int(entry["row"])))
        for part, members in sorted(by_part.items()):
            store = open_store(self.dir / "parts" / part)
            chunks.append(np.asarray(store.descriptors[[row for _, row in members]], dtype=np.float32))
            ids += [rel for rel, _ in members]
        if not ids:
            raise InputError(f"{self.images}: none of the photos could be read")
        return ids, np.concatenate(chunks)

    def _build_index(self):
        ids, x = self.descriptors()
        return build_index(x, "flat", ids=ids, out=self.dir / "index")

    def open_index(self):
        return open_index(self.dir / "index")

    # -- query ------------------------------------------------------------------------------
    def describe_query(self, query: Path) -> np.ndarray:
        desc, failed, _ = Extractor(self.model, self.options).extract(
            ImageList(ids=[query.name], paths=[query], source=str(query)))
        if failed:
            raise InputError(f"{query}: cannot read the query photo ({failed[0][1]})")
        return np.asarray(desc, dtype=np.float32)


def check_query(query: str | os.PathLike) -> Path:
    """Fail fast, before any indexing, when the query is missing or not a readable image."""

    query = Path(query)
    if not query.is_file():
        raise InputError(f"{query}: query photo not found")
    try:
        load_image(query)
    except ImageLoadError as exc:
        raise InputError(f"{query}: not a readable image ({exc})") from None
    return query


def search_photos(images: str | os.PathLike, query: str | os.PathLike, *, model_name: str = DEFAULT_MODEL,
                  scales="cfcd", max_size: int | None = 1024, k: int = 10, cache: str | os.PathLike | None = None,
                  progress: bool = True, out=sys.stdout, runtime: str = "auto") -> list[tuple[str, float]]:
    """Index ``images`` (incrementally, in the cache) and print the ``k`` nearest photos of ``query``."""
    query = check_query(query)
    say = lambda message: print(message, file=out, flush=True)  # noqa: E731
    library = PhotoLibrary(images, model_name=model_name, scales=scales, max_size=max_size, cache=cache,
                           progress=progress, runtime=runtime)
    index = library.update(say)
    u = library.last_update
    say(f"index: {u.total} photos ({u.added} added, {u.changed} changed, {u.removed} removed)"
        + (f"; {u.failed} unreadable photo(s) skipped" if u.failed else "")
        + f" in {u.seconds:.1f} s -> {library.dir / 'index'}")
    hits = index.search(library.describe_query(query), k=min(k, len(index)))
    ranked = [(rid, score) for rid, score in zip(hits.ids[0], hits.scores[0].tolist()) if rid is not None]
    for rank, (rid, score) in enumerate(ranked, 1):
        say(f"{rank:3d}  {score:.4f}  {rid}")
    return ranked
