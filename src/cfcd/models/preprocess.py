"""Per-model input normalisation.

Every model carries a :class:`Preprocess`: the channel order it was trained with and the
mean/std in that same order. ``network input = (image in channel_order, float in [0, 1] - mean) / std``.

- CFCD and DOLG (pycls pipeline): images decoded by ``cv2.imread`` are **BGR**; mean/std are
  the ImageNet values reversed into BGR order, ``[0.406, 0.456, 0.485]`` / ``[0.225, 0.224, 0.229]``.
- cirtorch / dirtorch GeM ResNets: **RGB** with the ImageNet mean/std.
- EfficientNet-Lite (TF weights): **RGB** with mean = std = 0.5, i.e. inputs in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How to turn a decoded image into the network input (see module docstring)."""

    channel_order: str = "RGB"
    mean: tuple[float, float, float] = IMAGENET_MEAN_RGB
    std: tuple[float, float, float] = IMAGENET_STD_RGB
    input_size: int | None = None  # native square size of the pretrained weights, if any

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', not {self.channel_order!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got {self.mean} / {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocess":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})

    @classmethod
    def coerce(cls, obj: Any) -> "Preprocess":
        """A :class:`Preprocess` from itself, a plain dict (checkpoint metadata) or ``None``
        (the CFCD/DOLG reference normalisation, BGR ImageNet)."""
        if obj is None:
            return BGR_IMAGENET
        if isinstance(obj, cls):
            return obj
        get = obj.get if isinstance(obj, dict) else lambda k, d=None: getattr(obj, k, d)
        order = str(get("channel_order")).upper()
        if order not in ("BGR", "RGB"):
            from cfcd.errors import InputError

            raise InputError(f"model preprocess channel_order must be BGR or RGB, got {order!r}")
        return cls(order, tuple(get("mean")), tuple(get("std")), get("input_size", None))

    def _order_for(self, input_order: str) -> bool:
        """Whether an image decoded in ``input_order`` must be channel-reversed for this model."""
        input_order = str(input_order).upper()
        if input_order not in ("RGB", "BGR"):
            raise ValueError(f"input_order must be 'RGB' or 'BGR', not {input_order!r}")
        return input_order != self.channel_order

    def scale_shift(self, device=None, dtype=None, *, pixel_scale: float = 255.0):
        """``(mean, std)`` tensors 1 x 3 x 1 x 1 for inputs in ``[0, pixel_scale]``, in this model's
        channel order: the /255 is folded into them (``mean * 255``, ``std * 255`` computed in float64,
        then cast), which is the arithmetic of the batched extraction path."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        mean = torch.tensor([m * pixel_scale for m in self.mean], dtype=dtype, device=device)
        std = torch.tensor([s * pixel_scale for s in self.std], dtype=dtype, device=device)
        return mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)

    def normalise_nhwc_u8(self, images, mean=None, std=None, *, input_order: str = "RGB", contiguous: bool = True):
        """B x H x W x 3 uint8 (or 0-255 float) tensor -> B x 3 x H x W float32 ``(x - 255 mean) / (255 std)``.

        ``mean``/``std`` are :meth:`scale_shift`'s (pass them to avoid a host copy per call). With
        ``contiguous=False`` the result keeps the permuted (channels_last) strides. Never in place."""
        x = images.permute(0, 3, 1, 2)
        if self._order_for(input_order):
            x = x.flip(1)
        x = x.float()
        if mean is None or std is None:
            mean, std = self.scale_shift(x.device, x.dtype)
        x = (x - mean) / std
        return x.contiguous() if contiguous else x

    def normalise_numpy(self, image, *, input_order: str | None = None, layout: str = "HWC", from_u8: bool = True,
                        out=None):
        """numpy normalisation in float32: ``(x / 255 - mean) / std`` (``from_u8``) or ``(x - mean) / std``.

        ``input_order`` defaults to this model's order (no reorder). ``layout`` is ``"HWC"`` or
        ``"CHW"``. ``out="inplace"`` writes into ``image`` when it is a C-contiguous float32 array (the
        transforms' own buffer; a reorder or any other view is copied first), the training transforms' arithmetic, same values as the plain formula."""
        import numpy as np

        if layout not in ("HWC", "CHW"):
            raise ValueError(f"layout must be 'HWC' or 'CHW', not {layout!r}")
        shape = (3, 1, 1) if layout == "CHW" else (3,)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(shape)
        x = image
        if input_order is not None and self._order_for(input_order):
            x = x[::-1] if layout == "CHW" else x[..., ::-1]
        if out == "inplace":
            if from_u8:
                raise ValueError("in-place normalisation expects [0, 1] float32 input (from_u8=False)")
            # only a C-contiguous float32 buffer is written; any other view is copied first
            if x is not image or x.dtype != np.float32 or not x.flags.writeable or not x.flags.c_contiguous:
                x = np.ascontiguousarray(x, dtype=np.float32)
            x -= mean
            x /= std
            return x
        if from_u8:
            x = x / 255.0
        return (x - mean) / std

    def __call__(self, images_rgb):
        """Normalise a float tensor B x 3 x H x W (or 3 x H x W) of **RGB** values in [0, 1].

        The channels are reordered to ``channel_order`` first, so callers always decode to RGB.
        """
        import torch

        x = images_rgb
        if self.channel_order == "BGR":
            x = x.flip(-3)
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std


BGR_IMAGENET = Preprocess("BGR", IMAGENET_MEAN_RGB[::-1], IMAGENET_STD_RGB[::-1])
RGB_IMAGENET = Preprocess("RGB", IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)
