"""Search latency, memory and recall on a generated 1M x 512 clustered database.

Paths compared in one run, on the same queries:
  * exact, chunked torch matmul + running top-k (cfcd.index.exact_search)      [the default path]
  * exact, plain NumPy reference: full nq x N score matrix + argpartition         [reference]
  * FAISS IndexFlatIP (exact)
  * FAISS IVF-PQ (trained on a subsample, the standard practice), recall@k against exact, per nprobe
  * optionally HNSW (--hnsw)

The data is clustered with a decaying variance spectrum (like real global descriptors), not
uniform noise, so that recall is meaningful. Memory is the peak RSS of each stage (VmHWM after
resetting it through /proc/self/clear_refs), on top of the database already in memory.

    .venv/bin/python benchmarks/search.py                        # 1M x 512, 1000 queries
    .venv/bin/python benchmarks/search.py --n 100000 --nq 200    # quick
    .venv/bin/python benchmarks/search.py --mode store --n 200000 --dim 2048   # store write/finalize
    .venv/bin/python benchmarks/search.py --mode postprocess --n 100000 --nq 70  # alpha-QE / DBA
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cfcd.index import build_index, exact_search, recall_at_k  # noqa: E402


def generate(n: int, d: int, clusters: int, seed: int, noise: float = 0.4, block: int = 100_000) -> np.ndarray:
    """Clustered, L2-normalised float32 rows with a decaying per-dimension spectrum."""
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(1.0 + np.arange(d) / 16.0)).astype(np.float32)
    centers = rng.standard_normal((clusters, d), dtype=np.float32) * scale
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        labels = rng.integers(0, clusters, m)
        x = centers[labels] + noise * rng.standard_normal((m, d), dtype=np.float32) * scale
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def generate_queries(nq: int, d: int, clusters: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    scale = (1.0 / np.sqrt(1.0 + np.arange(d) / 16.0)).astype(np.float32)
    centers = rng.standard_normal((clusters, d), dtype=np.float32) * scale  # the same centres as generate()
    rng = np.random.default_rng(1)
    x = centers[rng.integers(0, clusters, nq)] + noise * rng.standard_normal((nq, d), dtype=np.float32) * scale
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stage:
    """Time a stage and its extra peak memory.

    ``extra_peak_mb``: peak RSS above the start (VmHWM); it includes file pages touched through a
    memory map, which are page cache, not allocations. With ``heap=True`` the peak of NumPy/Python
    heap allocations (tracemalloc, which NumPy reports to) is recorded too: that is the memory a
    streaming (memory-mapped) path really needs.
    """

    def __init__(self, name: str, results: dict, heap: bool = False):
        self.name, self.results, self.heap = name, results, heap

    def __enter__(self):
        import tracemalloc

        _reset_peak()
        self.base = _rss_mb()
        if self.heap:
            tracemalloc.start()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import tracemalloc

        dt = time.perf_counter() - self.t
        extra = max(0.0, _peak_mb() - self.base)
        entry = {"seconds": round(dt, 3), "extra_peak_mb": round(extra, 1)}
        text = f"{self.name:<48} {dt:9.3f} s   +{extra:8.1f} MB peak RSS"
        if self.heap:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            entry["heap_peak_mb"] = round(peak / 2**20, 1)
            text += f"   heap peak {entry['heap_peak_mb']:8.1f} MB"
        self.results[self.name] = entry
        print(text, flush=True)


def store_benchmark(args) -> int:
    """Write N x D through StoreWriter (2 parts, shuffled order), finalize, load: time and peak RSS.

    finalize_store streams shard by shard into a memory map: its extra peak memory must stay far
    below the store size (the naive path, np.concatenate of every shard, needs it twice).
    """
    import shutil
    import tempfile

    from cfcd.store import StoreWriter, finalize_store, load_descriptors

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    root = Path(tempfile.mkdtemp(prefix="cfcd-store-bench-", dir=args.tmp))
    n, d = args.n, args.dim
    ids = [f"img/{i:07d}.jpg" for i in range(n)]
    rng = np.random.default_rng(0)
    block = 20000
    try:
        with Stage(f"generate + StoreWriter append {n} x {d} ({args.dtype}, 2 parts)", results, heap=True):
            writers = [StoreWriter(root / "s", dim=d, dtype=args.dtype, part=f"rank{r}", shard_size=8192)
                       for r in range(2)]
            for s in range(0, n, block):
                x = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                rows = np.arange(s, s + len(x))
                for r, w in enumerate(writers):
                    sel = rows % 2 == r
                    w.append([ids[i] for i in rows[sel]], x[sel])
            for w in writers:
                w.flush()
            del x
        with Stage("done_ids (resume scan of every part)", results, heap=True):
            done = writers[0].done_ids()
        assert len(done) == n
        with Stage("finalize_store (memmap streaming, list order)", results, heap=True):
            store = finalize_store(root / "s", order=ids)
        size_mb = store.descriptors.nbytes / 2**20
        del store
        with Stage("load_descriptors (validate, memmap kept)", results, heap=True):
            st = load_descriptors(root / "s", expected_ids=ids, dtype=None)
        del st
        results["store_mb"] = round(size_mb, 1)
        fin = results["finalize_store (memmap streaming, list order)"]
        print(f"store size {size_mb:.0f} MB; finalize heap peak {fin['heap_peak_mb']:.0f} MB "
              f"(RSS peak +{fin['extra_peak_mb']:.0f} MB is mostly the page cache of the memory map)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def _dirtorch_expand(descs, db=None, alpha=0, k=0):
    """deep-image-retrieval expand_descriptors, verbatim logic (full similarity matrix, Python loop)."""
    n = descs.shape[0]
    db_descs = db if db is not None else descs
    sim = descs @ db_descs.T
    if db is None:
        sim[np.diag_indices(n)] = 0
    idx = np.argpartition(sim, int(-k), axis=1)[:, int(-k):]
    out = np.zeros_like(descs)
    for i in range(n):
        new_q = np.vstack([db_descs[j, :] * sim[i, j] ** alpha for j in idx[i]])
        new_q = np.mean(np.vstack([descs[i], new_q]), axis=0)
        out[i] = new_q / np.linalg.norm(new_q)
    return out


def postprocess_benchmark(args) -> int:
    """alpha-QE and alpha-DBA: cfcd (chunked top-k, vectorised) vs dirtorch's loop, same inputs."""
    from cfcd.postprocess import alpha_query_expansion, database_augmentation

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    clusters = args.clusters or max(1, args.n // 100)
    db = generate(args.n, args.dim, clusters, seed=0, noise=args.noise)
    q = generate_queries(args.nq, args.dim, clusters, args.noise)
    k, alpha = 10, 3
    alpha_query_expansion(q[:2], db[:100], 2, alpha, device=args.device)  # warm-up: torch import, threads
    with Stage(f"dirtorch alpha-QE ({args.nq} q, N={args.n})", results):
        ref = _dirtorch_expand(q, db, alpha, k)
    with Stage(f"cfcd alpha-QE ({args.nq} q, N={args.n})", results):
        got = alpha_query_expansion(q, db, k, alpha, device=args.device)
    print(f"  max |diff| {np.abs(got - ref).max():.2e}")
    n_dba = min(args.n, args.n_dba)
    sub = np.ascontiguousarray(db[:n_dba])
    with Stage(f"dirtorch alpha-DBA (N={n_dba})", results):
        ref = _dirtorch_expand(sub, None, alpha, k)
    with Stage(f"cfcd alpha-DBA (N={n_dba})", results):
        got = database_augmentation(sub, k, alpha, device=args.device)
    print(f"  max |diff| {np.abs(got - ref).max():.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("search", "store", "postprocess"), default="search",
                    help="search: latency/recall (default); store: StoreWriter/finalize memory and time; "
                         "postprocess: alpha-QE/DBA against dirtorch's loop")
    ap.add_argument("--n-dba", type=int, default=10000, help="postprocess mode: database size for DBA")
    ap.add_argument("--dtype", default="float32", help="store mode: float32 or float16")
    ap.add_argument("--tmp", default=None, help="store mode: directory for the temporary store")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--nq-ref", type=int, default=100, help="queries for the NumPy full-matrix reference")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--clusters", type=int, default=None, help="default N/100 (~100 images per landmark)")
    ap.add_argument("--noise", type=float, default=0.4, help="within-cluster spread relative to the centres")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--train-size", type=int, default=65536)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rerank", type=int, default=1000, help="candidates re-ranked exactly")
    ap.add_argument("--hnsw", action="store_true", help="also build HNSW (slow at 1M on 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.mode == "store":
        return store_benchmark(args)
    if args.mode == "postprocess":
        return postprocess_benchmark(args)

    import faiss
    import torch

    print(f"torch {torch.__version__} threads={torch.get_num_threads()}, faiss {faiss.__version__} "
          f"threads={faiss.omp_get_max_threads()}, cpus={os.cpu_count()}", flush=True)
    results: dict = {"args": vars(args) | {"json": str(args.json) if args.json else None}}
    t = time.perf_counter()
    clusters = args.clusters or max(1, args.n // 100)
    db = generate(args.n, args.dim, clusters, seed=0, noise=args.noise)
    # queries: fresh samples of the same clusters (same centres, seed 1 for the noise)
    q = generate_queries(args.nq, args.dim, clusters, args.noise)
    print(f"generated {args.n} x {args.dim} ({db.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s", flush=True)

    nq_ref = min(args.nq_ref, args.nq)
    with Stage(f"numpy reference full matrix ({nq_ref} q)", results):
        s = q[:nq_ref] @ db.T
        part = np.argpartition(-s, args.k, axis=1)[:, : args.k]
        ref_idx = np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, 1), axis=1), 1)
        del s
    with Stage(f"exact chunked torch ({nq_ref} q)", results):
        small = exact_search(q[:nq_ref], db, args.k, device=args.device)
    agree = recall_at_k(small.indices, ref_idx)
    print(f"  exact chunked vs numpy reference: top-{args.k} overlap {agree:.5f}")
    results["exact_vs_reference_overlap"] = agree
    with Stage(f"exact chunked torch ({args.nq} q)", results):
        exact = exact_search(q, db, args.k, device=args.device)

    with Stage("faiss flat build", results):
        flat = build_index(db, "flat", threads=os.cpu_count())
    with Stage(f"faiss flat search ({args.nq} q)", results):
        rf = flat.search(q, args.k)
    results["flat_recall"] = recall_at_k(rf.indices, exact.indices)
    print(f"  flat recall@{args.k} vs exact: {results['flat_recall']:.5f}")
    del flat

    with Stage(f"ivfpq build (train {args.train_size}, nlist {args.nlist}, m {args.m})", results):
        ivf = build_index(db, "ivfpq", nlist=args.nlist, m=args.m, nbits=8, train_size=args.train_size,
                          threads=os.cpu_count())
    results["ivfpq"] = {}
    for nprobe in args.nprobe:
        with Stage(f"ivfpq search nprobe={nprobe} ({args.nq} q)", results):
            r = ivf.search(q, args.k, nprobe=nprobe)
        rec = recall_at_k(r.indices, exact.indices)
        rec10 = recall_at_k(r.indices[:, :10], exact.indices[:, :10])
        results["ivfpq"][nprobe] = {"recall@k": rec, "recall@10": rec10,
                                    "ms_per_query": 1000 * results[f"ivfpq search nprobe={nprobe} ({args.nq} q)"]["seconds"] / args.nq}
        print(f"  nprobe={nprobe}: recall@{args.k} {rec:.4f}, recall@10 {rec10:.4f}")
    ivf.vectors, ivf.params["rerank"] = db, args.rerank  # as built with --rerank from a store
    for nprobe in args.nprobe[-2:]:
        name = f"ivfpq+rerank {args.rerank} nprobe={nprobe} ({args.nq} q)"
        with Stage(name, results):
            r = ivf.search(q, args.k, nprobe=nprobe)
        rec = recall_at_k(r.indices, exact.indices)
        rec10 = recall_at_k(r.indices[:, :10], exact.indices[:, :10])
        results["ivfpq"][f"{nprobe}+rerank"] = {"recall@k": rec, "recall@10": rec10,
                                                "ms_per_query": 1000 * results[name]["seconds"] / args.nq}
        print(f"  nprobe={nprobe} + rerank {args.rerank}: recall@{args.k} {rec:.4f}, recall@10 {rec10:.4f}")
    results["ivfpq_code_bytes_per_vector"] = args.m
    if args.hnsw:
        with Stage("hnsw build (M=32)", results):
            hn = build_index(db, "hnsw", hnsw_m=32, threads=os.cpu_count())
        with Stage(f"hnsw search ef=128 ({args.nq} q)", results):
            r = hn.search(q, args.k)
        results["hnsw_recall"] = recall_at_k(r.indices, exact.indices)
        print(f"  hnsw recall@{args.k}: {results['hnsw_recall']:.4f}")

    ex = results[f"exact chunked torch ({nq_ref} q)"]
    rf_ = results[f"numpy reference full matrix ({nq_ref} q)"]
    print(f"\nexact chunked vs numpy reference: {rf_['seconds'] / ex['seconds']:.2f}x time, "
          f"peak +{ex['extra_peak_mb']:.0f} MB vs +{rf_['extra_peak_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
