"""MadaCos: the adaptive-scale, adaptive-margin cosine softmax of CFCD (ICCV 2023).

Transcribes ``core/model/madacos.py`` of bassyess/CFCD (``MadaCosLayerFunction.forward``, lines 16-62):
the scale from the global batch's median target cosine, the margin that gives the median sample
the target probability alpha. docs/madacos.md has the steps, the numerical hardening (float64
log-sum-exp of the median row only, no ``.item()``) and the two scale constants (the code's
``K = 9 999 999``, the default, and the paper's number of classes).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .cosine import CosineHead
from .distributed import all_gather_cat, gather_sizes, rank, world_size

__all__ = ["MadaCos", "MadaCosStats", "madacos_scale", "madacos_margin", "madacos_statistics", "CODE_SCALE_CONSTANT"]

#: The hard-coded number of "virtual negatives" in the reference code (not num_classes - 1).
CODE_SCALE_CONSTANT = 9_999_999


@dataclass
class MadaCosStats:
    """Statistics of one MadaCos call (0-dim tensors on the logits' device)."""

    scale: Tensor  # s
    margin: Tensor  # m (0 in eval mode or when the formula is negative)
    median_cos: Tensor  # median target cosine over the global batch
    median_index: Tensor  # its index in the rank-ordered gathered vector
    log_b_median: Tensor  # log B of the median sample (nan in eval mode, where it is not needed)
    raw_margin: Tensor  # m before the clamp (nan in eval mode)

    def as_dict(self) -> dict[str, Tensor]:
        return {
            "scale": self.scale,
            "margin": self.margin,
            "median_cos": self.median_cos,
            "log_b_median": self.log_b_median,
            "raw_margin": self.raw_margin,
        }


def madacos_scale(median_cos: Tensor | float, *, alpha: float, k: float = CODE_SCALE_CONSTANT,
                  min_scale: float = 32.0) -> Tensor:
    """``max(min_scale, ln(k (1 - alpha) / alpha) / (1 - median_cos))`` as a float64 tensor."""
    med = torch.as_tensor(median_cos, dtype=torch.float64)
    s = math.log(k * (1.0 - alpha) / alpha) / (1.0 - med).clamp_min(1e-12)
    return s.clamp_min(min_scale)


def madacos_margin(median_cos: Tensor | float, log_b_median: Tensor | float, scale: Tensor | float,
                   *, alpha: float) -> Tensor:
    """The unclamped margin ``med - (log B_med + ln(alpha / (1 - alpha))) / s`` (float64)."""
    med = torch.as_tensor(median_cos, dtype=torch.float64)
    log_b = torch.as_tensor(log_b_median, dtype=torch.float64)
    s = torch.as_tensor(scale, dtype=torch.float64)
    return med - (log_b + math.log(alpha / (1.0 - alpha))) / s


@torch.no_grad()
def madacos_statistics(
    cos: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    k: float = CODE_SCALE_CONSTANT,
    min_scale: float = 32.0,
    training: bool = True,
    sync: bool = True,
    group: dist.ProcessGroup | None = None,
) -> MadaCosStats:
    """Scale and margin of one MadaCos step from the local B x C cosines (gradient-free).

    With ``sync`` and an initialised process group of more than one rank, the median and
    ``B`` come from the global batch (every rank must call this, as with the reference).
    """
    cos = cos.detach().float()
    labels = labels.long()
    target = cos.gather(1, labels[:, None]).squeeze(1)
    distributed = sync and world_size(group) > 1
    sizes = gather_sizes(target.shape[0], target.device, group) if distributed else None
    target_all = all_gather_cat(target, sizes, group) if distributed else target
    if target_all.numel() == 0:
        raise ValueError("MadaCos: empty batch")
    median, index = torch.median(target_all, dim=0)
    scale = madacos_scale(median, alpha=alpha, k=k, min_scale=min_scale).to(cos.device)
    nan = torch.full((), float("nan"), dtype=torch.float64, device=cos.device)
    if not training:
        zero = torch.zeros((), dtype=torch.float64, device=cos.device)
        return MadaCosStats(scale, zero, median, index, nan, nan)
    # Only the median sample's B is used. The rank holding it computes log B of that single row
    # (logsumexp over the non-target classes in float64: never overflows) and an all_reduce
    # shares it; the reference all-gathers B of every sample (same value, B x C more work).
    # Every rank evaluates one row, so there is no host sync to find the owner.
    n_local = target.shape[0]
    log_b_median = torch.zeros((), dtype=torch.float64, device=cos.device)
    if n_local > 0:  # a rank with an empty local batch only receives
        local = index - (sum(sizes[: rank(group)]) if distributed else 0)
        mine = (local >= 0) & (local < n_local)
        row = local.clamp(0, n_local - 1).reshape(1)
        z = cos.index_select(0, row).double() * scale
        z.scatter_(1, labels.index_select(0, row)[:, None], float("-inf"))
        log_b_median = torch.where(mine, torch.logsumexp(z, dim=1)[0], log_b_median)
    if distributed:
        dist.all_reduce(log_b_median, op=dist.ReduceOp.SUM, group=group)
    raw = madacos_margin(median, log_b_median, scale, alpha=alpha)
    margin = torch.where(raw < 0, torch.zeros_like(raw), raw)
    return MadaCosStats(scale, margin, median, index, log_b_median, raw)


class MadaCos(CosineHead):
    """MadaCos loss head (CFCD): ``loss = head(embeddings, labels)``, mean CE over the local batch.

    Args:
        embedding_dim: D, the size of the (un-normalised) embeddings fed to the head.
        num_classes: C; ``weight`` is C x D, initialised U(-1/sqrt(D), 1/sqrt(D)).
        alpha: the target probability of the median sample after the margin (0.02 in every
            CFCD config; the reference config default is 0.1). The paper calls it rho.
        scale_constant: ``"code"`` (K = 9 999 999, the released code and weights),
            ``"classes"`` (K = num_classes - 1, the paper's formula) or a positive number.
        min_scale: the floor of the scale (32 in the code).
        sync_stats: gather the median and B over all ranks when torch.distributed is
            initialised (the reference). Turn it off only when ranks run different numbers of
            steps (e.g. validation on one rank), where a collective would deadlock.

    In eval mode the scale is still adaptive (computed from the current batch, as the
    reference does for its validation loss) and the margin is 0. ``last_stats`` has
    ``scale``, ``margin``, ``median_cos``, ``log_b_median`` and ``raw_margin``.
    ``batch_statistics``: with gradient accumulation the trainer computes s and m over the whole
    global batch (:meth:`window_statistics`) and passes them to :meth:`logits`.
    The DDP equivalence: each rank's loss is its local mean, DDP averages gradients, so
    ``world`` ranks of batch b train exactly as one process with batch ``world * b``.
    """

    batch_statistics = True

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        alpha: float = 0.02,
        *,
        scale_constant: str | float = "code",
        min_scale: float = 32.0,
        sync_stats: bool = True,
    ) -> None:
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"MadaCos: alpha must be in (0, 1), got {alpha}")
        super().__init__(embedding_dim, num_classes)
        self.alpha = float(alpha)
        if scale_constant == "code":
            k = float(CODE_SCALE_CONSTANT)
        elif scale_constant == "classes":
            k = float(self.num_classes - 1)
        elif isinstance(scale_constant, (int, float)) and not isinstance(scale_constant, bool) and scale_constant > 0:
            k = float(scale_constant)
        else:
            raise ValueError(
                f"MadaCos: scale_constant must be 'code', 'classes' or a positive number, got {scale_constant!r}"
            )
        self.scale_constant = scale_constant
        self.k = k
        self.min_scale = float(min_scale)
        self.sync_stats = bool(sync_stats)

    def statistics(self, cos: Tensor, labels: Tensor) -> MadaCosStats:
        """Scale and margin for precomputed cosines (collective when distributed)."""
        return madacos_statistics(
            cos, labels, alpha=self.alpha, k=self.k, min_scale=self.min_scale,
            training=self.training, sync=self.sync_stats,
        )

    @contextlib.contextmanager
    def local_statistics(self) -> Iterator[None]:
        sync, self.sync_stats = self.sync_stats, False
        try:
            yield
        finally:
            self.sync_stats = sync

    def logits(self, embeddings: Tensor, labels: Tensor, batch_stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``s (cos - m onehot)`` in float32; s and m are constants for autograd.

        ``batch_stats``: a fixed float32 ``(scale, margin)`` pair (from :meth:`window_statistics`)
        instead of the statistics of this batch.
        """
        self._check(embeddings, labels)
        labels = labels.long()
        cos = self.cosine(embeddings)
        if batch_stats is None:
            stats = self.statistics(cos, labels)
            self.stats = stats.as_dict()
            s, m = stats.scale.float(), stats.margin.float()
        else:
            s, m = batch_stats
            self.stats = {"scale": s, "margin": m}
        return s * cos.scatter_add(1, labels[:, None], (-m).expand(labels.shape[0], 1))

    @torch.no_grad()
    def window_statistics(self, outputs: Sequence[Mapping[str, Tensor]],
                          labels: Sequence[Tensor]) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        """s and m over all micro-batches of a step (the reference's global batch of 128)."""
        cos = torch.cat([self.cosine(o["global"]).float() for o in outputs])
        stats = self.statistics(cos, torch.cat(list(labels)))
        return (stats.scale.float(), stats.margin.float()), stats.as_dict()

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, alpha={self.alpha}, "
            f"scale_constant={self.scale_constant!r} (K={self.k:.0f}), min_scale={self.min_scale}, "
            f"sync_stats={self.sync_stats}"
        )
