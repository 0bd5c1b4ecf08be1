"""Samplers: global order independent of world size / accumulation, reference-exact tuples,
tuple invariants and the hard-negative probabilities of CFCD's HEM sampler
(datasets/distributed_tuple_hem_sampler.py)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from cfcd.train.samplers import SequentialBatchSampler, ShuffleBatchSampler, TupleBatchSampler, build_tuples
from cfcd.errors import InputError


def reference_tuples(labels, total, seed, tuple_size=8, gt_pred=None):
    """Plain port of CFCD ``DistributedTupleHEMSampler.__iter__`` (global ``random`` replaced by
    a local ``random.Random`` seeded identically), returning the first ``total`` indices."""
    r = random.Random(seed)
    class_indices = {}
    for i, c in enumerate(labels):
        class_indices.setdefault(int(c), []).append(i)
    index_gt_pred = {} if gt_pred is None else {i: (int(g), int(p)) for i, (g, p) in enumerate(zip(*gt_pred))}
    negative_num = tuple_size - 2

    def rebuild():
        cand_anchor = []
        cand = copy.deepcopy(class_indices)
        for c, v in cand.items():
            r.shuffle(v)
            if len(v) >= 2:
                cand_anchor.append(c)
        tpfp = {}
        if index_gt_pred:
            for index, (gt, pred) in index_gt_pred.items():
                tpfp.setdefault(gt, {"TP": [], "FP": []})
                tpfp.setdefault(pred, {"TP": [], "FP": []})
                (tpfp[gt]["TP"] if gt == pred else tpfp[pred]["FP"]).append(index)
            for d in tpfp.values():
                for v in d.values():
                    r.shuffle(v)
        return cand_anchor, cand, tpfp

    cand_anchor, cand, tpfp = rebuild()
    indices = []
    while len(indices) < total:
        if not cand_anchor:
            cand_anchor, cand, tpfp = rebuild()
        c = r.choice(cand_anchor)
        a = cand[c].pop()
        if index_gt_pred:
            if a in tpfp[c]["TP"]:
                a_is_tp = True
                tpfp[c]["TP"].remove(a)
                p = cand[c].pop()
                if p in tpfp[c]["TP"]:
                    tpfp[c]["TP"].remove(p)
                else:
                    tpfp[index_gt_pred[p][1]]["FP"].remove(p)
            else:
                a_is_tp = False
                tpfp[index_gt_pred[a][1]]["FP"].remove(a)
                if tpfp[c]["TP"]:
                    p = tpfp[c]["TP"].pop()
                    cand[c].remove(p)
                else:
                    p = cand[c].pop()
                    tpfp[index_gt_pred[p][1]]["FP"].remove(p)
        else:
            p = cand[c].pop()
        length_c = len(cand[c])
        if length_c == 0:
            del cand[c]
            cand_anchor.remove(c)
        elif length_c < 2:
            cand_anchor.remove(c)
        ns = []
        if index_gt_pred:
            for _ in range(negative_num):
                nc = None
                if a_is_tp:
                    if r.random() < 0.5 and tpfp[c]["FP"]:
                        n = tpfp[c]["FP"].pop()
                        ns.append(n)
                        nc = index_gt_pred[n][0]
                        cand[nc].remove(n)
                else:
                    if r.random() < 0.33 and tpfp[c]["FP"]:
                        n = tpfp[c]["FP"].pop()
                        ns.append(n)
                        nc = index_gt_pred[n][0]
                        cand[nc].remove(n)
                    elif r.random() < 0.5 and index_gt_pred[a][1] in cand:
                        nc = index_gt_pred[a][1]
                        n = cand[nc].pop()
                        ns.append(n)
                        if n in tpfp[nc]["TP"]:
                            tpfp[nc]["TP"].remove(n)
                        else:
                            tpfp[index_gt_pred[n][1]]["FP"].remove(n)
                if nc is not None:
                    length_n = len(cand[nc])
                    if length_n == 0:
                        del cand[nc]
                    if length_n < 2 and nc in cand_anchor:
                        cand_anchor.remove(nc)
        cnc = list(cand.keys())
        if length_c:
            cnc.remove(c)
        if len(cnc) > negative_num:
            cnc = r.sample(cnc, negative_num)
        while len(ns) < negative_num and len(cnc):
            upd = []
            for nc in cnc:
                n = cand[nc].pop()
                ns.append(n)
                if index_gt_pred:
                    if n in tpfp[nc]["TP"]:
                        tpfp[nc]["TP"].remove(n)
                    else:
                        tpfp[index_gt_pred[n][1]]["FP"].remove(n)
                length_n = len(cand[nc])
                if length_n:
                    upd.append(nc)
                else:
                    del cand[nc]
                if length_n < 2 and nc in cand_anchor:
                    cand_anchor.remove(nc)
                if len(ns) >= negative_num:
                    break
            cnc = upd
        if len(ns) != negative_num:
            cand_anchor, cand = [], {}
            continue
        indices += [a, p] + ns
    return np.asarray(indices[:total])


def synthetic_labels(n_classes=60, seed=0, max_per_class=12):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_per_class, size=n_classes)
    labels = np.repeat(np.arange(n_classes), sizes)
    return labels[rng.permutation(len(labels))]  # interleaved, as a real list


def synthetic_confusions(labels, seed=0, error_rate=0.3, n_confusers=3):
    """Each class is confused into a few 'neighbour' classes (structured confusions)."""
    rng = np.random.default_rng(seed)
    n_classes = int(labels.max()) + 1
    neighbours = {c: rng.choice([k for k in range(n_classes) if k != c], n_confusers, replace=False)
                  for c in range(n_classes)}
    pred = labels.copy()
    wrong = rng.random(len(labels)) < error_rate
    for i in np.flatnonzero(wrong):
        pred[i] = rng.choice(neighbours[int(labels[i])])
    return labels.copy(), pred


@pytest.mark.parametrize("hem", [False, True])
@pytest.mark.parametrize("seed", [0, 7])
def test_tuples_equal_the_reference_sequence(hem, seed):
    labels = synthetic_labels(seed=seed)
    gt_pred = synthetic_confusions(labels, seed) if hem else None
    n = 3 * len(labels) // 8  # several pool rebuilds
    ours = build_tuples(labels, n, seed=seed, gt_pred=gt_pred).reshape(-1)
    ref = reference_tuples(labels.tolist(), n * 8, seed, gt_pred=gt_pred)
    np.testing.assert_array_equal(ours, ref)


def test_tuples_equal_reference_with_few_classes():
    # <= 6 negative classes: no random.sample, negatives cycle over the remaining classes
    labels = np.array([0] * 5 + [1] * 6 + [2] * 4 + [3] * 3)
    ours = build_tuples(labels, 20, seed=3, tuple_size=6).reshape(-1)
    np.testing.assert_array_equal(ours, reference_tuples(labels.tolist(), 120, 3, tuple_size=6))


def test_tuple_structure_invariants():
    labels = synthetic_labels(n_classes=80, seed=1)
    gt, pred = synthetic_confusions(labels, 1)
    tuples = build_tuples(labels, 400, seed=5, gt_pred=(gt, pred))
    for t in tuples:
        a, p, ns = t[0], t[1], t[2:]
        assert labels[a] == labels[p] and a != p
        assert all(labels[n] != labels[a] for n in ns)
        assert len(set(t.tolist())) == 8
    # without replacement inside a round: the first round has no repeated image
    first = tuples[: len(labels) // 16].reshape(-1)
    assert len(np.unique(first)) == len(first)


def test_sampler_does_not_touch_global_random():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    build_tuples(synthetic_labels(), 50, seed=0)
    assert random.random() == expected


def test_hem_probabilities():
    """TP anchors: each slot is an FP[c] image with p = 0.5. Misclassified anchors: FP[c] with
    p = 0.33, else the confused class c' with p = 0.67 * 0.5 (FP pools kept large)."""
    rng = np.random.default_rng(0)
    n_classes, per_class = 40, 150
    labels = np.repeat(np.arange(n_classes), per_class)
    pred = labels.copy()
    wrong = rng.random(len(labels)) < 0.4
    pred[wrong] = (labels[wrong] + 1 + rng.integers(0, 2, wrong.sum())) % n_classes
    tuples = build_tuples(labels, 300, seed=11, gt_pred=(labels, pred))  # < 1 round: pools stay full
    tp_fp, tp_total, mis_fp, mis_conf, mis_total = 0, 0, 0, 0, 0
    for t in tuples:
        a, c = t[0], labels[t[0]]
        fp_c = [n for n in t[2:] if pred[n] == c and labels[n] != c]
        if pred[a] == c:
            tp_fp += len(fp_c)
            tp_total += 6
        else:
            mis_fp += len(fp_c)
            mis_conf += sum(labels[n] == pred[a] for n in t[2:] if n not in fp_c)
            mis_total += 6
    assert tp_total > 600 and mis_total > 300
    # random negatives can land in FP[c] / c' by chance (~1/40): small upward bias allowed
    assert abs(tp_fp / tp_total - 0.5) < 0.06
    assert abs(mis_fp / mis_total - 0.33) < 0.07
    assert abs(mis_conf / mis_total - 0.67 * 0.5) < 0.07


