"""``cfcd index``: build (exact, FAISS presets, budgeted/factory; sharded, on-disk, resumable), add, remove, info."""

from __future__ import annotations

import argparse
from pathlib import Path

_TYPES = ("flat", "ivfpq", "hnsw", "exact")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{build,add,remove,info}", required=True)
    b = sub.add_parser("build", help="build an index from a descriptor store and save it to a directory")
    b.add_argument("store", type=Path, help="descriptor store directory (or .npy, whose row numbers are its ids)")
    b.add_argument("--out", type=Path, required=True, help="index directory to write")
    b.add_argument("--type", choices=("auto",) + _TYPES, default="flat",
                   help="auto: choose the FAISS index (Flat, HNSW, IVF-Flat/SQ8/PQ, OPQ) for the size and "
                        "--max-memory, build IVF shard by shard with on-disk lists, tune nprobe/efSearch; "
                        "flat: exact FAISS inner product; ivfpq: compressed inverted file; hnsw: graph; "
                        "exact: chunked torch matmul over the memory-mapped descriptors, GPU when available "
                        "(default flat). Every type is built, resumed after a kill, grown and shrunk the same way")
    b.add_argument("--factory", default=None, metavar="STRING",
                   help="a FAISS index-factory string (e.g. 'OPQ32,IVF4096_HNSW32,PQ32'), built like --type auto")
    b.add_argument("--max-memory", default="4GB",
                   help="FAISS types: memory budget of the build and of the searched index (default 4GB)")
    b.add_argument("--max-query-ms", type=float, default=10.0,
                   help="auto/factory: latency target per query, used for the choice and the tuning (10)")
    b.add_argument("--in-memory", action="store_true",
                   help="IVF: merge the IVF shards into RAM instead of on-disk inverted lists")
    b.add_argument("--shard-rows", type=int, default=None,
                   help="IVF: rows per shard (default: from --max-memory and --workers)")
    b.add_argument("--workers", type=int, default=1,
                   help="IVF: processes encoding shards in parallel (0: in this process; default 1)")
    b.add_argument("--tune-queries", type=int, default=None,
                   help="held-out rows that tune nprobe/efSearch against exact search (0: no tuning; default "
                        "1000 for auto/factory, 0 for flat/ivfpq/hnsw, which keep --nprobe/--ef-search)")
    b.add_argument("--target-recall", type=float, default=0.95,
                   help="auto/factory: recall@10 that the tuning aims for (0.95)")
    b.add_argument("--nlist", type=int, default=None, help="ivfpq: inverted lists (default ~4 sqrt(N))")
    b.add_argument("--m", type=int, default=None, help="ivfpq: PQ sub-quantizers, must divide D (default D/8)")
    b.add_argument("--nbits", type=int, default=8, help="ivfpq: bits per PQ code (8)")
    b.add_argument("--nprobe", type=int, default=None, help="ivfpq: lists visited per query (16)")
    b.add_argument("--train-size", type=int, default=None,
                   help="ivfpq/auto: training subsample size (default max(64 nlist, 65536), at most N)")
    b.add_argument("--hnsw-m", type=int, default=32, help="hnsw: neighbours per node (32)")
    b.add_argument("--ef-construction", type=int, default=200, help="hnsw: build-time beam (200)")
    b.add_argument("--ef-search", type=int, default=128, help="hnsw: search-time beam (128)")
    b.add_argument("--rerank", type=int, default=0, metavar="R",
                   help="FAISS types: re-rank the top R candidates with the exact descriptors "
                        "(hard-linked into the index directory, read on demand); 0 = off (default)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: FAISS's choice)")
    b.add_argument("--no-progress", action="store_true")
    a = sub.add_parser("add", help="append the images of a store to an index (same model)")
    a.add_argument("index", type=Path, help="index directory")
    a.add_argument("store", type=Path, help="descriptor store (or .npy) with the new images")
    a.add_argument("--workers", type=int, default=1, help="processes encoding shards (0: in this process)")
    a.add_argument("--force", action="store_true", help="add even when the provenance (model/whitening) differs")
    a.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("remove", help="remove images from an index")
    r.add_argument("index", type=Path, help="index directory")
    r.add_argument("--ids", type=Path, required=True, help="text file, one image id per line")
    r.add_argument("--missing-ok", action="store_true", help="ignore ids that are not in the index")
    i = sub.add_parser("info", help="describe an index directory")
    i.add_argument("index", type=Path)


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        return _info(args)
    if args.action == "add":
        return _add(args)
    if args.action == "remove":
        return _remove(args)
    return _build(args)


