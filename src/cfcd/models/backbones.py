"""Backbones, built by timm and never downloaded (``pretrained=False`` always).

ResNet-50/101/152 from timm have exactly the torchvision v1.5 layout and parameter names
(``conv1``, ``bn1``, ``layer{1..4}.{j}.conv{1,2,3}/bn{1,2,3}/downsample.{0,1}``, stride on the 3x3),
which is also the pycls ``R-*-1x64d`` architecture of CFCD/DOLG (only the names differ, see
:mod:`cfcd.models.checkpoints`). Weights come from files (``weights=``) or embedded packages.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from cfcd.models._compat import import_timm
from cfcd.models.preprocess import RGB_IMAGENET, Preprocess


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A timm model without classifier nor global pool: ``forward_features`` gives the last map.

    Raises ValueError for a name timm does not know.
    """
    timm = import_timm()
    if not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)


def timm_preprocess(backbone: nn.Module) -> Preprocess:
    """The RGB mean/std of a timm model's ``pretrained_cfg`` (ImageNet's when it has none)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return RGB_IMAGENET
    return Preprocess("RGB", tuple(mean), tuple(std))


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


# --------------------------------------------------------------------------------------------------
# ResNet checkpoint layouts: pycls (CFCD/DOLG's ImageNet backbones) and torchvision/timm

_PYCLS_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(.+)$")
_PYCLS_BLOCK_PARTS = (("f.a_bn.", "bn1."), ("f.b_bn.", "bn2."), ("f.c_bn.", "bn3."),  # *_bn before conv and .bn
                      ("f.a.", "conv1."), ("f.b.", "conv2."), ("f.c.", "conv3."),
                      ("proj.", "downsample.0."), ("bn.", "downsample.1."))
RESNET_NAMES = {"resnet50": "gem_r50", "resnet101": "gem_r101", "resnet152": "gem_r152"}  # depth -> registry name
_TORCHVISION_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def pycls_to_torchvision(key: str) -> str | None:
    """Map a pycls ResNet key to the torchvision/timm name; None for keys that are not backbone weights."""
    if key.startswith("stem.conv."):
        return "conv1." + key[len("stem.conv."):]
    if key.startswith("stem.bn."):
        return "bn1." + key[len("stem.bn."):]
    m = _PYCLS_BLOCK.match(key)
    if m:
        stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        for src, dst in _PYCLS_BLOCK_PARTS:
            if rest.startswith(src):
                return f"layer{stage}.{block - 1}.{dst}{rest[len(src):]}"
    return None


def backbone_from_pycls(state: Mapping[str, torch.Tensor], prefix: str, out: dict, extra: dict, unknown: dict) -> None:
    """The pycls ResNet under ``prefix`` into ``backbone.<torchvision names>``; its ``head`` is an extra."""
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if rest.startswith("head."):
            extra["imagenet_head." + rest[len("head."):]] = v
            continue
        name = pycls_to_torchvision(rest)
        if name is None:
            unknown[k] = v
        else:
            out["backbone." + name] = v


def resnet_depth(state: Mapping[str, Any]) -> str | None:
    """ResNet name from the number of stage-3 blocks and the block type (bottleneck has conv3)."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^backbone\.layer3\.(\d+)\.", k))}
    bottleneck = "backbone.layer3.0.conv3.weight" in state
    table = {6: "resnet50", 23: "resnet101", 36: "resnet152"} if bottleneck else {2: "resnet18", 6: "resnet34"}
    return table.get(len(blocks))


def infer_resnet(ckpt, container: Mapping[str, Any] | None = None) -> None:
    """The backbone depth read from the tensors, unless the file named it."""
    depth = resnet_depth(ckpt.state)
    if depth and "backbone" not in ckpt.model_kwargs:
        ckpt.model_kwargs["backbone"] = depth


def _convert_pycls(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    out: dict = {}
    extra: dict = {}
    unknown: dict = {}
    backbone_from_pycls(state, "", out, extra, unknown)
    return {**out, **unknown}, extra, {}


def _convert_torchvision(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    out = {"backbone." + k: v for k, v in state.items() if not k.startswith("fc.")}
    return out, {"imagenet_head." + k: v for k, v in state.items() if k.startswith("fc.")}, {}


def _register_formats() -> None:
    from cfcd.models.checkpoints import register_checkpoint_format

    register_checkpoint_format(
        "pycls", priority=30, detect=lambda state, container: "stem.conv.weight" in state,
        convert=_convert_pycls, infer=infer_resnet,
        description="pycls ImageNet R-*-1x64d_dds_8gpu.pyth (model_state: stem.*, s{i}.b{j}.f.{a,b,c}[_bn], "
                    "s{i}.b1.{proj,bn}); head.fc kept as an extra")
    register_checkpoint_format(
        "torchvision", priority=70, aliases=("timm",),
        detect=lambda state, container: "conv1.weight" in state and any(k.startswith("layer1.") for k in state),
        convert=_convert_torchvision, infer=infer_resnet,
        description="torchvision / timm ResNet state dicts (conv1, layer1..4; fc kept as an extra)")


_register_formats()
