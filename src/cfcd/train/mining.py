"""Model-based hard-negative mining for tuple training (cirtorch ``TuplesDataset.create_epoch_tuples``).

Every epoch (cirtorch ``cirtorch/datasets/traindataset.py``, ``create_epoch_tuples``):

1. ``qsize`` (query, positive) pairs are drawn from the pair pool by a random permutation;
2. ``poolsize`` images are drawn from all training images by a second random permutation;
3. the queries and the pool are described with the CURRENT model (eval mode);
4. per query, the pool is ranked by descending similarity (``pool @ q``) and walked down: an image
   is taken as a negative when its cluster differs from the query's and from the cluster of every
   negative already taken (at most one per cluster), until ``nnum`` negatives are found.

The permutations use a ``torch.Generator`` seeded with ``seed + epoch`` (cirtorch seeds torch's
global generator with the epoch number before each epoch; ``seed = 0`` reproduces it). cirtorch
loops forever when the pool holds fewer than ``nnum`` other clusters; here that is an error. The
average query-negative distance ``||q - n + 1e-6||`` is returned for logging, as cirtorch does.

:class:`MinedTupleBatchSampler` turns the mined tuples into the global batches of the trainer's
samplers (:mod:`cfcd.train.samplers`), rows laid out ``[query, positive, negative_1..nnum]`` per
tuple, which is what :class:`cfcd.losses.ContrastiveLoss` / :class:`~cfcd.losses.TripletLoss` take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from cfcd.data.lists import ImageList
from cfcd.errors import InputError
from cfcd.extract import ExtractOptions, Extractor, parse_scales
from cfcd.train.samplers import GlobalBatchSampler

__all__ = ["MinedTuples", "HardNegativeMiner", "MinedTupleBatchSampler", "pairs_from_labels"]

Describe = Callable[[Sequence[int]], "torch.Tensor | np.ndarray"]  # indices -> N x D unit rows


@dataclass
class MinedTuples:
    qidxs: list[int]
    pidxs: list[int]
    nidxs: list[list[int]]
    avg_negative_distance: float = float("nan")
    pool: list[int] = field(default_factory=list)

    def as_rows(self) -> np.ndarray:
        """T x (2 + nnum) image indices, one tuple per row ``[q, p, n_1, ...]``."""
        return np.asarray([[q, p, *n] for q, p, n in zip(self.qidxs, self.pidxs, self.nidxs)], dtype=np.int64)


def pairs_from_labels(labels: Sequence[int] | np.ndarray, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """(query, positive) pairs for a labelled list (cirtorch ships them as ``qidxs``/``pidxs``):
    every image of a class with >= 2 images is paired with another image of its class, drawn once."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    q, p = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        for i in members:
            others = members[members != i]
            q.append(int(i))
            p.append(int(others[rng.integers(len(others))]))
    return q, p


