"""cirtorch's tuple losses for the GeM baselines (Radenovic et al., TPAMI 2019;
``cirtorch/layers/functional.py`` ``contrastive_loss`` / ``triplet_loss``, lines 141-172).

Layout: cirtorch passes a D x N matrix whose COLUMNS are grouped per tuple with a label
vector (-1 query, 1 positive, 0 negative). Here the input is our usual row-major B x D batch
of descriptors, grouped per tuple ``[query, positive, negative_1, ..., negative_k]`` of
``tuple_size`` rows, i.e. ``x_cirtorch == x_here.T`` with the labels implied by the position.
``tuples_from_cirtorch`` converts the cirtorch layout. Both losses are SUMS (not means) over
the tuples' pairs, as in cirtorch.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BatchLayout, LossOutput, Objective

__all__ = ["ContrastiveLoss", "TripletLoss", "TupleLoss", "tuples_from_cirtorch"]


def tuples_from_cirtorch(x: Tensor, label: Tensor) -> tuple[Tensor, int]:
    """cirtorch's D x N matrix + labels (-1, 1, 0...) per tuple -> (B x D rows, tuple_size)."""
    n_queries = int((label == -1).sum().item())
    if n_queries == 0 or x.shape[1] % n_queries:
        raise ValueError(f"cirtorch layout: {x.shape[1]} columns do not split into {n_queries} equal tuples")
    size = x.shape[1] // n_queries
    pattern = torch.tensor([-1, 1] + [0] * (size - 2), device=label.device, dtype=label.dtype)
    if not torch.equal(label, pattern.repeat(n_queries)):
        raise ValueError("cirtorch layout: labels must repeat [-1, 1, 0, ..., 0] per tuple")
    return x.t(), size


class TupleLoss(Objective):
    """Base of the losses on tuples of global descriptors: ``loss(descriptors, tuple_size)``.

    ``objective`` L2-normalises ``outputs["global"]`` in float32 (the descriptor the model
    returns) and takes the tuple size from the batch layout.
    """

    log_name = "loss_tuple"

    def forward(self, x: Tensor, tuple_size: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def objective(self, outputs: Mapping[str, Tensor], labels: Tensor, layout: BatchLayout,
                  batch_stats: Any = None) -> LossOutput:
        size = layout.require_tuples(type(self).__name__, 2)
        return LossOutput(self(F.normalize(outputs["global"].float(), dim=1), size), {})


class ContrastiveLoss(TupleLoss):
    """cirtorch's contrastive loss: the query against each other member of its tuple.

    ``d = sqrt(sum_c (q_c - x_c + eps)^2)`` (eps added to each component, as cirtorch);
    ``L = sum [ 1/2 y d^2 + 1/2 (1 - y) max(0, margin - d)^2 ]`` with y = 1 for the positive and
    0 for the negatives. cirtorch's default margin 0.7 (its README trains with 0.85).
    """

    def __init__(self, margin: float = 0.7, eps: float = 1e-6) -> None:
        super().__init__()
        self.margin = float(margin)
        self.eps = float(eps)

    def forward(self, x: Tensor, tuple_size: int) -> Tensor:
        t = BatchLayout(tuple_size).split(x, "ContrastiveLoss", 2)
        q, others = t[:, :1], t[:, 1:]
        d = (q - others + self.eps).pow(2).sum(dim=2).sqrt()  # T x (S-1)
        y = torch.zeros_like(d)
        y[:, 0] = 1
        return (0.5 * y * d.pow(2) + 0.5 * (1 - y) * (self.margin - d).clamp(min=0).pow(2)).sum()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, eps={self.eps}"


class TripletLoss(TupleLoss):
    """cirtorch's triplet loss: ``sum_tuples sum_neg max(0, |q - p|^2 - |q - n|^2 + margin)``.

    Squared Euclidean distances, summed. cirtorch's default margin 0.1 (its README trains the
    "-gem-w" models with 0.5).
    """

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, x: Tensor, tuple_size: int) -> Tensor:
        t = BatchLayout(tuple_size).split(x, "TripletLoss", 3)
        q, p, n = t[:, :1], t[:, 1:2], t[:, 2:]
        d_pos = (q - p).pow(2).sum(dim=2)  # T x 1
        d_neg = (q - n).pow(2).sum(dim=2)  # T x (S-2)
        return (d_pos - d_neg + self.margin).clamp(min=0).sum()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
