"""The common interface of every retrieval model in :mod:`cfcd.models`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cfcd.models.pooling import l2_normalize
from cfcd.models.preprocess import Preprocess


class RetrievalModel(nn.Module):
    """Base class: ``model(x)`` is the L2-normalised global descriptor (B x D, float32).

    Subclasses implement :meth:`forward_features`, returning ``{"global": B x D embedding
    before the final L2, "local": B x C x h x w local feature map or None}``.

    Attributes:
        preprocess: channel order and mean/std the weights expect (:class:`Preprocess`).
        embedding_dim: D.
        model_config: ``{"name", "kwargs"}`` to re-create the model with :func:`cfcd.models.create`.
        load_report: the :class:`~cfcd.models.checkpoints.LoadReport` of the weights given to ``create``.
    """

    preprocess: Preprocess
    embedding_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.model_config: dict[str, Any] = {}
        self.load_report = None  # set by cfcd.models.create(weights=...)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.forward_features(x)["global"])
