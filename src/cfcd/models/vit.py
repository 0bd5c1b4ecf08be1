"""Vision Transformers (DINOv2, CLIP, any timm ViT) as global descriptors.

A ViT's ``forward_features`` gives tokens ``B x N x C`` (prefix tokens: CLS, then registers, then
the ``h x w`` patch grid), not a ``B x C x H x W`` map, so the GeM of :class:`~cfcd.models.gem.GeMNet`
would pool the wrong axis. :class:`ViTNet` turns the patch tokens back into a map and pools it:

``backbone (timm, dynamic_img_size) -> final LayerNorm -> [CLS | GeM/SPoC/MAC of the patch map]
-> optional FC to out_dim -> L2``

* ``dynamic_img_size=True``: the position embedding is resampled (bicubic) to every input's patch
  grid, so multi-scale extraction works at any size; the right and bottom ``H mod patch`` pixels
  are dropped (as a strided patchifying convolution would; timm refuses other sizes).
* GeM clamps at 1e-6 like every GeM of this package (LayerNorm outputs are signed, so negative
  activations do not count); ``spoc`` (mean of the patch tokens) keeps them.
* ``local`` is the patch map ``B x C x h x w``.

Names (built with ``pretrained=False`` always; weights come from ``weights=``):

==========================  ======================================  ============================
``vit_dinov2_small14``      timm ``vit_small_patch14_dinov2``       ImageNet mean/std, RGB
``vit_dinov2_base14``       ``vit_base_patch14_dinov2``             (DINOv2 ``make_normalize_transform``)
``vit_dinov2_large14``      ``vit_large_patch14_dinov2``
``vit_dinov2_giant14``      ``vit_giant_patch14_dinov2``
``vit_dinov2_*14_reg``      ``vit_*_patch14_reg4_dinov2`` (4 registers)
``vit_clip_b16/b32/l14``    ``vit_*_clip_quickgelu_224`` (OpenAI)    OpenAI CLIP mean/std, RGB
``vit_timm``                ``backbone=`` any timm ViT               timm's mean/std for it
==========================  ======================================  ============================

``gem_<timm ViT name>`` (e.g. ``gem_vit_small_patch14_dinov2``) resolves to this family with GeM.
CLIP models default to ``pooling="cls", out_dim=512`` (CLS -> ``ln_post`` -> ``proj``: the CLIP image
embedding, the ``proj`` matrix loaded into ``fc``).

Checkpoints (format ``vit``, auto-detected, imported with timm's own
``vision_transformer.checkpoint_filter_fn``): the original DINOv2 hub files
(``dinov2_vits14_pretrain.pth``: ``cls_token``, ``pos_embed``, ``mask_token``, ``register_tokens``,
``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2|mlp.w12,mlp.w3,ls2.gamma}``),
OpenAI CLIP state dicts (``visual.*``), open_clip timm trunks and plain timm ViT state dicts. The
architecture (width, depth, patch, registers, native grid) is read from the tensors.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import nn

from cfcd.models._compat import import_timm
from cfcd.models.base import RetrievalModel
from cfcd.models.pooling import create_pooling
from cfcd.models.preprocess import RGB_IMAGENET, Preprocess

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_OPENAI = Preprocess("RGB", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, input_size=224)
DINOV2 = Preprocess("RGB", RGB_IMAGENET.mean, RGB_IMAGENET.std, input_size=224)  # DINOv2 evaluates at 224

POOLINGS = ("gem", "cls", "spoc", "mac")
VIT_MODULES = ("vision_transformer",)  # timm modules whose models are VisionTransformer (tokens out)

# cfcd name -> (timm architecture, preprocessing, defaults)
_DINOV2_WIDTHS = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_CLIP_ARCHS = {(768, 16): "b16", (768, 32): "b32", (1024, 14): "l14"}
_CLIP_TIMM = {"b16": "vit_base_patch16_clip_quickgelu_224", "b32": "vit_base_patch32_clip_quickgelu_224",
              "l14": "vit_large_patch14_clip_quickgelu_224"}


def _dinov2_timm(size: str, registers: bool) -> str:
    return f"vit_{size}_patch14_{'reg4_' if registers else ''}dinov2"


def is_vit_backbone(name: str) -> bool:
    """True for timm models whose ``forward_features`` returns ViT tokens (``vision_transformer``)."""
    timm = import_timm()
    return bool(timm.is_model(name)) and bool(timm.models.is_model_in_modules(name, list(VIT_MODULES)))


class ViTNet(RetrievalModel):
    """ViT -> CLS token or pooled patch-token map -> optional FC -> L2.

    Args:
        backbone: a timm VisionTransformer name (``vit_small_patch14_dinov2``, ...).
        pooling: ``gem`` (patch map, p = ``p``), ``cls``, ``spoc`` (mean of patch tokens) or ``mac``.
        p / learnable_p: the GeM exponent and whether it is a parameter (``pool.p``).
        out_dim: size of an FC after pooling (``fc``; None: no FC, D = width).
        img_size: native image size of the position embedding (default: timm's for the backbone;
            set from the checkpoint when loading one, e.g. 518 for the DINOv2 hub files).
        backbone_kwargs: extra timm constructor arguments (``depth``, ``embed_dim``, ``num_heads``,
            ``drop_path_rate``...).
        preprocess: input normalisation (default: per family, see the module docstring).
    """

    def __init__(self, backbone: str = "vit_small_patch14_dinov2", pooling: str = "gem", p: float = 3.0,
                 learnable_p: bool = False, out_dim: int | None = None, img_size: int | None = None,
                 backbone_kwargs: Mapping[str, Any] | None = None, preprocess: Preprocess | dict | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"ViT pooling must be one of {POOLINGS}, not {pooling!r}")
        if not is_vit_backbone(backbone):
            raise ValueError(f"{backbone!r} is not a timm VisionTransformer (see timm.list_models('vit_*'))")
        kwargs = dict(backbone_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = int(img_size)
        timm = import_timm()
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="",
                                          dynamic_img_size=True, **kwargs)
        width = int(self.backbone.num_features)
        self.pooling = pooling
        self.num_prefix_tokens = int(self.backbone.num_prefix_tokens)
        if pooling == "cls" and not getattr(self.backbone, "has_class_token", True):
            raise ValueError(f"{backbone} has no class token: use pooling='gem' or 'spoc'")
        self.pool = None if pooling == "cls" else create_pooling(pooling, p=p, learnable_p=learnable_p)
        self.fc = nn.Linear(width, int(out_dim), bias=True) if out_dim else None
        self.embedding_dim = int(out_dim) if out_dim else width
        if isinstance(preprocess, dict):
            preprocess = Preprocess.from_dict(preprocess)
        self.preprocess = preprocess or _default_preprocess(backbone, self.backbone)

    def patch_map(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Patch tokens ``B x N x C`` of a ``height x width`` input -> ``B x C x h x w``."""
        h, w = self.backbone.patch_embed.dynamic_feat_size((height, width))
        patches = tokens[:, self.num_prefix_tokens:]
        if patches.shape[1] != h * w:
            raise RuntimeError(f"{patches.shape[1]} patch tokens for a {h} x {w} grid")
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        height, width = x.shape[-2:]
        patch = self.backbone.patch_embed.patch_size
        if height < patch[0] or width < patch[1]:
            raise ValueError(f"a {width}x{height} input is smaller than one {patch[1]}x{patch[0]} patch")
        # timm's PatchEmbed wants multiples of the patch: drop the right/bottom remainder (a view)
        height, width = height - height % patch[0], width - width % patch[1]
        tokens = self.backbone.forward_features(x[..., :height, :width])
        fmap = self.patch_map(tokens, height, width)
        g = tokens[:, 0].float() if self.pooling == "cls" else self.pool(fmap)
        if self.fc is not None:
            g = self.fc(g.to(self.fc.weight.dtype))
        return {"global": g, "local": fmap}


