"""DOLG (ICCV 2021): orthogonal fusion of a local (stage-3) and a global (stage-4) branch.

Follows ``feymanpriv/DOLG`` ``core/model/dolg_model.py`` (the code behind the released weights):

- global: ``fg = fc_t(GeM(s4))``, Linear 2048 -> 1024, not normalised. GeM p is learnable
  (``pool_g.p``) for models trained after 2022-04-11, fixed at 3 before (``learnable_p``).
- local (``SpatialAttention2d``): [ASPP] -> conv1 1x1 -> BN -> ``fmap = L2(channels)`` (before ReLU)
  -> ReLU -> conv2 1x1 -> Softplus = attention; ``fl = att * fmap`` (B x 1024 x h3 x w3).
  ASPP (dilations 6/12/18, image pooling branch) is dead code in the DOLG repo (always off); the
  CFCD copy makes it work: ``with_aspp=True``.
- orthogonal fusion: ``fl_orth = fl - (fg . fl_xy) fg / ||fg||^2`` at every position, averaged to ``fo``.
- ``global_feature = fc([fg ; fo])``, Linear 2048 -> 512 with bias and **no BN** in DOLG;
  the CFCD copy adds ``BatchNorm1d(512)`` and fixes p = 3: ``with_bn=True, learnable_p=False``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cfcd.models.backbones import (RESNET_NAMES, backbone_from_pycls, create_backbone, infer_resnet, is_resnet,
                                   resnet_stages, stage_channels)
from cfcd.models.base import RetrievalModel
from cfcd.models.pooling import GeM
from cfcd.models.preprocess import BGR_IMAGENET


class ASPP(nn.Module):
    """DOLG's multi-atrous module: [image pool, 1x1, 3x3 d6, d12, d18] -> concat -> 1x1 -> ReLU.

    Parameter names follow the original (``aspp.{0..3}``, ``im_pool.1``, ``conv_after.0``) and no BN.
    """

    def __init__(self, in_channels: int = 1024, branch_channels: int = 512, out_channels: int = 1024,
                 dilations: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        convs = [nn.Conv2d(in_channels, branch_channels, 1, 1)]
        convs += [nn.Conv2d(in_channels, branch_channels, 3, 1, padding=d, dilation=d) for d in dilations]
        self.aspp = nn.ModuleList(convs)
        self.im_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, branch_channels, 1, 1), nn.ReLU())
        self.conv_after = nn.Sequential(nn.Conv2d(branch_channels * (len(convs) + 1), out_channels, 1, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # bilinear upsampling of a 1x1 map (the original) is a broadcast
        outs = [self.im_pool(x).expand(-1, -1, h, w)] + [conv(x) for conv in self.aspp]
        return self.conv_after(torch.cat(outs, dim=1))


class SpatialAttention2d(nn.Module):
    """DOLG's local branch; returns ``(att * L2(bn(conv1(x))), att)``."""

    def __init__(self, in_channels: int = 1024, channels: int = 1024, with_aspp: bool = False):
        super().__init__()
        self.aspp = ASPP(in_channels, out_channels=in_channels) if with_aspp else None
        self.conv1 = nn.Conv2d(in_channels, channels, 1, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, 1, 1, 1)
        self.softplus = nn.Softplus(beta=1, threshold=20)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.aspp is not None:
            x = self.aspp(x)
        x = self.bn(self.conv1(x))
        fmap = F.normalize(x, p=2, dim=1)
        att = self.softplus(self.conv2(self.act1(x)))
        return att * fmap, att


