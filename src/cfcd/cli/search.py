"""``cfcd search``: top-k of queries in an index (or directly in a store, exact).

The queries are descriptors (a store or an N x D ``.npy``) or photos (an image file, a folder of
images, or a text list of image paths): photos are described with the index's own model and
extraction settings, read from the meta of the store the index was built from.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=Path,
                        help="index directory from 'cfcd index build', or a descriptor store (exact search)")
    parser.add_argument("--queries", type=Path, required=True,
                        help="query descriptor store or .npy (N x D), or photos: an image file, a folder of images "
                             "or a text list of image paths (described with the index's model and settings)")
    parser.add_argument("--whiten", default=None, metavar="FILE",
                        help="photo queries on a whitened index: the whitening file that made it")
    parser.add_argument("--k", type=int, default=100, help="results per query (100)")
    parser.add_argument("--json", type=Path, default=None, help="write every result (ids and scores) to this JSON")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF indexes (ivfpq, auto/factory IVF): override the index's nprobe")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW indexes: override efSearch")
    parser.add_argument("--rerank", type=int, default=None, metavar="R",
                        help="ivfpq/hnsw: re-rank R candidates exactly (0 = off; default: the index's setting)")
    parser.add_argument("--device", default="auto", help="exact search device: auto (GPU if any), cpu, cuda:0")
    parser.add_argument("--show", type=int, default=5, metavar="N", help="print the first N queries (5)")
    parser.add_argument("--show-k", type=int, default=5, metavar="K", help="print the top K of each (5)")
    parser.add_argument("--force", action="store_true",
                        help="search even when query and index provenance (model/whitening) differ")


def run(args: argparse.Namespace) -> int:
    import time

    from cfcd.errors import InputError
    from cfcd.store import load_descriptors
    from cfcd.index import check_compatible, open_index
    from cfcd.utils.io import atomic_write_json

    if args.k <= 0:
        raise InputError(f"--k must be positive, got {args.k}")
    index = open_index(args.index)
    if is_descriptor_path(args.queries):
        queries = load_descriptors(args.queries, expected_dim=None, role="query descriptors", dtype=None)
    else:
        queries = describe_photos(index, args)
    if queries.dim != index.dim:
        raise InputError(f"{queries.path}: queries are {queries.dim}-D but the index {args.index} holds "
                         f"{index.dim}-D descriptors (different model or whitening?)")
    if not args.force:
        check_compatible(index, queries)
    t0 = time.perf_counter()
    result = index.search(queries, args.k, nprobe=args.nprobe, ef_search=args.ef_search, device=args.device,
                          rerank=args.rerank)
    elapsed = time.perf_counter() - t0
    nq = len(queries)
    print(f"{nq} queries, top {result.indices.shape[1]} of {len(index)} ({index.type}) in {elapsed:.3f} s "
          f"({1000 * elapsed / max(nq, 1):.2f} ms/query)")
    width = 28
    for qi in range(min(args.show, nq)):
        qid = queries.ids[qi] if queries.ids is not None else f"#{qi}"
        print(f"{qid}")
        for rank, (j, s) in enumerate(zip(result.indices[qi, : args.show_k], result.scores[qi, : args.show_k]), 1):
            if j < 0:
                break
            name = index.ids[j] if index.ids is not None else f"#{j}"
            print(f"  {rank:>3}  {s:8.4f}  {name[:width] if len(name) <= width else '...' + name[-(width - 3):]}")
    if nq > args.show:
        print(f"... {nq - args.show} more queries" + ("" if args.json else " (use --json for all results)"))
    if args.json:
        payload = result.to_json()
        payload.update(index=str(args.index), index_type=index.type, queries_path=str(args.queries))
        atomic_write_json(args.json, payload)
        print(f"results written to {args.json}")
    return 0


def is_descriptor_path(path: Path) -> bool:
    """A store directory (``meta.json`` or ``descriptors.npy`` in it) or an ``.npy`` file; else photos."""
    from cfcd.store import DESCRIPTORS_FILE, META_FILE

    if path.is_dir():
        return (path / META_FILE).is_file() or (path / DESCRIPTORS_FILE).is_file()
    return path.suffix.lower() == ".npy"


def describe_photos(index, args):
    """The query photos (a file, a folder or a list) described like the index's source store."""
    from cfcd.data.lists import IMAGE_EXTENSIONS, ImageList, read_image_list
    from cfcd.errors import InputError
    from cfcd.extract.describer import describer_for

    path = args.queries
    if not path.exists():
        raise InputError(f"{path}: no such query store, photo, folder or image list")
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        photos = ImageList(ids=[path.stem], paths=[path], source=str(path))
    else:  # ids as `cfcd extract --images` gives them (the relative path without its extension)
        photos = read_image_list(path)
    meta = (index.source or {}).get("meta") or {}
    where = f"index {args.index}"
    if not meta:
        raise InputError(f"{where}: records no source store meta, so photos cannot be described like its "
                         "descriptors; extract the queries with 'cfcd extract' and pass the store")
    from cfcd.runtime import resolve_device

    describer = describer_for(meta, whiten=args.whiten, device=str(resolve_device(args.device)), where=where)
    print(f"describing {len(photos)} photo(s) with {describer.header()}")
    queries, failures = describer.describe(photos)
    for image_id, reason in failures:
        print(f"  failed  {image_id}: {reason}")
    if not len(queries):
        raise InputError(f"{path}: none of the {len(photos)} photo(s) could be read")
    return queries
