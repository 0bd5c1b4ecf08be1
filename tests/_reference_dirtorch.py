"""Transcriptions of naver/deep-image-retrieval (dirtorch) lines, for fidelity tests only.

Upstream commit 610247f (github.com/naver/deep-image-retrieval); file and line of each piece:

* ``dirtorch/utils/transforms.py`` l.133-185 ``Scale`` (``get_params`` l.154-172, ``__call__``
  l.174-185: resize with ``Image.BILINEAR`` only when the shorter side changes);
* ``dirtorch/utils/pytorch_loader.py`` l.55 ``transforms.create(trf_chain, to_tensor=True)`` ->
  ``..., ToTensor(), Normalize(mean=mean, std=std)``; ``dirtorch/datasets/generic.py`` l.246
  ``Image.open(...).convert('RGB')``;
* ``dirtorch/utils/common.py`` l.41-55 ``pool`` (``sympow`` l.48-50), l.221-238 ``transform`` /
  ``whiten_features``; ``dirtorch/test_dir.py`` l.121-122 (``F.normalize(pool(...))``), l.136-138
  (whitening), l.237-239 (``net.pca = net.pca[args.whiten]``, ``whitenp``/``whitenv``/``whitenm``);
* ``dirtorch/loss.py`` l.7-65 ``APLoss``, l.73-131 ``TAPLoss``, l.148-207 ``TripletLogExpLoss``,
  l.210-224 ``sim_to_dist``, ``APLoss_dist``, ``TAPLoss_dist``;
* ``dirtorch/nets/rmac_resnet.py`` l.12-69 ``ResNet_RMAC`` (``self.fc`` is created whatever
  ``without_fc`` says, l.34; used only ``if not self.without_fc``, l.65-66).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


class Scale:
    """dirtorch/utils/transforms.py Scale (int/float size; the tuple case omitted)."""

    def __init__(self, size, interpolation=Image.BILINEAR, largest=False, can_upscale=True, can_downscale=True):
        self.size = size
        self.interpolation = interpolation
        self.largest = largest
        self.can_upscale = can_upscale
        self.can_downscale = can_downscale

    def get_params(self, imsize):
        w, h = imsize
        if isinstance(self.size, int):
            is_smaller = lambda a, b: (a >= b) if self.largest else (a <= b)  # noqa: E731
            if (is_smaller(w, h) and w == self.size) or (is_smaller(h, w) and h == self.size):
                ow, oh = w, h
            elif is_smaller(w, h):
                ow = self.size
                oh = int(0.5 + self.size * h / w)
            else:
                oh = self.size
                ow = int(0.5 + self.size * w / h)
        else:
            ow, oh = int(0.5 + self.size * w), int(0.5 + self.size * h)
        return ow, oh

    def __call__(self, img):
        size2 = self.get_params(img.size)
        if size2 != img.size:
            a1, a2 = img.size, size2
            if (self.can_upscale and min(a1) < min(a2)) or (self.can_downscale and min(a1) > min(a2)):
                img = img.resize(size2, self.interpolation)
        return img


def to_tensor_normalize(img, mean, std):
    """torchvision ToTensor() + Normalize(mean, std) of a PIL RGB image -> 1 x 3 x H x W."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x[None]


def pool(x, pooling="mean", gemp=3):
    """dirtorch/utils/common.py pool."""
    if len(x) == 1:
        return x[0]
    x = torch.stack(x, dim=0)
    if pooling == "mean":
        return torch.mean(x, dim=0)
    elif pooling == "gem":
        def sympow(x, p, eps=1e-6):
            s = torch.sign(x)
            return (x * s).clamp(min=eps).pow(p) * s
        x = sympow(x, gemp)
        x = torch.mean(x, dim=0)
        return sympow(x, 1 / gemp)
    raise ValueError(pooling)


def eval_descriptors(net, rgb_uint8: np.ndarray, trfs: list[str] | list[Scale], mean, std, pooling="gem", gemp=3):
    """test_dir.eval_model for one image: one descriptor per transform chain, pool, F.normalize."""
    descs = []
    for chain in trfs:
        img = Image.fromarray(rgb_uint8).convert("RGB")
        if chain is not None:
            img = chain(img)
        with torch.no_grad():
            d = net(to_tensor_normalize(img, mean, std))
        descs.append(d.reshape(1, -1))
    return F.normalize(pool(descs, pooling, gemp), p=2, dim=1)[0]


def transform(pca, X, whitenp=0.5, whitenv=None, whitenm=1.0):
    """dirtorch/utils/common.py transform (use_sklearn=True); ``pca`` has sklearn's attributes."""
    if pca.mean_ is not None:
        X = X - pca.mean_
    X_transformed = np.dot(X, pca.components_[:whitenv].T)
    if pca.whiten:
        X_transformed /= whitenm * np.power(pca.explained_variance_[:whitenv], whitenp)
    return X_transformed


