"""The model registry: one constructor, :func:`create`, used by every command.

Names: ``cfcd_r50/r101/r152``, ``dolg_r50/r101/r152``, ``gem_r50/r101/r152`` (cirtorch/dirtorch GeM
ResNets), ``gem_efficientnet_lite0/1/2`` (embedded ImageNet weights; lite2 is the package default),
``gem_timm`` (``backbone=`` any timm name), the pattern ``gem_<timm model name>`` (a timm ViT goes to the
ViT family, :mod:`cfcd.models.vit`: ``vit_dinov2_*``, ``vit_clip_*``, ``vit_timm``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cfcd.errors import CfcdError, InputError
from cfcd.utils.registry import Registry

DEFAULT_MODEL = "gem_efficientnet_lite2"
RANDOM_WEIGHTS = "random"  # weights=RANDOM_WEIGHTS: an explicit random initialisation


@dataclass
class ModelEntry:
    name: str
    builder: Callable[..., Any]
    family: str
    defaults: dict[str, Any] = field(default_factory=dict)
    embedded: Callable[[Any], None] | None = None  # loads weights shipped with an installed package
    description: str = ""
    # query box to pixels: "truncate" (int(), the CFCD/DOLG reference code) or "round" (revisitop / PIL crop)
    crop_rule: str = "round"


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, builder: Callable[..., Any], *, family: str, defaults: dict[str, Any] | None = None,
                   embedded: Callable[[Any], None] | None = None, description: str = "",
                   crop_rule: str = "round") -> ModelEntry:
    """Register ``name``; ``create(name, **kw)`` calls ``builder(**{**defaults, **kw})``."""
    if crop_rule not in ("truncate", "round"):
        raise ValueError(f"crop_rule must be 'truncate' or 'round', got {crop_rule!r}")
    entry = ModelEntry(name, builder, family, dict(defaults or {}), embedded, description, crop_rule)
    return MODELS.register(name, entry)


def list_models() -> list[str]:
    """Registered names (``gem_<timm name>`` also works for any timm model)."""
    _ensure_builtin()
    return MODELS.names()


def embedded_models() -> list[str]:
    """Names of the models that ship their weights (usable without ``weights=``)."""
    _ensure_builtin()
    return [n for n, e in MODELS.items() if e.embedded is not None]


def has_embedded_weights(name: str) -> bool:
    return get_entry(name).embedded is not None


def get_entry(name: str) -> ModelEntry:
    _ensure_builtin()
    if name in MODELS:
        return MODELS.get(name)
    if name.startswith("gem_"):
        from cfcd.models._compat import import_timm

        backbone = name[len("gem_"):]
        from cfcd.models.vit import is_vit_backbone

        if is_vit_backbone(backbone):  # tokens, not a map: the ViT family pools the patch-token map
            base = MODELS.get("vit_timm")
            return ModelEntry(name, base.builder, "vit", {**base.defaults, "backbone": backbone, "pooling": "gem"},
                              description=f"GeM of the patch-token map of timm {backbone}")
        if import_timm().is_model(backbone):
            base = MODELS.get("gem_timm")
            return ModelEntry(name, base.builder, "gem", {**base.defaults, "backbone": backbone},
                              description=f"GeM on timm {backbone}")
    raise InputError(f"unknown model {name!r}; known: {', '.join(list_models())}, or gem_<timm model name>")


def _config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        out[k] = v.to_dict() if hasattr(v, "to_dict") else copy.deepcopy(v)
    return out


def create(name: str, weights: str | Path | None = None, *, strict: bool = True, pretrained: bool | None = None,
           format: str = "auto", **kwargs: Any):
    """Build a registered model, in eval mode, optionally loading weights.

    Args:
        name: registry name (see :func:`list_models`).
        weights: ``"random"`` for an explicitly random initialisation, or a checkpoint file of any supported format (official ``.pyth``/``.pth``/``.pt``,
            torchvision/timm state dict) or a directory/``.safetensors`` written by ``cfcd convert``.
            Architecture switches recorded in, or implied by, the checkpoint (learnable p, ASPP, BN,
            whitening, output size, backbone depth) are applied unless overridden by ``kwargs``.
        strict: fail on any missing/unexpected/wrongly-shaped tensor (the classifier ``desc_cls`` and
            ImageNet heads are expected leftovers, returned in ``model.load_report.extra``).
        pretrained: load the embedded weights when ``weights`` is None. Defaults to True for the models
            that have them (``gem_efficientnet_lite*``). A model without embedded weights and no
            ``weights`` is refused unless it is asked for explicitly (``weights="random"`` or
            ``pretrained=False``, as timm's ``pretrained=False``): random descriptors are never silent.
        format: force the checkpoint format instead of auto-detection.
        kwargs: constructor options of the model class.

    The returned model has ``model_config`` (``{"name", "kwargs"}``), ``preprocess``, ``embedding_dim``
    and, when weights were given, ``load_report`` (:class:`~cfcd.models.checkpoints.LoadReport`).
    """
    from cfcd.models.checkpoints import load_weights, read_checkpoint

    entry = get_entry(name)
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS:
        if pretrained:
            raise InputError(f"{name}: weights='random' contradicts pretrained=True")
        weights, pretrained = None, False
    if weights is None and pretrained is None and entry.embedded is None:
        raise InputError(
            f"{name} has no embedded weights: pass weights=FILE (an official checkpoint or a 'cfcd convert' "
            f"output; --weights FILE on the command line), or weights='random' (--weights random) for a "
            f"randomly initialised model; models with embedded weights: {', '.join(embedded_models())}"
        )
    ckpt = None
    merged = dict(entry.defaults)
    if weights is not None:
        ckpt = read_checkpoint(weights, format=format)
        if ckpt.model_name and ckpt.format == "cfcd-safetensors" and ckpt.model_name != name:
            raise CfcdError(f"{weights}: holds a {ckpt.model_name!r} model, not {name!r}")
        if ckpt.model_name and ckpt.format != "cfcd-safetensors":
            implied = get_entry(ckpt.model_name)
            if implied.family != entry.family:
                raise CfcdError(f"{weights}: is a {ckpt.format} checkpoint ({ckpt.model_name}), not a {name} model")
        implied_backbone = ckpt.model_kwargs.get("backbone")
        if (implied_backbone and "backbone" in entry.defaults and implied_backbone != entry.defaults["backbone"]
                and "backbone" not in kwargs and ckpt.format != "cfcd-safetensors"):
            raise CfcdError(f"{weights}: is a {implied_backbone} checkpoint but {name} uses "
                            f"{entry.defaults['backbone']}" + (f"; use {ckpt.model_name}" if ckpt.model_name else ""))
        family_keys = _accepted_kwargs(entry)
        merged.update({k: v for k, v in ckpt.model_kwargs.items() if family_keys is None or k in family_keys})
    merged.update(kwargs)
    try:
        model = entry.builder(**merged)
    except (TypeError, ValueError) as exc:
        raise InputError(f"cannot build {name} with {merged}: {exc}") from None
    model.model_config = {"name": name, "kwargs": _config_kwargs(merged)}
    if ckpt is not None:
        model.load_report = load_weights(model, ckpt, strict=strict)
    elif pretrained or (pretrained is None and entry.embedded is not None):
        if entry.embedded is None:
            raise InputError(f"{name} has no embedded weights; pass weights=FILE (see cfcd convert)")
        entry.embedded(model)
    return model.eval()


def _accepted_kwargs(entry: ModelEntry) -> set[str] | None:
    import inspect

    try:
        params = inspect.signature(entry.builder).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


_BUILTIN_DONE = False


def _ensure_builtin() -> None:
    """Import the built-in families; each registers its models and checkpoint formats (timm's pattern)."""
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    import cfcd.models.backbones  # noqa: F401 - pycls, torchvision/timm ResNet checkpoints
    import cfcd.models.cfcd_net  # noqa: F401
    import cfcd.models.dolg  # noqa: F401
    import cfcd.models.efficientnet_lite  # noqa: F401 - gem_efficientnet_lite*: GeM with embedded weights
    import cfcd.models.gem  # noqa: F401
    import cfcd.models.vit  # noqa: F401


def describe_models() -> list[dict[str, Any]]:
    """One row per registered model: family, output dimension, input convention, embedded weights.

    The models are built on PyTorch's meta device, so no memory is allocated and nothing is loaded.
    """
    import torch

    rows = []
    for name in list_models():
        entry = MODELS.get(name)
        row: dict[str, Any] = {"name": name, "family": entry.family, "embedded_weights": entry.embedded is not None,
                               "description": entry.description}
        try:
            with torch.device("meta"):
                model = entry.builder(**entry.defaults)
            pre = model.preprocess
            row.update(dim=int(model.embedding_dim), channel_order=pre.channel_order,
                       mean=list(pre.mean), std=list(pre.std), input_size=pre.input_size)
        except Exception as exc:  # a third-party registration that cannot be built without arguments
            row.update(dim=None, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows
