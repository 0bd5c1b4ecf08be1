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

import re
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from cfcd.errors import CfcdError
from cfcd.models.backbones import RESNET_NAMES, create_backbone, infer_resnet, timm_preprocess
from cfcd.models.base import RetrievalModel
from cfcd.models.pooling import create_pooling, l2n
from cfcd.models.preprocess import Preprocess

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
        self.preprocess = preprocess or timm_preprocess(self.backbone)

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


# --------------------------------------------------------------------------------------------------
# checkpoint layouts: cirtorch (cnnimageretrieval-pytorch) and dirtorch (deep-image-retrieval)

_CIRTORCH_FEATURES = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}
_CIRTORCH_FEATURE_KEY = re.compile(r"^features\.(\d+)\.(.+)$")
_CIRTORCH_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _is_cirtorch(state: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    return "features.0.weight" in state or ("meta" in container and "state_dict" in container)


def _convert_cirtorch(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """``features.{0,1,4,5,6,7}`` (``nn.Sequential(*list(resnet.children())[:-2])``,
    cirtorch ``networks/imageretrievalnet.py``) -> ``backbone.{conv1,bn1,layer1..4}``; ``pool``/``whiten`` kept."""
    out: dict = {}
    unknown: dict = {}
    for k, v in state.items():
        m = _CIRTORCH_FEATURE_KEY.match(k)
        if m and int(m.group(1)) in _CIRTORCH_FEATURES:
            out[f"backbone.{_CIRTORCH_FEATURES[int(m.group(1))]}.{m.group(2)}"] = v
        elif k.startswith(("pool.", "whiten.")):
            out[k] = v
        else:
            unknown[k] = v
    return {**out, **unknown}, {}, {}


def _infer_cirtorch(ckpt, container: Mapping[str, Any]) -> None:
    """``meta`` (architecture, pooling, whitening, mean/std, post-hoc ``Lw``) of ``init_network``."""
    from cfcd.models.checkpoints import as_tensor

    meta = container.get("meta")
    if isinstance(meta, Mapping):
        arch = str(meta.get("architecture", ""))
        if arch not in _CIRTORCH_ARCHS:
            raise CfcdError(f"{ckpt.source}: cirtorch architecture {arch!r} is not supported (ResNet-18/34/50/101/152 only)")
        if meta.get("local_whitening") or meta.get("regional"):
            raise CfcdError(f"{ckpt.source}: cirtorch local whitening / regional pooling networks are not supported")
        pooling = str(meta.get("pooling", "gem"))
        ckpt.model_kwargs.update(backbone=arch, pooling=pooling, whitening="cirtorch" if meta.get("whitening") else None)
        if pooling in ("gem", "gemmp"):
            ckpt.model_kwargs["learnable_p"] = True
        if "mean" in meta and "std" in meta:
            ckpt.model_kwargs["preprocess"] = {"channel_order": "RGB", "mean": [float(v) for v in meta["mean"]],
                                               "std": [float(v) for v in meta["std"]]}
        ckpt.model_name = RESNET_NAMES.get(arch, f"gem_{arch}")
        for wset, modes in (meta.get("Lw") or {}).items():
            for mode, mats in (modes or {}).items():
                for name in ("m", "P"):
                    if name in mats:
                        ckpt.extra[f"Lw.{wset}.{mode}.{name}"] = as_tensor(mats[name], f"{ckpt.source}: meta['Lw']").float()
        if ckpt.extra:
            ckpt.notes.append("cirtorch learned whitening Lw kept as extras Lw.<set>.<ss|ms>.{m,P} (x' = P (x - m))")
    infer_resnet(ckpt)
    if "pool.p" in ckpt.state and ckpt.state["pool.p"].numel() > 1:
        ckpt.model_kwargs["pooling"] = "gemmp"


def _is_dirtorch(state: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    return "model_options" in container or "adpool.p" in state


def _convert_dirtorch(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """``ResNet_RMAC`` (dirtorch ``nets/rmac_resnet.py``): ``adpool.p`` -> ``pool.p``, ``fc`` kept,
    the torchvision ResNet names under ``backbone.``."""
    out: dict = {}
    unknown: dict = {}
    for k, v in state.items():
        if k == "adpool.p":
            out["pool.p"] = v
        elif k.startswith("fc."):
            out[k] = v
        elif k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
            out["backbone." + k] = v
        else:
            unknown[k] = v
    return {**out, **unknown}, {}, {}


def _infer_dirtorch(ckpt, container: Mapping[str, Any]) -> None:
    """``model_options`` (arch, pooling, gemp, without_fc, norm_features), ``preprocess`` and ``pca``
    of a dirtorch checkpoint (``nets/__init__.py create_model``, ``test_dir.py``)."""
    from cfcd.models.checkpoints import as_tensor

    options = dict(container.get("model_options") or {})
    arch = str(options.get("arch", ""))
    m = re.match(r"^resnet(18|34|50|101|152)(_rmac)?$", arch)
    if arch and not m:
        raise CfcdError(f"{ckpt.source}: dirtorch arch {arch!r} is not supported (resnet18/34/50/101/152[_rmac] only)")
    if m:
        backbone = f"resnet{m.group(1)}"
        ckpt.model_kwargs["backbone"] = backbone
        ckpt.model_name = RESNET_NAMES.get(backbone, f"gem_{backbone}")
    pooling = str(options.get("pooling", "gem"))
    ckpt.model_kwargs["pooling"] = "gem" if pooling.startswith("gem") else {"max": "mac", "avg": "spoc"}.get(pooling, pooling)
    if "gemp" in options:
        ckpt.model_kwargs["p"] = float(options["gemp"])
    if options.get("without_fc") or "fc.weight" not in ckpt.state:
        ckpt.model_kwargs["whitening"] = None
        # ResNet_RMAC always creates self.fc (rmac_resnet.py) and skips it with without_fc: keep it as an extra
        unused = [k for k in ("fc.weight", "fc.bias") if k in ckpt.state]
        for k in unused:
            ckpt.extra["unused_" + k] = ckpt.state.pop(k)
        if unused:
            ckpt.notes.append("dirtorch without_fc=True: the unused FC is kept as extras unused_fc.{weight,bias}")
    else:
        ckpt.model_kwargs["whitening"] = "dirtorch"
        ckpt.model_kwargs["out_dim"] = int(ckpt.state["fc.weight"].shape[0])
    ckpt.model_kwargs["norm_features"] = bool(options.get("norm_features", False))
    unsupported = [k for k in ("center_bias", "dropout") if options.get(k)]
    if unsupported:
        ckpt.notes.append(f"dirtorch options {unsupported} are training/test-time extras not reproduced by cfcd")
    pre = container.get("preprocess")
    if isinstance(pre, Mapping) and "mean" in pre and "std" in pre:
        ckpt.model_kwargs["preprocess"] = {"channel_order": "RGB", "mean": [float(v) for v in pre["mean"]],
                                           "std": [float(v) for v in pre["std"]]}
    for name, pca in (container.get("pca") or {}).items():
        attrs = getattr(pca, "__dict__", {})
        arrays = {a: attrs.get(a) for a in ("mean_", "components_", "explained_variance_")}
        if any(v is None for v in arrays.values()):
            ckpt.notes.append(f"pca[{name!r}] skipped: missing mean_/components_/explained_variance_")
            continue
        for a, v in arrays.items():
            ckpt.extra[f"pca.{name}.{a.rstrip('_')}"] = as_tensor(np.asarray(v), f"{ckpt.source}: pca").float()
        ckpt.extra[f"pca.{name}.whiten"] = torch.tensor(bool(attrs.get("whiten", False)))
    if any(k.startswith("pca.") for k in ckpt.extra):
        ckpt.notes.append("dirtorch PCA kept as extras pca.<name>.{mean,components,explained_variance,whiten}")
    infer_resnet(ckpt)


def _register() -> None:
    from cfcd.models.checkpoints import register_checkpoint_format
    from cfcd.models.registry import register_model

    for depth in (50, 101, 152):
        register_model(f"gem_r{depth}", GeMNet, family="gem", defaults={"backbone": f"resnet{depth}"},
                       description=f"GeM ResNet-{depth} (cirtorch/dirtorch; whitening from the checkpoint)")
    register_model("gem_timm", GeMNet, family="gem", defaults={"pooling": "gem", "learnable_p": True},
                   description="GeM on any timm backbone (backbone=NAME)")
    register_checkpoint_format(
        "cirtorch", priority=40, detect=_is_cirtorch, convert=_convert_cirtorch, infer=_infer_cirtorch,
        description="cnnimageretrieval-pytorch {'meta', 'state_dict'} (features.N, pool.p, whiten; meta['Lw'] as extras)")
    register_checkpoint_format(
        "dirtorch", priority=50, detect=_is_dirtorch, convert=_convert_dirtorch, infer=_infer_dirtorch,
        description="deep-image-retrieval {'model_options', 'state_dict', 'pca'} (ResNet_RMAC: adpool.p, fc)")


_register()