def whiten_features(X, pca, l2norm=True, whitenp=0.5, whitenv=None, whitenm=1.0):
    res = transform(pca, X, whitenp=whitenp, whitenv=whitenv, whitenm=whitenm)
    if l2norm:
        res = res / np.expand_dims(np.linalg.norm(res, axis=1), axis=1)
    return res


class APLoss(nn.Module):
    """dirtorch/loss.py APLoss."""

    def __init__(self, nq=25, min=0, max=1):  # noqa: A002
        nn.Module.__init__(self)
        self.nq, self.min, self.max = nq, min, max
        gap = max - min
        self.quantizer = q = nn.Conv1d(1, 2 * nq, kernel_size=1, bias=True)
        q.weight = nn.Parameter(q.weight.detach(), requires_grad=False)
        q.bias = nn.Parameter(q.bias.detach(), requires_grad=False)
        a = (nq - 1) / gap
        with torch.no_grad():
            q.weight[:nq] = -a
            q.bias[:nq] = torch.from_numpy(a * min + np.arange(nq, 0, -1))
            q.weight[nq:] = a
            q.bias[nq:] = torch.from_numpy(np.arange(2 - nq, 2, 1) - a * min)
            q.weight[0] = q.weight[-1] = 0
            q.bias[0] = q.bias[-1] = 1

    def forward(self, x, label, qw=None):
        N, M = x.shape
        q = self.quantizer(x.unsqueeze(1))
        q = torch.min(q[:, : self.nq], q[:, self.nq :]).clamp(min=0)
        nbs = q.sum(dim=-1)
        rec = (q * label.view(N, 1, M).float()).sum(dim=-1)
        prec = rec.cumsum(dim=-1) / (1e-16 + nbs.cumsum(dim=-1))
        rec = rec / rec.sum(dim=-1).unsqueeze(1)  # (in place upstream: `rec /= ...`)
        ap = (prec * rec).sum(dim=-1)
        return 1 - ap.mean()


class TAPLoss(APLoss):
    """dirtorch/loss.py TAPLoss."""

    def __init__(self, nq=25, min=0, max=1, simplified=False):  # noqa: A002
        APLoss.__init__(self, nq=nq, min=min, max=max)
        self.simplified = simplified

    def forward(self, x, label, qw=None):
        N, M = x.shape
        label = label.float()
        Np = label.sum(dim=-1, keepdim=True)
        q = self.quantizer(x.unsqueeze(1))
        q = torch.min(q[:, : self.nq], q[:, self.nq :]).clamp(min=0)
        c = q.sum(dim=-1)
        cp = (q * label.view(N, 1, M)).sum(dim=-1)
        C = c.cumsum(dim=-1)
        Cp = cp.cumsum(dim=-1)
        zeros = torch.zeros(N, 1).to(x.device)
        C_1d = torch.cat((zeros, C[:, :-1]), dim=-1)
        Cp_1d = torch.cat((zeros, Cp[:, :-1]), dim=-1)
        if self.simplified:
            aps = cp * (Cp_1d + Cp + 1) / (C_1d + C + 1) / Np
        else:
            eps = 1e-8
            ratio = (cp - 1).clamp(min=0) / ((c - 1).clamp(min=0) + eps)
            aps = cp * (c * ratio + (Cp_1d + 1 - ratio * (C_1d + 1)) * torch.log((C + 1) / (C_1d + 1))) / (c + eps) / Np
        aps = aps.sum(dim=-1)
        return 1 - aps.mean()


def sim_to_dist(scores):
    return 1 - torch.sqrt(2.001 - 2 * scores)


class APLoss_dist(APLoss):  # noqa: N801 - upstream name
    def forward(self, x, label, **kw):
        return APLoss.forward(self, sim_to_dist(x), label, **kw)


class TAPLoss_dist(TAPLoss):  # noqa: N801
    def forward(self, x, label, **kw):
        return TAPLoss.forward(self, sim_to_dist(x), label, **kw)


class TripletLogExpLoss(nn.Module):
    """dirtorch/loss.py TripletLogExpLoss."""

    def __init__(self, p=2, eps=1e-6, swap=False):
        super().__init__()
        self.p, self.eps, self.swap = p, eps, swap

    def forward(self, anchor, positive, negative):
        d_p = F.pairwise_distance(anchor, positive, self.p, self.eps)
        d_n = F.pairwise_distance(anchor, negative, self.p, self.eps)
        if self.swap:
            d_s = F.pairwise_distance(positive, negative, self.p, self.eps)
            d_n = torch.min(d_n, d_s)
        dist = torch.log(1 + torch.exp(d_p - d_n))
        return torch.mean(dist)
