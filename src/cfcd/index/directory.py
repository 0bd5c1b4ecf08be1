"""An index directory: build one from a store, open one, check queries against it.

Types: ``exact`` (the chunked search over a hard link of the descriptors), ``flat``, ``ivfpq``,
``hnsw``, and ``auto`` / ``faiss`` (a budgeted choice or any index-factory string, built shard by
shard with on-disk lists by :mod:`cfcd.index.ondisk`). Format: docs/index-format.md.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cfcd.errors import InputError
from cfcd.store import DESCRIPTORS_FILE, IDS_FILE, DescriptorStore, is_store, load_descriptors, open_store
from cfcd.store import check_compatible as _check_compatible
from cfcd.store import read_ids as _read_ids

logger = logging.getLogger(__name__)
from cfcd.index.base import INDEX_FILE, INDEX_META, ExactIndex, IdTable, Index, RowSegments
from cfcd.index.faiss_index import _SMALL_BUILD, INDEX_TYPES, FaissIndex, faiss_threads


def build_index(
    store: str | os.PathLike | DescriptorStore | np.ndarray,
    type: str = "flat",
    *,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    ids: Sequence[str] | None = None,
    **params,
) -> Index:
    """Build an index of ``type`` (exact, flat, ivfpq, hnsw) from a store (path or loaded) or array.

    Parameters (``params``): ivfpq ``nlist`` (default ~4 sqrt(N), reduced with a warning when
    there are fewer than 39 vectors per list), ``m`` (sub-quantizers, must divide D; default D/8),
    ``nbits`` (8), ``nprobe`` (16), ``train_size`` (training subsample; default
    max(64 nlist, 65536) capped at N: the usual subsample), ``seed``; hnsw ``hnsw_m`` (32), ``ef_construction`` (200),
    ``ef_search`` (128); exact ``device`` ("auto"), ``db_chunk``; approximate types ``rerank``
    (0: off; R: take R candidates and re-rank them with the exact inner product read from the
    memory-mapped store rows, hard-linked into the index directory); FAISS ``threads`` (default: one
    thread below 50k vectors, FAISS's default above). The descriptors are validated
    (finite, non-zero rows) first. With ``out`` the index is saved there.
    """
    if type in ("auto", "faiss"):
        # budgeted choice / any factory string, sharded and on disk: cfcd.index.ondisk
        if out is None:
            raise InputError(f"a {type!r} index is built into a directory: pass out=")
        from cfcd.index import ondisk

        if type == "faiss" and not params.get("factory"):
            raise InputError("type 'faiss' needs factory= (a FAISS index-factory string)")
        return ondisk.build(store, out, ids=ids, progress=progress, **params)
    if type not in INDEX_TYPES:
        raise InputError(f"unknown index type {type!r}; choose from {', '.join(INDEX_TYPES)}, auto, faiss")
    data_file = None
    if isinstance(store, np.ndarray):
        st = DescriptorStore(path=Path("<array>"), descriptors=store, ids=list(ids) if ids is not None else None)
        if st.descriptors.ndim != 2:
            raise InputError(f"expected an N x D matrix, got shape {st.descriptors.shape}")
    else:
        if isinstance(store, DescriptorStore):
            st = store
        else:
            st = load_descriptors(store, role="database", dtype=None)
        if (st.path / DESCRIPTORS_FILE).is_file():
            data_file = st.path / DESCRIPTORS_FILE
        elif st.path.is_file() and st.path.suffix == ".npy":
            data_file = st.path
    x = st.descriptors
    if x.shape[0] == 0:
        raise InputError(f"{st.path}: the store is empty")
    source = {"path": str(st.path), "meta": {k: v for k, v in st.meta.items() if k != "failures"}}
    params = {k: v for k, v in params.items() if v is not None}
    if type == "exact":
        index: Index = ExactIndex(
            x,
            st.ids,
            {"device": params.get("device", "auto"), "db_chunk": params.get("db_chunk")},
            source,
            data_file=data_file,
        )
    else:
        threads = params.pop("threads", None) or (1 if x.shape[0] < _SMALL_BUILD else None)
        rerank = int(params.pop("rerank", 0) or 0)
        with faiss_threads(threads):
            faiss_index, resolved = INDEX_TYPES[type](x, params, progress)
        if rerank:
            resolved["rerank"] = rerank
        index = FaissIndex(faiss_index, type, st.ids, resolved, source, vectors=x if rerank else None,
                           data_file=data_file)
    if out is not None:
        index.save(out)
    return index


def open_index(path: str | os.PathLike, *, mmap: bool = True) -> Index:
    """Reopen an index directory written by :func:`build_index` (or a store, searched exactly)."""
    path = Path(path)
    meta_path = path / INDEX_META
    if not meta_path.is_file():
        if is_store(path) or (path.is_file() and path.suffix == ".npy"):
            st = open_store(path, mmap=mmap)
            return ExactIndex(
                st.descriptors,
                st.ids,
                {"device": "auto", "db_chunk": None},
                {"path": str(st.path), "meta": {k: v for k, v in st.meta.items() if k != "failures"}},
                path=path,
                data_file=(st.path / DESCRIPTORS_FILE) if st.path.is_dir() else st.path,
            )
        if path.is_dir():
            raise InputError(f"{path}: not an index directory (no {INDEX_META}; incomplete build?)")
        raise InputError(f"{path}: index directory not found")
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{meta_path}: not valid JSON: {exc}") from None
    type_ = info.get("type")
    # index directories written by cfcd.index.ondisk name their files (one generation per add/remove)
    files = info.get("files") or {}
    ids_path = path / files.get("ids", IDS_FILE)
    if type_ == "faiss":
        ids = IdTable(ids_path) if ids_path.is_file() else None
    else:
        ids = _read_ids(ids_path) if ids_path.is_file() else None
    if type_ == "exact":
        from cfcd.store import load_npy as _load_npy

        data = _load_npy(path / DESCRIPTORS_FILE, mmap)
        if data.ndim != 2:
            raise InputError(f"{path / DESCRIPTORS_FILE}: expected an N x D matrix, got shape {data.shape}")
        index: Index = ExactIndex(data, ids, info.get("params", {}), info.get("source", {}), path, path / DESCRIPTORS_FILE)
    elif type_ in ("flat", "ivfpq", "hnsw", "faiss"):
        import faiss

        from cfcd.store import load_npy as _load_npy

        params = info.get("params", {})
        index_path = path / files.get("index", INDEX_FILE)
        if not index_path.is_file():
            raise InputError(f"{index_path}: index file not found")
        if params.get("ondisk"):
            ivfdata = path / files.get("ivfdata", "")
            if not files.get("ivfdata") or not ivfdata.is_file():
                raise InputError(f"{path}: the on-disk inverted lists {files.get('ivfdata')!r} are missing")
            # the lists stay in their file, memory-mapped by FAISS (IO_FLAG_MMAP must not be added: it
            # does not combine with on-disk lists); the process holds the centroids and codebooks only
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR
        else:
            flags = faiss.IO_FLAG_MMAP if (mmap and type_ != "hnsw" and params.get("kind") != "hnsw") else 0
        try:
            raw = faiss.read_index(str(index_path), flags)
        except Exception as exc:
            raise InputError(f"{index_path}: cannot read the FAISS index (corrupt?): {exc}") from None
        vectors = None
        names = files.get("vectors")
        if names is None:
            names = [DESCRIPTORS_FILE] if (path / DESCRIPTORS_FILE).is_file() else []
        if names:
            if params.get("ondisk"):
                from cfcd.index.ondisk import RowReader

                # plain reads, not a memory map: every page a map touches stays in the process's
                # resident memory, and re-ranking touches most of a large store over many queries
                parts = [RowReader(path / name) for name in names]
            else:
                parts = [_load_npy(path / name, True) for name in names]
            vectors = parts[0] if len(parts) == 1 else RowSegments(parts)
        removed = None
        if files.get("removed"):
            removed = _load_npy(path / files["removed"], False)
        index = FaissIndex(raw, type_, ids, params, info.get("source", {}), path,
                           vectors=vectors, data_file=(path / names[0]) if len(names) == 1 else None,
                           removed=removed)
        if vectors is not None and tuple(vectors.shape) != (index.n_labels, index.dim):
            raise InputError(f"{path}: re-ranking rows {', '.join(names)} have shape {tuple(vectors.shape)}, which "
                             f"does not match the index ({index.n_labels} x {index.dim})")
    else:
        raise InputError(f"{meta_path}: unknown index type {type_!r}")
    n_rows = index.n_labels if isinstance(index, FaissIndex) else len(index)
    if ids is not None and len(ids) != n_rows:
        raise InputError(f"{path}: {ids_path.name} has {len(ids)} ids but the index holds {n_rows} vectors")
    if int(info.get("dim", index.dim)) != index.dim:
        raise InputError(f"{meta_path}: says dim {info.get('dim')} but the index is {index.dim}-D")
    return index


def check_compatible(index: Index, queries: DescriptorStore) -> None:
    """Raise when the query store and the index's source store live in different embedding spaces."""
    src = index.source.get("meta", {}) if index.source else {}
    _check_compatible((f"index {index.path}" if index.path else "the index", src), queries)