def orthogonal_fusion(fl: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Average over positions of the component of ``fl`` orthogonal to ``fg`` (B x C)."""
    fl = fl.float()
    fg = fg.float()
    b, c = fl.shape[:2]
    flat = fl.reshape(b, c, -1)
    dot = torch.bmm(fg.unsqueeze(1), flat)  # B x 1 x hw
    proj = torch.bmm(fg.unsqueeze(2), dot) / (fg * fg).sum(dim=1).view(-1, 1, 1)
    return (flat - proj).mean(dim=2)


class DOLGNet(RetrievalModel):
    """DOLG network (defaults = the DOLG repo: learnable p off for pre-2022-04 weights, no ASPP, no BN).

    Args:
        backbone: timm ResNet name.
        dim: output size (512).
        p / learnable_p: GeM exponent; ``learnable_p=True`` adds ``pool.p`` (``pool_g.p`` officially).
        with_aspp: the multi-atrous module before the attention (paper; dead in the DOLG repo).
        with_bn: BatchNorm1d after the final FC (CFCD's copy of DOLG).
    """

    def __init__(self, backbone: str = "resnet50", dim: int = 512, p: float = 3.0, learnable_p: bool = False,
                 with_aspp: bool = False, with_bn: bool = False):
        super().__init__()
        self.backbone = create_backbone(backbone)
        if not is_resnet(self.backbone):
            raise ValueError(f"DOLG needs a ResNet backbone, not {backbone!r}")
        s3, s4 = stage_channels(self.backbone)
        self.pool = GeM(p=p, learnable=learnable_p)
        self.fc_t = nn.Linear(s4, s3, bias=True)
        self.local = SpatialAttention2d(s3, s3, with_aspp=with_aspp)
        self.fc = nn.Linear(2 * s3, dim, bias=True)
        self.bn = nn.BatchNorm1d(dim) if with_bn else None
        self.embedding_dim = dim
        self.preprocess = BGR_IMAGENET

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        f3, f4 = resnet_stages(self.backbone, x)
        fl, _ = self.local(f3)
        fg = self.fc_t(self.pool(f4).to(self.fc_t.weight.dtype))
        fo = orthogonal_fusion(fl, fg)
        g = self.fc(torch.cat([fg.float(), fo], dim=1).to(self.fc.weight.dtype))
        if self.bn is not None:
            g = self.bn(g)
        return {"global": g, "local": fl}


# --------------------------------------------------------------------------------------------------
# checkpoint layout of the DOLG repo (and of CFCD, which copied it) and the registry entries


def convert_dolg_layout(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """``globalmodel.*`` (a pycls ResNet) -> ``backbone.*``; ``pool_g.p`` -> ``pool.p``; ``localmodel.*`` ->
    ``local.*``; ``fc``/``bn``/``fc_t`` kept; the classifier ``desc_cls.*`` is an extra
    (``core/model/dolg_model.py``; CFCD ``core/model/model_s1.py``). Unmapped keys keep their name."""
    out: dict = {}
    extra: dict = {}
    unknown: dict = {}
    backbone_from_pycls(state, "globalmodel.", out, extra, unknown)
    for k, v in state.items():
        if k.startswith("globalmodel."):
            continue
        if k.startswith("desc_cls."):
            extra[k] = v
        elif k == "pool_g.p":
            out["pool.p"] = v
        elif k.startswith("localmodel."):
            out["local." + k[len("localmodel."):]] = v
        elif k.startswith(("fc.", "bn.", "fc_t.")):
            out[k] = v
        else:
            unknown[k] = v
    return {**out, **unknown}, extra, {}


def infer_dolg_layout(ckpt, container: Mapping[str, Any] | None = None) -> None:
    """Architecture switches that follow from which tensors the checkpoint has."""
    infer_resnet(ckpt)
    state, kw = ckpt.state, ckpt.model_kwargs
    kw["learnable_p"] = "pool.p" in state
    kw["with_bn"] = "bn.weight" in state
    if "fc.weight" in state:
        kw["dim"] = int(state["fc.weight"].shape[0])
    if ckpt.format == "dolg":
        kw["with_aspp"] = any(k.startswith("local.aspp.") for k in state)
    depth = kw.get("backbone")
    if depth in RESNET_NAMES:
        ckpt.model_name = f"{ckpt.format}_r{depth[len('resnet'):]}"


def _register() -> None:
    from cfcd.models.checkpoints import register_checkpoint_format
    from cfcd.models.registry import register_model

    for depth in (50, 101, 152):
        register_model(f"dolg_r{depth}", DOLGNet, family="dolg", defaults={"backbone": f"resnet{depth}"},
                       crop_rule="truncate",
                       description=f"DOLG: ResNet-{depth}, orthogonal fusion of s3 attention and s4 GeM, FC 512")
    register_checkpoint_format(
        "dolg", priority=10, detect=lambda state, container: any(k.startswith(("localmodel.", "fc_t.")) for k in state),
        convert=convert_dolg_layout, infer=infer_dolg_layout,
        description="feymanpriv/DOLG checkpoints (globalmodel.* pycls ResNet, localmodel.*, fc_t, fc, pool_g.p, desc_cls)")


_register()
