"""Batch samplers that are deterministic in ``(seed, epoch)`` and identical on 1 or N processes.

Every sampler here first builds the **global** order of an epoch (a function of the seed and
the epoch only), cuts it into global batches of ``global_batch`` samples, and gives each rank
the contiguous slice ``[rank * G/W, (rank + 1) * G/W)`` of every global batch, split into
micro-batches for gradient accumulation. So the content of global step ``t`` does not depend
on the number of processes nor on the accumulation, and a resumed run skips exactly the
steps it has done (the sampler's state is two ints, ``epoch`` and ``step``).

Items are yielded as ``(epoch, index)`` pairs; :class:`cfcd.data.training.TrainingDataset`
uses the epoch to seed its augmentation.

:class:`TupleBatchSampler` reproduces CFCD's ``DistributedTupleHEMSampler``
(``datasets/distributed_tuple_hem_sampler.py`` lines 46-197) call for call -- the same tuples for
the same seed -- with three fixes: it works on one process (the reference falls back to a plain
shuffle there, ``datasets/loader.py`` lines 34-40, and silently breaks the tuples), it uses its
own ``random.Random`` instead of reseeding the global ``random`` module (line 47),
and it runs in O(log C) per tuple instead of O(C) list copies and removals.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np

from cfcd.errors import InputError

Item = tuple[int, int]  # (epoch, dataset index)


class GlobalBatchSampler:
    """Base class: global order per epoch -> this rank's micro-batches.

    Args:
        global_batch: samples per optimizer step over all ranks (128 in the CFCD recipes).
        micro_batch: samples per forward/backward on one rank; ``global_batch`` must equal
            ``world_size * accumulation * micro_batch``.
        rank, world_size: this process and the number of processes.
        seed: the base seed; the epoch's order depends on ``(seed, epoch)`` only.
        align: every micro-batch and rank slice must be a multiple of this (the tuple size).
    """

    def __init__(self, *, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, align: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"invalid rank {rank} for a world of {world_size}")
        per_rank, rem = divmod(global_batch, world_size)
        if rem or per_rank < 1:
            raise InputError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        accum, rem = divmod(per_rank, micro_batch)
        if rem or accum < 1:
            raise InputError(f"per-rank batch {per_rank} (global {global_batch} / world {world_size}) "
                             f"is not a multiple of the micro-batch {micro_batch}")
        if micro_batch % align:
            raise InputError(f"micro-batch {micro_batch} is not a multiple of the tuple size {align}")
        self.global_batch, self.micro_batch = int(global_batch), int(micro_batch)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.per_rank, self.accumulation = per_rank, accum
        self.epoch = 0
        self.start_step = 0
        self._cache: tuple[int, np.ndarray] | None = None

    # -- to implement ----------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def build_global_order(self, epoch: int) -> np.ndarray:
        """All indices of the epoch, ``steps_per_epoch() * global_batch`` long."""
        raise NotImplementedError

    # -- common ------------------------------------------------------------------------------
    def global_order(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            order = np.asarray(self.build_global_order(epoch), dtype=np.int64)
            expected = self.steps_per_epoch() * self.global_batch
            if order.shape != (expected,):
                raise RuntimeError(f"{type(self).__name__}: global order has {order.shape[0]} items, "
                                   f"expected {expected}")
            self._cache = (epoch, order)
        return self._cache[1]

    def global_batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """The indices of global step ``step`` of ``epoch`` (all ranks)."""
        order = self.global_order(epoch)
        return order[step * self.global_batch:(step + 1) * self.global_batch]

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch and the first global step to yield (resume inside an epoch)."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("global_batch", self.global_batch)) != self.global_batch:
            raise InputError(f"cannot resume: checkpoint global batch {state['global_batch']} "
                             f"!= configured {self.global_batch}")
        self.seed = int(state.get("seed", self.seed))
        self.set_epoch(int(state["epoch"]), int(state.get("start_step", 0)))

    def __len__(self) -> int:
        """Micro-batches this rank yields in the current epoch (from ``start_step``)."""
        return max(0, self.steps_per_epoch() - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[Item]]:
        epoch = self.epoch
        lo = self.rank * self.per_rank
        for step in range(self.start_step, self.steps_per_epoch()):
            mine = self.global_batch_indices(epoch, step)[lo:lo + self.per_rank].tolist()
            for k in range(self.accumulation):
                yield [(epoch, i) for i in mine[k * self.micro_batch:(k + 1) * self.micro_batch]]


class ShuffleBatchSampler(GlobalBatchSampler):
    """Stage 1: a random permutation per epoch; the incomplete last global batch is dropped."""

    def __init__(self, num_samples: int, **kwargs):
        super().__init__(**kwargs)
        if num_samples < self.global_batch:
            raise InputError(f"the training list has {num_samples} images, fewer than one global batch "
                             f"of {self.global_batch}")
        self.num_samples = int(num_samples)

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def build_global_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return perm[: self.steps_per_epoch() * self.global_batch]


class SequentialBatchSampler(GlobalBatchSampler):
    """Validation / inference: the list in order; the last global batch is padded by repeating
    the first indices (callers drop duplicates using the returned indices)."""

    def __init__(self, num_samples: int, **kwargs):
        super().__init__(**kwargs)
        self.num_samples = int(num_samples)

    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.global_batch)

    def build_global_order(self, epoch: int) -> np.ndarray:
        n = self.steps_per_epoch() * self.global_batch
        return np.arange(n) % self.num_samples


# ----------------------------------------------------------------------------------------------
# tuples
# ----------------------------------------------------------------------------------------------


class _Fenwick:
    """Order statistics over positions 0..n-1 flagged alive: k-th alive, rank, remove; O(log n)."""

    def __init__(self, alive: Sequence[bool]):
        self.n = len(alive)
        self.tree = [0] * (self.n + 1)
        self.flags = bytearray(1 if a else 0 for a in alive)
        self.count = sum(self.flags)
        tree = self.tree
        for i, a in enumerate(self.flags, 1):  # O(n) build
            if a:
                tree[i] += 1
            j = i + (i & -i)
            if j <= self.n:
                tree[j] += tree[i]
        self.log = 1 << max(0, self.n.bit_length() - 1) if self.n else 0

    def remove(self, pos: int) -> None:
        if not self.flags[pos]:
            return
        self.flags[pos] = 0
        self.count -= 1
        i = pos + 1
        while i <= self.n:
            self.tree[i] -= 1
            i += i & -i

    def rank(self, pos: int) -> int:
        """Number of alive positions < pos."""
        s, i = 0, pos
        while i > 0:
            s += self.tree[i]
            i -= i & -i
        return s

    def kth(self, k: int) -> int:
        """Position of the k-th (0-based) alive element."""
        pos, step, rem = 0, self.log, k + 1
        tree = self.tree
        while step:
            nxt = pos + step
            if nxt <= self.n and tree[nxt] < rem:
                pos = nxt
                rem -= tree[nxt]
            step >>= 1
        return pos


class _AliveView(Sequence):
    """The alive classes in class order, optionally without one class: a virtual list for
    ``random.sample``/``choice`` with the same indexing as the reference's Python list."""

    def __init__(self, fen: _Fenwick, classes: list[int], skip_pos: int | None):
        self.fen, self.classes = fen, classes
        self.skip_rank = fen.rank(skip_pos) if skip_pos is not None else None
        self.n = fen.count - (1 if skip_pos is not None else 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(self.n))]
        if j < 0:
            j += self.n
        if not 0 <= j < self.n:
            raise IndexError(j)
        if self.skip_rank is not None and j >= self.skip_rank:
            j += 1
        return self.classes[self.fen.kth(j)]


