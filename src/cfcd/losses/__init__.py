"""Losses for retrieval training, as small modules in the style of pytorch-metric-learning.

Every loss is an :class:`Objective` with one training contract (:mod:`cfcd.losses.base`)::

    loss, stats = objective.objective(outputs, labels, layout)

``outputs`` the model's ``forward_features`` dict (``"global"``, ``"local"``), ``layout`` a
:class:`BatchLayout` (independent images or tuples). Each loss keeps its own low-level call,
the transcription of its reference:

Classification heads own their class weights (``head.weight``, num_classes x embedding_dim)
and are called ``loss = head(embeddings, labels)`` (mean cross-entropy over the local batch);
``head.logits(embeddings, labels)`` gives the logits and ``head.last_stats`` the statistics of
the last call:

* :class:`MadaCos` (CFCD), :class:`ArcFace`, :class:`CosFace`, :class:`CurricularFace`
  (DOLG's "Arcface").

Tuple / list losses:

* :class:`LocalTripletLoss` (CFCD stage 2): ``loss(local_features, tuple_size=8)``;
* :class:`ContrastiveLoss`, :class:`TripletLoss` (cirtorch): ``loss(descriptors, tuple_size)``;
* :class:`APLoss`, :class:`TAPLoss` (deep-image-retrieval): ``loss(scores, labels)``;
* :class:`APLossDist`, :class:`TAPLossDist` (dirtorch ``APLoss_dist``/``TAPLoss_dist``):
  ``loss(scores, labels)``; :class:`TripletLogExpLoss` (dirtorch): ``loss(descriptors, tuple_size)``.

``create(name, **kwargs)`` builds any of them by registry name (``list_losses()``),
``create_from_recipe`` from a recipe's kwargs and the model's sizes. A new loss is one module
here and one line in the registry below (``docs/extending.md``).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import InputError
from .ap import APLoss, APQuantizer, TAPLoss, in_batch_scores
from .base import BatchLayout, LossOutput, Objective
from .cosine import CosineHead, fp32_cosine
from .distance import APLossDist, TAPLossDist, TripletLogExpLoss, sim_to_dist
from .local_triplet import LocalTripletLoss, local_attention, match_local_descriptors
from .madacos import MadaCos, MadaCosStats, madacos_margin, madacos_scale, madacos_statistics
from .margin import ArcFace, CosFace, CurricularFace
from ..utils.registry import Registry
from .pairwise import ContrastiveLoss, TripletLoss, TupleLoss, tuples_from_cirtorch

__all__ = [
    "APLoss", "APLossDist", "APQuantizer", "ArcFace", "BatchLayout", "ContrastiveLoss", "CosFace", "CosineHead",
    "CurricularFace", "LocalTripletLoss", "LossOutput", "MadaCos", "MadaCosStats", "Objective", "TAPLoss",
    "TAPLossDist", "TripletLogExpLoss", "TripletLoss", "TupleLoss",
    "LOSSES", "create", "create_from_recipe", "fp32_cosine", "in_batch_scores", "is_classification_head", "list_losses",
    "local_attention", "madacos_margin", "madacos_scale", "madacos_statistics", "match_local_descriptors",
    "register_loss", "sim_to_dist", "tuples_from_cirtorch",
]

LOSSES: Registry[type[Objective]] = Registry("loss", key=lambda name: name.lower().replace("-", "_"))


def register_loss(name: str, cls: type[Objective] | None = None):
    """Register the :class:`Objective` subclass ``cls`` under ``name`` (usable as a decorator)."""

    def _add(c: type[Objective]) -> type[Objective]:
        if not (isinstance(c, type) and issubclass(c, Objective)):
            raise TypeError(f"loss {name!r}: {c!r} is not a cfcd.losses.Objective subclass")
        return LOSSES.register(name, c)

    return _add(cls) if cls is not None else _add


for _name, _cls in {
    "madacos": MadaCos,
    "arcface": ArcFace,
    "cosface": CosFace,
    "curricularface": CurricularFace,
    "dolg_arcface": CurricularFace,  # what DOLG's code calls "Arcface"
    "local_triplet": LocalTripletLoss,
    "ap": APLoss,
    "tap": TAPLoss,
    "contrastive": ContrastiveLoss,
    "triplet": TripletLoss,
    "ap_dist": APLossDist,
    "tap_dist": TAPLossDist,
    "triplet_logexp": TripletLogExpLoss,
}.items():
    register_loss(_name, _cls)


def list_losses() -> list[str]:
    """Registered loss names, sorted."""
    return LOSSES.names()


def _lookup(name: str) -> type[Objective]:
    return LOSSES.get(name)


def create(name: str, **kwargs) -> Objective:
    """Build a registered loss, e.g. ``create("madacos", embedding_dim=512, num_classes=81313)``.

    An unknown name, a keyword the loss does not take or a bad value raises
    :class:`cfcd.errors.InputError` (these come from configs and command lines).
    """
    cls = _lookup(name)
    try:
        return cls(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"loss {name!r} with arguments {sorted(kwargs)}: {exc}") from exc


def create_from_recipe(name: str, kwargs: Mapping[str, Any] | None = None, *, embedding_dim: int,
                       num_classes: int | None = None) -> Objective:
    """Build a registered loss from a recipe's ``loss.*_kwargs``; heads with class weights also
    get the model's ``embedding_dim`` and the recipe's ``num_classes`` (:meth:`Objective.from_recipe`)."""
    cls = _lookup(name)
    kwargs = dict(kwargs or {})
    try:
        return cls.from_recipe(kwargs, embedding_dim=embedding_dim, num_classes=num_classes)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"loss {name!r} with arguments {sorted(kwargs)}: {exc}") from exc


def is_classification_head(module: Any) -> bool:
    """True for the heads that own class weights and take ``(embeddings, labels)``."""
    return isinstance(module, CosineHead)
