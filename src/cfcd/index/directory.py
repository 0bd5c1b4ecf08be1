"""Opening an index directory (any type, any generation) and checking queries against it.

:func:`open_index` reads ``index.json`` and opens the files it names; everything it returns holds
its generation's files open or memory-mapped, so a later commit (which deletes them) never breaks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cfcd.errors import InputError
from cfcd.index.base import INDEX_META, ExactIndex, IdTable, Index, RowSegments
from cfcd.index.faiss_index import FaissIndex
from cfcd.index.generations import _token
from cfcd.index.rows import RowReader
from cfcd.store import DescriptorStore, is_store, load_npy, open_store
from cfcd.store import check_compatible as _check_compatible

FAISS_TYPES = ("flat", "ivfpq", "hnsw", "faiss")


def open_index(path: str | os.PathLike, *, mmap: bool = True) -> Index:
    """Open the committed index in ``path`` (or a store, searched exactly).

    ``Index.generation`` is the token of the ``index.json`` it was opened from (compare it with
    :func:`cfcd.index.generation` to see whether a newer one was committed since).
    """
    path = Path(path)
    meta_path = path / INDEX_META
    if not meta_path.is_file():
        if is_store(path) or (path.is_file() and path.suffix == ".npy"):
            return _open_store(path, mmap)
        if path.is_dir():
            raise InputError(f"{path}: not an index directory (no {INDEX_META}; incomplete build?)")
        raise InputError(f"{path}: index directory not found")
    for attempt in range(5):
        with open(meta_path, "rb") as handle:
            token = _token(os.fstat(handle.fileno()))
            raw = handle.read()
        try:
            info = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{meta_path}: not valid JSON: {exc}") from None
        if not isinstance(info, dict):
            raise InputError(f"{meta_path}: expected a JSON object")
        try:
            index = open_info(path, info, mmap=mmap)
        except InputError:
            # a commit between reading index.json and opening its files deletes them: read the new one
            with_new = meta_path.is_file() and _token(os.stat(meta_path)) != token
            if with_new and attempt < 4:
                continue
            raise
        index.generation = token
        return index
    raise AssertionError("unreachable")


def _open_store(path: Path, mmap: bool) -> ExactIndex:
    st = open_store(path, mmap=mmap)
    index = ExactIndex([st.descriptors], st.ids, {"device": "auto", "db_chunk": None},
                       {"path": str(st.path), "meta": {k: v for k, v in st.meta.items() if k != "failures"}},
                       path=path)
    marker = st.path / "meta.json" if st.path.is_dir() else st.path
    index.generation = _token(os.stat(marker))
    return index


def open_info(path: str | os.PathLike, info: dict, *, mmap: bool = True) -> Index:
    """Open the index that ``info`` (an ``index.json``, committed or about to be) describes in ``path``."""
    path = Path(path)
    type_ = info.get("type")
    files = info.get("files")
    if not files:
        raise InputError(f"{path}: an index directory of an older cfcd (one {info.get('type')} index without "
                         "generations); build it again with 'cfcd index build'")
    ids_path = path / files["ids"] if files.get("ids") else None
    ids = IdTable(ids_path) if ids_path is not None else None
    removed = load_npy(path / files["removed"], False) if files.get("removed") else None
    params, source = info.get("params", {}), info.get("source", {})
    names = list(files.get("vectors") or [])
    if type_ == "exact":
        parts = [load_npy(path / name, mmap) for name in names]
        if not parts:
            raise InputError(f"{path / INDEX_META}: an exact index names no descriptor files")
        for name, part in zip(names, parts):
            if part.ndim != 2 or part.shape[1] != parts[0].shape[1]:
                raise InputError(f"{path / name}: expected an N x {parts[0].shape[1]} matrix, got shape {part.shape}")
        index: Index = ExactIndex(parts, ids, params, source, path, removed)
    elif type_ in FAISS_TYPES:
        raw = _read_faiss(path, files, params, mmap)
        vectors = None
        if names:
            # plain reads, not a memory map: every page a map touches stays in the process's
            # resident memory, and re-ranking touches most of a large store over many queries
            parts = [RowReader(path / name) for name in names]
            vectors = parts[0] if len(parts) == 1 else RowSegments(parts)
        index = FaissIndex(raw, type_, ids, params, source, path, vectors=vectors, removed=removed)
        if vectors is not None and tuple(vectors.shape) != (index.n_labels, index.dim):
            raise InputError(f"{path}: re-ranking rows {', '.join(names)} have shape {tuple(vectors.shape)}, which "
                             f"does not match the index ({index.n_labels} x {index.dim})")
    else:
        raise InputError(f"{path / INDEX_META}: unknown index type {type_!r}")
    if ids is not None and len(ids) != index.n_labels:
        raise InputError(f"{path}: {ids_path.name} has {len(ids)} ids but the index holds {index.n_labels} vectors")
    if int(info.get("dim", index.dim)) != index.dim:
        raise InputError(f"{path / INDEX_META}: says dim {info.get('dim')} but the index is {index.dim}-D")
    return index


def _read_faiss(path: Path, files: dict, params: dict, mmap: bool):
    import faiss

    index_path = path / files.get("index", "")
    if not files.get("index") or not index_path.is_file():
        raise InputError(f"{index_path}: index file not found")
    if params.get("ondisk"):
        ivfdata = path / files.get("ivfdata", "")
        if not files.get("ivfdata") or not ivfdata.is_file():
            raise InputError(f"{path}: the on-disk inverted lists {files.get('ivfdata')!r} are missing")
        # the lists stay in their file, memory-mapped by FAISS (IO_FLAG_MMAP must not be added: it
        # does not combine with on-disk lists); the process holds the centroids and codebooks only
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    else:
        flags = faiss.IO_FLAG_MMAP if (mmap and params.get("kind") != "hnsw") else 0
    try:
        return faiss.read_index(str(index_path), flags)
    except Exception as exc:
        raise InputError(f"{index_path}: cannot read the FAISS index (corrupt?): {exc}") from None


def check_compatible(index: Index, queries: DescriptorStore) -> None:
    """Raise when the query store and the index's source store live in different embedding spaces."""
    src = index.source.get("meta", {}) if index.source else {}
    _check_compatible((f"index {index.path}" if index.path else "the index", src), queries)
