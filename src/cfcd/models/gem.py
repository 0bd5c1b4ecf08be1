"""GeM baselines: deep-image-retrieval (dirtorch) and cnnimageretrieval-pytorch (cirtorch) networks,
and GeM on any timm backbone (the embedded EfficientNet-Lite default).

``whitening`` selects the head after pooling:

- ``None``: ``pool -> L2`` (off-the-shelf; EfficientNet-Lite: GeM p=3 fixed on the 1280-d conv_head output).
- ``"cirtorch"``: ``pool -> L2N -> whiten = Linear(C, C, bias) -> L2N`` (cirtorch "-w" networks;
  ``ImageRetrievalNet`` with ``whitening=True``). Post-hoc Lw (``meta['Lw']``) is not part of the model:
  it is kept as an extra tensor by the checkpoint import.
- ``"dirtorch"``: ``pool -> [L2N if norm_features] -> fc = Linear(C, out_dim, bias) -> L2``
  (``ResNet_RMAC``; AP-GeM uses out_dim 2048). The PCA of the checkpoint is an extra as well.

Pooling: ``gem`` (learnable p by default, as both originals), ``gemmp``, ``mac``, ``spoc``, ``rmac``.
"""

from __future__ import annotations

import torch
from torch import nn

from cfcd.models.backbones import create_backbone
from cfcd.models.base import RetrievalModel
from cfcd.models.pooling import create_pooling, l2n
from cfcd.models.preprocess import RGB_IMAGENET, Preprocess

WHITENINGS = (None, "cirtorch", "dirtorch")


class GeMNet(RetrievalModel):
    """Backbone -> pooling -> optional whitening/projection -> L2.

    Args:
        backbone: any timm model name (features = ``forward_features`` output).
        pooling: ``gem``, ``gemmp``, ``mac``, ``spoc`` or ``rmac``.
        p / learnable_p: GeM exponent and whether it is a parameter (``pool.p``).
        whitening: ``None``, ``"cirtorch"`` or ``"dirtorch"`` (see module docstring).
        out_dim: output size of the dirtorch FC (default: the backbone's channels).
        norm_features: dirtorch's L2N before the FC (default False).
        preprocess: input normalisation (default: the mean/std timm records for the backbone, RGB;
            ImageNet mean/std for ResNets, mean = std = 0.5 for EfficientNet-Lite).
    """

    def __init__(self, backbone: str = "resnet101", pooling: str = "gem", p: float = 3.0, learnable_p: bool = True,
                 whitening: str | None = None, out_dim: int | None = None, norm_features: bool = False,
                 preprocess: Preprocess | dict | None = None):
        super().__init__()
        if whitening not in WHITENINGS:
            raise ValueError(f"whitening must be one of {WHITENINGS}, not {whitening!r}")
        self.backbone = create_backbone(backbone)
        channels = self.backbone.num_features
        self.pool = create_pooling(pooling, p=p, learnable_p=learnable_p, channels=channels)
        self.whitening = whitening
        self.norm_features = norm_features
        self.whiten: nn.Linear | None = None
        self.fc: nn.Linear | None = None
        dim = channels
        if whitening == "cirtorch":
            self.whiten = nn.Linear(channels, channels, bias=True)
        elif whitening == "dirtorch":
            dim = out_dim or channels
            self.fc = nn.Linear(channels, dim, bias=True)
        elif out_dim not in (None, channels):
            raise ValueError(f"out_dim={out_dim} needs whitening='dirtorch' (an FC); without it D = {channels}")
        self.embedding_dim = dim
        if isinstance(preprocess, dict):
            preprocess = Preprocess.from_dict(preprocess)
        self.preprocess = preprocess or _timm_preprocess(self.backbone)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        fmap = self.backbone.forward_features(x)
        g = self.pool(fmap)
        if self.whitening == "cirtorch":
            g = self.whiten(l2n(g).to(self.whiten.weight.dtype))
        elif self.whitening == "dirtorch":
            if self.norm_features:
                g = l2n(g)
            g = self.fc(g.to(self.fc.weight.dtype))
        return {"global": g, "local": fmap}


def _timm_preprocess(backbone: nn.Module) -> Preprocess:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return RGB_IMAGENET
    return Preprocess("RGB", tuple(mean), tuple(std))
