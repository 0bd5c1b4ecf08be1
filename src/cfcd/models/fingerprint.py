"""What identifies a model's numbers: recorded in every store's meta and in the ONNX graph cache's key."""

from __future__ import annotations

import hashlib
import os

import torch

from cfcd.models.checkpoints import weights_sha256
from cfcd.models.registry import RANDOM_WEIGHTS


def model_fingerprint(model, weights: str | os.PathLike | None) -> dict:
    """What identifies the model's numbers: its config, the weights file hash, and a hash of the
    state dict itself (catches random initialisations that differ between runs)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    preprocess = model.preprocess
    return {
        "config": getattr(model, "model_config", {"name": type(model).__name__}),
        "weights": None if weights is None else str(weights),
        "weights_sha256": None if weights is None or str(weights) == RANDOM_WEIGHTS else weights_sha256(weights),
        "state_sha256": digest.hexdigest(),
        "embedding_dim": int(model.embedding_dim),
        "preprocess": {
            "channel_order": getattr(preprocess, "channel_order", "RGB"),
            "mean": [float(v) for v in preprocess.mean],
            "std": [float(v) for v in preprocess.std],
        },
    }
