"""deep-image-retrieval's distance-based losses (``dirtorch/loss.py``), which its AP-GeM training used.

* :class:`APLossDist` / :class:`TAPLossDist` (``APLoss_dist`` / ``TAPLoss_dist``): the AP losses
  of :mod:`cfcd.losses.ap` on ``sim_to_dist(s) = 1 - sqrt(2.001 - 2 s)`` instead of the cosine
  similarity ``s``: for unit vectors ``sqrt(2 - 2 s)`` is the Euclidean distance, so the bins are
  uniform in distance rather than in cosine (0.001 keeps the square root's gradient finite at
  ``s = 1``). Call ``loss(scores, labels)`` like :class:`~cfcd.losses.APLoss`; the quantizer
  range ``[min, max]`` (default [0, 1]) applies to the transformed values, as in dirtorch.
* :class:`TripletLogExpLoss`: ``mean log(1 + exp(d(a, p) - d(a, n)))`` with
  ``d = F.pairwise_distance(., ., p, eps)`` (L_p norm of ``a - b + eps``), optionally
  ``d(a, n) <- min(d(a, n), d(p, n))`` (``swap``). Called ``loss(descriptors, tuple_size)`` like
  :class:`~cfcd.losses.TripletLoss` (rows grouped ``[query, positive, negative_1, ...]``; one
  triplet per negative, the mean over all of them); ``loss.triplets(a, p, n)`` is dirtorch's own
  signature (three N x D matrices).

In training all three follow the common contract (:mod:`cfcd.losses.base`): the AP losses
inherit :meth:`APLoss.objective` (every image against the rest of the batch), the triplet loss
:meth:`TupleLoss.objective` (L2-normalised descriptors, the layout's tuple size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ap import APLoss, TAPLoss
from .base import BatchLayout
from .cosine import _no_autocast
from .pairwise import TupleLoss

__all__ = ["APLossDist", "TAPLossDist", "TripletLogExpLoss", "sim_to_dist"]


def sim_to_dist(scores: Tensor) -> Tensor:
    """dirtorch ``sim_to_dist``: ``1 - sqrt(2.001 - 2 s)`` (computed in float32)."""
    return 1 - torch.sqrt(2.001 - 2 * scores.float())


class APLossDist(APLoss):
    """dirtorch ``APLoss_dist``: :class:`~cfcd.losses.APLoss` on ``sim_to_dist(scores)``."""

    def ap(self, x: Tensor, label: Tensor) -> Tensor:
        with _no_autocast(x.device):
            return super().ap(sim_to_dist(x), label)


class TAPLossDist(TAPLoss):
    """dirtorch ``TAPLoss_dist``: :class:`~cfcd.losses.TAPLoss` on ``sim_to_dist(scores)``."""

    def ap(self, x: Tensor, label: Tensor) -> Tensor:
        with _no_autocast(x.device):
            return super().ap(sim_to_dist(x), label)


class TripletLogExpLoss(TupleLoss):
    """dirtorch ``TripletLogExpLoss(p=2, eps=1e-6, swap=False)``; see the module docstring."""

    def __init__(self, p: float = 2.0, eps: float = 1e-6, swap: bool = False) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"TripletLogExpLoss: p must be positive, got {p}")
        self.p = float(p)
        self.eps = float(eps)
        self.swap = bool(swap)

    def triplets(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        if anchor.dim() != 2 or anchor.shape != positive.shape or anchor.shape != negative.shape:
            raise ValueError(
                "TripletLogExpLoss: anchor, positive and negative must be N x D of one shape, got "
                f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
            )
        with _no_autocast(anchor.device):
            a, pos, neg = anchor.float(), positive.float(), negative.float()
            d_p = F.pairwise_distance(a, pos, self.p, self.eps)
            d_n = F.pairwise_distance(a, neg, self.p, self.eps)
            if self.swap:
                d_n = torch.min(d_n, F.pairwise_distance(pos, neg, self.p, self.eps))
            # log(1 + exp(z)) as dirtorch writes it (softplus would differ only past exp overflow)
            return torch.log(1 + torch.exp(d_p - d_n)).mean()

    def forward(self, x: Tensor, tuple_size: int) -> Tensor:
        t = BatchLayout(tuple_size).split(x, "TripletLogExpLoss", 3)
        n_neg = tuple_size - 2
        a = t[:, :1].expand(-1, n_neg, -1).reshape(-1, t.shape[2])
        p = t[:, 1:2].expand(-1, n_neg, -1).reshape(-1, t.shape[2])
        n = t[:, 2:].reshape(-1, t.shape[2])
        return self.triplets(a, p, n)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}, swap={self.swap}"
