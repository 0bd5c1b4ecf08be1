"""``cfcd index build``: an exact or FAISS index (flat, IVF-PQ, HNSW) from a descriptor store."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{build,info}", required=True)
    b = sub.add_parser("build", help="build an index from a descriptor store and save it to a directory")
    b.add_argument("store", type=Path, help="descriptor store directory (or .npy, then without ids)")
    b.add_argument("--out", type=Path, required=True, help="index directory to write")
    b.add_argument("--type", choices=("flat", "ivfpq", "hnsw", "exact"), default="flat",
                   help="flat: exact FAISS inner product; ivfpq: compressed inverted file; hnsw: graph; "
                        "exact: chunked torch matmul over the memory-mapped descriptors, GPU when available "
                        "(default flat)")
    b.add_argument("--nlist", type=int, default=None, help="ivfpq: inverted lists (default ~4 sqrt(N))")
    b.add_argument("--m", type=int, default=None, help="ivfpq: PQ sub-quantizers, must divide D (default D/8)")
    b.add_argument("--nbits", type=int, default=8, help="ivfpq: bits per PQ code (8)")
    b.add_argument("--nprobe", type=int, default=None, help="ivfpq: lists visited per query (16)")
    b.add_argument("--train-size", type=int, default=None,
                   help="ivfpq: training subsample size (default max(64 nlist, 65536), at most N)")
    b.add_argument("--hnsw-m", type=int, default=32, help="hnsw: neighbours per node (32)")
    b.add_argument("--ef-construction", type=int, default=200, help="hnsw: build-time beam (200)")
    b.add_argument("--ef-search", type=int, default=128, help="hnsw: search-time beam (128)")
    b.add_argument("--rerank", type=int, default=0, metavar="R",
                   help="ivfpq/hnsw: re-rank the top R candidates with the exact descriptors (memory-mapped, "
                        "hard-linked into the index directory); 0 = off (default)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: FAISS's choice)")
    b.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("info", help="describe an index directory")
    i.add_argument("index", type=Path)


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        return _info(args)
    import time
    import warnings

    from cfcd.search import build_index

    params = {}
    if args.type == "ivfpq":
        params = dict(nlist=args.nlist, m=args.m, nbits=args.nbits, nprobe=args.nprobe,
                      train_size=args.train_size, seed=args.seed)
    elif args.type == "hnsw":
        params = dict(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search)
    if args.rerank and args.type in ("ivfpq", "hnsw"):
        params["rerank"] = args.rerank
    if args.threads:
        params["threads"] = args.threads
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = build_index(args.store, args.type, out=args.out, progress=not args.no_progress, **params)
    for w in caught:
        print(f"warning: {w.message}")
    print(f"built {args.type} index of {len(index)} x {index.dim} in {time.perf_counter() - t0:.1f} s -> {args.out}")
    if index.params:
        print("params: " + ", ".join(f"{k}={v}" for k, v in index.params.items()))
    return 0


def _info(args) -> int:
    import json

    from cfcd.errors import InputError

    meta = args.index / "index.json"
    if not meta.is_file():
        raise InputError(f"{args.index}: not an index directory (no index.json)")
    info = json.loads(meta.read_text(encoding="utf-8"))
    print(json.dumps({k: v for k, v in info.items() if k != "source"}, indent=2))
    src = info.get("source", {})
    print(f"source: {src.get('path')} (model: {src.get('meta', {}).get('model')})")
    return 0
