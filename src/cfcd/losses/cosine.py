"""Shared base for the cosine-softmax classification losses (MadaCos, ArcFace, CosFace, CurricularFace).

A head owns its class weights ``weight`` (num_classes x embedding_dim), computes
``cos = L2(embeddings) @ L2(weight).T`` in float32 whatever the autocast, turns it into
logits (``head.logits``) and returns the mean cross-entropy over the local batch
(``head(embeddings, labels)``; ``head.objective(outputs, labels, layout)`` in the common
contract of :mod:`cfcd.losses.base`, which also reports the top-1 of the batch).
``head.stats`` holds the statistics of the last call as tensors, ``head.last_stats`` as floats,
converted only when read, so training pays no device synchronisation unless it logs.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import nullcontext
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchLayout, LossOutput, Objective

__all__ = ["CosineHead", "fp32_cosine"]


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        return nullcontext()


def fp32_cosine(embeddings: Tensor, weight: Tensor) -> Tensor:
    """Cosine similarities ``L2(embeddings) @ L2(weight).T`` computed in float32, autocast disabled.

    The scale of these losses reaches 100 (MadaCos), so a bf16 cosine (3 significant digits)
    would move logits by ~0.4; the matrix product is small next to the backbone.
    """
    with _no_autocast(embeddings.device):
        return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(weight.float(), dim=1))


class CosineHead(Objective):
    """Base class: class weights, input checks, fp32 cosine, CE over the local batch, lazy stats."""

    log_name = "loss_ce"

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        if int(embedding_dim) < 1:
            raise ValueError(f"{type(self).__name__}: embedding_dim must be >= 1, got {embedding_dim}")
        if int(num_classes) < 2:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 2, got {num_classes}")
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_dim))
        self.reset_parameters()

    @classmethod
    def from_recipe(cls, kwargs: Mapping[str, Any], *, embedding_dim: int, num_classes: int | None) -> "CosineHead":
        if num_classes is None:
            raise ValueError(f"{cls.__name__} needs loss.num_classes")
        return cls(**{**kwargs, "embedding_dim": int(embedding_dim), "num_classes": int(num_classes)})

    def reset_parameters(self) -> None:
        """U(-1/sqrt(D), 1/sqrt(D)), as the CFCD MadaCos and Arcface heads."""
        bound = 1.0 / math.sqrt(self.embedding_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    # -- helpers -------------------------------------------------------------------------
    def _check(self, embeddings: Tensor, labels: Tensor | None) -> None:
        name = type(self).__name__
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{name}: embeddings must be B x {self.embedding_dim}, got {tuple(embeddings.shape)}"
            )
        if labels is not None:
            if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
                raise ValueError(
                    f"{name}: labels must be a vector of {embeddings.shape[0]} class indices, "
                    f"got shape {tuple(labels.shape)}"
                )
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"{name}: labels must be integer class indices, got {labels.dtype}")

    def cosine(self, embeddings: Tensor) -> Tensor:
        """B x C cosine similarities between the embeddings and every class weight (float32)."""
        return fp32_cosine(embeddings, self.weight)

    @contextlib.contextmanager
    def local_statistics(self) -> Iterator[None]:
        """Statistics from this process's batch only, for passes that not every rank runs
        (validation on a share of the list): heads without cross-rank statistics change nothing."""
        yield

    # -- API -----------------------------------------------------------------------------
    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        """B x C float32 logits, margins applied (training) as the loss sees them."""
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the (local) batch, as ``nn.CrossEntropyLoss`` in the references."""
        self._check(embeddings, labels)
        labels = labels.long()
        return F.cross_entropy(self.logits(embeddings, labels), labels)

    def objective(self, outputs: Mapping[str, Tensor], labels: Tensor, layout: BatchLayout | None = None,
                  batch_stats: Any = None) -> LossOutput:
        """Mean CE of the logits of ``outputs["global"]``; stats: the head's and ``top1``."""
        embeddings = outputs["global"]
        labels = labels.long()
        logits = self.logits(embeddings, labels) if batch_stats is None else self.logits(embeddings, labels, batch_stats)
        ce = F.cross_entropy(logits, labels)
        stats = self.reported_stats()
        stats["top1"] = (logits.detach().argmax(1) == labels).float().mean()
        return LossOutput(ce, stats)
