"""Batch samplers that are deterministic in ``(seed, epoch)`` and identical on 1 or N processes.

Every sampler here first builds the **global** order of an epoch (a function of the seed and
the epoch only), cuts it into global batches of ``global_batch`` samples, and gives each rank
the contiguous slice ``[rank * G/W, (rank + 1) * G/W)`` of every global batch, split into
micro-batches for gradient accumulation. So the content of global step ``t`` does not depend
on the number of processes nor on the accumulation, and a resumed run skips exactly the
steps it has done (the sampler's state is two ints, ``epoch`` and ``step``).

Items are yielded as ``(epoch, index)`` pairs; :class:`cfcd.train.data.TrainingDataset`
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
    if tuple_size - 2 < 1:
        raise InputError(f"tuple size must be >= 3, got {tuple_size}")
    builder = _TupleBuilder(labels, random.Random(seed), tuple_size - 2, gt_pred)
    out = np.empty((num_tuples, tuple_size), dtype=np.int64)
    made = 0
    failures = 0
    while made < num_tuples:
        if builder.need_reset or builder.anchor_classes.count == 0:
            builder.reset()
        tuple_ = builder.next_tuple()
        if tuple_ is None:
            builder.need_reset = True
            failures += 1
            if failures > 1000:  # the reference would loop forever here
                raise InputError(f"cannot build tuples of {tuple_size}: too few images outside the anchor "
                                 f"classes ({len(labels)} images in {len(builder.classes)} classes)")
            continue
        failures = 0
        out[made] = tuple_
        made += 1
    return out


class _TupleBuilder:
    """The state of :func:`build_tuples` between tuples: the shuffled per-class pools, which
    images are used, the live and anchor classes (Fenwick trees) and, with confusions, the TP
    and FP lists per class. Every random draw happens in the reference's order."""

    def __init__(self, labels: np.ndarray, rng: random.Random, num_negatives: int,
                 gt_pred: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.labels, self.rng, self.num_negatives = labels, rng, num_negatives
        # class order = first appearance in the list (the reference's dict order)
        self.class_indices: dict[int, list[int]] = {}
        for i, c in enumerate(labels.tolist()):
            self.class_indices.setdefault(c, []).append(i)
        self.classes = list(self.class_indices)
        if not any(len(v) >= 2 for v in self.class_indices.values()):
            raise InputError("tuple sampling needs at least one class with 2 images")
        if len(self.classes) < 2:
            raise InputError("tuple sampling needs at least two classes")
        self.class_position = {c: k for k, c in enumerate(self.classes)}
        self.hem = gt_pred is not None
        if self.hem:
            gt, pred = (np.asarray(a, dtype=np.int64) for a in gt_pred)
            if gt.shape != labels.shape or pred.shape != labels.shape:
                raise InputError("confusions must have one (gt, pred) per training sample")
            if not np.array_equal(gt, labels):
                raise InputError("confusions: the ground-truth column differs from the training labels")
            self.gt, self.pred = gt.tolist(), pred.tolist()
            # the TP/FP lists' class order: first appearance as gt or pred (the reference's dicts)
            self.confusion_classes: dict[int, None] = {}
            for g, q in zip(self.gt, self.pred):
                self.confusion_classes.setdefault(g, None)
                self.confusion_classes.setdefault(q, None)
        self.need_reset = True
        self.used = bytearray(len(labels))

    def reset(self) -> None:
        """A new round: every image unused, pools reshuffled (class by class, then TP and FP)."""
        rng = self.rng
        self.need_reset = False
        self.used = bytearray(len(self.labels))
        self.pools = {c: list(v) for c, v in self.class_indices.items()}
        self.count: dict[int, int] = {}
        for c, v in self.pools.items():
            rng.shuffle(v)
            self.count[c] = len(v)
        self.live_classes = _Fenwick([True] * len(self.classes))
        self.anchor_classes = _Fenwick([self.count[c] >= 2 for c in self.classes])
        if self.hem:
            self.tp: dict[int, list[int]] = {c: [] for c in self.confusion_classes}
            self.fp: dict[int, list[int]] = {c: [] for c in self.confusion_classes}
            for i, (g, q) in enumerate(zip(self.gt, self.pred)):
                (self.tp[g] if g == q else self.fp[q]).append(i)
            self.tp_left = {c: len(v) for c, v in self.tp.items()}
            self.fp_left = {c: len(v) for c, v in self.fp.items()}
            for c in self.confusion_classes:  # the reference shuffles TP then FP, class by class
                rng.shuffle(self.tp[c])
                rng.shuffle(self.fp[c])

    def pop_unused(self, images: list[int]) -> int:
        while self.used[images[-1]]:
            images.pop()
        return images.pop()

    def take(self, i: int) -> None:
        """Mark image i used: remove it from its class pool and its TP/FP list."""
        self.used[i] = 1
        c = int(self.labels[i])
        self.count[c] -= 1
        if self.hem:
            if self.gt[i] == self.pred[i]:
                self.tp_left[c] -= 1
            else:
                self.fp_left[self.pred[i]] -= 1

    def after_take(self, c: int) -> None:
        """Drop class c from the live / anchor sets once it runs low."""
        if self.count[c] == 0:
            self.live_classes.remove(self.class_position[c])
        if self.count[c] < 2:
            self.anchor_classes.remove(self.class_position[c])

    def next_tuple(self) -> list[int] | None:
        """``[anchor, positive, negatives...]``, or None when the negatives ran out (reset and retry)."""
        rng = self.rng
        anchor_class = self.classes[self.anchor_classes.kth(rng.choice(range(self.anchor_classes.count)))]
        anchor = self.pop_unused(self.pools[anchor_class])
        self.take(anchor)
        anchor_is_tp = not (self.hem and self.gt[anchor] != self.pred[anchor])
        if not anchor_is_tp and self.tp_left[anchor_class]:
            positive = self.pop_unused(self.tp[anchor_class])
        else:
            positive = self.pop_unused(self.pools[anchor_class])
        self.take(positive)
        anchor_class_left = self.count[anchor_class]
        self.after_take(anchor_class)
        negatives = self.hard_negatives(anchor_class, anchor, anchor_is_tp) if self.hem else []
        self.random_negatives(anchor_class if anchor_class_left else None, negatives)
        if len(negatives) != self.num_negatives:
            return None
        return [anchor, positive, *negatives]

    def hard_negatives(self, anchor_class: int, anchor: int, anchor_is_tp: bool) -> list[int]:
        """Per slot: an image confused into the anchor's class (p 0.5 for a TP anchor, 0.33 else),
        elif (a misclassified anchor, fresh draw, p 0.5) an image of the class it was taken for."""
        rng = self.rng
        confused_class = self.pred[anchor]
        negatives: list[int] = []
        for _ in range(self.num_negatives):
            n = None
            if anchor_is_tp:
                if rng.random() < 0.5 and self.fp_left[anchor_class]:
                    n = self.pop_unused(self.fp[anchor_class])
            else:
                if rng.random() < 0.33 and self.fp_left[anchor_class]:
                    n = self.pop_unused(self.fp[anchor_class])
                elif (rng.random() < 0.5 and confused_class in self.class_position
                      and self.count[confused_class] > 0):
                    n = self.pop_unused(self.pools[confused_class])
            if n is not None:
                negatives.append(n)
                self.take(n)
                self.after_take(int(self.labels[n]))
        return negatives

    def random_negatives(self, excluded_class: int | None, negatives: list[int]) -> None:
        """Fill the remaining slots with one image of each of up to that many random other classes
        (``excluded_class``: the anchor's, while it has images), cycling over them if too few."""
        view = _AliveView(self.live_classes, self.classes,
                          self.class_position[excluded_class] if excluded_class is not None else None)
        if len(view) > self.num_negatives:
            candidate_classes = self.rng.sample(view, self.num_negatives)
        else:
            candidate_classes = list(view)
        while len(negatives) < self.num_negatives and candidate_classes:
            still_has_images = []
            for nc in candidate_classes:
                n = self.pop_unused(self.pools[nc])
                negatives.append(n)
                self.take(n)
                self.after_take(nc)
                if self.count[nc]:
                    still_has_images.append(nc)
                if len(negatives) >= self.num_negatives:
                    break
            candidate_classes = still_has_images


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
