"""Building an index directory: every type through one path (plan, train, encode shards, merge,
tune, commit), resumable after ``kill -9`` at any point by running the same build again.

* :func:`build_index` - the entry point: ``exact``, the presets ``flat``, ``ivfpq``, ``hnsw``
  (:func:`cfcd.index.choose.preset`), ``auto`` (:func:`cfcd.index.choose.choose_index`) and
  ``faiss`` (any index-factory string);
* :func:`build` - a FAISS index from a factory string: trained once on a sample, IVF rows encoded
  shard by shard in worker processes (``.build/shard-NNNNN.faiss``) and merged into on-disk lists,
  search parameters tuned on held-out rows, committed as a new generation;
* :func:`build_exact` - the exact (torch) type: hard links of the store's rows and ids.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cfcd import __version__
from cfcd.errors import InputError
from cfcd.index.base import BUILD_DIR, Index
from cfcd.index.choose import PRESETS, choose_index, kind_of, parse_size, preset
from cfcd.index.directory import open_index, open_info
from cfcd.index.faiss_index import SMALL_BUILD, faiss_threads
from cfcd.index.generations import commit, next_generation, read_info, resume_or_start, write_faiss, write_id_file
from cfcd.index.rows import Source, check_rows, save_rows
from cfcd.index.shards import _BLOCK_ROWS, add_rows, merge_lists, run_jobs
from cfcd.index.train import train
from cfcd.index.tune import tune
from cfcd.store import link_or_copy
from cfcd.utils.io import atomic_write_json
from cfcd.utils.io import utc_timestamp as _now

logger = logging.getLogger(__name__)

INDEX_TYPES = ("exact",) + PRESETS + ("auto", "faiss")
TRAINED_FILE = "trained.faiss"
_PRESET_KEYS = ("nlist", "m", "nbits", "nprobe", "hnsw_m", "ef_construction", "ef_search")


def build_index(store, type: str = "flat", *, out: str | os.PathLike | None = None, progress: bool = False,
                ids: Sequence[str] | None = None, **params) -> Index:
    """Build an index of ``type`` from a store (path or loaded) or an N x D array, into ``out``.

    Types: ``exact`` (``device``, ``db_chunk``); the presets ``flat``, ``ivfpq`` (``nlist``, ``m``,
    ``nbits``, ``nprobe``), ``hnsw`` (``hnsw_m``, ``ef_construction``, ``ef_search``), which keep
    their search settings (no tuning unless ``tune_queries`` is given); ``auto`` (the budgeted
    choice) and ``faiss`` (``factory=``), tuned on held-out rows. Every FAISS type takes the
    options of :func:`build` (``rerank``, ``threads``, ``workers``, ``train_size``, ``seed``, ...).
    Without ``out`` the index is built in a temporary directory that is deleted once it is open
    (its files stay mapped). Image ids must be unique.
    """
    if type not in INDEX_TYPES:
        raise InputError(f"unknown index type {type!r}; choose from {', '.join(INDEX_TYPES)}")
    if out is None:
        tmp = tempfile.mkdtemp(prefix="cfcd-index-")
        try:
            index = build_index(store, type, out=tmp, progress=progress, ids=ids, **params)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        index.path = None
        return index
    params = {k: v for k, v in params.items() if v is not None}
    if type == "exact":
        return build_exact(store, out, ids=ids, **params)
    if type in PRESETS:
        src = Source(store, ids)
        chosen = preset(type, *src.reader.shape, {k: params.pop(k) for k in _PRESET_KEYS if k in params})
        params.setdefault("tune_queries", 0)
        return build(src, out, factory=chosen["factory"], search=chosen["search"], construction=chosen["build"],
                     type=type, progress=progress, **params)
    if type == "faiss" and not params.get("factory"):
        raise InputError("type 'faiss' needs factory= (a FAISS index-factory string)")
    if type == "auto":
        params.pop("factory", None)
    return build(store, out, ids=ids, progress=progress, **params)


def build(
    store,
    out: str | os.PathLike,
    *,
    factory: str | None = None,
    max_memory="4GB",
    max_query_ms: float = 10.0,
    ondisk: bool = True,
    shard_rows: int | None = None,
    workers: int = 1,
    threads: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
    tune_queries: int = 1000,
    target_recall: float = 0.95,
    rerank: int = 0,
    search: dict | None = None,
    construction: dict | None = None,
    type: str = "faiss",
    ids: Sequence[str] | None = None,
    progress: bool = False,
    on_shard: Callable[[int], None] | None = None,
):
    """Build a FAISS index of ``store`` into the directory ``out`` and return it opened.

    ``factory`` (a FAISS index-factory string, e.g. ``"OPQ32,IVF4096_HNSW32,PQ32"``) or, when
    None, :func:`choose_index` under ``max_memory``/``max_query_ms``. IVF factories are built
    shard by shard (``shard_rows`` rows each, default from the budget; ``workers`` processes,
    0 = in this process) and merged on disk (``ondisk``) or in memory. ``tune_queries`` held-out
    rows (not in the training sample) tune nprobe/efSearch against exact search: the smallest
    setting with recall@10 >= ``target_recall`` whose latency stays under ``max_query_ms``
    (0 queries: no tuning); ``search`` (``{"nprobe": P}`` / ``{"efSearch": E}``) fixes the setting
    instead. ``construction`` sets build-time fields (``{"efConstruction": E}``). ``rerank`` > 0
    hard-links the store's rows for exact re-ranking of that many candidates. ``type`` is the name
    recorded in ``index.json``. ``on_shard(i)`` is called after each shard is written. Resumable:
    run it again with the same arguments after a kill.
    """
    import faiss

    shown = Path(out)
    out = shown.absolute()  # FAISS records the lists file's path; the cwd may change
    src = store if isinstance(store, Source) else Source(store, ids)
    n, d = src.reader.shape
    budget = parse_size(max_memory)
    choice, probe = _choose_or_parse(factory, n, d, budget, max_query_ms)
    if type in PRESETS:
        choice["reason"] = f"the {type} preset"
    factory = choice["factory"]
    is_ivf = faiss.try_extract_index_ivf(probe) is not None
    ondisk = bool(ondisk and is_ivf)
    old, generation = _prepare(out)

    nq = min(int(tune_queries or 0), max(0, n // 10))
    rng = np.random.default_rng(seed)
    held_out = np.sort(rng.choice(n, size=nq, replace=False)) if nq else np.zeros(0, np.int64)
    shard_rows = _shard_rows(probe, n, d, budget, workers, shard_rows) if is_ivf else n
    ranges = [(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)]
    plan = {
        "factory": factory, "source": src.fingerprint(), "shard_rows": shard_rows, "seed": int(seed),
        "train_size": train_size, "held_out": int(nq), "generation": generation, "ondisk": ondisk,
        "construction": construction or {},
    }
    work = resume_or_start(out / BUILD_DIR, plan)
    files = {"index": f"index-g{generation}.faiss"}
    if ondisk:
        files["ivfdata"] = f"index-g{generation}.ivfdata"
    if is_ivf:
        files["trained"] = f"trained-g{generation}.faiss"

    one_thread = threads or (1 if n < SMALL_BUILD else None)
    t_start = time.perf_counter()
    timings: dict = {}
    with faiss_threads(one_thread):
        trained = work / TRAINED_FILE
        if not trained.is_file():
            t0 = time.perf_counter()
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index = train(index, src.reader, held_out, train_size, seed, factory, budget)
            write_faiss(index, trained)
            timings["train_s"] = round(time.perf_counter() - t0, 2)
        merged_marker = work / "merged.json"
        if merged_marker.is_file() and all((out / name).is_file() for name in files.values()):
            logger.info("%s: resuming after the merge", shown)
        elif is_ivf:
            _encode_and_merge(src, out, work, trained, ranges, files, workers, threads, on_shard, progress, timings)
        else:
            t0 = time.perf_counter()
            index = faiss.read_index(str(trained))
            _construction(index, construction)
            add_rows(index, src.reader, 0, n, 0, str(src.path), ivf=False)
            write_faiss(index, out / files["index"])
            del index
            timings["add_s"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(merged_marker, files)
    _write_ids(src, out, files, generation)
    if rerank:
        _write_rows(src, out, files, generation)
    params = {"factory": factory, "kind": choice["kind"], "ondisk": ondisk, "shard_rows": shard_rows,
              "search": {}, "max_memory": budget, "max_query_ms": max_query_ms, **(construction or {})}
    if is_ivf:
        params["nlist"] = int(faiss.extract_index_ivf(probe).nlist)
        params["search"] = {"nprobe": min(16, params["nlist"])}
    elif choice["kind"] == "hnsw":
        params["search"] = {"efSearch": 128}
    if search:
        params["search"] = dict(search)
    if rerank:
        params["rerank"] = int(rerank)
    info = _info(type, params, src, files, generation, n, d)
    info.update(choice=choice, build={"shards": len(ranges), "workers": workers, **timings})
    if nq:
        # tuned from the files about to be committed (index.json is written last)
        index = open_info(out, info)
        t0 = time.perf_counter()
        with faiss_threads(one_thread):
            info["tuning"] = tune(index, src.reader, held_out, target_recall=target_recall, max_query_ms=max_query_ms)
        del index
        if not search:
            info["params"]["search"] = info["tuning"]["chosen"]["search"]
        info["build"]["tune_s"] = round(time.perf_counter() - t0, 2)
    info["build"]["total_s"] = round(time.perf_counter() - t_start, 2)
    _commit_build(out, info, old)
    return open_index(shown)


def build_exact(store, out: str | os.PathLike, *, ids: Sequence[str] | None = None, device: str = "auto",
                db_chunk: int | None = None, cache_on_device: bool = True, progress: bool = False) -> Index:
    """The exact type: the store's rows (a hard link, no second copy) searched by chunked torch matmul."""
    shown = Path(out)
    out = shown.absolute()
    src = Source(store, ids)
    n, d = src.reader.shape
    for s in range(0, n, _BLOCK_ROWS):  # what a FAISS build checks while it encodes
        check_rows(src.reader.read(s, s + _BLOCK_ROWS), s, str(src.path))
    old, generation = _prepare(out)
    files: dict = {}
    _write_ids(src, out, files, generation)
    _write_rows(src, out, files, generation)
    params = {"device": device, "db_chunk": db_chunk}
    if not cache_on_device:
        params["cache_on_device"] = False
    info = _info("exact", params, src, files, generation, n, d)
    _commit_build(out, info, old)
    return open_index(shown)


