"""Backbones, built by timm and never downloaded (``pretrained=False`` always).

ResNet-50/101/152 from timm have exactly the torchvision v1.5 layout and parameter names
(``conv1``, ``bn1``, ``layer{1..4}.{j}.conv{1,2,3}/bn{1,2,3}/downsample.{0,1}``, stride on the 3x3),
which is also the pycls ``R-*-1x64d`` architecture of CFCD/DOLG (only the names differ, see
:mod:`cfcd.models.checkpoints`). Weights come from files (``weights=``) or embedded packages.
"""

from __future__ import annotations

import torch
from torch import nn

from cfcd.models._compat import import_timm

def create_backbone(name: str, **kwargs) -> nn.Module:
    """A timm model without classifier nor global pool: ``forward_features`` gives the last map.

    Raises ValueError for a name timm does not know.
    """
    timm = import_timm()
    if not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)


def is_resnet(backbone: nn.Module) -> bool:
    return all(hasattr(backbone, a) for a in ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4"))


def resnet_stages(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a (timm/torchvision-layout) ResNet and return the stage-3 and stage-4 maps (strides 16, 32)."""
    x = backbone.maxpool(backbone.act1(backbone.bn1(backbone.conv1(x))))
    f3 = backbone.layer3(backbone.layer2(backbone.layer1(x)))
    return f3, backbone.layer4(f3)


def stage_channels(backbone: nn.Module) -> tuple[int, int]:
    """Output channels of stage 3 and stage 4 of a ResNet backbone (1024, 2048 for R-50/101/152)."""
    info = backbone.feature_info
    channels = [f["num_chs"] for f in info]
    return channels[-2], channels[-1]
