"""The one call contract of every training objective.

    loss, stats = objective.objective(outputs, labels, layout)

* ``outputs``: the model's ``forward_features`` dict: ``"global"`` (B x D descriptors before
  the final L2) and, for the models that have them, ``"local"`` (B x C x h x w maps). An
  objective reads the entries it names in :attr:`Objective.inputs`.
* ``labels``: B class indices.
* ``layout``: a :class:`BatchLayout`, how the rows relate (independent images, or tuples
  ``[query, positive, negative_1, ...]`` of ``tuple_size`` rows).
* ``loss``: a 0-dim float32 tensor; ``stats``: the objective's statistics of this call as
  tensors (no device sync), the same as :attr:`Objective.stats` (floats in ``last_stats``).

The low-level call of each loss (``head(embeddings, labels)``, ``loss(scores, labels)``,
``loss(descriptors, tuple_size)``, ...) stays: it is the transcription of the reference code
that the tests compare. ``objective`` turns the model's outputs into that call.

A loss whose statistics span the whole global batch (MadaCos's median) sets
:attr:`Objective.batch_statistics`; the trainer then computes them with
:meth:`Objective.window_statistics` over all micro-batches of an accumulated step and passes
them back as ``batch_stats``.

A new loss is one module in ``cfcd/losses/`` with an :class:`Objective` subclass, registered by
name (``@register_loss("name")``) and imported in ``cfcd/losses/__init__.py``; see
``docs/extending.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

__all__ = ["BatchLayout", "LossOutput", "Objective"]


@dataclass(frozen=True)
class BatchLayout:
    """How the rows of a training batch relate.

    ``tuple_size`` None: independent labelled images; an int S: the batch is a whole number of
    tuples of S rows laid out ``[query (anchor), positive, negative_1, ..., negative_{S-2}]``.
    """

    tuple_size: int | None = None

    def require_tuples(self, name: str, min_size: int) -> int:
        """The tuple size, or a clear error when the batch is not made of tuples."""
        if self.tuple_size is None:
            raise ValueError(f"{name} trains on tuples [query, positive, negatives...]: use data.sampler: tuple")
        if self.tuple_size < min_size:
            raise ValueError(f"{name}: tuple_size must be >= {min_size} ([query, positive, negatives...]), "
                             f"got {self.tuple_size}")
        return int(self.tuple_size)

    def split(self, x: Tensor, name: str, min_size: int) -> Tensor:
        """B x D rows -> T x S x D tuples (checked: B a whole number of tuples)."""
        if x.dim() != 2:
            raise ValueError(f"{name}: descriptors must be B x D, got shape {tuple(x.shape)}")
        size = self.require_tuples(name, min_size)
        if x.shape[0] == 0 or x.shape[0] % size:
            raise ValueError(f"{name}: batch of {x.shape[0]} rows is not a whole number of tuples of {size}")
        return x.reshape(x.shape[0] // size, size, x.shape[1])


class LossOutput(NamedTuple):
    """What :meth:`Objective.objective` returns: the loss and its statistics (tensors)."""

    loss: Tensor
    stats: dict[str, Tensor]


class Objective(nn.Module):
    """Base class of every training objective (see the module docstring for the contract)."""

    #: entries of the model's ``forward_features`` output that :meth:`objective` reads
    inputs: ClassVar[tuple[str, ...]] = ("global",)
    #: the key of this objective's loss value in the training log
    log_name: ClassVar[str] = "loss"
    #: True when the statistics span the global batch (computed by :meth:`window_statistics`)
    batch_statistics: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        #: statistics of the last call, tensors (or floats) kept on the device until read
        self.stats: dict[str, Tensor | float] = {}

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call, as Python floats (the conversion syncs with the device)."""
        return {k: float(v.item()) if isinstance(v, Tensor) else float(v) for k, v in self.stats.items()}

    def reported_stats(self) -> dict[str, Tensor]:
        """:attr:`stats` as tensors, for the training log."""
        return {k: v.detach() if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in self.stats.items()}

    @classmethod
    def from_recipe(cls, kwargs: Mapping[str, Any], *, embedding_dim: int, num_classes: int | None) -> "Objective":
        """Build from a recipe's ``*_kwargs``; heads with class weights also take the model's sizes."""
        return cls(**kwargs)

    def objective(self, outputs: Mapping[str, Tensor], labels: Tensor, layout: BatchLayout,
                  batch_stats: Any = None) -> LossOutput:  # pragma: no cover - abstract
        """``(loss, stats)`` of one (micro-)batch; ``batch_stats`` from :meth:`window_statistics`."""
        raise NotImplementedError

    @torch.no_grad()
    def window_statistics(self, outputs: Sequence[Mapping[str, Tensor]],
                          labels: Sequence[Tensor]) -> tuple[Any, dict[str, Tensor]]:  # pragma: no cover
        """Statistics over all micro-batches of a step (no-grad outputs of each): ``(batch_stats,
        report)``, ``batch_stats`` for :meth:`objective`, ``report`` for the log."""
        raise NotImplementedError(f"{type(self).__name__} has no batch statistics")