def _default_preprocess(name: str, backbone: nn.Module) -> Preprocess:
    if name.endswith("dinov2"):
        return DINOV2
    if "_clip_" in name:
        return CLIP_OPENAI
    from cfcd.models.backbones import timm_preprocess

    return timm_preprocess(backbone)


# ----------------------------------------------------------------------------------------------
# checkpoints: format "vit"


def is_vit_state(state: Mapping[str, Any], container: Mapping[str, Any] | None = None) -> bool:
    """DINOv2 hub, OpenAI CLIP, open_clip timm trunk or timm ViT state dict."""
    if "visual.class_embedding" in state or "visual.trunk.pos_embed" in state:
        return True
    return "pos_embed" in state and "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state)


def _depth(state: Mapping[str, Any], pattern: str) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def describe_vit_state(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture from a ViT state dict: ``layout``, ``width``, ``depth``, ``patch``,
    ``registers``, ``grid`` (native patch grid side), ``timm`` (the timm name when it is a known
    DINOv2/CLIP architecture) and ``name`` (the cfcd registry name)."""
    if "visual.class_embedding" in state:  # OpenAI CLIP (visual.conv1, visual.transformer.resblocks.N)
        width = int(state["visual.class_embedding"].shape[-1])
        patch = int(state["visual.conv1.weight"].shape[-1])
        positions = int(state["visual.positional_embedding"].shape[0]) - 1
        info = dict(layout="openai_clip", width=width, patch=patch, registers=0,
                    depth=_depth(state, r"^visual\.transformer\.resblocks\.(\d+)\."))
        arch = _CLIP_ARCHS.get((width, patch))
        if arch is not None:
            info.update(timm=_CLIP_TIMM[arch], name=f"vit_clip_{arch}")
    else:
        prefix = "visual.trunk." if "visual.trunk.pos_embed" in state else ""
        layout = "dinov2" if "mask_token" in state else ("open_clip" if prefix else "timm")
        width = int(state[prefix + "pos_embed"].shape[-1])
        patch = int(state[prefix + "patch_embed.proj.weight"].shape[-1])
        registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else (
            int(state[prefix + "reg_token"].shape[1]) if prefix + "reg_token" in state else 0)
        tokens = int(state[prefix + "pos_embed"].shape[1])
        if layout == "dinov2" or not registers:  # DINOv2 always embeds the CLS position; timm reg models do not
            tokens -= 1 if prefix + "cls_token" in state else 0
        positions = tokens
        info = dict(layout=layout, width=width, patch=patch, registers=registers,
                    depth=_depth(state, r"^" + re.escape(prefix) + r"blocks\.(\d+)\."))
        layer_scale = any(k.startswith(prefix + "blocks.0.ls1.") for k in state)
        size = _DINOV2_WIDTHS.get(width)
        if size and patch == 14 and layer_scale and registers in (0, 4):
            info.update(timm=_dinov2_timm(size, registers == 4),
                        name=f"vit_dinov2_{size}14" + ("_reg" if registers else ""))
    grid = math.isqrt(max(positions, 0))
    info["grid"] = grid if grid * grid == positions else None
    return info


def convert_vit_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """A ViT checkpoint into cfcd names, with timm's ``checkpoint_filter_fn`` (DINOv2 ``mask_token``
    dropped, registers split from the CLS position, SwiGLU ``w12/w3`` renamed, OpenAI CLIP renamed).

    Returns ``(state, extra, info)``: ``backbone.<timm name>`` tensors (+ ``fc.*`` from the CLIP
    ``proj``), extras (a timm classifier becomes ``imagenet_head.*``) and ``model_kwargs`` /
    ``model_name`` / ``notes`` for the :class:`~cfcd.models.checkpoints.Checkpoint`.
    """
    import_timm()  # first: it works around a torchvision without its C++ ops
    from timm.models.vision_transformer import checkpoint_filter_fn

    info = describe_vit_state(state)
    template = _template(info)
    timm_state = checkpoint_filter_fn(dict(state), template)
    out: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    kwargs: dict[str, Any] = {}
    for k, v in timm_state.items():
        if k.startswith("head."):
            if info["layout"] in ("openai_clip", "open_clip"):
                out["fc." + k[len("head."):]] = v  # the CLIP projection: CLS -> ln_post -> proj
            else:
                extra["imagenet_head." + k[len("head."):]] = v
        else:
            out["backbone." + k] = v
    if "fc.weight" in out:
        kwargs.update(pooling="cls", out_dim=int(out["fc.weight"].shape[0]))
    if info.get("timm"):
        kwargs["backbone"] = info["timm"]
    if info["grid"]:
        kwargs["img_size"] = info["grid"] * info["patch"]
    notes = [f"ViT ({info['layout']} layout): width {info['width']}, depth {info['depth']}, patch {info['patch']}, "
             f"{info['registers']} registers, native grid {info['grid']}"]
    if not info.get("timm"):
        notes.append("architecture not recognised as a DINOv2/CLIP release: pass backbone= (and backbone_kwargs=)")
    return out, extra, {"model_kwargs": kwargs, "model_name": info.get("name"), "notes": notes}


def _template(info: dict) -> nn.Module:
    """A meta-device timm ViT of the checkpoint's geometry: what ``checkpoint_filter_fn`` reads
    (patch size, grid, prefix tokens), with no memory allocated (ViT-g has 1.1 B parameters)."""
    timm = import_timm()
    name = info.get("timm") or ("vit_base_patch16_clip_224" if info["layout"] in ("openai_clip", "open_clip")
                                else "vit_base_patch16_224")
    kwargs: dict[str, Any] = dict(patch_size=info["patch"], embed_dim=info["width"], depth=1,
                                  num_heads=1, num_classes=0, global_pool="", dynamic_img_size=True)
    if info["grid"]:
        kwargs["img_size"] = info["grid"] * info["patch"]
    if info["registers"]:
        kwargs.update(reg_tokens=info["registers"], no_embed_class=True)
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def adapt_vit_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> tuple[dict, dict]:
    """Before loading into ``model``: resample a position embedding of another grid to the model's
    (timm's ``resample_abs_pos_embed``, bicubic, as ``checkpoint_filter_fn``). ``create(weights=)``
    builds the model at the checkpoint's grid, so this only acts when weights go into a model built
    otherwise (e.g. a training recipe's ``model.weights``)."""
    backbone = getattr(model, "backbone", None)
    key = "backbone.pos_embed"
    if backbone is None or key not in state or getattr(backbone, "pos_embed", None) is None:
        return state, {}
    target = backbone.pos_embed
    if tuple(state[key].shape) == tuple(target.shape) or state[key].shape[-1] != target.shape[-1]:
        return state, {}
    import_timm()
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(backbone, "no_embed_class", False) else int(backbone.num_prefix_tokens)
    old = state[key].shape[1] - prefix
    side = math.isqrt(old)
    if side * side != old:
        return state, {}  # not a square grid: reported as a shape mismatch
    state = dict(state)
    state[key] = resample_abs_pos_embed(state[key], new_size=list(backbone.patch_embed.grid_size),
                                        old_size=[side, side], num_prefix_tokens=prefix)
    return state, {}


# ----------------------------------------------------------------------------------------------
# registration (timm style: importing the module registers the family)


def _register() -> None:
    from cfcd.models.checkpoints import register_checkpoint_format
    from cfcd.models.registry import register_model

    for size in ("small", "base", "large", "giant"):
        for reg in (False, True):
            name = f"vit_dinov2_{size}14" + ("_reg" if reg else "")
            register_model(name, ViTNet, family="vit",
                           defaults={"backbone": _dinov2_timm(size, reg), "pooling": "gem", "p": 3.0,
                                     "learnable_p": False},
                           description=f"DINOv2 ViT-{size[0].upper()}/14{' + 4 registers' if reg else ''}: "
                                       "GeM p=3 of the patch map (or pooling=cls), ImageNet mean/std, RGB")
    for arch, timm_name in _CLIP_TIMM.items():
        register_model(f"vit_clip_{arch}", ViTNet, family="vit",
                       defaults={"backbone": timm_name, "pooling": "cls", "out_dim": 512 if arch != "l14" else 768},
                       description=f"OpenAI CLIP ViT-{arch.upper()} image tower: CLS -> ln_post -> proj, CLIP mean/std")
    register_model("vit_timm", ViTNet, family="vit", defaults={"pooling": "gem"},
                   description="any timm ViT (backbone=NAME): GeM of the patch-token map or CLS")
    register_checkpoint_format(
        "vit", priority=80, detect=is_vit_state, convert=convert_vit_state, adapt=adapt_vit_state,
        description="timm / DINOv2 (facebookresearch/dinov2 hub) / OpenAI CLIP ViT state dicts; pos_embed resampled")


_register()
