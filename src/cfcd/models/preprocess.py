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
