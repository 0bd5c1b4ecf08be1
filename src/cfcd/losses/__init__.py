"""Losses for retrieval training, as small modules in the style of pytorch-metric-learning.

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

``create(name, **kwargs)`` builds any of them by registry name (``list_losses()``).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import InputError
from .ap import APLoss, APQuantizer, TAPLoss
from .cosine import CosineHead, fp32_cosine
from .distance import APLossDist, TAPLossDist, TripletLogExpLoss, sim_to_dist
from .local_triplet import LocalTripletLoss, local_attention, match_local_descriptors
from .madacos import MadaCos, MadaCosStats, madacos_margin, madacos_scale, madacos_statistics
from .margin import ArcFace, CosFace, CurricularFace
from .pairwise import ContrastiveLoss, TripletLoss, tuples_from_cirtorch

__all__ = [
    "APLoss", "APLossDist", "APQuantizer", "ArcFace", "ContrastiveLoss", "CosFace", "CosineHead", "CurricularFace",
    "LocalTripletLoss", "MadaCos", "MadaCosStats", "TAPLoss", "TAPLossDist", "TripletLogExpLoss", "TripletLoss",
    "create", "fp32_cosine", "is_classification_head", "list_losses", "local_attention",
    "madacos_margin", "madacos_scale", "madacos_statistics", "match_local_descriptors", "register_loss",
    "sim_to_dist", "tuples_from_cirtorch",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register ``factory`` under ``name`` (usable as a decorator). Names are lower-case."""

    def _add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[key] = f
        return f

    return _add(factory) if factory is not None else _add


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
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered loss, e.g. ``create("madacos", embedding_dim=512, num_classes=81313)``.

    An unknown name, a keyword the loss does not take or a bad value raises
    :class:`cfcd.errors.InputError` (these come from configs and command lines).
    """
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise InputError(f"unknown loss {name!r}; known losses: {', '.join(list_losses())}")
    try:
        return _REGISTRY[key](**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"loss {name!r} with arguments {sorted(kwargs)}: {exc}") from exc


def is_classification_head(module: nn.Module) -> bool:
    """True for the heads that own class weights and take ``(embeddings, labels)``."""
    return isinstance(module, CosineHead)
