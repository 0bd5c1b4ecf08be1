"""Listwise AP losses of deep-image-retrieval (Revaud et al., ICCV 2019; ``dirtorch/loss.py`` lines 7-136).

``APLoss(nq=25, min=0, max=1)`` quantises every score into ``nq`` triangular bins with the
fixed 1x1-Conv1d quantizer of ``dirtorch/loss.py`` and computes a differentiable AP per row:

    nbs_i = sum_m q_i(x_m);  rec_i = sum_m q_i(x_m) label_m
    prec_i = cumsum(rec)_i / (1e-16 + cumsum(nbs)_i);  AP = sum_i prec_i rec_i / sum_i rec_i

and returns ``1 - mean AP``. ``TAPLoss`` is the tie-aware variant. The quantizer's weights are
buffers named ``quantizer.weight`` / ``quantizer.bias`` like the reference's state dict.

Difference from the reference: a row without any positive has AP 0/0 = NaN there, which
poisons the whole batch; here such rows are left out of the mean (``ap()`` still reports NaN
for them) and a batch without any positive returns ``0 * x.sum()``.

In training (``objective``) every image of the batch queries the rest of it:
:func:`in_batch_scores` builds the B x (B-1) cosine matrix and its 0/1 same-class labels.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchLayout, LossOutput, Objective
from .cosine import _no_autocast

__all__ = ["APQuantizer", "APLoss", "TAPLoss", "in_batch_scores"]


def in_batch_scores(descriptors: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each image queries the rest of the batch: B x (B-1) cosines of the float32 L2-normalised
    descriptors (the diagonal dropped) and the matching 0/1 same-class matrix."""
    d = F.normalize(descriptors.float(), dim=1)
    scores = d @ d.t()
    same = (labels[:, None] == labels[None, :]).float()
    off_diagonal = ~torch.eye(len(labels), device=d.device, dtype=torch.bool)
    return scores[off_diagonal].view(len(labels), -1), same[off_diagonal].view(len(labels), -1)


class APQuantizer(nn.Module):
    """The fixed soft-binning of dirtorch's APLoss: x (N x M) -> N x nq x M bin memberships.

    Rows ``i < nq`` are the lines ``-a x + a min + (nq - i)``, rows ``nq + i`` the lines
    ``a x + (2 - nq + i) - a min`` with ``a = (nq - 1) / (max - min)``; row 0 and row 2nq-1 are
    overridden to the constant 1, so the top bin (centre ``max``) saturates above ``max`` and
    the bottom bin (centre ``min``) below ``min``. ``q_i = clamp(min(row_i, row_{nq+i}), 0)``:
    triangles of half-width 1/a centred on ``max - i / a`` that sum to 1 inside [min, max].
    """

    def __init__(self, nq: int = 25, min: float = 0.0, max: float = 1.0) -> None:  # noqa: A002 - reference names
        super().__init__()
        if not isinstance(nq, int) or isinstance(nq, bool) or not 2 <= nq <= 100:
            raise ValueError(f"APQuantizer: nq must be an int in [2, 100], got {nq!r}")
        if not max > min:
            raise ValueError(f"APQuantizer: max must exceed min, got min={min}, max={max}")
        self.nq, self.min, self.max = nq, float(min), float(max)
        a = (nq - 1) / (self.max - self.min)
        weight = torch.empty(2 * nq, 1, 1, dtype=torch.float64)
        bias = torch.empty(2 * nq, dtype=torch.float64)
        weight[:nq] = -a
        bias[:nq] = a * self.min + torch.arange(nq, 0, -1, dtype=torch.float64)
        weight[nq:] = a
        bias[nq:] = torch.arange(2 - nq, 2, 1, dtype=torch.float64) - a * self.min
        weight[0] = weight[-1] = 0
        bias[0] = bias[-1] = 1
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def forward(self, x: Tensor) -> Tensor:
        q = F.conv1d(x.unsqueeze(1), self.weight.to(x.dtype), self.bias.to(x.dtype))
        return torch.min(q[:, : self.nq], q[:, self.nq :]).clamp(min=0)

    def extra_repr(self) -> str:
        return f"nq={self.nq}, min={self.min}, max={self.max}"