def build_tuples(labels: Sequence[int] | np.ndarray, num_tuples: int, *, seed: int, tuple_size: int = 8,
                 gt_pred: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The reference CFCD tuple sequence: ``num_tuples`` rows ``[anchor, positive, negatives...]``.

    ``rng = random.Random(seed)`` plays the role of the reference's ``random.seed(seed)``
    (the reference passes ``seed + epoch``). Without ``gt_pred`` this is
    ``DistributedTupleSampler``; with the classifier confusions ``(gt, pred)`` (one per
    sample) it is ``DistributedTupleHEMSampler``:

    * anchor class uniform over the classes with >= 2 unused images; anchor and positive
      popped from the class's shuffled pool; images are used without replacement, and all
      pools are rebuilt when no anchor class is left;
    * TP anchor: each negative slot takes, with p = 0.5, an image confused into the
      anchor's class (``FP[c]``: pred = c, gt != c);
    * misclassified anchor (pred c' != c): the positive is a TP image of c if any; each slot
      takes an ``FP[c]`` image with p = 0.33, **elif** (fresh draw) with p = 0.5 an image of c';
    * remaining slots: one image from each of ``min(6, ...)`` random distinct classes != c,
      cycling over them if fewer classes remain; if still short, everything is reset and the
      tuple is retried.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n_neg = tuple_size - 2
    if n_neg < 1:
        raise InputError(f"tuple size must be >= 3, got {tuple_size}")
    rng = random.Random(seed)
    # class order = first appearance in the list (the reference's dict order)
    class_indices: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        class_indices.setdefault(c, []).append(i)
    classes = list(class_indices)
    if not any(len(v) >= 2 for v in class_indices.values()):
        raise InputError("tuple sampling needs at least one class with 2 images")
    if len(classes) < 2:
        raise InputError("tuple sampling needs at least two classes")
    cpos = {c: k for k, c in enumerate(classes)}
    hem = gt_pred is not None
    if hem:
        gt, pred = (np.asarray(a, dtype=np.int64) for a in gt_pred)
        if gt.shape != labels.shape or pred.shape != labels.shape:
            raise InputError("confusions must have one (gt, pred) per training sample")
        if not np.array_equal(gt, labels):
            raise InputError("confusions: the ground-truth column differs from the training labels")
        gtl, predl = gt.tolist(), pred.tolist()
        tpfp_order: dict[int, None] = {}
        for g, q in zip(gtl, predl):
            tpfp_order.setdefault(g, None)
            tpfp_order.setdefault(q, None)

    def pop_live(lst: list[int]) -> int:
        while used[lst[-1]]:
            lst.pop()
        return lst.pop()

    def take(i: int) -> None:
        """Mark image i used: remove it from its class pool and its TP/FP list."""
        used[i] = 1
        c = int(labels[i])
        count[c] -= 1
        if hem:
            if gtl[i] == predl[i]:
                ntp[c] -= 1
            else:
                nfp[predl[i]] -= 1

    def after_take(c: int) -> None:
        """Drop class c from the live / anchor sets once it runs low."""
        if count[c] == 0:
            live.remove(cpos[c])
        if count[c] < 2:
            anchor.remove(cpos[c])

    out = np.empty((num_tuples, tuple_size), dtype=np.int64)
    made = 0
    used = bytearray(len(labels))
    need_reset = True
    failures = 0
    while made < num_tuples:
        if need_reset or anchor.count == 0:
            need_reset = False
            used = bytearray(len(labels))
            pools = {c: list(v) for c, v in class_indices.items()}
            count = {}
            for c, v in pools.items():
                rng.shuffle(v)
                count[c] = len(v)
            live = _Fenwick([True] * len(classes))
            anchor = _Fenwick([count[c] >= 2 for c in classes])
            if hem:
                tp: dict[int, list[int]] = {c: [] for c in tpfp_order}
                fp: dict[int, list[int]] = {c: [] for c in tpfp_order}
                for i, (g, q) in enumerate(zip(gtl, predl)):
                    (tp[g] if g == q else fp[q]).append(i)
                ntp = {c: len(v) for c, v in tp.items()}
                nfp = {c: len(v) for c, v in fp.items()}
                for c in tpfp_order:  # the reference shuffles TP then FP, class by class
                    rng.shuffle(tp[c])
                    rng.shuffle(fp[c])

        c = classes[anchor.kth(rng.choice(range(anchor.count)))]
        a = pop_live(pools[c])
        take(a)
        if hem and gtl[a] != predl[a]:
            a_is_tp = False
            if ntp[c]:
                p = pop_live(tp[c])
            else:
                p = pop_live(pools[c])
        else:
            a_is_tp = True
            p = pop_live(pools[c])
        take(p)
        length_c = count[c]
        after_take(c)

        ns: list[int] = []
        if hem:
            c_conf = predl[a]
            for _ in range(n_neg):
                n = None
                if a_is_tp:
                    if rng.random() < 0.5 and nfp[c]:
                        n = pop_live(fp[c])
                else:
                    if rng.random() < 0.33 and nfp[c]:
                        n = pop_live(fp[c])
                    elif rng.random() < 0.5 and c_conf in cpos and count[c_conf] > 0:
                        n = pop_live(pools[c_conf])
                if n is not None:
                    ns.append(n)
                    take(n)
                    after_take(int(labels[n]))
        view = _AliveView(live, classes, cpos[c] if length_c else None)
        if len(view) > n_neg:
            cand = rng.sample(view, n_neg)
        else:
            cand = list(view)
        while len(ns) < n_neg and cand:
            nxt = []
            for nc in cand:
                n = pop_live(pools[nc])
                ns.append(n)
                take(n)
                after_take(nc)
                if count[nc]:
                    nxt.append(nc)
                if len(ns) >= n_neg:
                    break
            cand = nxt
        if len(ns) != n_neg:
            need_reset = True
            failures += 1
            if failures > 1000:  # the reference would loop forever here
                raise InputError(f"cannot build tuples of {tuple_size}: too few images outside the anchor "
                                 f"classes ({len(labels)} images in {len(classes)} classes)")
            continue
        failures = 0
        out[made, 0], out[made, 1] = a, p
        out[made, 2:] = ns
        made += 1
    return out


class TupleBatchSampler(GlobalBatchSampler):
    """Stage 2: global batches of whole tuples ``[anchor, positive, negatives...]``.

    An epoch has ``max(1, N // global_batch)`` global steps (about N images, as the
    reference). The tuples of epoch ``e`` are ``build_tuples(..., seed=seed + e)``: with
    ``seed=0`` they are the reference's sequence. ``micro_batch`` and the rank slice must be
    multiples of ``tuple_size`` so that no tuple is ever split.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, *, tuple_size: int = 8,
                 gt_pred: tuple[np.ndarray, np.ndarray] | None = None, **kwargs):
        super().__init__(align=tuple_size, **kwargs)
        if self.per_rank % tuple_size:
            raise InputError(f"per-rank batch {self.per_rank} is not a multiple of the tuple size {tuple_size}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.tuple_size, self.gt_pred = int(tuple_size), gt_pred

    def steps_per_epoch(self) -> int:
        return max(1, len(self.labels) // self.global_batch)

    def build_global_order(self, epoch: int) -> np.ndarray:
        n = self.steps_per_epoch() * self.global_batch // self.tuple_size
        return build_tuples(self.labels, n, seed=self.seed + epoch, tuple_size=self.tuple_size,
                            gt_pred=self.gt_pred).reshape(-1)


class ClassBalancedBatchSampler(GlobalBatchSampler):
    """Listwise losses (AP): global batches of ``images_per_class`` images from random classes.

    Per epoch: each class with enough images contributes groups of ``images_per_class``
    images (shuffled by ``(seed, epoch)``), the groups are shuffled, and consecutive groups
    form the batches, so every image has positives in its micro-batch.
    """

    def __init__(self, labels, *, images_per_class: int = 4, **kwargs):
        super().__init__(align=images_per_class, **kwargs)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.k = int(images_per_class)
        counts = np.bincount(self.labels)
        self.num_groups = int((counts // self.k).sum())
        if self.num_groups * self.k < self.global_batch:
            raise InputError(f"class-balanced sampling: fewer than {self.global_batch} images in groups of "
                             f"{self.k} images of one class")

    def _groups(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        groups = []
        order = np.argsort(self.labels, kind="stable")
        bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
        for members in np.split(order, bounds):
            members = rng.permutation(members)
            for i in range(0, len(members) - self.k + 1, self.k):
                groups.append(members[i:i + self.k])
        groups = np.stack(groups)
        return groups[rng.permutation(len(groups))]

    def steps_per_epoch(self) -> int:
        return max(1, self.num_groups * self.k // self.global_batch)

    def build_global_order(self, epoch: int) -> np.ndarray:
        flat = self._groups(epoch).reshape(-1)
        n = self.steps_per_epoch() * self.global_batch
        reps = -(-n // len(flat))
        return np.tile(flat, reps)[:n]