def _prepare(out: Path) -> tuple[dict | None, int]:
    """The output directory made, its committed index (if any) and the generation to write."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    old = read_info(out)
    return old, next_generation(old)


def _info(type: str, params: dict, src: Source, files: dict, generation: int, n: int, d: int) -> dict:
    return {
        "type": type, "params": params, "dim": d, "count": n, "metric": "inner_product",
        "source": {"path": str(src.path), "meta": src.meta}, "files": {k: v for k, v in files.items() if v},
        "generation": generation, "history": [{"op": "build", "rows": n, "created": _now()}],
        "cfcd_version": __version__, "created": _now(),
    }


def _write_ids(src: Source, out: Path, files: dict, generation: int) -> None:
    if not src.has_ids:
        return
    files["ids"] = f"images-g{generation}.txt"
    if src.ids_file is not None and src.ids is None:
        link_or_copy(src.ids_file, out / files["ids"])
    else:
        write_id_file(out / files["ids"], [src.ids])


def _write_rows(src: Source, out: Path, files: dict, generation: int) -> None:
    files["vectors"] = [f"descriptors-g{generation}.npy"]
    save_rows(src, out / files["vectors"][0])


def _commit_build(out: Path, info: dict, old: dict | None) -> None:
    commit(out, info)
    if old is not None and not old.get("files"):
        # an index directory of an older cfcd rebuilt in place: its fixed names are not generation files
        for name in ("index.faiss", "descriptors.npy", "images.txt"):
            (out / name).unlink(missing_ok=True)



def _encode_and_merge(src, out, work, trained, ranges, files, workers, threads, on_shard, progress, timings) -> None:
    """Encode the shards that are not written yet, then merge every shard's lists into ``files``."""
    t0 = time.perf_counter()
    shard_files = [work / f"shard-{i:05d}.faiss" for i in range(len(ranges))]
    data = str(src.reader.path) if src.reader.path is not None else src.reader
    per = max(1, (os.cpu_count() or 1) // max(1, workers)) if workers > 1 else threads
    jobs = [
        {"trained": str(trained), "data": data, "start": a, "stop": b, "label0": a, "out": str(f),
         "shard": i, "threads": per, "where": str(src.path)}
        for i, ((a, b), f) in enumerate(zip(ranges, shard_files))
        if not f.is_file()
    ]
    if len(jobs) < len(ranges):
        logger.info("%s: resuming, %d of %d shards already written", out, len(ranges) - len(jobs), len(ranges))
    run_jobs(jobs, workers, on_shard, progress)
    timings["add_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    merged = merge_lists(trained, shard_files, out / files["ivfdata"] if files.get("ivfdata") else None)
    write_faiss(merged, out / files["index"])
    del merged
    link_or_copy(trained, out / files["trained"])
    timings["merge_s"] = round(time.perf_counter() - t0, 2)


def _construction(index, settings: dict | None) -> None:
    """Build-time fields of the index (HNSW's efConstruction) before rows are added."""
    import faiss

    if settings and "efConstruction" in settings:
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efConstruction = int(settings["efConstruction"])


def _choose_or_parse(factory: str | None, n: int, d: int, budget: int, max_query_ms: float):
    """(choice, an untrained probe index): the given factory string checked, or choose_index's pick."""
    import faiss

    if factory:
        choice = {"kind": kind_of(factory), "factory": factory, "reason": "given with --factory"}
    else:
        choice = choose_index(n, d, max_memory=budget, max_query_ms=max_query_ms)
    try:
        probe = faiss.index_factory(d, choice["factory"], faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:
        raise InputError(f"invalid FAISS index-factory string {choice['factory']!r}: {exc}") from None
    return choice, probe


def _shard_rows(probe, n: int, d: int, budget: int, workers: int, shard_rows: int | None) -> int:
    """Rows per shard: given, or what one worker's share of the budget holds as codes."""
    import faiss

    if shard_rows is None:
        code = max(1, int(faiss.extract_index_ivf(probe).code_size))
        # per worker: the shard's codes and ids, one float32 block, twice for the writer's copy
        per_worker = max(64 << 20, budget // (2 * max(1, workers)) - 2 * _BLOCK_ROWS * d * 4)
        shard_rows = int(max(10_000, per_worker // (2 * (code + 8))))
    return max(1, min(int(shard_rows), n))
