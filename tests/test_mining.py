"""cirtorch's model-based hard-negative mining against a transcription of create_epoch_tuples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import _reference_cirtorch as cir
from cfcd.train.mining import HardNegativeMiner, MinedTupleBatchSampler, pairs_from_labels
from cfcd.errors import InputError


def _world(n_images=120, n_clusters=30, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    clusters = torch.randint(0, n_clusters, (n_images,), generator=g).numpy()
    centres = F.normalize(torch.randn(n_clusters, dim, generator=g), dim=1)
    desc = F.normalize(centres[clusters] + 0.6 * torch.randn(n_images, dim, generator=g), dim=1)
    return clusters, desc


@pytest.mark.parametrize("epoch", [0, 3])
def test_mining_equals_create_epoch_tuples(epoch):
    clusters, desc = _world()
    qpool, ppool = pairs_from_labels(clusters, seed=1)
    describe = lambda idx: desc[list(idx)]  # noqa: E731 - the "current model"
    miner = HardNegativeMiner(qpool, ppool, clusters, nnum=5, qsize=40, poolsize=90, seed=0)
    ours = miner.mine(describe, epoch)
    torch.manual_seed(0 + epoch)  # cirtorch train.py seeds torch with the epoch
    q, p, n, avg = cir.create_epoch_tuples(qpool, ppool, clusters, 5, 40, 90, lambda idx: describe(idx).t(),
                                           num_images=len(clusters))
    assert ours.qidxs == q and ours.pidxs == p and ours.nidxs == n
    assert abs(ours.avg_negative_distance - avg) <= 1e-5 * avg
    for qi, negs in zip(ours.qidxs, ours.nidxs):  # one per cluster, never the query's
        cl = [clusters[i] for i in negs]
        assert len(set(cl)) == 5 and clusters[qi] not in cl


def test_mined_sampler_batches_and_errors():
    clusters, desc = _world(seed=2)
    qpool, ppool = pairs_from_labels(clusters)
    miner = HardNegativeMiner(qpool, ppool, clusters, nnum=2, qsize=16, poolsize=60)
    sampler = MinedTupleBatchSampler(miner, lambda idx: desc[list(idx)], global_batch=8, micro_batch=4, seed=0)
    batches = list(sampler)
    assert len(batches) == sampler.steps_per_epoch() * sampler.accumulation == 16
    rows = np.asarray([i for b in batches for _, i in b]).reshape(-1, 4)
    np.testing.assert_array_equal(rows, sampler.last.as_rows()[: len(rows)])
    few = HardNegativeMiner(qpool, ppool, clusters, nnum=5, qsize=4, poolsize=3)
    with pytest.raises(InputError, match="clusters other than"):
        few.mine(lambda idx: desc[list(idx)])
    with pytest.raises(InputError, match="set .describe"):
        list(MinedTupleBatchSampler(miner, global_batch=8, micro_batch=4))


def test_trainer_mined_contrastive_baseline(tmp_path):
    """cfcd train with data.sampler: mined (cirtorch's training mode of the GeM baselines)."""
    import _train_helpers as H
    from cfcd.train.logging import read_log
    from cfcd.train.trainer import Trainer

    root = tmp_path / "data"
    H.make_landmarks(root)
    cfg = H.tiny_config(root, tmp_path / "run", loss={"global": "contrastive", "global_kwargs": {"margin": 0.85}},
                        data={"sampler": "mined", "val_list": None,
                              "mining": {"nnum": 2, "qsize": 8, "poolsize": 40, "image_size": 48}},
                        optim={"epochs": 1}, train={"freeze_bn": True})
    trainer = Trainer(cfg, resume=False)
    trainer.build()
    assert trainer.sampler.tuple_size == 4 and trainer.module.tuple_size == 4
    trainer.fit()
    rows = read_log(tmp_path / "run" / "log.jsonl", "train")
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    mined = trainer.sampler.last
    assert len(mined.qidxs) == 8 and all(len(n) == 2 for n in mined.nidxs)
    labels = trainer.train_list.labels
    assert all(labels[q] not in {labels[i] for i in n} for q, n in zip(mined.qidxs, mined.nidxs))
    trainer.close()
