"""A collection that grows (:func:`add`) and shrinks (:func:`remove`), for every index type.

Each change writes a new generation of the files it touches, then ``index.json``
(:func:`cfcd.index.generations.commit`), so a kill leaves the previous, complete index, and rerunning
the same add resumes it (its encoded shards are kept in ``.build/add-gG/``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cfcd import __version__
from cfcd.errors import InputError
from cfcd.index.base import BUILD_DIR, ExactIndex, Index
from cfcd.index.directory import open_index
from cfcd.index.generations import commit, next_generation, read_info, resume_or_start, write_faiss, write_id_file
from cfcd.index.rows import Source, save_rows
from cfcd.index.shards import add_rows, merge_lists, run_jobs
from cfcd.store import check_compatible
from cfcd.utils.io import atomic_save_npy
from cfcd.utils.io import utc_timestamp as _now


def _load(index_dir: Path) -> tuple[dict, Index]:
    info = read_info(index_dir)
    if info is None:
        raise InputError(f"{index_dir}: not an index directory (no index.json; incomplete build?)")
    return info, open_index(index_dir)


def add(index_dir: str | os.PathLike, store, *, force: bool = False, workers: int = 0,
        ids: Sequence[str] | None = None, progress: bool = False) -> Index:
    """Append the rows of ``store`` to the index in ``index_dir`` (same model: checked with
    :func:`cfcd.store.check_compatible` unless ``force``) and return the reopened index.

    Image ids must be new and unique (ids removed earlier may come back). IVF indexes encode the rows
    with the stored trained index (shard by shard) and merge the old and new lists into a new
    generation of files; other FAISS indexes are read, extended and rewritten; the exact index gets
    a hard link of the new rows.
    """
    shown = Path(index_dir)
    index_dir = shown.absolute()
    info, index = _load(index_dir)
    src = Source(store, ids)
    _check_addition(index, src, index_dir, force)
    generation = next_generation(info)
    files = dict(info["files"])
    label0 = index.n_labels
    if not isinstance(index, ExactIndex):
        files["index"] = f"index-g{generation}.faiss"
        _grow_faiss(index, src, index_dir, info, files, generation, label0, workers, progress)
    if index.ids is not None:
        files["ids"] = f"images-g{generation}.txt"
        old_ids = index_dir / info["files"]["ids"]
        write_id_file(index_dir / files["ids"], [old_ids, src.ids_file if src.ids is None else src.ids])
    if files.get("vectors"):  # the exact index, or re-ranking rows
        name = f"descriptors-g{generation}.npy"
        save_rows(src, index_dir / name)
        files["vectors"] = list(files["vectors"]) + [name]
    n_new = len(src.reader)
    new_info = _next_info(info, files, generation, len(index) + n_new,
                          {"op": "add", "rows": int(n_new), "from": str(src.path)})
    del index
    commit(index_dir, new_info)
    return open_index(shown)


def _check_addition(index: Index, src: Source, index_dir: Path, force: bool) -> None:
    """Refuse rows of another dimension, model (unless ``force``), id kind, or ids already live."""
    d = src.reader.shape[1]
    if d != index.dim:
        raise InputError(f"{src.path}: {d}-D descriptors cannot be added to the {index.dim}-D index {index_dir}")
    if not force:
        check_compatible((f"index {index_dir}", index.source.get("meta", {})), (str(src.path), src.meta))
    if (index.ids is None) != (not src.has_ids):
        raise InputError(f"{src.path}: " + ("the index has image ids but these rows have none (a plain .npy); "
                                            "write a store" if index.ids is not None else
                                            "the index was built from a plain .npy (row numbers as ids); "
                                            "add a plain .npy too, or rebuild from a store"))
    if index.ids is None:
        return
    removed = set(index.removed.tolist())
    new_ids = set(src.id_list())
    clash = [i for j, i in enumerate(index.ids) if i in new_ids and j not in removed]
    if clash:
        shown = ", ".join(repr(c) for c in clash[:5])
        raise InputError(f"{src.path}: {len(clash)} image ids are already in the index {index_dir}: {shown}"
                         f"{' ...' if len(clash) > 5 else ''} (remove them first to replace them)")


def _grow_faiss(index, src: Source, index_dir: Path, info: dict, files: dict, generation: int, label0: int,
                workers: int, progress: bool) -> None:
    """The FAISS index with the new rows (labels from ``label0``), written as ``files["index"]``."""
    import faiss

    n_new = len(src.reader)
    params = info.get("params", {})
    if faiss.try_extract_index_ivf(index.index) is None:
        grown = faiss.read_index(str(index_dir / info["files"]["index"]))
        add_rows(grown, src.reader, 0, n_new, label0, str(src.path), ivf=False)
        write_faiss(grown, index_dir / files["index"])
        return
    if not files.get("trained") or not (index_dir / files["trained"]).is_file():
        raise InputError(f"{index_dir}: the trained index {files.get('trained')!r} is missing; build the index again")
    trained = index_dir / files["trained"]
    work = resume_or_start(index_dir / BUILD_DIR / f"add-g{generation}",
                           {"source": src.fingerprint(), "label0": label0, "generation": generation})
    shard_rows = int(params.get("shard_rows") or n_new)
    shard_files, jobs = [], []
    data = str(src.reader.path) if src.reader.path is not None else src.reader
    for i, a in enumerate(range(0, n_new, shard_rows)):
        f = work / f"shard-{i:05d}.faiss"
        shard_files.append(f)
        if not f.is_file():
            jobs.append({"trained": str(trained), "data": data, "start": a, "stop": min(a + shard_rows, n_new),
                         "label0": label0 + a, "out": str(f), "shard": i, "threads": None, "where": str(src.path)})
    run_jobs(jobs, workers, None, progress)
    if params.get("ondisk"):
        files["ivfdata"] = f"index-g{generation}.ivfdata"
        merged = merge_lists(trained, [index.index] + shard_files, index_dir / files["ivfdata"])
    else:
        merged = merge_lists(trained, [index_dir / info["files"]["index"]] + shard_files, None)
    write_faiss(merged, index_dir / files["index"])


def remove(index_dir: str | os.PathLike, ids: Sequence[str], *, missing_ok: bool = False) -> Index:
    """Remove the images ``ids`` from the index in ``index_dir`` (they never come back in results).

    The rows stay in the index and are skipped at search time (a FAISS ``IDSelector``; a mask for
    the exact type); the space is reclaimed by building the index again. Unknown ids are an error
    unless ``missing_ok``.
    """
    shown = Path(index_dir)
    index_dir = shown.absolute()
    info, index = _load(index_dir)
    if index.ids is None:
        try:
            rows = np.asarray([int(i) for i in ids], dtype=np.int64)
        except ValueError:
            raise InputError(f"{index_dir}: the index has no image ids (built from a .npy): give row numbers") from None
        unknown = [str(r) for r in rows.tolist() if not 0 <= r < index.n_labels]
    else:
        wanted = set(ids)
        found: dict = {}
        for j, image_id in enumerate(index.ids):
            if image_id in wanted:
                found.setdefault(image_id, []).append(j)
        unknown = [i for i in ids if i not in found]
        rows = np.asarray([j for js in found.values() for j in js], dtype=np.int64)
    if unknown and not missing_ok:
        shown_ids = ", ".join(repr(u) for u in unknown[:5])
        raise InputError(f"{index_dir}: {len(unknown)} ids are not in the index: {shown_ids}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    merged = np.union1d(index.removed, rows)
    newly = int(len(merged) - len(index.removed))
    generation = next_generation(info)
    files = dict(info["files"])
    files["removed"] = f"removed-g{generation}.npy"
    atomic_save_npy(index_dir / files["removed"], merged.astype(np.int64))
    new_info = _next_info(info, files, generation, int(index.n_labels - len(merged)), {"op": "remove", "rows": newly})
    del index
    commit(index_dir, new_info)
    return open_index(shown)


def _next_info(info: dict, files: dict, generation: int, count: int, event: dict) -> dict:
    new_info = dict(info)
    new_info.update(files=files, generation=generation, count=count, created=_now(), cfcd_version=__version__)
    new_info["history"] = list(info.get("history", [])) + [{**event, "created": _now()}]
    if info.get("tuning"):
        new_info["tuning"] = {**info["tuning"], "note": "measured before later adds/removes"}
    return new_info



def read_id_file(path: str | os.PathLike) -> list[str]:
    """Ids to remove: one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: id list not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 ({exc})") from None
    out = [line.rstrip("\r") for line in lines if line.strip()]
    if not out:
        raise InputError(f"{path}: no ids")
    return out