def _build(args) -> int:
    import time
    import warnings

    from cfcd.index import build_index
    from cfcd.index.generations import read_info

    type_ = "faiss" if args.factory else args.type
    if type_ == "exact":
        params: dict = {}
    else:
        params = dict(max_memory=args.max_memory, max_query_ms=args.max_query_ms, ondisk=not args.in_memory,
                      shard_rows=args.shard_rows, workers=args.workers, threads=args.threads,
                      train_size=args.train_size, seed=args.seed, tune_queries=args.tune_queries,
                      target_recall=args.target_recall, rerank=args.rerank)
    if type_ == "faiss":
        params["factory"] = args.factory
    elif type_ == "ivfpq":
        params.update(nlist=args.nlist, m=args.m, nbits=args.nbits, nprobe=args.nprobe)
    elif type_ == "hnsw":
        params.update(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = build_index(args.store, type_, out=args.out, progress=not args.no_progress, **params)
    for w in caught:
        print(f"warning: {w.message}")
    info = read_info(args.out)
    p = index.params
    if type_ == "exact":
        print(f"built exact index of {len(index)} x {index.dim} in {time.perf_counter() - t0:.1f} s -> {args.out}")
        return 0
    print(f"built {type_} index {p['factory']} ({p['kind']}, {'on-disk lists' if p.get('ondisk') else 'in memory'}) "
          f"of {len(index)} x {index.dim} in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print(f"choice: {info['choice'].get('reason')}; search: {p.get('search') or 'exact'}")
    tuning = info.get("tuning")
    if tuning:
        c = tuning["chosen"]
        rk = "recall@100" if "recall@100" in c else f"recall@{tuning['k']}"
        print(f"tuned on {tuning['queries']} held-out rows: {c['search']} recall@10={c['recall@10']:.3f} "
              f"{rk}={c.get(rk, float('nan')):.3f} {c['ms_per_query']:.2f} ms/query")
    return 0


def _add(args) -> int:
    import time

    from cfcd.index import add

    t0 = time.perf_counter()
    index = add(args.index, args.store, force=args.force, workers=args.workers, progress=not args.no_progress)
    print(f"added {args.store} -> {args.index}: {len(index)} images in {time.perf_counter() - t0:.1f} s")
    return 0


def _remove(args) -> int:
    from cfcd.index import read_id_file, remove

    ids = read_id_file(args.ids)
    index = remove(args.index, ids, missing_ok=args.missing_ok)
    print(f"removed {len(ids)} ids from {args.index}: {len(index)} images remain")
    return 0


def _info(args) -> int:
    import json

    from cfcd.errors import InputError
    from cfcd.index.generations import read_info

    info = read_info(args.index)
    if info is None:
        raise InputError(f"{args.index}: not an index directory (no index.json)")
    print(json.dumps({k: v for k, v in info.items() if k not in ("source", "tuning")}, indent=2))
    if info.get("tuning"):
        t = info["tuning"]
        print(f"tuning ({t['queries']} held-out rows): chosen {json.dumps(t['chosen'])}")
    src = info.get("source", {})
    print(f"source: {src.get('path')} (model: {src.get('meta', {}).get('model')})")
    return 0
