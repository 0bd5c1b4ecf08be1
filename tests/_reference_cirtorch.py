"""Transcriptions of filipradenovic/cnnimageretrieval-pytorch (cirtorch) lines, for fidelity tests only.

Upstream commit 1e66a41 (github.com/filipradenovic/cnnimageretrieval-pytorch):

* ``cirtorch/networks/imageretrievalnet.py`` l.309-324 ``extract_ms``: per scale ``input.clone()``
  (s = 1) or ``F.interpolate(scale_factor=s, mode='bilinear', align_corners=False)``,
  ``v += net(input_t).pow(msp)``, ``v /= len(ms)``, ``v = v.pow(1./msp)``, ``v /= v.norm()``;
* ``cirtorch/examples/test.py`` l.136-143: ``msp = net.pool.p.item()`` for a multi-scale GeM net
  without regional pooling or whitening, else 1;
* ``cirtorch/datasets/traindataset.py`` l.153-244 ``TuplesDataset.create_epoch_tuples``: qsize
  (query, positive) pairs by ``torch.randperm`` (l.164), a pool of poolsize images by
  ``torch.randperm`` (l.179), descriptors with the current net in eval mode, ``scores =
  poolvecs.t() @ qvecs`` sorted descending (l.218-219), then per query the walk of l.223-240:
  accept a pool image when its cluster is neither the query's nor that of an accepted negative,
  until nnum are found.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def extract_ms(net, input, ms, msp):  # noqa: A002 - upstream names
    v = None
    for s in ms:
        if s == 1:
            input_t = input.clone()
        else:
            input_t = nn.functional.interpolate(input, scale_factor=s, mode="bilinear", align_corners=False)
        out = net(input_t).pow(msp).cpu().data.squeeze()
        v = out if v is None else v + out
    v /= len(ms)
    v = v.pow(1.0 / msp)
    v /= v.norm()
    return v


def create_epoch_tuples(qpool, ppool, clusters, nnum, qsize, poolsize, describe, *, num_images):
    """The selection of ``create_epoch_tuples`` with the extraction replaced by ``describe(indices)``
    (D x len(indices) descriptors of those images with the current net). Uses torch's global RNG
    exactly as upstream (two ``randperm`` calls)."""
    idxs2qpool = torch.randperm(len(qpool))[:qsize]
    qidxs = [qpool[i] for i in idxs2qpool]
    pidxs = [ppool[i] for i in idxs2qpool]
    if nnum == 0:
        return qidxs, pidxs, [[] for _ in qidxs], 0.0
    idxs2images = torch.randperm(num_images)[:poolsize]
    qvecs = describe(qidxs)
    poolvecs = describe([int(i) for i in idxs2images])
    scores = torch.mm(poolvecs.t(), qvecs)
    scores, ranks = torch.sort(scores, dim=0, descending=True)
    avg_ndist = torch.tensor(0).float()
    n_ndist = torch.tensor(0).float()
    nidxs_all = []
    for q in range(len(qidxs)):
        qcluster = clusters[qidxs[q]]
        cl = [qcluster]
        nidxs = []
        r = 0
        while len(nidxs) < nnum:
            potential = idxs2images[ranks[r, q]]
            if not clusters[potential] in cl:
                nidxs.append(potential)
                cl.append(clusters[potential])
                avg_ndist += torch.pow(qvecs[:, q] - poolvecs[:, ranks[r, q]] + 1e-6, 2).sum(dim=0).sqrt()
                n_ndist += 1
            r += 1
        nidxs_all.append([int(n) for n in nidxs])
    return qidxs, pidxs, nidxs_all, (avg_ndist / n_ndist).item()
