"""Shards: rows of a store encoded into copies of a trained index in worker processes, and the
merge of their inverted lists (on disk, as faiss ``contrib/ondisk.merge_ondisk``, or in memory)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np

from cfcd.index.generations import kill_point, write_faiss
from cfcd.index.rows import RowReader, check_rows

_BLOCK_ROWS = 65536


def add_rows(index, reader: RowReader, start: int, stop: int, label0: int, where: str, ivf: bool) -> None:
    for s in range(start, stop, _BLOCK_ROWS):
        e = min(s + _BLOCK_ROWS, stop)
        block = reader.read(s, e)
        check_rows(block, s, where)
        if ivf:
            index.add_with_ids(block, np.arange(label0 + s - start, label0 + e - start, dtype=np.int64))
        else:
            index.add(block)


def encode_shard(job: dict) -> str:
    """Worker: add rows ``[start, stop)`` to a copy of the trained index, labels from ``label0``."""
    import faiss

    if job.get("threads"):
        faiss.omp_set_num_threads(int(job["threads"]))
    index = faiss.read_index(job["trained"])
    reader = RowReader(job["data"]) if isinstance(job["data"], str) else job["data"]
    add_rows(index, reader, job["start"], job["stop"], job["label0"], job["where"], ivf=True)
    write_faiss(index, Path(job["out"]))
    return job["out"]


def run_jobs(jobs: list[dict], workers: int, on_shard: Callable | None, progress: bool) -> None:
    if not jobs:  # every shard was written before a kill: nothing to encode (and no pool of 0 processes)
        return
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="index shards", unit="shard")
    try:
        if workers <= 0 or any(not isinstance(j["data"], str) for j in jobs):
            for job in jobs:
                encode_shard(job)
                _shard_done(job["shard"], bar, on_shard)
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no forked FAISS/OpenMP state
        with ctx.Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool:
            by_out = {j["out"]: j for j in jobs}
            for out in pool.imap_unordered(encode_shard, jobs):
                _shard_done(by_out[out]["shard"], bar, on_shard)
    finally:
        if bar:
            bar.close()


def _shard_done(shard: int, bar, on_shard: Callable | None) -> None:
    if bar:
        bar.update(1)
    if on_shard:
        on_shard(shard)
    kill_point("encode")


def merge_lists(trained_path: Path, sources: list, ivfdata: Path | None):
    """Merge the inverted lists of ``sources`` (index files or indexes) into a copy of the trained
    index: on disk (``OnDiskInvertedLists`` in ``ivfdata``) or in memory."""
    import faiss

    index = faiss.read_index(str(trained_path))
    ivf = faiss.extract_index_ivf(index)
    opened, lists = [], []
    if ivfdata is not None:
        # the sources are only read: memory-mapped shard files, or an opened (on-disk) index
        for src in sources:
            sub = faiss.read_index(str(src), faiss.IO_FLAG_MMAP) if isinstance(src, (str, Path)) else src
            opened.append(sub)
            lists.append(faiss.extract_index_ivf(sub).invlists)
        with contextlib.suppress(FileNotFoundError):
            ivfdata.unlink()
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
        vec = faiss.InvertedListsPtrVector()
        for il in lists:
            vec.push_back(il)
        ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), False, False)
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()
    else:
        # merge_from empties its source: read each file fully, one at a time
        for src in sources:
            sub = faiss.read_index(str(src))
            ivf.merge_from(faiss.extract_index_ivf(sub), 0)
            del sub
        ntotal = ivf.ntotal
    index.ntotal = ivf.ntotal = int(ntotal)
    del opened
    kill_point("merge")  # the lists are written, the index file that names them is not
    return index
