"""CFCD (ICCV 2023) global model: ResNet -> GeM(p=3, fixed) -> Linear(2048, 512) -> BatchNorm1d -> L2.

Follows ``bassyess/CFCD`` ``core/model/model_s1.py``/``model_s2.py``/``model_deploy.py``:
the 512-d ``global_feature`` is ``bn(fc(GeM3(s4)))`` (un-normalised), and the deploy descriptor is its
L2 normalisation with BN in eval mode. The "local descriptors" of stage 2 are the raw s4 activations
(B x 2048 x h x w); there is no local head. The MadaCos classifier ``desc_cls`` is not part of the
model (it is returned as an extra tensor when loading a training checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn

from cfcd.models.backbones import create_backbone, is_resnet, stage_channels
from cfcd.models.base import RetrievalModel
from cfcd.models.pooling import GeM
from cfcd.models.preprocess import BGR_IMAGENET


class CFCDNet(RetrievalModel):
    """CFCD network.

    Args:
        backbone: timm ResNet name (``resnet50``/``resnet101``/``resnet152``; any ResNet works).
        dim: embedding size (512).
        p: GeM exponent (3, fixed in the released code).
        learnable_p: make p a parameter (``pool.p``); off in CFCD.
        with_bn: the BatchNorm1d after the FC (the paper's "whitening" box); on in CFCD.
    """

    def __init__(self, backbone: str = "resnet50", dim: int = 512, p: float = 3.0, learnable_p: bool = False,
                 with_bn: bool = True):
        super().__init__()
        self.backbone = create_backbone(backbone)
        if not is_resnet(self.backbone):
            raise ValueError(f"CFCD needs a ResNet backbone, not {backbone!r}")
        _, s4 = stage_channels(self.backbone)
        self.pool = GeM(p=p, learnable=learnable_p)
        self.fc = nn.Linear(s4, dim, bias=True)
        self.bn = nn.BatchNorm1d(dim) if with_bn else None
        self.embedding_dim = dim
        self.preprocess = BGR_IMAGENET

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        f4 = self.backbone.forward_features(x)
        # pooling runs in fp32; cast back for a model converted with .to(dtype) (autocast casts itself)
        g = self.fc(self.pool(f4).to(self.fc.weight.dtype))
        if self.bn is not None:
            g = self.bn(g)
        return {"global": g, "local": f4}


def _register() -> None:
    from cfcd.models.checkpoints import register_checkpoint_format
    from cfcd.models.dolg import convert_dolg_layout, infer_dolg_layout
    from cfcd.models.registry import register_model

    for depth in (50, 101, 152):
        register_model(f"cfcd_r{depth}", CFCDNet, family="cfcd", defaults={"backbone": f"resnet{depth}"},
                       crop_rule="truncate", description=f"CFCD: ResNet-{depth}, GeM p=3, FC 512, BN, L2 (BGR input)")
    # CFCD's checkpoints use DOLG's layout without the local branch (bassyess/CFCD core/model/model_s1.py)
    register_checkpoint_format(
        "cfcd", priority=20, detect=lambda state, container: any(k.startswith("globalmodel.") for k in state),
        convert=convert_dolg_layout, infer=infer_dolg_layout,
        description="bassyess/CFCD checkpoints (globalmodel.* pycls ResNet, fc, bn, pool_g.p, desc_cls)")


_register()