class APLoss(Objective):
    """Quantised listwise AP loss: ``loss = fn(scores, labels)`` with N x M scores and 0/1 labels.

    Each row n is one query's scores against M database items (typically cosine similarities
    in [min, max]); returns ``1 - mean_n AP_n`` (optionally weighted by ``qw``, N query weights).
    The computation runs in float32 whatever the autocast.
    """

    log_name = "loss_ap"

    def __init__(self, nq: int = 25, min: float = 0.0, max: float = 1.0) -> None:  # noqa: A002
        super().__init__()
        self.quantizer = APQuantizer(nq, min, max)

    @property
    def nq(self) -> int:
        return self.quantizer.nq

    def _inputs(self, x: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 2 or x.shape != label.shape:
            raise ValueError(
                f"{type(self).__name__}: scores and labels must both be N x M, got {tuple(x.shape)} and {tuple(label.shape)}"
            )
        return x.float(), label.float()

    def ap(self, x: Tensor, label: Tensor) -> Tensor:
        """Per-row quantised AP (N,); NaN for a row without positives, as the reference."""
        with _no_autocast(x.device):
            x, label = self._inputs(x, label)
            q = self.quantizer(x)  # N x Q x M
            nbs = q.sum(dim=-1)
            rec = (q * label.unsqueeze(1)).sum(dim=-1)
            prec = rec.cumsum(dim=-1) / (1e-16 + nbs.cumsum(dim=-1))
            total = rec.sum(dim=-1, keepdim=True)
            has_pos = label.sum(dim=-1) > 0
            # Safe denominator so that no NaN enters the graph (its gradient would leak).
            ap = (prec * rec / torch.where(total > 0, total, torch.ones_like(total))).sum(dim=-1)
            return torch.where(has_pos, ap, torch.full_like(ap, float("nan")))

    def forward(self, x: Tensor, label: Tensor, qw: Tensor | None = None) -> Tensor:
        return _one_minus_map(self.ap(x, label), label, qw, x)

    def objective(self, outputs: Mapping[str, Tensor], labels: Tensor, layout: BatchLayout | None = None,
                  batch_stats: Any = None) -> LossOutput:
        """``1 - mAP`` of every image of the batch against the rest of it (:func:`in_batch_scores`)."""
        return LossOutput(self(*in_batch_scores(outputs["global"], labels)), {})

    def extra_repr(self) -> str:
        return f"nq={self.quantizer.nq}, min={self.quantizer.min}, max={self.quantizer.max}"


class TAPLoss(APLoss):
    """Tie-aware quantised AP loss (dirtorch ``TAPLoss``); ``simplified`` selects the cheap bound.

    With per-bin counts c and positives cp, their cumsums C, Cp and the shifted cumsums
    C-, Cp- (0 first), Np = number of positives:

    * simplified: ``AP = sum cp (Cp- + Cp + 1) / (C- + C + 1) / Np``;
    * full: ``r = max(cp-1, 0) / (max(c-1, 0) + 1e-8)``,
      ``AP = sum cp [c r + (Cp- + 1 - r (C- + 1)) ln((C + 1) / (C- + 1))] / (c + 1e-8) / Np``.
    """

    def __init__(self, nq: int = 25, min: float = 0.0, max: float = 1.0, simplified: bool = False) -> None:  # noqa: A002
        super().__init__(nq, min, max)
        self.simplified = bool(simplified)

    def ap(self, x: Tensor, label: Tensor) -> Tensor:
        with _no_autocast(x.device):
            x, label = self._inputs(x, label)
            n_pos = label.sum(dim=-1, keepdim=True)
            has_pos = n_pos[:, 0] > 0
            n_pos = torch.where(has_pos[:, None], n_pos, torch.ones_like(n_pos))
            q = self.quantizer(x)
            c = q.sum(dim=-1)
            cp = (q * label.unsqueeze(1)).sum(dim=-1)
            big_c, big_cp = c.cumsum(dim=-1), cp.cumsum(dim=-1)
            zeros = c.new_zeros(c.shape[0], 1)
            c_prev = torch.cat((zeros, big_c[:, :-1]), dim=-1)
            cp_prev = torch.cat((zeros, big_cp[:, :-1]), dim=-1)
            if self.simplified:
                aps = cp * (cp_prev + big_cp + 1) / (c_prev + big_c + 1) / n_pos
            else:
                eps = 1e-8
                r = (cp - 1).clamp(min=0) / ((c - 1).clamp(min=0) + eps)
                aps = cp * (c * r + (cp_prev + 1 - r * (c_prev + 1)) * torch.log((big_c + 1) / (c_prev + 1))) / (c + eps) / n_pos
            aps = aps.sum(dim=-1)
            return torch.where(has_pos, aps, torch.full_like(aps, float("nan")))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", simplified={self.simplified}"


def _one_minus_map(ap: Tensor, label: Tensor, qw: Tensor | None, x: Tensor) -> Tensor:
    has_pos = label.detach().reshape(label.shape[0], -1).sum(dim=1) > 0
    # Rows without positives are left out (NaN in the reference); an all-negative batch gives 0.
    ap = torch.where(has_pos, ap, torch.zeros_like(ap))
    if qw is not None:
        ap = ap * qw.to(ap.dtype)
    n = has_pos.sum()
    return torch.where(n > 0, 1 - ap.sum() / n.clamp_min(1), 0 * x.float().sum())
