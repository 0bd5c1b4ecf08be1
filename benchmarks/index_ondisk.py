"""A collection past one machine's memory: shard-by-shard build, on-disk search, in-memory comparison.

Stages (each in its own child process, so that its peak RSS is its own; ``ru_maxrss`` of the
process and of its worker children, and VmHWM / RssAnon / RssFile from /proc):

  gen      a synthetic clustered N x D float16 store written in blocks (never all in RAM)
  build    ``cfcd.index.build(--type auto --max-memory M)``: trains on a sample, encodes each
           shard in a worker process, merges into on-disk inverted lists, tunes nprobe on
           held-out rows against exact search (recorded in index.json)
  truth    exact top-100 of Q fresh queries (same distribution, not in the store), block reads
  ondisk   open the index (lists memory-mapped) and search: recall@10/@100, latency per query
  memory   the same index with its lists copied into RAM (ArrayInvertedLists): the comparison

    nice -n 10 .venv/bin/python benchmarks/index_ondisk.py --n 5000000 --dim 512 --max-memory 4GB \\
        --work /tmp/cfcd-index-bench --json benchmarks/index_ondisk_5m.json
    .venv/bin/python benchmarks/index_ondisk.py --n 200000 --dim 128 --max-memory 256MB   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _Sampler:
    """Peak anonymous and file-backed resident memory of this process, sampled every 50 ms
    (VmHWM mixes both: file pages of memory-mapped shards and lists are page cache the kernel can
    drop, anonymous pages must fit in RAM)."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            st = _proc_status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], st.get(k, 0))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {f"peak_{k}": v for k, v in self.peak.items()}


_SAMPLER = None


def _report(result: dict) -> None:
    if _SAMPLER is not None:
        result.update(_SAMPLER.stop())
    result["ru_maxrss_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["ru_maxrss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result.update(_proc_status())
    print("RESULT " + json.dumps(result), flush=True)


def _centers(d: int, clusters: int, seed: int):
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(1.0 + np.arange(d) / 16.0)).astype(np.float32)
    return rng.standard_normal((clusters, d), dtype=np.float32) * scale, scale


def _rows(rng, centers, scale, m, noise):
    x = centers[rng.integers(0, len(centers), m)] + noise * rng.standard_normal((m, centers.shape[1]), dtype=np.float32) * scale
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stage_gen(a) -> None:
    """Write STORE/descriptors.npy (float16) block by block through a plain file, then ids and meta."""
    from cfcd.store import DESCRIPTORS_FILE, IDS_FILE, META_FILE, STORE_FORMAT, STORE_VERSION
    from cfcd.utils.io import atomic_write_json

    store = Path(a.work) / "store"
    store.mkdir(parents=True, exist_ok=True)
    if (store / META_FILE).is_file():
        _report({"stage": "gen", "skipped": True})
        return
    t0 = time.perf_counter()
    centers, scale = _centers(a.dim, a.clusters, 0)
    rng = np.random.default_rng(1)
    tmp = store / ".descriptors.npy.tmp"
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (a.n, a.dim)})
        for s in range(0, a.n, 100_000):
            f.write(_rows(rng, centers, scale, min(100_000, a.n - s), a.noise).astype(np.float16).tobytes())
    os.replace(tmp, store / DESCRIPTORS_FILE)
    with open(store / IDS_FILE, "w", encoding="utf-8") as f:
        for s in range(0, a.n, 1_000_000):
            f.write("".join(f"img/{i:09d}.jpg\n" for i in range(s, min(s + 1_000_000, a.n))))
    atomic_write_json(store / META_FILE, {
        "format": STORE_FORMAT, "version": STORE_VERSION, "count": a.n, "dim": a.dim, "dtype": "float16",
        "failures": [], "model": "synthetic-clustered", "cfcd_version": "bench", "created": "bench"})
    _report({"stage": "gen", "seconds": time.perf_counter() - t0, "bytes": (store / DESCRIPTORS_FILE).stat().st_size})


def stage_build(a) -> None:
    from cfcd.index import build

    t0 = time.perf_counter()
    index = build(Path(a.work) / "store", Path(a.work) / "index", max_memory=a.max_memory,
                  max_query_ms=a.max_query_ms, workers=a.workers, tune_queries=a.nq, rerank=a.rerank,
                  progress=False)
    info = json.loads((Path(a.work) / "index" / "index.json").read_text())
    files = [p for p in (Path(a.work) / "index").iterdir() if p.is_file()]
    rows = set((info.get("files") or {}).get("vectors") or [])  # hard links to the store, for re-ranking
    disk = sum(p.stat().st_size for p in files if p.name not in rows)
    _report({"stage": "build", "seconds": time.perf_counter() - t0, "factory": index.params["factory"],
             "build": info["build"], "tuning": info.get("tuning"), "index_bytes_on_disk": disk,
             "rerank_rows_bytes": sum(p.stat().st_size for p in files if p.name in rows),
             "shard_rows": index.params["shard_rows"]})