def test_global_batches_independent_of_world_and_accumulation():
    labels = synthetic_labels(n_classes=50, seed=2)
    ref = TupleBatchSampler(labels, global_batch=32, micro_batch=32, seed=4)
    ref.set_epoch(1)
    single = [b for b in ref]
    for world, micro in [(2, 8), (4, 8), (1, 16)]:
        per_rank = []
        for r in range(world):
            s = TupleBatchSampler(labels, global_batch=32, micro_batch=micro, rank=r, world_size=world, seed=4)
            s.set_epoch(1)
            per_rank.append(list(s))
        acc = 32 // world // micro
        for step, batch in enumerate(single):
            merged = [x for r in range(world) for k in range(acc) for x in per_rank[r][step * acc + k]]
            assert merged == batch
    # every micro-batch holds whole tuples
    for b in single:
        idx = [i for _, i in b]
        for t in range(0, len(idx), 8):
            assert labels[idx[t]] == labels[idx[t + 1]]
    # epochs differ, and the epoch is passed to the dataset
    ref.set_epoch(2)
    other = list(ref)
    assert other[0][0][0] == 2 and [i for _, i in other[0]] != [i for _, i in single[0]]


def test_resume_skips_done_steps():
    s = ShuffleBatchSampler(1000, global_batch=64, micro_batch=16, seed=3)
    s.set_epoch(5)
    full = list(s)
    s2 = ShuffleBatchSampler(1000, global_batch=64, micro_batch=16, seed=3)
    s2.load_state_dict({"epoch": 5, "start_step": 3, "seed": 3, "global_batch": 64})
    assert list(s2) == full[3 * 4:]
    assert len(s2) == len(full) - 12
    order = s.global_order(5)
    assert len(np.unique(order)) == len(order) == 15 * 64


def test_sequential_sampler_covers_all():
    s = SequentialBatchSampler(10, global_batch=8, micro_batch=4, rank=1, world_size=2)
    assert [i for b in s for _, i in b] == [4, 5, 6, 7, 2, 3, 4, 5]  # second step padded from the start
    all_idx = set()
    for r in range(2):
        t = SequentialBatchSampler(10, global_batch=8, micro_batch=4, rank=r, world_size=2)
        all_idx |= {i for b in t for _, i in b}
    assert all_idx == set(range(10))


def test_invalid_configurations():
    with pytest.raises(InputError):
        ShuffleBatchSampler(1000, global_batch=100, micro_batch=16)
    with pytest.raises(InputError):
        TupleBatchSampler(np.arange(100) % 10, global_batch=32, micro_batch=12)
    with pytest.raises(InputError):
        build_tuples(np.array([0, 0, 1, 1]), 2, seed=0)  # never 6 negatives
