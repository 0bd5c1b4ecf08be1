"""Which FAISS index: the budgeted choice (:func:`choose_index`), size estimates, and the presets
``flat``, ``ivfpq``, ``hnsw`` as index-factory strings (:func:`preset`)."""

from __future__ import annotations

import math
import re
import warnings

from cfcd.errors import InputError

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """``"4GB"``, ``"512M"``, ``"1.5GiB"`` or a number of bytes -> bytes (powers of 1024)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InputError(f"cannot read the size {text!r} (examples: 4GB, 512MB, 1.5GiB)")
    unit = (m.group(2) or "b").lower()[:1]
    scale = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(m.group(1)) * scale)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TB"


def _pow2(x: float) -> int:
    return int(2 ** round(math.log2(max(1.0, x))))


def _nlist_for(n: int) -> int:
    # the FAISS guideline (~4 sqrt(N) lists), a power of two, and >= 39 training points per list
    return max(1, min(_pow2(4 * math.sqrt(n)), _pow2(n / 39.0) if n >= 39 else 1, 1 << 16))


def estimate_index_bytes(kind: str, n: int, d: int, *, nlist: int = 0, m: int = 0, hnsw_m: int = 32) -> int:
    """Bytes of an index of ``n`` x ``d`` (lists, codes, ids, centroids, codebooks, graph links)."""
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        return int(n * (d * 4 + hnsw_m * 2 * 4 * 1.1 + 16))
    centroids = nlist * d * 4 + (nlist * 32 * 2 * 4 if nlist >= 4096 else 0)
    code = {"ivf-flat": d * 4, "ivf-sq8": d, "ivf-pq": m, "opq-ivf-pq": m}[kind]
    extra = d * d * 4 if kind == "opq-ivf-pq" else (256 * d * 4 if kind in ("ivf-pq",) else 2 * d * 4)
    return int(n * (code + 8) + centroids + extra + (64 << 10))


def choose_index(n: int, d: int, *, max_memory, max_query_ms: float = 10.0) -> dict:
    """The index for ``n`` x ``d`` descriptors under ``max_memory`` bytes and ``max_query_ms``.

    The same reasoning as autofaiss's, done with FAISS alone (see the README for why):

    1. **Flat** (exact) when the float32 rows fit and brute force is estimated under the latency
       target (about 5e6 multiply-adds per millisecond on one core).
    2. **HNSW32** up to 1M rows when the rows and the graph fit (built in memory, not sharded).
    3. **IVF** with ~4 sqrt(N) lists (an HNSW coarse quantizer from 4096 lists, so that adding
       does not cost N x nlist dot products), and the largest codes whose index takes at most
       a third of the budget (the merge maps the shards and writes the merged lists: twice the
       index; the search maps the lists it visits): Flat, SQ8, then PQ with D/4 ... 8 bytes, with
       an OPQ rotation once a sub-quantizer spans 16 dimensions or more.
    """
    budget = parse_size(max_memory)
    n, d = int(n), int(d)
    if n <= 0 or d <= 0:
        raise InputError(f"cannot choose an index for {n} x {d} descriptors")
    flat = estimate_index_bytes("flat", n, d)
    flat_ms = n * d / 5e6
    if flat <= budget and (flat_ms <= max_query_ms or n < 2048):
        return {"kind": "flat", "factory": "Flat", "bytes": flat,
                "reason": f"the float32 rows fit ({_fmt_bytes(flat)}) and brute force takes ~{flat_ms:.2g} ms"}
    hnsw = estimate_index_bytes("hnsw", n, d)
    if n <= 1_000_000 and hnsw <= budget:
        return {"kind": "hnsw", "factory": "HNSW32,Flat", "bytes": hnsw,
                "reason": f"rows and graph fit ({_fmt_bytes(hnsw)}); brute force would take ~{flat_ms:.2g} ms"}
    nlist = _nlist_for(n)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 4096 else f"IVF{nlist}"
    candidates = [("ivf-flat", f"{coarse},Flat", 0), ("ivf-sq8", f"{coarse},SQ8", 0)]
    for m in sorted({d // 4, d // 8, d // 16, d // 32, 8}, reverse=True):
        if m >= 8 and d % m == 0 and m <= d:
            kind = "opq-ivf-pq" if d // m >= 16 else "ivf-pq"
            factory = f"OPQ{m},{coarse},PQ{m}" if kind == "opq-ivf-pq" else f"{coarse},PQ{m}"
            candidates.append((kind, factory, m))
    for kind, factory, m in candidates:
        size = estimate_index_bytes(kind, n, d, nlist=nlist, m=m)
        if 3 * size <= budget:
            return {"kind": kind, "factory": factory, "nlist": nlist, "m": m or None, "bytes": size,
                    "reason": f"{kind} index of {_fmt_bytes(size)} is at most a third of the budget of "
                              f"{_fmt_bytes(budget)}"}
    smallest = estimate_index_bytes(candidates[-1][0], n, d, nlist=nlist, m=candidates[-1][2])
    raise InputError(
        f"no index of {n} x {d} descriptors fits in {_fmt_bytes(budget)}: the smallest ({candidates[-1][1]}) "
        f"takes {_fmt_bytes(smallest)} and needs three times that; raise --max-memory or pass --factory"
    )


def kind_of(factory: str) -> str:
    f = factory.replace(" ", "")
    if "IVF" in f:
        if "OPQ" in f:
            return "opq-ivf-pq"
        if re.search(r",PQ\d", f):
            return "ivf-pq"
        if "SQ" in f:
            return "ivf-sq8" if "SQ8" in f else "ivf-sq"
        return "ivf-flat" if f.endswith(",Flat") else "ivf"
    if f.startswith("HNSW"):
        return "hnsw"
    return "flat" if f == "Flat" else "other"


def default_nlist(n: int) -> int:
    # the FAISS guideline: ~4 sqrt(N) lists, rounded to a power of two, at least 1
    return _pow2(4 * math.sqrt(n))


def default_pq_m(d: int) -> int:
    # 8-bit codes of 8 dimensions each (64 bytes for 512-D), and a divisor of d
    for m in (d // 8, d // 4, d // 16, d // 2, d):
        if m >= 1 and d % m == 0 and m <= 128:
            return m
    return 1


PRESETS = ("flat", "ivfpq", "hnsw")


def preset(type: str, n: int, d: int, params: dict) -> dict:
    """The index-factory string, search settings and build settings of a preset type.

    ``flat``: ``Flat``. ``hnsw``: ``HNSW{hnsw_m},Flat`` (``hnsw_m`` 32, ``ef_construction`` 200,
    ``ef_search`` 128). ``ivfpq``: ``IVF{nlist},PQ{m}x{nbits}`` (``nlist`` ~4 sqrt(N), reduced with a
    warning below 39 vectors per list; ``m`` D/8, must divide D; ``nbits`` 8; ``nprobe`` 16).
    """
    if type == "flat":
        return {"factory": "Flat", "search": {}, "build": {}}
    if type == "hnsw":
        hnsw_m = int(params.get("hnsw_m") or 32)
        return {"factory": f"HNSW{hnsw_m},Flat", "search": {"efSearch": int(params.get("ef_search") or 128)},
                "build": {"efConstruction": int(params.get("ef_construction") or 200)}}
    if type != "ivfpq":
        raise InputError(f"unknown index preset {type!r}; choose from {', '.join(PRESETS)}")
    m = int(params.get("m") or default_pq_m(d))
    nbits = int(params.get("nbits") or 8)
    if d % m:
        raise InputError(f"IVF-PQ: the dimension {d} must be divisible by the number of sub-quantizers m={m}")
    if n < (1 << nbits):
        raise InputError(f"IVF-PQ with nbits={nbits} needs at least {1 << nbits} training vectors but the store "
                         f"has {n}; use --type flat (exact and fast at this size) or a smaller --nbits")
    nlist = int(params.get("nlist") or default_nlist(n))
    max_nlist = max(1, n // 39)  # FAISS wants >= 39 training points per centroid
    if nlist > max_nlist:
        warnings.warn(f"IVF-PQ: nlist={nlist} is too large for {n} vectors (FAISS needs ~39 per list); "
                      f"using nlist={max_nlist}", stacklevel=3)
        nlist = max_nlist
    nprobe = min(int(params.get("nprobe") or 16), nlist)
    return {"factory": f"IVF{nlist},PQ{m}x{nbits}", "search": {"nprobe": nprobe}, "build": {}}
