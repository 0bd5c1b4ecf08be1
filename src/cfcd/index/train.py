"""Training the index once on a sample (held-out rows excluded): k-means for the coarse quantizer
(two-level from 2048 lists) and the codebooks."""

from __future__ import annotations

import numpy as np

from cfcd.errors import InputError
from cfcd.index.rows import RowReader


def train(index, reader: RowReader, held_out: np.ndarray, train_size: int | None, seed: int, factory: str,
           budget: int | None = None):
    import faiss

    n, d = reader.shape
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 1
    if train_size:
        want = int(train_size)
    else:
        want = min(n, max(64 * nlist, 65536))
        if budget:
            # the float32 sample and FAISS's working copies take ~3x its size: a quarter of the budget
            want = min(want, max(budget // (4 * 4 * d), 8 * nlist, 9984))
        want = max(want, min(39 * nlist, budget // (4 * 4 * d) if budget else 39 * nlist), 9984 if "PQ" in factory else 0)
    want = min(n - len(held_out), want)
    rng = np.random.default_rng(seed + 1)
    pool = np.setdiff1d(np.arange(n, dtype=np.int64), held_out, assume_unique=True) if len(held_out) else None
    if pool is None:
        rows = np.sort(rng.choice(n, size=want, replace=False)) if want < n else np.arange(n)
    else:
        rows = np.sort(rng.choice(pool, size=min(want, len(pool)), replace=False))
    sample = reader.take(rows) if want < n else reader.read(0, n)
    bad = np.flatnonzero(~(np.isfinite(sample).all(axis=1) & np.any(sample != 0, axis=1)))
    if bad.size:
        where = reader.path or "descriptors"
        raise InputError(f"{where}: rows that are NaN, inf or all zero, first: rows "
                         + ", ".join(str(int(rows[b] if want < n else b)) for b in bad[:5]))
    if ivf is not None:
        ivf.cp.seed = seed
        if ivf.nlist > len(sample):
            raise InputError(f"{factory}: {ivf.nlist} lists need at least {ivf.nlist} training rows (FAISS "
                             f"advises {39 * ivf.nlist}), the store has {len(sample)}; use fewer lists or Flat")
    _no_polysemous(index)
    if ivf is not None and ivf.nlist >= _TWO_LEVEL_FROM:
        _train_two_level(index, sample, seed)
    else:
        index.train(sample)
    return index


def _no_polysemous(index) -> None:
    """The index factory turns on polysemous training for PQ codes: a code re-ordering for Hamming
    filtering (``polysemous_ht``), which cfcd never searches with, and which takes minutes for
    128 sub-quantizers. Off."""
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


# Flat k-means costs train x nlist x D per iteration (hours for 8192 lists on two cores); from this
# many lists the coarse centroids come from FAISS's two-level clustering (sqrt(nlist) clusters,
# each split in proportion to its size: ~2 sqrt(nlist) distances per point), the rest as usual.
_TWO_LEVEL_FROM = 2048


def _two_level_centroids(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """``nlist`` k-means centroids by two-level clustering, as FAISS's
    ``contrib.clustering.two_level_clustering`` (sqrt(nlist) clusters, each split in proportion to
    its size), except that a small first-level cluster gets at least one and at most as many
    centroids as it has points (FAISS's version fails on a cluster allotted none)."""
    import faiss

    n, d = x.shape
    nc1 = max(1, int(np.sqrt(nlist)))
    km = faiss.Kmeans(d, nc1, niter=20, max_points_per_centroid=2000, seed=seed)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=nc1)
    alloc = np.minimum(np.floor(sizes * nlist / n).astype(np.int64), sizes)
    alloc[(alloc == 0) & (sizes > 0)] = 1
    while alloc.sum() > nlist:  # the minimum of one per cluster may overshoot: take from the largest
        alloc[int(np.argmax(alloc))] -= 1
    while alloc.sum() < nlist:  # the rest to the clusters with the most points per centroid
        ratio = np.where(alloc < sizes, sizes / (alloc + 1.0), -1.0)
        alloc[int(np.argmax(ratio))] += 1
    out = []
    for c in np.flatnonzero(alloc):
        sub = np.ascontiguousarray(x[assign == c])
        if alloc[c] >= len(sub):
            out.append(sub)
            continue
        km2 = faiss.Kmeans(d, int(alloc[c]), niter=20, seed=seed + int(c))
        km2.train(sub)
        out.append(km2.centroids)
    return np.ascontiguousarray(np.vstack(out), dtype=np.float32)


def _train_two_level(index, sample: np.ndarray, seed: int) -> None:
    import faiss

    inner = faiss.downcast_index(index)
    x = sample
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = inner.chain.at(i)
            vt.train(x)
            x = vt.apply(x)
        inner = faiss.downcast_index(inner.index)
    ivf = faiss.extract_index_ivf(inner)
    centroids = _two_level_centroids(np.ascontiguousarray(x, dtype=np.float32), int(ivf.nlist), seed)
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(centroids)
    ivf.train(x)  # the quantizer is full: this trains the codes (PQ/SQ) only
    index.is_trained = True
