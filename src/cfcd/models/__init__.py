"""Retrieval models: one registry, one constructor.

>>> import cfcd.models
>>> model = cfcd.models.create("gem_efficientnet_lite2")          # embedded ImageNet weights
>>> model = cfcd.models.create("cfcd_r50", weights="R50_CFCD.pyth")  # official checkpoint, no pickle code run
>>> model = cfcd.models.create("cfcd_r50", weights="random")         # explicit random initialisation

Every model maps a normalised batch ``B x 3 x H x W`` (see ``model.preprocess``) to L2-normalised
``B x D`` descriptors; ``model.forward_features(x)`` gives ``{"global", "local"}`` before the final L2.
"""

from cfcd.models.base import RetrievalModel
from cfcd.models.checkpoints import (
    Checkpoint,
    LoadReport,
    load_backbone_weights,
    load_checkpoint_state,
    load_weights,
    read_checkpoint,
    save_weights,
)
from cfcd.models.pooling import GeM, MAC, RMAC, SPoC, gem, rmac_regions
from cfcd.models.preprocess import Preprocess
from cfcd.models.registry import (
    DEFAULT_MODEL,
    RANDOM_WEIGHTS,
    create,
    embedded_models,
    get_entry,
    has_embedded_weights,
    list_models,
    register_model,
)

__all__ = [
    "DEFAULT_MODEL", "RANDOM_WEIGHTS", "Checkpoint", "GeM", "LoadReport", "MAC", "Preprocess", "RMAC", "RetrievalModel", "SPoC",
    "create", "embedded_models", "gem", "get_entry", "has_embedded_weights", "list_models", "load_backbone_weights", "load_checkpoint_state", "load_weights", "read_checkpoint",
    "register_model", "rmac_regions", "save_weights",
]