class HardNegativeMiner:
    """cirtorch's per-epoch tuple mining; ``mine(describe, epoch)`` -> :class:`MinedTuples`.

    Args:
        qpool, ppool: the (query, positive) pairs to draw from (cirtorch ``qidxs``/``pidxs``).
        clusters: the cluster (class) of every training image.
        nnum: negatives per tuple (5); qsize: tuples per epoch (2000); poolsize: images in the
            negative pool (20000); both capped at what exists, as cirtorch.
        seed: base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, qpool: Sequence[int], ppool: Sequence[int], clusters: Sequence[int] | np.ndarray, *,
                 nnum: int = 5, qsize: int = 2000, poolsize: int = 20000, seed: int = 0) -> None:
        if len(qpool) != len(ppool) or not len(qpool):
            raise InputError(f"hard-negative mining needs equally long, non-empty query/positive pools "
                             f"(got {len(qpool)} and {len(ppool)})")
        if nnum < 0:
            raise InputError(f"nnum must be >= 0, got {nnum}")
        self.qpool, self.ppool = [int(i) for i in qpool], [int(i) for i in ppool]
        self.clusters = np.asarray(clusters)
        self.nnum = int(nnum)
        self.qsize = min(int(qsize), len(self.qpool))
        self.poolsize = min(int(poolsize), len(self.clusters))
        self.seed = int(seed)

    def mine(self, describe: Describe, epoch: int = 0) -> MinedTuples:
        g = torch.Generator().manual_seed(self.seed + int(epoch))
        pick = torch.randperm(len(self.qpool), generator=g)[: self.qsize].tolist()
        qidxs = [self.qpool[i] for i in pick]
        pidxs = [self.ppool[i] for i in pick]
        if self.nnum == 0:
            return MinedTuples(qidxs, pidxs, [[] for _ in qidxs], 0.0)
        pool = torch.randperm(len(self.clusters), generator=g)[: self.poolsize].tolist()
        qvecs = torch.as_tensor(np.asarray(describe(qidxs)), dtype=torch.float32)
        pvecs = torch.as_tensor(np.asarray(describe(pool)), dtype=torch.float32)
        if qvecs.shape[0] != len(qidxs) or pvecs.shape[0] != len(pool) or qvecs.shape[1] != pvecs.shape[1]:
            raise InputError(f"describe() returned {tuple(qvecs.shape)} and {tuple(pvecs.shape)} for "
                             f"{len(qidxs)} queries and {len(pool)} pool images")
        ranks = torch.argsort(qvecs @ pvecs.t(), dim=1, descending=True, stable=True)  # nq x pool
        pool_clusters = self.clusters[np.asarray(pool)]
        nidxs, dist_sum, n_dist = [], 0.0, 0
        for q in range(len(qidxs)):
            seen = {self.clusters[qidxs[q]].item()}
            chosen: list[int] = []
            for r in ranks[q].tolist():
                c = pool_clusters[r].item()
                if c in seen:
                    continue
                chosen.append(pool[r])
                seen.add(c)
                dist_sum += float((qvecs[q] - pvecs[r] + 1e-6).pow(2).sum().sqrt())
                n_dist += 1
                if len(chosen) == self.nnum:
                    break
            if len(chosen) < self.nnum:
                raise InputError(f"hard-negative mining: the pool of {len(pool)} images holds only {len(chosen)} "
                                 f"clusters other than query {qidxs[q]}'s; {self.nnum} negatives are needed "
                                 "(raise poolsize or lower nnum)")
            nidxs.append(chosen)
        return MinedTuples(qidxs, pidxs, nidxs, dist_sum / max(n_dist, 1), pool)


class MinedTupleBatchSampler(GlobalBatchSampler):
    """Global batches of mined tuples ``[q, p, n_1..n_nnum]``; ``describe`` (indices -> descriptors
    with the current model) is called once per epoch, at the epoch's first batch, on every rank
    (the mining is deterministic in ``(seed, epoch)`` and the model identical across ranks)."""

    def __init__(self, miner: HardNegativeMiner, describe: Describe | None = None, **kwargs):
        self.tuple_size = 2 + miner.nnum
        super().__init__(align=self.tuple_size, **kwargs)
        if self.per_rank % self.tuple_size:
            raise InputError(f"per-rank batch {self.per_rank} is not a multiple of the tuple size {self.tuple_size}")
        if miner.qsize * self.tuple_size < self.global_batch:
            raise InputError(f"{miner.qsize} tuples of {self.tuple_size} are fewer than one global batch of {self.global_batch}")
        self.miner, self.describe = miner, describe
        self.last: MinedTuples | None = None

    def steps_per_epoch(self) -> int:
        return self.miner.qsize * self.tuple_size // self.global_batch

    def build_global_order(self, epoch: int) -> np.ndarray:
        if self.describe is None:
            raise InputError("MinedTupleBatchSampler: set .describe (indices -> descriptors) before iterating")
        self.last = self.miner.mine(self.describe, epoch)
        return self.last.as_rows().reshape(-1)[: self.steps_per_epoch() * self.global_batch]


def model_describer(model, paths: Sequence, *, image_size: int | None = 1024, device: str = "cpu",
                    workers: int = 0, after: Callable[[], None] | None = None) -> Describe:
    """``describe(indices)`` for the miner: single-scale descriptors of ``paths[i]`` with the CURRENT
    ``model`` (eval mode, longer side capped at ``image_size`` like cirtorch's ``imresize``), then
    the model's training mode is restored (and ``after()`` called, e.g. to re-freeze BN)."""
    from pathlib import Path


    paths = [Path(p) for p in paths]

    def describe(indices: Sequence[int]) -> np.ndarray:
        was_training = model.training
        try:
            options = ExtractOptions(scales=parse_scales("single"), max_size=image_size, device=str(device),
                                     workers=workers, progress=False)
            idx = [int(i) for i in indices]
            images = ImageList(ids=[str(i) for i in idx], paths=[paths[i] for i in idx], source="hard-negative mining")
            out, failures, _ = Extractor(model, options).extract(images)
            if failures:
                first = "; ".join(f"{i}: {r}" for i, r in failures[:3])
                raise InputError(f"hard-negative mining: {len(failures)} image(s) could not be read ({first})")
            return out
        finally:
            model.train(was_training)
            if after is not None:
                after()

    return describe
