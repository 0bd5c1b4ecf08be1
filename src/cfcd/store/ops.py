"""Whole-store operations: write in one go, transform row blocks, merge, summarise."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cfcd.errors import CfcdError, InputError
from cfcd.store.format import DESCRIPTORS_FILE, FAILED_FILE, IDS_FILE, META_FILE, PARTIAL_DIR, SUPPORTED_DTYPES
from cfcd.store.format import DescriptorStore, is_store, iter_blocks, open_store, write_ids
from cfcd.store.format import _block_rows, _check_ids, _descriptor_memmap, _duplicates, _few, _normalise_dtype
from cfcd.store.meta import check_compatible, write_meta
from cfcd.store.writer import _read_failures, _scan_shards
from cfcd.utils.io import atomic_save_npy


def write_store(
    path: str | os.PathLike,
    ids: Sequence[str],
    descriptors: np.ndarray,
    meta: dict | None = None,
) -> DescriptorStore:
    """Write a complete store in one go (small stores, tests, post-processed descriptors).

    ``descriptors`` must be N x D float32 or float16 (other floats are cast to float32) with
    unique ``ids``. An existing store at ``path`` is replaced; ``meta.json`` is removed first
    and written last, so a reader never sees a mix of old and new files as complete.
    """
    path = Path(path)
    ids = _check_ids(list(ids), str(path))
    x = np.asarray(descriptors)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise InputError(f"{path}: expected {len(ids)} x D descriptors for {len(ids)} ids, got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"{path}: refusing to write an empty store")
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: duplicate image ids: {_few(_duplicates(ids))}")
    if x.dtype.name not in SUPPORTED_DTYPES:
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{path}: descriptors must be floating point, got {x.dtype}")
        x = x.astype(np.float32)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (path / META_FILE).unlink()
    atomic_save_npy(path / DESCRIPTORS_FILE, np.ascontiguousarray(x))
    write_ids(path / IDS_FILE, ids)
    write_meta(path, dict(meta or {}), count=x.shape[0], dim=x.shape[1], dtype=x.dtype.name)
    return open_store(path)


def transform_store(
    source: DescriptorStore,
    out: str | os.PathLike,
    fn,
    *,
    out_dim: int,
    dtype: str | None = None,
    meta: dict | None = None,
) -> DescriptorStore:
    """Write ``fn(rows)`` of every block of ``source`` into a new store (e.g. a whitened copy).

    Streams block by block into a memory-mapped ``descriptors.npy`` under a temporary name, so a
    1M x 2048 store is transformed with one block in memory; ids are kept, ``meta`` replaces the
    meta (the format keys are recomputed). ``fn`` maps an n x D float32 block to n x ``out_dim``.
    """
    out = Path(out)
    if source.ids is None:
        raise InputError(f"{source.path}: a plain .npy matrix has no ids; write a store first")
    if out.resolve() == Path(source.path).resolve():
        raise InputError(f"{out}: the output must differ from the input store")
    dtype = _normalise_dtype(dtype or source.descriptors.dtype.name)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / META_FILE).unlink()
    with _descriptor_memmap(out, dtype, (len(source), int(out_dim))) as mm:
        for start, block in iter_blocks(source.descriptors, _block_rows(max(source.dim, int(out_dim)))):
            y = np.asarray(fn(block))
            if y.shape != (block.shape[0], int(out_dim)):
                raise CfcdError(f"transform returned shape {y.shape}, expected {(block.shape[0], int(out_dim))}")
            mm[start : start + block.shape[0]] = y
    write_ids(out / IDS_FILE, source.ids)
    write_meta(out, dict(meta or {}), count=len(source), dim=out_dim, dtype=dtype)
    return open_store(out)


# Provenance keys that must agree for descriptors to be comparable (combining them otherwise is
# a silent accuracy bug: the rows would live in different embedding spaces).


def merge_stores(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> DescriptorStore:
    """Concatenate stores (e.g. a database and the R1M distractors) into a new store ``out``.

    All stores must have the same dimension and agree on the provenance keys present in both
    metas (model, weights_sha256, preprocess, scales, extract.scales, whitening); ids must be unique across
    them. The output dtype is the common dtype (float32 if they differ). Rows are streamed
    through a memory map; ``meta["merged_from"]`` lists the sources.
    """
    if len(paths) < 1:
        raise InputError("merge needs at least one store")
    out = Path(out)
    stores = [open_store(p) for p in paths]
    for s in stores:
        if s.ids is None:
            raise InputError(f"{s.path}: a plain .npy matrix has no ids and cannot be merged; write a store first")
        if out.resolve() == s.path.resolve():
            raise InputError(f"{out}: the output must be a new directory, not one of the inputs")
    dim = stores[0].dim
    for s in stores[1:]:
        if s.dim != dim:
            raise InputError(f"{s.path}: {s.dim}-D descriptors cannot be merged with {dim}-D ones from {stores[0].path}")
        check_compatible(stores[0], s)
    seen: dict[str, Path] = {}
    dups: list[str] = []
    for s in stores:
        for i in s.ids:
            if i in seen:
                dups.append(f"{i} ({seen[i].name} and {s.path.name})")
            else:
                seen[i] = s.path
    if dups:
        raise InputError(f"{out}: {len(dups)} ids occur in more than one input store: {_few(dups, 3)}")
    dtypes = {s.descriptors.dtype.name for s in stores}
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    total = sum(len(s) for s in stores)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / META_FILE).unlink()
    with _descriptor_memmap(out, dtype, (total, dim)) as mm:
        offset = 0
        for s in stores:
            step = _block_rows(dim)
            for start in range(0, len(s), step):
                block = np.asarray(s.descriptors[start : start + step], dtype=dtype)
                mm[offset + start : offset + start + block.shape[0]] = block
            offset += len(s)
    all_ids = [i for s in stores for i in s.ids]
    write_ids(out / IDS_FILE, all_ids)
    meta = {k: v for k, v in stores[0].meta.items() if k not in ("failures", "merged_from", "duplicates_resolved")}
    meta["failures"] = [f for s in stores for f in s.meta.get("failures", [])]
    meta["merged_from"] = [{"path": str(s.path), "count": len(s), "created": s.meta.get("created")} for s in stores]
    write_meta(out, meta, count=total, dim=dim, dtype=dtype)
    return open_store(out)


def store_summary(path: str | os.PathLike) -> dict:
    """A short description of a store (complete or running) for ``cfcd store info``."""
    path = Path(path)
    info: dict = {"path": str(path)}
    partial = path / PARTIAL_DIR
    if is_store(path) or path.is_file():
        store = open_store(path)
        info.update(
            complete=True,
            count=len(store),
            dim=store.dim,
            dtype=store.descriptors.dtype.name,
            bytes=int(store.descriptors.nbytes),
            meta={k: v for k, v in store.meta.items() if k != "failures"},
            failures=len(store.meta.get("failures", [])),
            first_ids=(store.ids or [])[:3],
        )
    elif partial.is_dir():
        shards = _scan_shards(partial)
        parts = sorted({s.part for s in shards})
        failed = None
        if (partial / FAILED_FILE).is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                failed = json.loads((partial / FAILED_FILE).read_text(encoding="utf-8"))
        info.update(
            complete=False,
            failed=failed is not None,
            first_failures=(failed or {}).get("first", [])[:3],
            shards=len(shards),
            parts=parts,
            rows_written=sum(s.rows for s in shards),
            failures=len(_read_failures(partial)),
        )
    else:
        open_store(path)  # raises the right error
    if partial.is_dir() and info.get("complete"):
        info["pending_shards"] = len(_scan_shards(partial))
    return info