def stage_truth(a) -> None:
    from cfcd.index.rows import RowReader
    from cfcd.index.tune import exact_topk

    t0 = time.perf_counter()
    centers, scale = _centers(a.dim, a.clusters, 0)
    q = _rows(np.random.default_rng(2), centers, scale, a.nq, a.noise).astype(np.float16).astype(np.float32)
    reader = RowReader(Path(a.work) / "store" / "descriptors.npy")
    truth = exact_topk(q, reader, 100)
    np.save(Path(a.work) / "queries.npy", q)
    np.save(Path(a.work) / "truth.npy", truth)
    _report({"stage": "truth", "seconds": time.perf_counter() - t0})


def _search_stage(a, in_memory: bool) -> None:
    import faiss

    from cfcd.index.tune import _recall
    from cfcd.index import open_index

    q = np.load(Path(a.work) / "queries.npy")
    truth = np.load(Path(a.work) / "truth.npy")
    t0 = time.perf_counter()
    index = open_index(Path(a.work) / "index")
    if in_memory:
        ivf = faiss.extract_index_ivf(index.index)
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        for li in range(ivf.nlist):  # copy list by list (merge_from would empty the on-disk source)
            n = ivf.invlists.list_size(li)
            if n:
                lists.add_entries(li, n, ivf.invlists.get_ids(li), ivf.invlists.get_codes(li))
        ivf.replace_invlists(lists, True)
        lists.this.disown()
    t_open = time.perf_counter() - t0
    tuned = int(index.params["search"].get("nprobe", 0)) or None
    nprobes = [tuned] + ([4 * tuned] if tuned else [])
    reranks = [0] + ([a.rerank] if a.rerank and index.vectors is not None else [])
    points = []
    for nprobe, rerank in [(p, r) for r in reranks for p in nprobes]:
        t0 = time.perf_counter()
        res = index.search(q, 100, nprobe=nprobe, rerank=rerank)
        t_batch = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(q)):
            index.search(q[i : i + 1], 100, nprobe=nprobe, rerank=rerank)
        t_single = time.perf_counter() - t0
        points.append({"nprobe": nprobe, "rerank": rerank, "recall@10": _recall(res.indices, truth, 10),
                       "recall@100": _recall(res.indices, truth, 100),
                       "batch_ms_per_query": 1000 * t_batch / len(q), "single_ms_per_query": 1000 * t_single / len(q)})
    _report({"stage": "memory" if in_memory else "ondisk", "open_s": t_open, "points": points,
             **points[-1], "threads": faiss.omp_get_max_threads()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=20_000)
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--max-memory", default="4GB")
    p.add_argument("--max-query-ms", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rerank", type=int, default=0, help="exact re-ranking of R candidates (0: off)")
    p.add_argument("--work", default="/tmp/cfcd-index-bench")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stages", default="gen,build,truth,ondisk,memory")
    a = p.parse_args()
    if a.stage:
        global _SAMPLER
        _SAMPLER = _Sampler()
        {"gen": stage_gen, "build": stage_build, "truth": stage_truth,
         "ondisk": lambda a: _search_stage(a, False), "memory": lambda a: _search_stage(a, True)}[a.stage](a)
        return
    results = {"args": {k: v for k, v in vars(a).items() if k not in ("stage", "json")}, "stages": {}}
    base = [sys.executable, __file__] + [x for x in sys.argv[1:]]
    for stage in a.stages.split(","):
        t0 = time.perf_counter()
        proc = subprocess.run(base + ["--stage", stage], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:])
            raise SystemExit(f"stage {stage} failed (rc {proc.returncode})")
        r = json.loads(line[-1][7:])
        r["wall_s"] = time.perf_counter() - t0
        results["stages"][stage] = r
        gb = lambda b: f"{(b or 0) / 2**30:.2f} GB"  # noqa: E731
        print(f"{stage}: {r['wall_s']:.0f} s, peak RSS {gb(r['VmHWM'])} (peak anon {gb(r.get('peak_RssAnon'))}, "
              f"peak file-backed {gb(r.get('peak_RssFile'))}), "
              f"largest worker {gb(r['ru_maxrss_children'])}"
              + (f", recall@10 {r['recall@10']:.3f} recall@100 {r['recall@100']:.3f}, "
                 f"{r['single_ms_per_query']:.2f} ms/query single, {r['batch_ms_per_query']:.3f} batch"
                 if "recall@10" in r else ""), flush=True)
        if a.json:
            a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
